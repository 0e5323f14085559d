"""Taking a pipeline for one command, the way a daemon takes it.

Commands that write a pipeline's checkpoint or rebuild its records (``syncd snapshot``,
``syncd tokens set`` and ``reset``) hold the pipeline while they work, with a fresh
fencing epoch claimed on the checkpoint, so that every older writer is fenced off:

* with leases (the MongoDB checkpoint store and ``lease.enabled``), the command takes
  the pipeline's lease like a daemon would, renews it while it works and releases it
  at the end. A live daemon holding the lease makes it refuse (exit 7), unless
  ``force`` or the pipeline is halted (a halted pipeline writes nothing, and the
  hints of some halts name these commands): that fences the daemon out (its next
  checkpoint write and lease renewal fail, it stops the pipeline, and takes it again
  once the command is done);
* without leases, nothing says whether a daemon runs the pipeline; the command claims
  the stored epoch plus one, so a daemon still running it stops (exit 7) at its next
  checkpoint write instead of overwriting the command's work.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from syncd import halts, hints
from syncd.errors import CheckpointCorruptError, ExitCode, LeaseLostError, SyncdError
from syncd.lease import (
    LeaseInfo,
    LeaseManager,
    lease_info,
    leases_collection,
    new_owner,
    uses_leases,
)

if TYPE_CHECKING:
    from syncd.runtime import Runtime

log = logging.getLogger(__name__)

LOST_HINT = (
    "another process took the pipeline over while this command ran; stop it (or wait "
    "until it is done), then run this command again"
)


class PipelineBusyError(SyncdError):
    """A live daemon holds the pipeline's lease."""

    exit_code = ExitCode.LEASE


@dataclasses.dataclass(frozen=True)
class Hold:
    """The pipeline, held by this command: its epoch, and a check that it still is."""

    pipeline: str
    epoch: int
    check: Callable[[], None]  # raises LeaseLostError once the lease is no longer ours


def _halted(runtime: Runtime, name: str) -> bool:
    """A halt holds the pipeline: its process writes nothing, so a command may take it
    (the process lets the pipeline go, and takes it again after the command)."""
    try:
        return halts.active(runtime.store.load(name)) is not None
    except CheckpointCorruptError:
        return False


def lease_of(runtime: Runtime, name: str) -> LeaseInfo | None:
    """The pipeline's lease as stored (None without the MongoDB checkpoint store)."""
    if runtime.settings.checkpoint.store != "mongodb":
        return None
    return lease_info(leases_collection(runtime.mongo, runtime.settings.checkpoint.database), name)


def ensure_free(runtime: Runtime, name: str, *, force: bool, command: str) -> LeaseInfo | None:
    """Refuse (PipelineBusyError) while a live daemon holds the lease, unless forced.

    ``command`` is the command line being run, named in the hint with ``--force``.
    """
    lease = lease_of(runtime, name)
    if lease is not None and lease.live and not force:
        raise _busy(name, lease, command)
    return lease


@contextmanager
def exclusive(
    runtime: Runtime,
    name: str,
    *,
    force: bool,
    command: str,
    who: str,
    unreadable_ok: bool = False,
    configured: bool = True,
) -> Iterator[Hold]:
    """Hold pipeline ``name`` with a fresh epoch while the block runs; see the module doc.

    ``command`` is the command line being run (the busy hint names it with ``--force``);
    ``who`` prefixes the lease owner, e.g. ``syncd-snapshot``. ``unreadable_ok`` (for
    ``tokens reset``, whose job is to delete it): a checkpoint whose epoch cannot be read
    does not stop the command; without leases it yields epoch 0, with leases the
    checkpoint is deleted before the lease is taken again. ``configured`` false: ``name``
    is not a configured pipeline's but a rebuild's (see :mod:`syncd.rebuild`).
    """
    if configured:
        runtime.settings.pipeline(name)  # an unknown name is a ConfigError; take nothing for it
    if not uses_leases(runtime.settings):
        try:
            epoch = runtime.store.next_epoch(name)
        except CheckpointCorruptError:
            if not unreadable_ok:
                raise
            epoch = 0
        with _explained():
            yield Hold(name, epoch, lambda: None)
        return
    if not force and _halted(runtime, name):
        log.info("pipeline %s is halted: taking it from the process that holds it", name)
        force = True
    ensure_free(runtime, name, force=force, command=command)
    leases = LeaseManager(
        runtime.mongo,
        runtime.settings.checkpoint.database,
        runtime.settings.lease,
        runtime.store,
        owner=new_owner(f"{who}@"),
    )
    try:
        taken = leases.acquire(name, force=force)
    except CheckpointCorruptError:
        if not unreadable_ok:
            raise
        runtime.store.delete(name)  # its epoch cannot be read: start the fencing over
        taken = leases.acquire(name, force=force)
    if taken is None:
        raise _busy(name, lease_of(runtime, name), command)
    leases.start_renewing()  # a snapshot can outlast many TTLs

    def check() -> None:
        # A lease that lapsed while MongoDB was unreachable is taken back when no other
        # process took it; MongoDB still unreachable raises its outage error.
        if not leases.holds(name) and not leases.reclaim(name, taken):
            raise LeaseLostError(
                "this command no longer holds the pipeline's lease; not writing",
                hint=LOST_HINT,
                pipeline=name,
            )

    try:
        with _explained():
            yield Hold(name, taken, check)
    finally:
        leases.close()  # stops renewing and releases the lease


@contextmanager
def _explained() -> Iterator[None]:
    """A fenced checkpoint write inside a command says what to do about it."""
    try:
        yield
    except LeaseLostError as exc:
        exc.with_context(hint=LOST_HINT)
        raise


def _busy(name: str, lease: LeaseInfo | None, command: str) -> PipelineBusyError:
    holder = "another process"
    if lease is not None:
        until = f"{lease.expires_at:%Y-%m-%dT%H:%M:%SZ}" if lease.expires_at else "-"
        holder = f"{lease.owner} (lease epoch {lease.epoch}, until {until})"
    return PipelineBusyError(
        f"pipeline {name!r} is running in {holder}",
        hint=f"stop that daemon first, or run `{hints.with_flags(command, '--force')}` to "
        "fence it out (it stops the pipeline at once and takes it again when this command "
        "is done)",
        pipeline=name,
    )

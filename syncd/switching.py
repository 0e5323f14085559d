"""A rebuild's record, and the switch of a pipeline's Chroma collection.

``syncd rebuild PIPELINE`` builds a new collection beside the live one and then
switches: the configured collection name serves the new records, and the old
collection is kept under a versioned name for a rollback. What the rebuild has done is
recorded in the checkpoint store, in a document of its own named ``PIPELINE~switch``
('~' is not allowed in a pipeline name, so it never collides with one), as
:class:`~syncd.checkpoint.Checkpoint` ``rebuild``::

    {"state": "building" | "switching" | "switched",
     "generation": N,              # the live collection is version N (1 before any rebuild)
     "target": "NAME--vN+1",       # while building: where the new collection is built
     "switch": {...},              # while switching: everything the switch needs
     "previous": {...} | None}     # the collection kept for rollback, with its position

Dead letters follow their collection: at the switch the pipeline's own are parked
under ``PIPELINE~collection:ID`` (the id of the collection switched away from), and
those of the collection switched to (the build's, ``PIPELINE~rebuild``, or the parked
ones on a rollback) become the pipeline's, so `syncd dlq list PIPELINE` shows what the
live collection lacks. `--drop-previous` deletes the parked ones with their collection.

A switch (and a rollback, which is a switch back) is done so that a crash at any
instant leaves it done or resumable: the intent is recorded first, then the two
renames are made (each checked by collection id, so a repeated step is skipped), the
dead letters are moved (each move recorded in the intent once done), the live
checkpoint is written (new fingerprint, collection id and position), and last the
intent is cleared. While an intent is recorded, a daemon does not stream the pipeline
(:func:`check_start` raises a transient error): re-running the command completes it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from syncd import hints
from syncd.checkpoint import Checkpoint, CheckpointStore
from syncd.deadletter import DeadLetterStore
from syncd.errors import (
    ConfigError,
    MappingSwitchedError,
    SinkLostError,
    SyncdError,
    from_sink,
)

log = logging.getLogger(__name__)

BUILD_SUFFIX = "~rebuild"  # the build's own checkpoint and lease
RECORD_SUFFIX = "~switch"  # the rebuild's record
PARKED_SUFFIX = "~collection:"  # dead letters of a collection kept for a rollback

# What a live checkpoint carries from one collection to the next.
POSITION_FIELDS = ("token", "token_is_invalidate", "start_at", "cluster_time", "counts")


def build_name(pipeline: str) -> str:
    return f"{pipeline}{BUILD_SUFFIX}"


def record_name(pipeline: str) -> str:
    return f"{pipeline}{RECORD_SUFFIX}"


def parked_letters(pipeline: str, collection_id: str | None) -> str:
    """Whose dead letters those of a collection kept for a rollback are."""
    return f"{pipeline}{PARKED_SUFFIX}{collection_id}"


def internal_owner(name: str) -> tuple[str, str] | None:
    """(pipeline, what) for a name syncd keeps for a rebuild ("rebuild", "switch" or
    "collection:ID"), None for a pipeline's own name."""
    pipeline, sep, rest = name.partition("~")
    return (pipeline, rest) if sep else None


def versioned(collection: str, generation: int) -> str:
    return f"{collection}--v{generation}"


def load_record(store: CheckpointStore, pipeline: str) -> dict[str, Any]:
    cp = store.load(record_name(pipeline))
    return dict(cp.rebuild or {}) if cp is not None else {}


def kept_previous(record: Mapping[str, Any], pipeline: str) -> ConfigError | None:
    """Why a new rebuild of ``pipeline`` (its rebuild's record ``record``) may not begin:
    the previous collection of the last one is still kept, for a rollback. None when it
    may, or when one is under way (building or switching: continued, not begun)."""
    previous = record.get("previous")
    if record.get("state") in ("building", "switching") or not previous:
        return None
    return ConfigError(
        f"the previous collection {previous['name']!r} of {pipeline} is still kept from the "
        "last rebuild",
        hint=f"run `{hints.command('rebuild', pipeline, '--drop-previous')}` first (or "
        f"`{hints.command('rebuild', pipeline, '--rollback')}` to go back to it)",
        pipeline=pipeline,
    )


def save_record(store: CheckpointStore, pipeline: str, record: Mapping[str, Any]) -> None:
    """Written only by the holder of the build's lease (checked by the caller)."""
    cp = Checkpoint(
        pipeline=record_name(pipeline),
        fingerprint=str(record.get("fingerprint", "")),
        rebuild=dict(record),
    )
    store.save(cp, history_reason=f"rebuild {record.get('state', '?')}")


def position_of(cp: Checkpoint) -> dict[str, Any]:
    out = {field: getattr(cp, field) for field in POSITION_FIELDS}
    out["counts"] = dict(cp.counts)
    out["fingerprint"] = cp.fingerprint
    return out


# --- what a daemon does about it ------------------------------------------------------


def check_start(
    store: CheckpointStore,
    pipeline: str,
    fingerprint: str,
    cp: Checkpoint,
    *,
    rebuilds: bool = False,
) -> None:
    """Raise MappingSwitchedError when the pipeline must not stream with ``fingerprint``.

    * a switch is in progress (a crashed `syncd rebuild`): wait until it is completed;
    * the checkpoint has another mapping than this process, and a rebuild switched the
      pipeline to that mapping (this process runs the old configuration), or a rebuild
      to this process's mapping is under way (this process runs the new one early);
    * ``rebuilds`` (``on_mapping_change = "rebuild"``): the checkpoint has another
      mapping than this process, and another build (to a third mapping) holds the
      pipeline's ``~rebuild``: one build at a time, this process waits for it; or the
      checkpoint was written with another mapping since this process started it, and
      a running pipeline does not rebuild by itself (only a start does).

    Transient: the pipeline writes nothing, reports not ready with the reason, and
    starts by itself once the checkpoint matches (after a restart with the other
    configuration, a rollback, or the switch). Other mismatches are left to the caller.
    """
    record = load_record(store, pipeline)
    if not record:
        if rebuilds and cp.fingerprint != fingerprint:
            raise _changed_under(pipeline)
        return
    if record.get("state") == "switching":
        raise MappingSwitchedError(
            "a rebuild is switching this pipeline's Chroma collection",
            hint=f"wait for it, or, if `{hints.command('rebuild', pipeline)}` was interrupted, "
            "run it again to complete the switch",
            pipeline=pipeline,
        )
    if cp.fingerprint == fingerprint:
        return
    if record.get("state") == "switched" and record.get("fingerprint") == cp.fingerprint:
        raise MappingSwitchedError(
            "the pipeline was rebuilt with another mapping than this process's "
            "configuration; not writing the old mapping into the new collection",
            hint="restart syncd with the configuration the rebuild used"
            + _rollback_hint(pipeline, record.get("previous")),
            pipeline=pipeline,
        )
    if record.get("state") == "building" and record.get("fingerprint") == fingerprint:
        raise MappingSwitchedError(
            "a rebuild with this process's mapping is under way; the pipeline starts once "
            "it has switched",
            hint=f"`{hints.command('rebuild', pipeline)}` finishes it; `{hints.command('status')}` "
            "shows its progress",
            pipeline=pipeline,
        )
    if not rebuilds:
        return
    if record.get("state") == "building":
        raise MappingSwitchedError(
            f"another rebuild of this pipeline, to a mapping other than this process's, is "
            f"under way (its build {build_name(pipeline)!r} into {record.get('target')!r}); "
            "waiting for it, one build at a time",
            hint=f"`{hints.command('status')}` shows its progress; once it has switched, "
            "restart syncd with the configuration it used",
            pipeline=pipeline,
        )
    raise _changed_under(pipeline)


def _changed_under(pipeline: str) -> MappingSwitchedError:
    """The checkpoint was written with another mapping while this process (with
    ``on_mapping_change = "rebuild"``) streamed the pipeline: it writes nothing."""
    return MappingSwitchedError(
        "the pipeline's records were written with another mapping than this process's "
        "since it started; not writing this mapping into them",
        hint="restart syncd with the configuration those records were written with (a "
        'start with this one and on_mapping_change = "rebuild" rebuilds the pipeline to '
        "this mapping)",
        pipeline=pipeline,
    )


def _rollback_hint(pipeline: str, previous: Mapping[str, Any] | None) -> str:
    """How to go back, if the previous collection is kept: after `--drop-previous` it
    is gone, and there is nothing to roll back to."""
    if not previous:
        return ""
    return (
        f" (or run `{hints.command('rebuild', pipeline, '--rollback')}` to go back to the "
        f"previous collection {previous.get('name')!r})"
    )


# --- the switch -------------------------------------------------------------------------


def collections(client: Any, namespace: str) -> dict[str, str]:
    """Every Chroma collection of the database, id -> name."""
    try:
        found = client.list_collections()
    except Exception as exc:
        raise from_sink(exc, namespace=namespace) from exc
    return {str(coll.id): str(coll.name) for coll in found}


def rename(client: Any, current: str, new: str) -> None:
    try:
        client.get_collection(current, embedding_function=None).modify(name=new)
    except Exception as exc:
        raise from_sink(exc, namespace=f"chroma:{current}") from exc
    log.info("renamed Chroma collection %s to %s", current, new)


EMPTY_BATCH = 1_000  # records deleted per request before a collection is deleted


def delete(client: Any, name: str) -> None:
    """Delete a collection, its records first.

    Deleting a collection that holds list-valued metadata leaves those values in
    Chroma's storage, and records created later (in any collection) that reuse their
    rows inherit them (chromadb 1.5); deleting the records first leaves nothing behind.
    """
    try:
        coll = client.get_collection(name, embedding_function=None)
        emptied = 0
        while ids := coll.get(limit=EMPTY_BATCH, include=[])["ids"]:
            coll.delete(ids=ids)
            emptied += len(ids)
        client.delete_collection(name)
    except Exception as exc:
        raise from_sink(exc, namespace=f"chroma:{name}") from exc
    log.info("deleted Chroma collection %s (%d records)", name, emptied)


def complete(
    store: CheckpointStore,
    client: Any,
    pipeline: str,
    record: dict[str, Any],
    *,
    epoch: int,
    letters: DeadLetterStore | None = None,
) -> dict[str, Any]:
    """Finish the switch recorded in ``record`` (state "switching"); the record after it.

    Each step looks first whether it was done: run again after a crash at any point, it
    ends in the same state. ``epoch`` is the live pipeline's, held by the caller.
    """
    switch = record["switch"]
    live_name = switch["live_name"]
    out_id, in_id = switch["out"]["id"], switch["in"]["id"]
    names = collections(client, f"chroma:{live_name}")
    if in_id not in names:
        if out_id in names and names[out_id] != live_name and live_name not in names.values():
            rename(client, names[out_id], live_name)  # renamed away before the crash: back
            names[out_id] = live_name
        if out_id is None or names.get(out_id) == live_name:
            abandon(store, pipeline, record)  # the live one serves on, as before the switch
        raise SinkLostError(
            f"the Chroma collection {switch['in']['name']!r} (id {in_id}) to switch to is "
            f"gone; {live_name!r} still serves the collection it served",
            hint=f"run `{hints.command('rebuild', pipeline)}` again: it builds the new "
            "collection anew"
            if switch.get("was") != "switched"  # a rollback's: the kept collection is gone
            else f"there is nothing to roll back to: {live_name!r} serves on unchanged",
            pipeline=pipeline,
        )
    if out_id is not None and names.get(out_id) == live_name:
        rename(client, live_name, switch["out"]["name"])
    if names.get(in_id) != live_name:
        if live_name in names.values() and names.get(out_id) != live_name:
            raise SyncdError(
                f"another Chroma collection named {live_name!r} appeared during the switch",
                hint=f"rename or delete it, then run `{hints.command('rebuild', pipeline)}` again",
                pipeline=pipeline,
            )
        rename(client, names[in_id], live_name)
    if letters is not None:
        record = move_letters(store, letters, pipeline, record)
        switch = record["switch"]
    write_live(store, pipeline, switch, epoch)
    store.delete(build_name(pipeline))  # the build's position now is the live one
    done = {key: value for key, value in record.items() if key != "switch"}
    done.update(switch["after"])
    done["state"] = "switched"
    save_record(store, pipeline, done)
    return done


def abandon(store: CheckpointStore, pipeline: str, record: dict[str, Any]) -> None:
    """Forget a switch whose collection to switch to is gone, before any rename: the
    record as it was before the intent, without that collection."""
    switch = record["switch"]
    restored = {key: value for key, value in record.items() if key != "switch"}
    restored["state"] = switch.get("was") or "switched"
    previous = restored.get("previous") or {}
    if previous.get("id") == switch["in"]["id"]:
        restored["previous"] = None  # a rollback's target: kept no more
    if restored["state"] == "building":
        restored["target"] = restored.get("target") or switch["in"]["name"]
        store.delete(build_name(pipeline))  # its collection is gone: the next run starts over
    save_record(store, pipeline, restored)
    log.warning(
        "abandoned the switch of %s: the collection %r to switch to is gone",
        pipeline, switch["in"]["name"], extra={"pipeline": pipeline},
    )  # fmt: skip


def move_letters(
    store: CheckpointStore, letters: DeadLetterStore, pipeline: str, record: dict[str, Any]
) -> dict[str, Any]:
    """Park the live collection's dead letters, then give the pipeline those of the
    collection switched to (a step of :func:`complete`). Each move is recorded in the
    intent once done: moved again after a crash, a move only finishes what it began
    (no daemon writes dead letters of the pipeline while the intent is recorded)."""
    stored = load_record(store, pipeline)
    if stored.get("state") != "switching":
        return record  # the switch was completed: its record is cleared last
    switch = dict(record["switch"])
    done = int((stored.get("switch") or switch).get("letters_moved", 0))
    moves = [
        (pipeline, parked_letters(pipeline, switch["out"]["id"])),
        (switch["in"].get("letters") or parked_letters(pipeline, switch["in"]["id"]), pipeline),
    ]
    for step, (source, target) in enumerate(moves[done:], start=done + 1):
        moved = letters.move(source, target)
        if moved:
            log.info("moved %d dead letter(s) of %s to %s", moved, source, target)
        switch["letters_moved"] = step
        record = dict(record, switch=switch)
        save_record(store, pipeline, record)
    return record


def write_live(store: CheckpointStore, pipeline: str, switch: dict[str, Any], epoch: int) -> None:
    """The live checkpoint at the switched-to collection (a step of :func:`complete`)."""
    position = switch["in"]["position"]
    current = store.load(pipeline)
    if (
        current is not None
        and current.chroma_collection_id == switch["in"]["id"]
        and current.fingerprint == position["fingerprint"]
    ):
        return  # written before a crash; a daemon may have moved it on since
    cp = Checkpoint(
        pipeline=pipeline,
        fingerprint=position["fingerprint"],
        phase="streaming",
        chroma_collection_id=switch["in"]["id"],
        epoch=epoch,
    )
    for field in POSITION_FIELDS:
        setattr(cp, field, position.get(field))
    cp.counts = dict(position.get("counts") or {})
    store.save(cp, history_reason=f"switched to Chroma collection id {switch['in']['id']}")
    store.set_halt(pipeline, None)  # a halt held the other collection's position

"""Durable state for the stand-in: a snapshot file plus an append-only journal.

Every acknowledged write appends its records to ``journal.bson`` with one
``os.write`` before the reply is sent, so the records survive ``kill -9`` of the
process (``fsync=True`` also survives an OS crash). At start-up the snapshot is
loaded, the journal replayed, and, when the journal has grown, both are folded
into a new snapshot written to a temporary file, fsynced and renamed.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bson
from codec import CODEC as _CODEC

_LEN = struct.Struct("<i")


def _read_records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (end offset, record) for each whole record; stop at a torn tail."""
    if not path.exists():
        return
    data = path.read_bytes()
    pos = 0
    while pos + 4 <= len(data):
        (size,) = _LEN.unpack_from(data, pos)
        if size < 5 or pos + size > len(data):
            break
        try:
            record = bson.decode(data[pos : pos + size], _CODEC)
        except bson.errors.InvalidBSON:
            break
        pos += size
        yield pos, record


class Journal:
    def __init__(self, data_dir: Path, *, fsync: bool = False) -> None:
        self.dir = data_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.fsync = fsync
        self.snapshot_path = self.dir / "snapshot.bson"
        self.journal_path = self.dir / "journal.bson"
        self._fd: int | None = None
        self.records_since_snapshot = 0

    def load(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Return (snapshot records, journal records); truncate a torn journal tail."""
        snapshot = [rec for _, rec in _read_records(self.snapshot_path)]
        journal: list[dict[str, Any]] = []
        end = 0
        for end, rec in _read_records(self.journal_path):  # noqa: B007
            journal.append(rec)
        if self.journal_path.exists() and self.journal_path.stat().st_size != end:
            with self.journal_path.open("r+b") as fh:
                fh.truncate(end)
        self.records_since_snapshot = len(journal)
        return snapshot, journal

    def open(self) -> None:
        self._fd = os.open(self.journal_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def append(self, records: list[dict[str, Any]], *, sync: bool = False) -> None:
        if not records:
            return
        assert self._fd is not None
        payload = b"".join(bson.encode(rec, codec_options=_CODEC) for rec in records)
        view = memoryview(payload)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        if self.fsync or sync:
            os.fsync(self._fd)
        self.records_since_snapshot += len(records)

    def write_snapshot(self, records: Iterator[dict[str, Any]]) -> None:
        """Replace the snapshot atomically, then empty the journal it subsumes."""
        tmp = self.snapshot_path.with_suffix(".tmp")
        with tmp.open("wb") as fh:
            batch: list[bytes] = []
            for rec in records:
                batch.append(bson.encode(rec, codec_options=_CODEC))
                if len(batch) >= 1000:
                    fh.write(b"".join(batch))
                    batch.clear()
            fh.write(b"".join(batch))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.snapshot_path)
        dir_fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        # Journal records carry sequence numbers, so a crash between the rename and
        # this truncation only replays records the snapshot already holds (skipped).
        with self.journal_path.open("wb") as fh:
            fh.flush()
            os.fsync(fh.fileno())
        self.records_since_snapshot = 0
        self.open()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

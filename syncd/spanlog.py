"""A local, bounded log of synced events, so an operator can ask what happened to one id.

Each line is one JSON object: pipeline, document_id, operation, cluster_time, trace_id,
span_id, time and outcome (never document content). The file is capped: when the next
line would take it past ``max_bytes`` it is renamed to ``<path>.1`` (replacing the
previous one) and a new file is started, so at most about twice ``max_bytes`` is kept.
``find`` reads both files; ``syncd explain PIPELINE ID`` is built on it.
"""

from __future__ import annotations

import json
import os
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from syncd.errors import from_os_error
from syncd.redact import redact_mapping


class SpanLog:
    def __init__(self, path: str | os.PathLike[str], max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        self.path = Path(path)
        self.rotated_path = self.path.with_name(self.path.name + ".1")
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._file: IO[str] | None = None
        self._size = 0

    def append(self, record: dict[str, Any]) -> None:
        self.extend([record])

    def extend(self, records: Iterable[dict[str, Any]], *, redacted: bool = False) -> None:
        """Append several records with one flush (a batch's events).

        Every string is redacted on the way in, unless the caller says it ``redacted``
        every value already (the pipeline's records: redacting ids once serves both
        their span and their line here).
        """
        encode = _ENCODER.encode
        if redacted:
            lines = [encode(record) + "\n" for record in records]
        else:
            lines = [encode(redact_mapping(record)) + "\n" for record in records]
        if not lines:
            return
        with self._lock:
            handle = self._open()
            for line in lines:
                size = len(line)  # ASCII: the encoder escapes everything else
                if self._size and self._size + size > self.max_bytes:
                    handle = self._rotate()
                handle.write(line)
                self._size += size
            handle.flush()

    def find(self, pipeline: str, document_id: str, limit: int = 20) -> list[dict[str, Any]]:
        """The last ``limit`` records of one document, oldest first."""
        found: deque[dict[str, Any]] = deque(maxlen=max(limit, 0))
        with self._lock:
            if self._file is not None:
                self._file.flush()
            for record in self._records():
                if record.get("pipeline") == pipeline and record.get("document_id") == document_id:
                    found.append(record)
        return list(found)

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    def _open(self) -> IO[str]:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a", encoding="utf-8")
            self._size = self._file.tell()
            if self._size and not _ends_with_newline(self.path):
                self._file.write("\n")  # end a line a crash cut short; find() skips it
                self._size += 1
        return self._file

    def _rotate(self) -> IO[str]:
        if self._file is not None:
            self._file.close()
            self._file = None
        os.replace(self.path, self.rotated_path)
        return self._open()

    def _records(self) -> Iterator[dict[str, Any]]:
        for path in (self.rotated_path, self.path):
            try:
                handle = path.open(encoding="utf-8", errors="replace")
            except FileNotFoundError:
                continue
            except OSError as exc:  # a directory, or not ours to read: the setting is wrong
                raise from_os_error(exc, setting="telemetry.span_log_path") from exc
            with handle:
                for line in handle:
                    try:
                        record = json.loads(line)
                    except ValueError:
                        continue  # a line cut short by a crash
                    if isinstance(record, dict):
                        yield record


def _ends_with_newline(path: Path) -> bool:
    with path.open("rb") as handle:
        handle.seek(-1, os.SEEK_END)
        return handle.read(1) == b"\n"


# One encoder for every line: json.dumps with options builds a new one per call.
_ENCODER = json.JSONEncoder(separators=(",", ":"), default=str)

"""JSONL reading with counted rejections, and an append-only writer that resumes after a kill."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Iterator


def count_lines(path: str | Path) -> int:
    """Newlines in a file, read in 1 MiB chunks: a progress bar's total without parsing anything."""
    with open(path, "rb") as handle:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: handle.read(1 << 20), b""))


def read_jsonl(path: str | Path, rejected: Counter | None = None) -> Iterator[dict]:
    """Yield one dict per valid line. Bad lines are counted in `rejected` by reason, never raised."""
    rejected = rejected if rejected is not None else Counter()
    with open(path, "rb") as handle:
        for raw in handle:
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                rejected["not_utf8"] += 1
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError:
                rejected["malformed_json"] += 1
                continue
            if not isinstance(record, dict):
                rejected["not_an_object"] += 1
                continue
            yield record


def cut_torn_tail(path: str | Path) -> bytes:
    """Truncate an append-only JSONL file after its last complete line (a killed writer leaves at most
    one torn line; appending after it would fuse the next record into it and lose both). Returns the
    kept bytes; a missing file is b""."""
    path = Path(path)
    if not path.exists():
        return b""
    data = path.read_bytes()
    keep = data[: data.rfind(b"\n") + 1]
    if len(keep) != len(data):
        with open(path, "r+b") as handle:
            handle.truncate(len(keep))
    return keep


class ResumableJsonl:
    """Output of a stage (or one shard of it), written record by record.

    Records go to `<path>.partial` and are flushed and fsynced in batches. A killed run leaves at most
    one incomplete last line, which `open()` cuts off; the ids already written are skipped on resume.
    `finish()` renames the partial file to its final name, so a finished output is never partial, and a
    finished output makes the next run of the same shard a no-op.
    """

    def __init__(self, path: str | Path, id_key: str = "id", track_written: bool = True):
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.id_key = id_key
        # track_written=False: `done` holds only what a killed run left (for a caller whose stream never
        # repeats an id), so memory does not grow with the records written
        self.track_written = track_written
        self.done: set[str] = set()
        self.num_written = 0
        self._handle = None

    @property
    def finished(self) -> bool:
        return self.path.exists()

    def open(self) -> "ResumableJsonl":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for line in cut_torn_tail(self.partial).splitlines():
            self.done.add(str(json.loads(line)[self.id_key]))
        self._handle = open(self.partial, "ab")
        return self

    def write(self, records: Iterable[dict[str, Any]]) -> None:
        lines = [json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records]
        if not lines:
            return
        self._handle.write("".join(lines).encode("utf-8"))
        self._handle.flush()
        os.fsync(self._handle.fileno())
        if self.track_written:
            self.done.update(str(r[self.id_key]) for r in records)
        self.num_written += len(lines)

    def finish(self) -> Path:
        self.close()
        os.replace(self.partial, self.path)
        return self.path

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __enter__(self) -> "ResumableJsonl":
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

"""Write to a temp name beside the target, then rename: readers never see half a file or folder.

  atomic_file(path)     yields a temp file path; on success it is fsynced and renamed to `path`
  atomic_folder(path)   yields a temp folder; on success it replaces `path` as a whole
  build_once(path, fn)  builds a folder once (marked COMPLETE); concurrent builders race safely
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

COMPLETE_MARKER = "COMPLETE"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """`with atomic_file(p) as tmp:` write `tmp` (by path); it becomes `p` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file normal permissions
        os.replace(tmp, path)
    except OSError as err:
        # A failed write names no file (or the temp one, deleted below): name the file being written.
        if err.errno is not None and err.filename in (None, str(tmp)):
            raise OSError(err.errno, err.strerror or os.strerror(err.errno), str(path)) from err
        raise
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """`with atomic_folder(p) as tmp:` fill `tmp`; on success it replaces `p` (old contents removed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
    os.chmod(staging, 0o777 & ~_umask())
    try:
        yield staging
        old = path.parent / f".{path.name}.old-{os.getpid()}"
        if path.exists():
            os.replace(path, old)
        os.replace(staging, path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def build_once(path: str | Path, build: Callable[[Path], Any]) -> Path:
    """Return `path`, first running `build(tmp_folder)` unless a complete build is already there.
    Two processes may build at once: the first rename wins and the other's identical copy is dropped."""
    path = Path(path)
    if (path / COMPLETE_MARKER).exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
    try:
        build(staging)
        (staging / COMPLETE_MARKER).write_text("ok\n")
        try:
            os.rename(staging, path)  # fails if another process finished first
        except OSError:
            if not (path / COMPLETE_MARKER).exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")

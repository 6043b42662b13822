"""Atomic single-file writes: the one way nanoqwen writes a file that must never be seen half written.

The data is written into a private temporary folder beside the target (same file system, so the final rename is
atomic), `.tmp-<target name>.<pid>.<random>/`, fsynced, then renamed over the target. The folder also holds whatever
temporary files the writing library makes of its own (safetensors writes its own `.tmpXXXXXX` and renames it).
An interrupted write leaves the previous file as it was: on an exception (a full disk, a failed rename) the folder is
removed at once; a process killed mid-write cannot clean up, so the next write of the same file removes the folders
of earlier writers that are no longer running.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile


@contextlib.contextmanager
def atomic_path(path: str):
    """Yield a temporary path for `path`; on success fsync it and rename it over `path`, on failure remove it."""
    directory, name = os.path.split(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    remove_leftovers(directory, name)
    folder = tempfile.mkdtemp(dir=directory, prefix=f".tmp-{name}.{os.getpid()}.")
    tmp = os.path.join(folder, name)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def atomic_write(path: str, data: bytes | str) -> None:
    """Write `data` (text as UTF-8) to `path` atomically."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def remove_leftovers(directory: str, name: str) -> None:
    """Remove the temporary folders of earlier writes of `name` whose process is gone (killed mid-write); a writer
    still running (another process writing the same file) keeps its own."""
    prefix = f".tmp-{name}."
    for entry in os.listdir(directory):
        pid = re.fullmatch(r"(\d+)\.[a-z0-9_]+", entry[len(prefix):]) if entry.startswith(prefix) else None
        if pid and not _running(int(pid.group(1))):
            shutil.rmtree(os.path.join(directory, entry), ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    return True

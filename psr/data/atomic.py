"""Files written all at once: to a temporary sibling, then renamed over the target."""

import os
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _temporary_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")


_TEMPORARY = re.compile(r"^\..+\.[0-9a-f]{12}\.tmp$")


def remove_stale_temporaries(folder) -> list[Path]:
    """Remove the temporary files (`.<name>.<12 hex>.tmp`) that a writer killed in `folder` left
    behind; only for folders no other process is writing into. Returns the removed paths."""
    folder = Path(folder)
    stale = [p for p in folder.iterdir() if _TEMPORARY.match(p.name) and p.is_file()] if folder.is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def _sync(path: Path) -> None:
    """Flush a written file to the disk (so the rename never points at data still in flight)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_target(path) -> Iterator[Path]:
    """A temporary file next to `path` to write to: flushed to disk (fsync) and renamed over `path`
    when the block ends, removed when it raises, so a failure never leaves a partial file (a killed
    process leaves the temporary file: `remove_stale_temporaries`)."""
    path = Path(path)
    tmp = _temporary_sibling(path)
    try:
        yield tmp
        _sync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise

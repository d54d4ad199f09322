"""Files written all at once: to a temporary sibling, then renamed over the target."""

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _temporary_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")


@contextmanager
def atomic_target(path) -> Iterator[Path]:
    """A temporary file next to `path` to write to: renamed over `path` when the block ends, removed
    when it raises, so a failure never leaves a partial file."""
    path = Path(path)
    tmp = _temporary_sibling(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise

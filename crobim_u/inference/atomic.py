"""
Output files that are either complete or absent: each is written under a hidden temporary name beside its final name
and renamed into place (`os.replace`, atomic) once complete, so a run killed at any moment, or a write that fails,
leaves no half-written file under a final name.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


# Temporary outputs are named `.<final name>.partial`, and what a writer makes beside them starts with that name too.
PARTIAL_MARK = ".partial"


def partial_path(path: str | os.PathLike) -> Path:
    """The hidden temporary name of an output: `.<name>.partial` beside it."""
    path = Path(path)
    return path.with_name(f".{path.name}{PARTIAL_MARK}")


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[str]:
    """
    Yields a temporary path beside `path` to write to, and renames it to `path` once the writing succeeded.

    The rename (`os.replace`) is atomic: `path` either does not exist or is complete, whenever the process dies.
    """
    temporary = partial_path(path)
    try:
        yield str(temporary)
        os.replace(temporary, path)
    finally:
        _remove(temporary)


def remove_partial_outputs(folder: str | os.PathLike) -> None:
    """Deletes the temporary files and folders a killed run left in `folder` (see [`atomic_output`])."""
    for path in Path(folder).glob(f".*{PARTIAL_MARK}*"):
        _remove(path)


__all__ = ["PARTIAL_MARK", "atomic_output", "partial_path", "remove_partial_outputs"]

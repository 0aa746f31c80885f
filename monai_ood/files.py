"""Atomic file writes: readers see either the old file or the complete new one, never a part.

Every file monai-ood writes (maps, checkpoints, tables, caches, calibration JSON, pictures) goes through
:func:`atomic_write`, so an interrupted run never leaves a truncated output behind.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write", "atomic_write_text"]

# Writers that pick the format from the file name need the whole extension on the temporary file.
_DOUBLE_SUFFIXES = (".nii.gz", ".tar.gz")


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], overwrite: bool = False) -> Path:
    """Write ``path`` through a temporary file in the same folder and :func:`os.replace`.

    ``write`` is called with a temporary path that ends like ``path`` (so writers choose the format by
    extension); the temporary file is fsync'ed, then replaces ``path`` (atomic within a file system),
    and is removed if anything fails, Ctrl-C included. Missing parent folders are created.

    Args:
        path: the file to write.
        write: writes the content to the path it is given.
        overwrite: replace an existing ``path``.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is false.
        IsADirectoryError: ``path`` is a folder.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"output {str(path)!r} is a folder; give a file name")
    if path.exists() and not overwrite:
        raise FileExistsError(f"output {str(path)!r} already exists; pass --overwrite to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    name = path.name
    suffix = next((s for s in _DOUBLE_SUFFIXES if name.lower().endswith(s)), path.suffix)
    base = name[: len(name) - len(suffix)] if suffix else name
    # A fresh name rather than mkstemp: the writer creates the file, so it gets the usual umask
    # permissions (mkstemp's 0600 would survive os.replace).
    temporary = path.with_name(f".{base}.{uuid.uuid4().hex[:12]}.tmp{suffix}")
    try:
        write(temporary)
        if not temporary.exists():
            raise RuntimeError(f"the writer did not create {str(temporary)!r}")
        with open(temporary, "rb") as written:
            os.fsync(written.fileno())  # on disk before the rename, so a power cut cannot leave it empty
        if path.exists() and not overwrite:  # written meanwhile by someone else: keep theirs
            raise FileExistsError(f"output {str(path)!r} already exists; pass --overwrite to replace it")
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str, overwrite: bool = False) -> Path:
    """:func:`atomic_write` of UTF-8 text."""
    return atomic_write(path, lambda temporary: temporary.write_text(text, encoding="utf-8"), overwrite)

"""Atomic file writes: readers see either the old file or the complete new one, never a part.

Every file monai-ood writes (maps, checkpoints, tables, caches, calibration JSON, pictures) goes through
:func:`atomic_write`, so an interrupted run never leaves a truncated output behind. Several files that
belong together (the maps of one scored input) go through :class:`AtomicFileSet`: all of them appear,
or none. A killed process can leave its hidden temporary files (``.<name>.<12 hex>.tmp<suffix>``)
behind; :func:`remove_temporaries` clears them, under the :func:`lock_folder` lock that keeps a second
run out of a folder while one is writing there.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import time
import uuid
import warnings
from collections.abc import Callable, Collection, Iterator
from pathlib import Path

try:  # POSIX
    import fcntl
except ImportError:  # Windows
    fcntl = None

__all__ = [
    "LOCK_NAME",
    "AtomicFileSet",
    "FolderLockedError",
    "atomic_write",
    "atomic_write_text",
    "check_writable",
    "lock_folder",
    "remove_temporaries",
    "temporary_target",
]

# Writers that pick the format from the file name need the whole extension on the temporary file.
_DOUBLE_SUFFIXES = (".nii.gz", ".tar.gz")
# ".<base>.<12 hex>.tmp<suffix>" stands for "<base><suffix>" (see _temporary_path).
_TEMPORARY_NAME = re.compile(r"^\.(?P<base>.+)\.[0-9a-f]{12}\.tmp(?P<suffix>.*)$")
LOCK_NAME = ".monai-ood.lock"


def _temporary_path(path: Path) -> Path:
    name = path.name
    suffix = next((s for s in _DOUBLE_SUFFIXES if name.lower().endswith(s)), path.suffix)
    base = name[: len(name) - len(suffix)] if suffix else name
    # A fresh name rather than mkstemp: the writer creates the file, so it gets the usual umask
    # permissions (mkstemp's 0600 would survive os.replace).
    return path.with_name(f".{base}.{uuid.uuid4().hex[:12]}.tmp{suffix}")


def _check_target(path: Path, overwrite: bool) -> None:
    if path.is_dir():
        raise IsADirectoryError(f"output {str(path)!r} is a folder; give a file name")
    if path.exists() and not overwrite:
        raise FileExistsError(f"output {str(path)!r} already exists; pass --overwrite to replace it")


def _write_synced(temporary: Path, write: Callable[[Path], None]) -> None:
    write(temporary)
    if not temporary.exists():
        raise RuntimeError(f"the writer did not create {str(temporary)!r}")
    with open(temporary, "rb") as written:
        os.fsync(written.fileno())  # on disk before the rename, so a power cut cannot leave it empty


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
    _check_target(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = _temporary_path(path)
    try:
        _write_synced(temporary, write)
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


class AtomicFileSet:
    """Files published together: each is written under a temporary name beside it, then all are renamed.

    Used as a context manager, the set is committed (every file renamed into place) when the block ends
    normally, and discarded (every temporary file removed) when it raises, Ctrl-C included; if a rename
    fails half-way, the files already renamed are removed again. A process killed between two renames
    can leave part of a set, so a set must be recorded as complete elsewhere (``monai-ood score`` marks
    it ``ok`` in its table after the commit) and re-written when it is not.

    Args:
        overwrite: replace existing files.

    Example::

        with AtomicFileSet() as files:
            files.write("out/a_seg.nii.gz", lambda tmp: nib.save(seg, tmp))
            files.write("out/a_score.nii.gz", lambda tmp: nib.save(score, tmp))
        # both files exist, or (after an error) neither
    """

    def __init__(self, overwrite: bool = False) -> None:
        self.overwrite = overwrite
        self._staged: dict[Path, Path] = {}

    def write(self, path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
        """Write one file of the set to its temporary name (fsync'ed); it appears at :meth:`commit`.

        Raises:
            FileExistsError: ``path`` exists and ``overwrite`` is false.
            IsADirectoryError: ``path`` is a folder.
            ValueError: ``path`` is already in the set.
        """
        path = Path(path)
        if path in self._staged:
            raise ValueError(f"{str(path)!r} is written twice in one file set")
        _check_target(path, self.overwrite)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self._staged[path] = _temporary_path(path)
        try:
            _write_synced(temporary, write)
        except BaseException:
            del self._staged[path]
            with contextlib.suppress(OSError):
                temporary.unlink(missing_ok=True)
            raise
        return path

    def commit(self) -> list[Path]:
        """Rename every written file into place; on any failure none of them is left.

        Returns:
            The files of the set.
        """
        published: list[Path] = []
        try:
            for path in self._staged:
                _check_target(path, self.overwrite)  # all checked before the first rename
            for path, temporary in self._staged.items():
                os.replace(temporary, path)
                published.append(path)
        except BaseException:
            for path in published:
                with contextlib.suppress(OSError):
                    path.unlink()
            self.discard()
            raise
        self._staged = {}
        return published

    def discard(self) -> None:
        """Remove the temporary files written so far (best effort: a read-only folder keeps them)."""
        for temporary in self._staged.values():
            with contextlib.suppress(OSError):
                temporary.unlink(missing_ok=True)
        self._staged = {}

    def __enter__(self) -> AtomicFileSet:
        return self

    def __exit__(self, kind, error, trace) -> None:
        if kind is None:
            self.commit()
        else:
            self.discard()


def temporary_target(name: str) -> str | None:
    """The file name a temporary file of :func:`atomic_write` stands for, or ``None`` if it is not one.

    ``".scan_seg.0123456789ab.tmp.nii.gz"`` stands for ``"scan_seg.nii.gz"``; nested temporary files
    (a writer that itself writes atomically) are followed to the final name.
    """
    match = _TEMPORARY_NAME.match(name)
    if match is None:
        return None
    while match is not None:
        name = match["base"] + match["suffix"]
        match = _TEMPORARY_NAME.match(name)
    return name


def remove_temporaries(folder: str | os.PathLike, names: Collection[str] | None = None) -> list[Path]:
    """Remove the temporary files a killed writer left in ``folder`` (not in its subfolders).

    Only call this while no other process writes there (hold :func:`lock_folder`): a live writer's
    temporary file looks the same as a dead one's.

    Args:
        folder: the folder to clear; a missing folder has nothing to clear.
        names: only the temporary files of these final names (e.g. the outputs a run is about to write);
            ``None``: every temporary file.

    Returns:
        The files removed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for entry in folder.iterdir():
        target = temporary_target(entry.name)
        if target is None or (names is not None and target not in names) or not entry.is_file():
            continue
        entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def check_writable(folder: str | os.PathLike) -> None:
    """Check that files can be created in ``folder`` by creating and removing an empty one.

    Unlike :func:`os.access`, this sees read-only file systems, ACLs and (when running as root) every
    reason the kernel refuses a write.

    Raises:
        OSError: the folder is missing, not a folder or not writable; ``filename`` is ``folder``.
    """
    folder = Path(folder)
    probe = _temporary_path(folder / ".monai-ood-probe")
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except OSError as error:
        raise type(error)(error.errno, error.strerror, str(folder)) from error
    with contextlib.suppress(OSError):
        probe.unlink()


class FolderLockedError(OSError):
    """Another process holds the :func:`lock_folder` lock of the folder."""


def _try_lock(descriptor: int, path: Path) -> bool:
    """Lock without waiting: ``False`` if another process holds the lock."""
    try:
        if fcntl is not None:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:  # pragma: no cover - Windows
            import msvcrt

            msvcrt.locking(descriptor, msvcrt.LK_NBLCK, 1)
    except BlockingIOError:
        return False
    except OSError as error:
        if fcntl is None and error.errno in (errno.EACCES, errno.EDEADLK):  # pragma: no cover - Windows
            return False
        # e.g. ENOLCK on a network file system without a lock service: carry on without the lock
        warnings.warn(
            f"cannot lock {str(path)!r} ({error.strerror}); make sure no other "
            "monai-ood run writes into the same folder meanwhile",
            stacklevel=4,
        )
    return True


@contextlib.contextmanager
def lock_folder(folder: str | os.PathLike, name: str = LOCK_NAME, wait: float = 0.0) -> Iterator[Path]:
    """Hold an exclusive lock on ``folder`` (the file ``folder/name``) for the ``with`` block.

    The lock is the operating system's (``flock``; ``msvcrt.locking`` on Windows), so it goes with the
    process: a killed run leaves no stale lock, only the (harmless, hidden) lock file. The file holds
    the holder's process id, quoted by the error another process gets.

    Args:
        folder: the folder to lock.
        name: the lock file's name (one lock per name).
        wait: seconds to wait for another holder to release it (0: do not wait).

    Raises:
        FolderLockedError: another process holds the lock (for longer than ``wait``).
        OSError: the lock file cannot be created (e.g. a read-only folder).
    """
    folder = Path(folder)
    path = folder / name
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + wait
        while not (locked := _try_lock(descriptor, path)) and time.monotonic() < deadline:
            time.sleep(0.02)
        if not locked:
            try:
                holder = os.pread(descriptor, 32, 0).decode("ascii", "replace").strip()
            except (OSError, AttributeError):
                holder = ""
            who = f" (process {holder})" if holder.isdigit() else ""
            raise FolderLockedError(
                f"another monai-ood run{who} is writing into {str(folder)!r}; wait for it to finish, "
                "or choose another output folder"
            ) from None
        os.ftruncate(descriptor, 0)
        os.write(descriptor, f"{os.getpid()}\n".encode("ascii"))
        yield path
    finally:
        os.close(descriptor)  # releases the lock

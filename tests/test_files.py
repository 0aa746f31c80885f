"""Atomic file writes (monai_ood.files): a file is replaced whole or not at all, a set of files appears
all or none, the temporary files a killed writer leaves are recognised by name and only those removed,
and lock_folder keeps a second writer out of a folder."""

import errno
import os

import pytest

from monai_ood.files import (
    LOCK_NAME,
    AtomicFileSet,
    FolderLockedError,
    atomic_write,
    atomic_write_text,
    lock_folder,
    remove_temporaries,
    temporary_target,
)


def test_file_set_is_all_or_none(tmp_path):
    with pytest.raises(OSError), AtomicFileSet() as files:
        files.write(tmp_path / "a.txt", lambda t: t.write_text("a"))
        files.write(tmp_path / "b.nii.gz", lambda t: t.write_text("b"))
        raise OSError(errno.ENOSPC, "No space left on device")
    assert list(tmp_path.iterdir()) == []
    with AtomicFileSet() as files:
        files.write(tmp_path / "a.txt", lambda t: t.write_text("a"))
        files.write(tmp_path / "b.nii.gz", lambda t: t.write_text("b"))
        assert {temporary_target(p.name) for p in tmp_path.iterdir()} == {"a.txt", "b.nii.gz"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.nii.gz"]
    with pytest.raises(FileExistsError), AtomicFileSet() as files:
        files.write(tmp_path / "a.txt", lambda t: t.write_text("again"))
    assert (tmp_path / "a.txt").read_text() == "a"


def test_stale_temporaries_are_recognised_and_only_those_removed(tmp_path):
    assert temporary_target(".case0_seg.0123456789ab.tmp.nii.gz") == "case0_seg.nii.gz"
    assert temporary_target("..case0_seg.0123456789ab.tmp.ba9876543210.tmp.nii.gz") == "case0_seg.nii.gz"
    assert temporary_target(".scores.0123456789ab.tmp.csv") == "scores.csv"
    assert temporary_target("case0_seg.nii.gz") is None and temporary_target(LOCK_NAME) is None
    for name in (".case0_seg.0123456789ab.tmp.nii.gz", ".other.0123456789ab.tmp.pt", "keep.nii.gz"):
        (tmp_path / name).write_text("x")
    removed = remove_temporaries(tmp_path, {"case0_seg.nii.gz"})
    assert [p.name for p in removed] == [".case0_seg.0123456789ab.tmp.nii.gz"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.0123456789ab.tmp.pt", "keep.nii.gz"]


def test_atomic_write_replaces_the_whole_file_or_nothing(tmp_path):
    target = tmp_path / "new" / "case_score.nii.gz"  # a missing parent folder is created
    temporaries = []

    def write(temporary):
        temporaries.append(temporary)
        temporary.write_text("first")

    assert atomic_write(target, write) == target and target.read_text() == "first"
    (temporary,) = temporaries  # beside the target, with its whole extension, and gone after the rename
    assert temporary.parent == target.parent and temporary.name.endswith(".tmp.nii.gz")
    assert temporary_target(temporary.name) == target.name and not temporary.exists()
    with pytest.raises(FileExistsError, match="--overwrite"):
        atomic_write_text(target, "second")

    def crash(temporary):  # a half-written file, then a full disk
        temporary.write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic_write(target, crash, overwrite=True)
    assert target.read_text() == "first" and [p.name for p in target.parent.iterdir()] == [target.name]
    with pytest.raises(RuntimeError, match="did not create"):
        atomic_write(tmp_path / "nothing.txt", lambda temporary: None)
    with pytest.raises(IsADirectoryError):
        atomic_write_text(target.parent, "x", overwrite=True)
    assert atomic_write_text(target, "second", overwrite=True).read_text() == "second"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["case_score.nii.gz", "new"]


def test_lock_folder_refuses_a_second_holder_until_released(tmp_path):
    with lock_folder(tmp_path) as lock:
        assert lock == tmp_path / LOCK_NAME and lock.read_text() == f"{os.getpid()}\n"
        # a second open of the lock file conflicts even in this process (flock locks an open file)
        with pytest.raises(FolderLockedError, match=rf"another monai-ood run \(process {os.getpid()}\)"):
            with lock_folder(tmp_path, wait=0.05):
                pass
        with lock_folder(tmp_path, name=".other.lock"):  # one lock per name
            pass
    with lock_folder(tmp_path):  # released when the block ends
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([".other.lock", LOCK_NAME])

"""``monai-ood score`` on batches: a bad input, a full disk, a kill or a second run loses no good result.

The model is a tiny untrained 2D network saved with a calibration (the batch machinery does not care
what it predicts), so each in-process run takes well under a second; the tests that need a real process
(a kill -9, a second process, the stderr of a user error) pay the interpreter's start-up once each.
"""

import errno
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import monai_ood.io
from monai_ood.cli import main
from monai_ood.files import LOCK_NAME, lock_folder, temporary_target

NAMES = ["case0", "case1", "case2", "case3"]
MAPS = ("_seg.nii.gz", "_score.nii.gz", "_score_calibrated.nii.gz")
# the seeds of the kill test; MONAI_OOD_KILL_SEEDS=1,2,3,... runs it at more moments
KILL_SEEDS = [int(seed) for seed in os.environ.get("MONAI_OOD_KILL_SEEDS", "14").split(",")]
# the child of the kill and concurrency tests: `monai-ood score` whose map writer pauses after each file
# (while its temporary file exists), so the batch lasts long enough to be killed or met in the middle
SLOW_CHILD = """
import sys, time
import monai_ood.io

real = monai_ood.io.write_image

def slow(*args, **kwargs):
    written = real(*args, **kwargs)
    time.sleep(float(sys.argv[1]))
    return written

monai_ood.io.write_image = slow
from monai_ood.cli import main

sys.exit(main(sys.argv[2:]))
"""


def _phantom(rng, shape=(24, 28, 6)):
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    r = (x / 0.8) ** 2 + (y / 0.9) ** 2 + (z / 1.6) ** 2
    image = np.where(r < 1, 300.0, 0.0) + np.where(r < 0.5, 300.0, 0.0) + rng.normal(0, 10, shape)
    return image.astype(np.float32)


def _save(path, array):
    nib.save(nib.Nifti1Image(array, np.diag([3.0, 3.0, 3.0, 1.0])), path)
    return path


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    import torch

    from monai_ood.calibration import WeibullCalibrator
    from monai_ood.engines.checkpoint import build_network, make_model_config, save_model
    from monai_ood.preprocessing import SlicePreprocessing

    torch.manual_seed(0)
    config = make_model_config("unet", 2, 1, 4, 8, network_kwargs={"channels": [4, 8, 16], "strides": [2, 2]})
    calibration = WeibullCalibrator().fit(np.random.default_rng(0).weibull(1.5, 1000) * 20)
    path = tmp_path_factory.mktemp("model") / "model.pt"
    preprocessing = SlicePreprocessing(spacing=(3.0, 3.0), size=(32, 32))
    return save_model(path, build_network(config), config, preprocessing, calibration=calibration)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A folder of good inputs (read-only for the tests: copy it to add bad ones)."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for name in NAMES:
        _save(folder / f"{name}.nii.gz", _phantom(rng))
    return folder


def _batch_with_bad_files(images, tmp_path):
    """The good inputs plus a truncated NIfTI and a 4D one (two channels) between them."""
    folder = tmp_path / "batch"
    shutil.copytree(images, folder)
    data = (folder / "case1.nii.gz").read_bytes()
    (folder / "case1b_truncated.nii.gz").write_bytes(data[: len(data) // 2])
    _save(folder / "case2b_channels.nii.gz", np.stack([_phantom(np.random.default_rng(1))] * 2, axis=-1))
    return folder


def _score(*argv, model, capsys=None):
    code = main(["score", *map(str, argv), "--checkpoint", str(model), "--quiet", "--device", "cpu"])
    captured = capsys.readouterr() if capsys is not None else None
    return code, captured


def _table(output):
    return json.loads((output / "scores.json").read_text())


def _statuses(output):
    return {Path(row["input"]).name: row["status"] for row in _table(output)["volumes"]}


def _mtimes(output):
    return {p.name: p.stat().st_mtime_ns for p in output.iterdir() if p.is_file() and p.name != LOCK_NAME}


def _leftovers(output):
    """Temporary files in the output folder and its slicer subfolder."""
    return [p.name for p in output.rglob(".*") if temporary_target(p.name) is not None]


def _comparable(table):
    """A table with its output paths reduced to file names, to compare runs into different folders."""

    def strip(row):
        return {
            key: Path(value).name
            if key in ("segmentation", "score_map", "calibrated_map") and value
            else value
            for key, value in row.items()
        }

    return {"volumes": [strip(row) for row in table["volumes"]], "slices": table["slices"]}


def _assert_same_table(got, expected):
    assert [row["input"] for row in got["volumes"]] == [row["input"] for row in expected["volumes"]]
    for mine, theirs in zip(
        got["volumes"] + got["slices"], expected["volumes"] + expected["slices"], strict=True
    ):
        assert mine.keys() == theirs.keys()
        for key, value in theirs.items():
            if isinstance(value, float):
                assert mine[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
            else:
                assert mine[key] == value, key


def _slow_child(seconds, *argv, model):
    argv = ["score", *map(str, argv), "--checkpoint", str(model), "--quiet", "--device", "cpu"]
    return subprocess.Popen(
        [sys.executable, "-c", SLOW_CHILD, str(seconds), *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_lock(child, output, timeout=180.0):
    """Wait until ``child`` holds the folder lock (its pid in the lock file): its batch has begun."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lock = output / LOCK_NAME
        if lock.exists() and lock.read_text().strip() == str(child.pid):
            return
        if child.poll() is not None:
            pytest.fail(f"the child ended before taking the lock: {child.communicate()[1][-2000:]}")
        time.sleep(0.01)
    child.kill()
    pytest.fail("the child did not take the lock in time")


# ---------------------------------------------------------------- a bad input


def test_one_bad_file_fails_its_row_and_the_batch_goes_on(model, images, tmp_path, capsys):
    folder, out = _batch_with_bad_files(images, tmp_path), tmp_path / "out"
    code, captured = _score(folder, "--output", out, model=model, capsys=capsys)
    assert code == 1
    volumes = {Path(row["input"]).name: row for row in _table(out)["volumes"]}
    assert list(volumes) == sorted(p.name for p in folder.iterdir())  # every input has its row, in order
    truncated, channels = volumes.pop("case1b_truncated.nii.gz"), volumes.pop("case2b_channels.nii.gz")
    assert truncated["status"] == "failed" and "truncated" in truncated["error"]
    assert channels["status"] == "failed" and "4D" in channels["error"]  # from its header, before any work
    assert truncated["image_score"] is None and truncated["segmentation"] is None
    for name, row in volumes.items():
        assert row["status"] == "ok" and row["error"] is None and row["image_score"] is not None
        for suffix in MAPS:
            assert (out / (name.removesuffix(".nii.gz") + suffix)).is_file()
    assert not list(out.glob("case1b_truncated*")) and not list(out.glob("case2b_channels*"))
    csv_rows = (out / "scores.csv").read_text().splitlines()
    assert csv_rows[0].startswith("input,status,error,level")
    assert sum(",failed," in line for line in csv_rows) == 2
    assert "case1b_truncated.nii.gz" in captured.err and "case2b_channels.nii.gz" in captured.err
    assert "--resume" in captured.err and "Traceback" not in captured.err


def test_resume_rescores_nothing_complete_and_finishes_the_rest(model, images, tmp_path, capsys):
    folder, out = _batch_with_bad_files(images, tmp_path), tmp_path / "out"
    assert _score(folder, "--output", out, model=model, capsys=capsys)[0] == 1
    before, tables = _mtimes(out), [(out / name).read_bytes() for name in ("scores.csv", "scores.json")]
    code, captured = _score(folder, "--output", out, "--resume", model=model, capsys=capsys)
    assert code == 1  # the bad inputs are retried, and fail again
    assert _mtimes(out) == before  # nothing re-scored, nothing rewritten
    assert [(out / name).read_bytes() for name in ("scores.csv", "scores.json")] == tables
    assert "case1b_truncated.nii.gz" in captured.err
    # the user fixes the inputs: --resume scores only those
    (folder / "case1b_truncated.nii.gz").unlink()
    shutil.copy(images / "case1.nii.gz", folder / "case1b_truncated.nii.gz")
    (folder / "case2b_channels.nii.gz").unlink()
    shutil.copy(images / "case2.nii.gz", folder / "case2b_channels.nii.gz")
    assert _score(folder, "--output", out, "--resume", model=model, capsys=capsys)[0] == 0
    assert set(_statuses(out).values()) == {"ok"}
    after = _mtimes(out)
    assert all(after[name] == stamp for name, stamp in before.items() if name.startswith(tuple(NAMES)))
    assert (out / "case1b_truncated_score.nii.gz").is_file()


def test_existing_outputs_are_refused_before_any_work(model, images, tmp_path, capsys):
    out = tmp_path / "out"
    assert _score(images, "--output", out, model=model, capsys=capsys)[0] == 0
    before = _mtimes(out)
    code, captured = _score(images, "--output", out, model=model, capsys=capsys)
    assert code == 2 and "--resume" in captured.err and "--overwrite" in captured.err
    assert len(captured.err.strip().splitlines()) == 1 and _mtimes(out) == before


# ---------------------------------------------------------------- a failed write


def test_a_failed_write_leaves_none_of_that_inputs_set(model, images, tmp_path, capsys, monkeypatch):
    out, real = tmp_path / "out", monai_ood.io.write_image

    def disk_full_on_case1_score(image, path, *args, **kwargs):  # case1's 2nd file, half written
        if Path(path).name.lstrip(".").startswith("case1_score."):
            Path(path).write_bytes(b"half a map")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(image, path, *args, **kwargs)

    monkeypatch.setattr(monai_ood.io, "write_image", disk_full_on_case1_score)
    code, captured = _score(images, "--output", out, model=model, capsys=capsys)
    assert code == 2  # the folder takes no more writes: the batch stops, with one line
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err
    assert os.strerror(errno.ENOSPC) in lines[0] and "--resume" in lines[0]
    assert "case1_score.nii.gz" in lines[0]
    assert ".tmp" not in lines[0]  # the file the user knows, not its temporary name
    assert not [p.name for p in out.iterdir() if p.name.lstrip(".").startswith("case1")]
    assert list(_statuses(out).values()) == ["ok", "failed", "skipped", "skipped"]  # case0 .. case3
    assert os.strerror(errno.ENOSPC) in _table(out)["volumes"][1]["error"]
    before = _mtimes(out)
    monkeypatch.setattr(monai_ood.io, "write_image", real)  # space freed
    assert _score(images, "--output", out, "--resume", model=model, capsys=capsys)[0] == 0
    assert set(_statuses(out).values()) == {"ok"}
    assert _mtimes(out)["case0_seg.nii.gz"] == before["case0_seg.nii.gz"]  # kept, not re-scored


# ---------------------------------------------------------------- a kill


@pytest.mark.parametrize("seed", KILL_SEEDS)
def test_kill_at_a_random_moment_then_resume_gives_the_uninterrupted_table(model, images, tmp_path, seed):
    folder = _batch_with_bad_files(images, tmp_path)
    reference, out = tmp_path / "reference", tmp_path / "out"
    assert _score(folder, "--output", reference, model=model)[0] == 1
    pause = 0.1  # after each map file: 4 good inputs x 3 files last at least 1.2 s
    child = _slow_child(pause, folder, "--output", out, model=model)
    _wait_for_lock(child, out)
    time.sleep(random.Random(seed).uniform(0.0, 12 * pause))
    child.kill()  # SIGKILL: no cleanup of any kind
    child.communicate(timeout=60)
    assert child.returncode == -9, "the batch ended before the kill: nothing was interrupted"
    assert _score(folder, "--output", out, "--resume", model=model)[0] == 1
    _assert_same_table(_comparable(_table(out)), _comparable(_table(reference)))
    assert _leftovers(out) == []
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference.iterdir())


# ---------------------------------------------------------------- user errors, in one line


def test_unwritable_output_folder_is_one_line_without_traceback(model, images, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    # running as root ignores permissions: a folder under a file cannot be written by anyone
    result = subprocess.run(
        [sys.executable, "-m", "monai_ood", "score", str(images / "case0.nii.gz"), "--checkpoint", str(model)]
        + ["--output", str(blocker / "sub"), "--quiet", "--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert str(blocker / "sub") in result.stderr and "writable --output" in result.stderr


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder_is_one_line(model, images, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o555)
    try:
        code, captured = _score(images, "--output", out, model=model, capsys=capsys)
    finally:
        out.chmod(0o755)
    assert code == 2 and len(captured.err.strip().splitlines()) == 1 and str(out) in captured.err


@pytest.fixture
def datalist(images, tmp_path):
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps({"validation": [{"image": str(images / "case0.nii.gz")}]}))
    return path


def test_calibrate_refuses_an_unwritable_checkpoint_folder_before_fitting(
    model, datalist, capsys, monkeypatch
):
    import monai_ood.cli
    import monai_ood.engines.calibration

    def read_only(folder):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(folder))

    def no_fit(*args, **kwargs):
        raise AssertionError("the fit ran before the folder was checked")

    monkeypatch.setattr(monai_ood.cli, "check_writable", read_only)
    monkeypatch.setattr(monai_ood.engines.calibration, "calibrate", no_fit)
    before = model.read_bytes()
    assert (
        main(["calibrate", "--checkpoint", str(model), "--datalist", str(datalist), "--device", "cpu"]) == 2
    )
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "model.pt" in err and "writable folder" in err
    assert model.read_bytes() == before


def test_calibrate_full_disk_is_one_line_naming_the_checkpoint(
    model, datalist, tmp_path, capsys, monkeypatch
):
    import monai_ood.engines.checkpoint

    checkpoint = shutil.copy(model, tmp_path / "model.pt")

    def disk_full(obj, path):
        temporary = Path(path).with_name(".model.0123456789ab.tmp.pt")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(temporary))

    monkeypatch.setattr(monai_ood.engines.checkpoint, "_atomic_save", disk_full)
    argv = ["calibrate", "--checkpoint", str(checkpoint), "--datalist", str(datalist), "--device", "cpu"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert f"{os.strerror(errno.ENOSPC)}: {str(checkpoint)!r}; free some disk space" in err


# ---------------------------------------------------------------- two runs into one folder


def test_a_second_run_into_a_busy_folder_is_refused(model, images, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    with lock_folder(out):  # as another process would hold it
        code, captured = _score(images, "--output", out, "--resume", model=model, capsys=capsys)
    assert (
        code == 2 and "another monai-ood run" in captured.err and len(captured.err.strip().splitlines()) == 1
    )
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # nothing written
    assert _score(images, "--output", out, "--resume", model=model, capsys=capsys)[0] == 0  # once it is free


def test_two_concurrent_runs_never_lose_a_row(model, images, tmp_path, capsys):
    more, out = tmp_path / "more", tmp_path / "out"
    more.mkdir()
    for name in ("extra0", "extra1"):
        shutil.copy(images / "case0.nii.gz", more / f"{name}.nii.gz")
    child = _slow_child(0.1, images, "--output", out, model=model)
    _wait_for_lock(child, out)
    code, captured = _score(more, "--output", out, "--resume", model=model, capsys=capsys)
    assert child.poll() is None, "the first run ended before the second one started"
    assert code == 2 and f"another monai-ood run (process {child.pid})" in captured.err
    _, child_err = child.communicate(timeout=300)
    assert child.returncode == 0, child_err[-2000:]
    assert _score(more, "--output", out, "--resume", model=model, capsys=capsys)[0] == 0
    expected = {f"{name}.nii.gz": "ok" for name in NAMES + ["extra0", "extra1"]}
    assert _statuses(out) == expected


# ---------------------------------------------------------------- --resume and names


def test_resume_with_an_unreadable_table_is_one_line_and_touches_nothing(model, images, tmp_path, capsys):
    out = tmp_path / "out"
    assert _score(images, "--output", out, model=model, capsys=capsys)[0] == 0
    (out / "scores.json").write_text('{"volumes": [{"no input key": 1}]')  # cut short by hand
    before = _mtimes(out)
    code, captured = _score(images, "--output", out, "--resume", model=model, capsys=capsys)
    assert code == 2 and "scores.json" in captured.err and "--overwrite" in captured.err
    assert len(captured.err.strip().splitlines()) == 1 and "Traceback" not in captured.err
    assert _mtimes(out) == before


def test_resume_refuses_outputs_that_belong_to_another_input_of_the_same_name(
    model, images, tmp_path, capsys
):
    out, other = tmp_path / "out", tmp_path / "elsewhere"
    assert _score(images / "case0.nii.gz", "--output", out, model=model, capsys=capsys)[0] == 0
    other.mkdir()
    _save(other / "case0.nii.gz", _phantom(np.random.default_rng(5)))  # another scan, the same stem
    before = _mtimes(out)
    code, captured = _score(other / "case0.nii.gz", "--output", out, "--resume", model=model, capsys=capsys)
    assert code == 2 and "are those of" in captured.err and str(other / "case0.nii.gz") in captured.err
    assert _mtimes(out) == before  # the first scan's maps are kept


def test_two_inputs_with_one_stem_are_refused_before_any_work(model, images, tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(images / "case0.nii.gz", other / "case0.nii.gz")
    out = tmp_path / "out"
    code, captured = _score(
        images / "case0.nii.gz", other / "case0.nii.gz", "--output", out, model=model, capsys=capsys
    )
    assert code == 2 and "same name stem" in captured.err
    assert not out.exists() or not any(out.iterdir())


def test_ctrl_c_exits_130_keeps_the_inputs_done_and_resume_finishes(
    model, images, tmp_path, capsys, monkeypatch
):
    import monai_ood.inference

    real, calls = monai_ood.inference.score_image, []

    def interrupted_on_the_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(monai_ood.inference, "score_image", interrupted_on_the_third)
    out = tmp_path / "out"
    code, captured = _score(images, "--output", out, model=model, capsys=capsys)
    assert code == 130 and "re-run with --resume" in captured.err
    statuses = _statuses(out)
    assert sorted(statuses.values()) == ["ok", "ok", "skipped", "skipped"]
    for name, status in statuses.items():  # an ok row has its whole set, a skipped one none of it
        stem = name.removesuffix(".nii.gz")
        assert all((out / f"{stem}{suffix}").is_file() == (status == "ok") for suffix in MAPS)
    monkeypatch.setattr(monai_ood.inference, "score_image", real)
    assert _score(images, "--output", out, "--resume", model=model, capsys=capsys)[0] == 0
    assert set(_statuses(out).values()) == {"ok"}


def test_a_stale_calibration_is_refused_in_one_line_before_any_work(model, images, tmp_path, capsys):
    import torch

    from monai_ood.engines.checkpoint import load_model, set_weights

    stale = tmp_path / "model.pt"
    shutil.copy(model, stale)
    net = load_model(stale, device="cpu").net
    with torch.no_grad():  # retrained weights, the calibration of the old ones still stored
        next(net.parameters()).view(-1)[0] += 1.0
    set_weights(stale, net)
    out = tmp_path / "out"
    code, captured = _score(images, "--output", out, model=stale, capsys=capsys)
    assert code == 2 and "other weights" in captured.err and "monai-ood calibrate" in captured.err
    assert len(captured.err.strip().splitlines()) == 1 and not out.exists()


# ---------------------------------------------------------------- a run split in parts


def test_parts_run_concurrently_and_merge_into_one_table(model, images, tmp_path, capsys):
    """Two parts into one folder at the same time: each input scored by exactly one part, and the
    merged table lists every input once, as an unsplit run's does (same rows, same scores)."""
    folder, out, whole = tmp_path / "inputs", tmp_path / "out", tmp_path / "whole"
    shutil.copytree(images, folder)
    for name in ("extra0", "extra1", "extra2"):
        shutil.copy(images / "case1.nii.gz", folder / f"{name}.nii.gz")
    child = _slow_child(0.1, folder, "--output", out, "--num-parts", "2", "--part-id", "1", model=model)
    code, _ = _score(
        folder, "--output", out, "--num-parts", "2", "--part-id", "0", model=model, capsys=capsys
    )
    _, child_err = child.communicate(timeout=300)
    assert code == 0 and child.returncode == 0, child_err[-2000:]
    assert _score(folder, "--output", whole, model=model, capsys=capsys)[0] == 0
    merged, reference = _table(out), _table(whole)
    names = sorted(p.name for p in folder.iterdir())
    assert sorted(Path(r["input"]).name for r in merged["volumes"]) == names  # none twice, none missing
    parts = [json.loads((out / f"scores.part-{k}-of-2.json").read_text())["volumes"] for k in (0, 1)]
    assert [len(p) for p in parts] == [4, 3] and not {r["input"] for r in parts[0]} & {
        r["input"] for r in parts[1]
    }
    by_input = {Path(r["input"]).name: r for r in reference["volumes"]}
    for row in merged["volumes"]:
        expected = by_input[Path(row["input"]).name]
        assert row["status"] == "ok" and row["image_score"] == pytest.approx(
            expected["image_score"], rel=1e-6
        )
    assert len(merged["slices"]) == len(reference["slices"])
    header = (out / "scores.csv").read_text().splitlines()[0]
    assert header == (whole / "scores.csv").read_text().splitlines()[0]
    assert (out / "slicer").is_dir()  # written once, by part 0


def test_a_bad_part_id_is_one_line(model, images, tmp_path, capsys):
    code, captured = _score(
        images, "--output", tmp_path / "o", "--num-parts", "2", "--part-id", "2", model=model, capsys=capsys
    )
    assert code == 2 and "--part-id must lie in 0..1" in captured.err


def test_torchrun_ranks_split_the_inputs_into_one_merged_table(model, images, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "monai_ood",
        "score",
        str(images),
        "--output",
        str(out),
        "--checkpoint",
        str(model),
        "--quiet",
        "--device",
        "cpu",
    ]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(Path(r["input"]).name for r in _table(out)["volumes"]) == sorted(
        f"{n}.nii.gz" for n in NAMES
    )
    assert sorted(p.name for p in out.glob("scores.part-*-of-2.json")) == [
        "scores.part-0-of-2.json",
        "scores.part-1-of-2.json",
    ]

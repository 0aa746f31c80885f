"""Peak memory of ``monai-ood score`` on one large volume (issue 14: "peak memory of scoring bounded and
stated").

Writes a 512 x 512 x 400 float32 NIfTI (0.5 mm isotropic, seeded noise: memory does not depend on the
content), builds an untrained default UNet model through the API (the network's size, not its training,
sets the memory; `--checkpoint` scores with another model instead), then runs, each in a fresh process:

1. the baseline: Python with monai-ood, torch and MONAI imported and the model loaded;
2. ``monai-ood score`` on the volume (segmentation, A and A_xi written as NIfTI).

and records each process's peak resident set size (``getrusage(RUSAGE_CHILDREN)``, from ``wait4``) in
``benchmarks/results/memory.json``.

Run: ``python benchmarks/memory.py [--size 512 512 400] [--checkpoint model.pt]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _peak_of(command: list[str], env: dict) -> tuple[float, float, int]:
    """(peak RSS in GiB, seconds, exit code) of one child process."""
    start = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(
            f"{command[:4]} failed with exit code {code}: {process.stderr.read().decode()[-2000:]}"
        )
    return usage.ru_maxrss / 2**20, seconds, code  # ru_maxrss is in KiB on Linux


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, nargs=3, default=(512, 512, 400), metavar=("X", "Y", "Z"))
    parser.add_argument("--checkpoint", help="score with this model.pt (default: an untrained default UNet)")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "memory.json")
    args = parser.parse_args(argv)

    # the parent stays small (stdlib only): a forked child's peak RSS counts the parent's pages until
    # exec, so the volume and the model are made by a child process too
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        volume = folder / "large.nii.gz"
        checkpoint = Path(args.checkpoint) if args.checkpoint else folder / "model.pt"
        prepare = f"""
import nibabel as nib, numpy as np
data = np.random.default_rng(0).random({tuple(args.size)!r}, dtype=np.float32) * 1000.0
nib.save(nib.Nifti1Image(data, np.diag([0.5, 0.5, 0.5, 1.0])), {str(volume)!r})
if {not args.checkpoint!r}:
    from monai_ood.engines.checkpoint import build_network, make_model_config, save_model
    from monai_ood.preprocessing import SlicePreprocessing
    config = make_model_config("unet", 2, 1, 4, 64)
    save_model({str(checkpoint)!r}, build_network(config), config, SlicePreprocessing())
"""
        subprocess.run([sys.executable, "-c", prepare], env=env, check=True)
        baseline = [
            sys.executable,
            "-c",
            "import monai_ood.cli, monai_ood.inference; from monai_ood.engines.checkpoint import load_model; "
            f"load_model({str(checkpoint)!r}, 'cpu')",
        ]
        score = [sys.executable, "-m", "monai_ood", "score", str(volume), "--checkpoint", str(checkpoint)]
        score += ["--output", str(folder / "scores"), "--device", "cpu"]
        base_gib, _, _ = _peak_of(baseline, env)
        peak_gib, seconds, _ = _peak_of(score, env)
    input_gib = 4 * args.size[0] * args.size[1] * args.size[2] / 2**30
    report = {
        "command": "python benchmarks/memory.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "volume": {"size": list(args.size), "dtype": "float32", "gib": input_gib},
        "checkpoint": args.checkpoint or "untrained default UNet (monai-ood train's network, c_g 64)",
        "baseline_peak_rss_gib": base_gib,
        "score_peak_rss_gib": peak_gib,
        "score_peak_above_baseline_gib": peak_gib - base_gib,
        "score_seconds": seconds,
        "threads": env["OMP_NUM_THREADS"],
        "python": platform.python_version(),
    }
    from monai_ood.files import atomic_write_text

    atomic_write_text(args.output, json.dumps(report, indent=1), overwrite=True)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

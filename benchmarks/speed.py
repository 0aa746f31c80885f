"""Cost of the prototype head, as ratios measured in one run on this machine.

* inference: ``forward_with_ood`` (logits + distances + A + upsampled A + image score) vs a plain forward;
* training: one step with InD + outliers (``forward_train`` + ``SegOODLoss``) vs a plain Dice+CE step at
  the same InD batch; outlier generation (``OutlierSynthesis`` in the main process) reported separately,
  because in training it runs in DataLoader workers;
* calibration: Weibull fit and transform on 10^7 values, in seconds.

Timings alternate plain / head runs and take medians, so both see the same machine load.

Run: ``make speed`` or ``python benchmarks/speed.py [--head-config paper|default] [--repeats 40] [--seed 0]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import monai
import numpy as np
import scipy
import torch
from monai.losses import DiceCELoss
from monai.utils import set_determinism

from monai_ood.calibration import WeibullCalibrator
from monai_ood.engines.training import TrainingConfig
from monai_ood.files import atomic_write_text
from monai_ood.losses import SegOODLoss
from monai_ood.networks import create_prototype_network
from monai_ood.transforms import OutlierSynthesis


def _median_seconds(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def _alternate(fn_a, fn_b, repeats: int, warmup: int = 3) -> tuple[float, float]:
    for _ in range(warmup):
        fn_a(), fn_b()
    times_a, times_b = [], []
    for _ in range(repeats):
        times_a += _median_seconds(fn_a, 1)
        times_b += _median_seconds(fn_b, 1)
    return statistics.median(times_a), statistics.median(times_b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--size", type=int, nargs=2, default=(112, 96), help="2D slice size (default 112 96)")
    parser.add_argument("--head-channels", type=int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--head-config",
        choices=("paper", "default", "all"),
        default="paper",
        help="the paper's head or the project's default head (multi-scale, global and Gaussian terms)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        help="default: results/speed.json (paper), results/speed_default.json (default)",
    )
    args = parser.parse_args()
    results_dir = Path(__file__).parent / "results"
    output = args.output or results_dir / (
        "speed.json" if args.head_config == "paper" else "speed_default.json"
    )

    set_determinism(args.seed)
    device = torch.device(args.device)
    wrapper_kwargs = TrainingConfig(head_config=args.head_config).wrapper_kwargs
    net = create_prototype_network("unet", 2, 1, 4, head_channels=args.head_channels, **wrapper_kwargs).to(
        device
    )
    images = torch.rand(args.batch_size, 1, *args.size, device=device)
    labels = torch.randint(0, 4, (args.batch_size, 1, *args.size), device=device)
    if net.gaussian_term:  # fitted on random images: the cost does not depend on the values
        net.refit([(images, labels)], prototypes=False)
    synthesis = OutlierSynthesis(TrainingConfig(head_config=args.head_config).outlier_ops)
    synthesis.set_random_state(args.seed)
    outliers = torch.stack([synthesis(image) for image in images.cpu()]).to(device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    # inference
    net.eval()

    def plain_forward():
        with torch.no_grad():
            net(images)
        sync()

    def head_forward():
        with torch.no_grad():
            net.forward_with_ood(images)
        sync()

    plain_inf, head_inf = _alternate(plain_forward, head_forward, args.repeats)

    # training
    net.train()
    optimiser = torch.optim.AdamW(net.parameters(), lr=1e-4)
    dice_ce = DiceCELoss(to_onehot_y=True, softmax=True)
    seg_ood = SegOODLoss(
        net.num_dims, class_balanced=TrainingConfig(head_config=args.head_config).class_balanced
    )

    def plain_step():
        optimiser.zero_grad(set_to_none=True)
        dice_ce(net(images), labels).backward()
        optimiser.step()
        sync()

    def head_step(outlier_batch: torch.Tensor):
        optimiser.zero_grad(set_to_none=True)
        out = net.forward_train(images, outlier_batch)
        seg_ood.from_train_output(out, labels).backward()
        optimiser.step()
        sync()

    def encoder_step():  # what the outlier pass adds: encoder forward + backward on n_b images
        optimiser.zero_grad(set_to_none=True)
        net.encode(outliers).sum().backward()
        sync()

    plain_train, head_train = _alternate(plain_step, lambda: head_step(outliers), args.repeats)
    plain_train_2, head_train_half = _alternate(
        plain_step, lambda: head_step(outliers[: max(len(outliers) // 2, 1)]), args.repeats
    )
    plain_train_3, encoder_train = _alternate(plain_step, encoder_step, args.repeats)
    cpu_images = images.cpu()
    synthesis_time = statistics.median(
        _median_seconds(lambda: [synthesis(image) for image in cpu_images], args.repeats)
    )

    # calibration on 10^7 values
    values = np.random.default_rng(args.seed).weibull(1.5, 10**7).astype(np.float32) * 300.0
    start = time.perf_counter()
    calibrator = WeibullCalibrator().fit(values)
    fit_seconds = time.perf_counter() - start
    start = time.perf_counter()
    calibrator.transform(torch.from_numpy(values))
    transform_seconds = time.perf_counter() - start

    results = {
        "command": "python benchmarks/speed.py " + " ".join(sys.argv[1:]),
        "seed": args.seed,
        "head_config": args.head_config,
        "head_terms": net.term_names,
        "setting": {
            "network": "MONAI UNet 2D, channels (16, 32, 64, 128, 256), strides 2x4, 2 residual units",
            "batch_size": args.batch_size,
            "size": list(args.size),
            "head_channels": args.head_channels,
            "repeats": args.repeats,
            "device": str(device),
            "torch_threads": torch.get_num_threads(),
        },
        "seconds": {
            "plain_forward": plain_inf,
            "forward_with_ood": head_inf,
            "plain_train_step": plain_train,
            "ood_train_step": head_train,
            "ood_train_step_half_outliers": head_train_half,
            "encoder_only_step_on_outliers": encoder_train,
            "outlier_synthesis_per_batch": synthesis_time,
            "weibull_fit_1e7": fit_seconds,
            "weibull_transform_1e7": transform_seconds,
        },
        "ratios": {
            "inference_head_vs_plain": head_inf / plain_inf,
            "train_step_head_vs_plain": head_train / plain_train,
            "train_step_head_half_outliers_vs_plain": head_train_half / plain_train_2,
            "encoder_step_vs_plain_step": encoder_train / plain_train_3,
            "train_step_head_plus_synthesis_vs_plain": (head_train + synthesis_time) / plain_train,
        },
        "goals": {"inference": "<= 1.05", "train_step": "<= 1.5", "weibull_fit_1e7_seconds": "<= 2"},
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "monai": monai.__version__,
            "numpy": np.__version__,
            "scipy": scipy.__version__,
            "machine": platform.machine(),
            "cpu_count": os.cpu_count(),
        },
    }
    atomic_write_text(output, json.dumps(results, indent=2), overwrite=True)

    r, s = results["ratios"], results["seconds"]
    print(
        f"inference   forward_with_ood / plain forward : {r['inference_head_vs_plain']:.3f}x  (goal <= 1.05)"
    )
    print(
        f"training    InD+outlier step / plain step     : {r['train_step_head_vs_plain']:.3f}x  (goal <= 1.5)"
    )
    print(
        f"            ... + outlier synthesis in-process: {r['train_step_head_plus_synthesis_vs_plain']:.3f}x"
    )
    print(
        f"            with n_b = n_a / 2 outliers       : {r['train_step_head_half_outliers_vs_plain']:.3f}x"
    )
    print(
        f"            encoder-only step / plain step    : {r['encoder_step_vs_plain_step']:.3f}x  (the floor of the overhead)"
    )
    print(f"calibration Weibull fit on 10^7 values        : {s['weibull_fit_1e7']:.2f} s  (goal <= 2 s)")
    print(f"            Weibull transform of 10^7 values  : {s['weibull_transform_1e7']:.2f} s")
    print(f"written to {output}")


if __name__ == "__main__":
    main()

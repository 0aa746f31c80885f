"""Smallest real example of monai-ood: wrap a MONAI UNet, train with SegOODLoss, calibrate, score.

Synthetic 2D "phantoms" (an ellipse with an inner structure and a small disc, 4 classes) stand in for
medical images so that this runs in about a minute on a laptop CPU with no data download. Outliers for
training are made from the training images by :class:`monai_ood.transforms.OutlierSynthesis` (paper
section 3.2); the test OOD images are made with other shifts (a 90 degree rotation, inverted contrast,
pure noise) that the head never saw.

Run: ``make demo`` (or ``python examples/quickstart.py --steps 150 --seed 0``).
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import torch
from monai.networks.nets import UNet
from monai.utils import set_determinism
from tqdm import trange

from monai_ood.calibration import WeibullCalibrator
from monai_ood.evaluation import dice_per_class
from monai_ood.losses import SegOODLoss
from monai_ood.networks import PrototypeOODNet
from monai_ood.transforms import OutlierSynthesis

SIZE = 64


def phantom(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One (1, 64, 64) image in [0, 1] and its label map: 0 background, 1 body, 2 core, 3 lesion."""
    yy, xx = np.mgrid[:SIZE, :SIZE].astype(np.float32)
    cy, cx = SIZE / 2 + rng.uniform(-4, 4, 2)
    ry, rx = rng.uniform(20, 26), rng.uniform(14, 20)  # taller than wide: a fixed "up" direction
    body = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
    core = ((yy - cy + ry * 0.3) / (ry * 0.35)) ** 2 + ((xx - cx) / (rx * 0.5)) ** 2 < 1
    ly, lx = cy + ry * 0.45 + rng.uniform(-2, 2), cx + rng.uniform(-rx * 0.4, rx * 0.4)
    lesion = (yy - ly) ** 2 + (xx - lx) ** 2 < rng.uniform(9, 25)
    label = np.zeros((SIZE, SIZE), np.int64)
    label[body], label[core & body], label[lesion & body] = 1, 2, 3
    image = np.choose(label, [0.05, 0.45, 0.85, 0.25]).astype(np.float32)
    image += rng.normal(0, 0.03, image.shape).astype(np.float32)
    return np.clip(image, 0, 1)[None], label[None]


def batch(rng: np.random.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = zip(*(phantom(rng) for _ in range(n)), strict=True)
    return torch.from_numpy(np.stack(images)), torch.from_numpy(np.stack(labels))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=150, help="training steps (default: 150)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    set_determinism(args.seed)
    rng = np.random.default_rng(args.seed)
    device = torch.device(args.device)

    # 1. Drop the head into an existing MONAI network: the bottleneck is found automatically.
    unet = UNet(2, 1, 4, channels=(16, 32, 64, 128), strides=(2, 2, 2), num_res_units=1)
    net = PrototypeOODNet(unet, num_classes=4, head_channels=64).to(device)
    print(f"head on '{net.layer}' ({net.feature_channels} -> {net.num_dims} channels)")

    # 2. Train: Dice+CE on InD images, lambda * L_out on outliers made from them (encoder-only pass).
    loss_fn = SegOODLoss(num_dims=net.num_dims, lambda_out=0.1)
    synthesis = OutlierSynthesis()
    synthesis.set_random_state(args.seed)
    optimiser = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(optimiser, T_0=max(args.steps // 2, 1))
    net.train()
    progress = trange(args.steps, desc="train", unit="step")
    for _ in progress:
        images, labels = batch(rng, args.batch_size)
        outliers = torch.stack([synthesis(image) for image in images])
        out = net.forward_train(images.to(device), outliers.to(device))
        loss, parts = loss_fn(
            out.logits, labels.to(device), out.distances, out.outlier_distances, return_components=True
        )
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        scheduler.step()
        progress.set_postfix(seg=f"{parts['seg']:.3f}", ood=f"{parts['ood']:.3f}")

    # 3. Calibrate: fit the Weibull on validation score-map values (paper eq. 9).
    net.eval()
    with torch.no_grad():
        validation, _ = batch(rng, 32)
        calibrator = WeibullCalibrator().fit(net.ood(validation.to(device)).score_map)
        print(f"Weibull fit on validation maps: shape={calibrator.shape:.3f} scale={calibrator.scale:.2f}")

        # 4. Score InD test images and three kinds of shift the head never saw in training.
        test, test_labels = batch(rng, 16)
        noise = torch.from_numpy(rng.uniform(0, 1, test.shape).astype(np.float32))
        groups = {
            "InD test": test,
            "rotated 90 deg": torch.rot90(test, 1, dims=(2, 3)),
            "inverted contrast": 1.0 - test,
            "uniform noise": noise,
        }
        print(f"{'images':<20}{'image score':>14}{'mean A_xi':>12}{'Dice (InD)':>12}")
        for name, images in groups.items():
            logits, ood = net.forward_with_ood(images.to(device))
            a_xi = calibrator.transform(ood.score_map_upsampled)
            dice = ""
            if name == "InD test":
                prediction = logits.argmax(1).cpu().numpy()
                dice = f"{np.nanmean(dice_per_class(prediction, test_labels[:, 0].numpy(), 4)):.3f}"
            score = ood.image_score.cpu()
            print(
                f"{name:<20}{float(score.mean()):>9.1f} ±{float(score.std()):<5.1f}{float(a_xi.mean()):>10.3f}{dice:>12}"
            )
        bound = net.num_dims + 1.645 * math.sqrt(2 * net.num_dims)
        print(
            f"(image score = mean of A(x) over the feature grid; a Gaussian class in N = {net.num_dims} dims "
            f"would give D ~ chi2({net.num_dims}): mean {net.num_dims}, 95% bound {bound:.0f})"
        )


if __name__ == "__main__":
    main()

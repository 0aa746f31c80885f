"""The OOD benchmark of ``../shared/BENCHMARK.md``: every detector, same backbone, data and budget.

Presets:

* ``--quick``: tiny networks, 1 epoch, a few test slices: checks that every method and every column is
  produced (runs inside the test suite);
* ``--full``: the real table (default UNet 16-256 on 2 mm 112x96 slices, 30 epochs = the end of the second
  warm-restart cycle, 5 ensemble members, 10 MC-dropout passes, seeds 0 1 2): run it in the background.

Methods: the prototype head (the paper), MSP, entropy, energy, MC dropout, deep ensemble, FCDD on the same
encoder layer (trained with the same outliers), single-Gaussian Mahalanobis on encoder features, a
MECAM-style multi-exit CAM masking score, and an autoencoder reconstruction error.

Outputs (``--output``, default ``benchmarks/results/<preset>``): ``results.json`` (every number, the
command, seeds and package versions) and ``results.md`` (the tables).

Run: ``python benchmarks/run.py --quick`` or ``python benchmarks/run.py --full``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from monai_ood.data.brain import brain_test_variants, load_brain_dataset
from monai_ood.data.ood_sources import load_ood_sets
from monai_ood.detectors import PrototypeDetector
from monai_ood.engines.checkpoint import load_model
from monai_ood.engines.training import TrainingConfig, train
from monai_ood.evaluation import (
    OOD_METRICS,
    category_means,
    dice_per_class,
    dice_per_image,
    ood_metrics,
    ood_set_name,
    risk_coverage,
    severity_correlation,
)
from monai_ood.files import atomic_write_text
from monai_ood.preprocessing import SlicePreprocessing

PRESETS = {
    "quick": {
        "preprocessing": {"spacing": (4.0, 4.0), "size": (48, 40)},
        "network_kwargs": {"channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 1},
        "head_channels": 16,
        "epochs": 1,
        "ensemble_members": 2,
        "mc_passes": 3,
        "test_slices_for_artefacts": 4,
        "seeds": [0],
        "num_workers": 0,
    },
    "full": {
        "preprocessing": {"spacing": (2.0, 2.0), "size": (112, 96)},
        "network_kwargs": {},
        "head_channels": 64,
        "epochs": 30,
        "ensemble_members": 5,
        "mc_passes": 10,
        "test_slices_for_artefacts": None,
        "seeds": [0, 1, 2],
        "num_workers": 2,
    },
}
CLASS_NAMES = ["background", "CSF", "grey matter", "white matter"]


def _train_segmenter(
    name, data, preset, prep, seed, out, lambda_out, network_kwargs=None, progress=False, head_config="paper"
):
    config = TrainingConfig(
        head_config=head_config,
        network_kwargs={**preset["network_kwargs"], **(network_kwargs or {})},
        head_channels=preset["head_channels"],
        lambda_out=lambda_out,
        outlier_batch_size=None if lambda_out > 0 else 0,
        max_epochs=preset["epochs"],
        seed=seed,
        num_workers=preset["num_workers"],
    )
    result = train(
        data["train"],
        data["validation"],
        config,
        out / name,
        prep,
        CLASS_NAMES,
        overwrite=True,
        progress=progress,
    )
    steps = int(result.history[-1]["iteration"])
    return load_model(result.best_checkpoint, device="cpu").net, steps


def _fit_posthoc_terms(net, data, batch_size: int = 32) -> None:
    """What ``train`` + ``calibrate`` do after training: the Gaussian term and, with several terms,
    their Weibull hazards on the validation images (``train`` already refitted the saved model)."""
    if net.term_weibull is not None:
        val = np.stack([i["image"] for i in data["validation"]]).astype(np.float32)
        net.fit_score_combination(
            torch.from_numpy(val[i : i + batch_size]) for i in range(0, len(val), batch_size)
        )


def _assemble(
    head, plain, dropout, members, fcdd_net, autoencoder, train_items, preset, seed, improved=None
) -> dict[str, tuple]:
    """{method: (detector, the segmentation network whose failures it should predict)}."""
    from monai_ood.detectors import (
        EnergyDetector,
        EnsembleDetector,
        EntropyDetector,
        FCDDDetector,
        MahalanobisDetector,
        MaxSoftmaxDetector,
        MCDropoutDetector,
        MECAMDetector,
    )

    detectors = {
        "prototype head": (PrototypeDetector(head), head.backbone),
        "prototype head (default)": (PrototypeDetector(improved), improved.backbone),
        "MSP": (MaxSoftmaxDetector(plain.backbone), plain.backbone),
        "entropy": (EntropyDetector(plain.backbone), plain.backbone),
        "energy": (EnergyDetector(plain.backbone), plain.backbone),
        "MC dropout": (
            MCDropoutDetector(dropout.backbone, num_passes=preset["mc_passes"], seed=seed),
            dropout.backbone,
        ),
        "ensemble": (EnsembleDetector(members), members[0]),
        "FCDD": (FCDDDetector(fcdd_net), fcdd_net),
        "Mahalanobis": (MahalanobisDetector(plain.backbone).fit(train_items), plain.backbone),
        # the issue defines the score as how much the encoder features change (larger = more OOD); the
        # MECAM abstract hypothesises the opposite (ood_if="smaller_change", the class default)
        "MECAM": (MECAMDetector(plain.backbone, ood_if="larger_change"), plain.backbone),
        "autoencoder": (autoencoder, plain.backbone),
    }
    return detectors


def _build_detectors(data, preset, prep, seed, out) -> tuple[dict[str, tuple], dict]:
    """Train every model; return {method: (detector, segmentation network)} and training facts."""
    from monai_ood.detectors.autoencoder import AutoencoderDetector
    from monai_ood.detectors.fcdd import train_fcdd
    from monai_ood.networks.presets import PRESETS as NETWORKS

    facts = {}
    start = time.perf_counter()
    head, steps = _train_segmenter("head", data, preset, prep, seed, out, lambda_out=0.1)
    facts["train_seconds_head"] = time.perf_counter() - start
    start = time.perf_counter()
    improved, _ = _train_segmenter("head_default", data, preset, prep, seed, out, 0.1, head_config="default")
    facts["train_seconds_head_default"] = time.perf_counter() - start
    _fit_posthoc_terms(improved, data)
    start = time.perf_counter()
    plain, _ = _train_segmenter("plain", data, preset, prep, seed, out, lambda_out=0.0)
    facts["train_seconds_plain"] = time.perf_counter() - start
    facts["steps"] = steps
    dropout, _ = _train_segmenter(
        "dropout", data, preset, prep, seed, out, lambda_out=0.0, network_kwargs={"dropout": 0.2}
    )
    members = [plain.backbone] + [
        _train_segmenter(f"member{m}", data, preset, prep, seed * 100 + m, out, lambda_out=0.0)[0].backbone
        for m in range(1, preset["ensemble_members"])
    ]
    # FCDD trains its own copy of the same architecture, jointly with segmentation, for the same steps
    fcdd_backbone = NETWORKS["unet"].build(2, 1, 4, **preset["network_kwargs"])
    fcdd_net = train_fcdd(fcdd_backbone, data["train"], steps=steps, seed=seed)
    autoencoder = AutoencoderDetector(steps=steps, seed=seed).fit(data["train"])
    detectors = _assemble(
        head, plain, dropout, members, fcdd_net, autoencoder, data["train"], preset, seed, improved
    )
    facts["dice"] = {}
    for name, net in (("with head", head), ("with default head", improved), ("plain", plain)):
        prediction = _segment(net, np.stack([i["image"] for i in data["test"]]))
        dice = dice_per_class(prediction, np.stack([i["label"][0] for i in data["test"]]), 4)
        facts["dice"][name] = {
            "per_class": dict(zip(CLASS_NAMES[1:], dice.tolist(), strict=True)),
            "mean": float(np.nanmean(dice)),
        }
    return detectors, facts


@torch.no_grad()
def _segment(net, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    net.eval()
    out = [
        net(torch.from_numpy(images[i : i + batch_size])).argmax(1).numpy()
        for i in range(0, len(images), batch_size)
    ]
    return np.concatenate(out)


def _scores(detector, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    scores = [
        detector(torch.from_numpy(images[i : i + batch_size])).image_score.cpu().numpy()
        for i in range(0, len(images), batch_size)
    ]
    return np.concatenate(scores).astype(np.float64)


def measure_costs(detectors: dict[str, tuple], plain_net, images: np.ndarray, repeats: int = 3) -> dict:
    """Seconds per image of every method and of one plain forward pass, in one run: each warmed up once,
    then timed in alternation (so all see the same machine load), medians over ``repeats``."""
    runs = {"plain forward": lambda: _segment(plain_net, images)}
    runs.update(
        {method: (lambda d=detector: _scores(d, images)) for method, (detector, _) in detectors.items()}
    )
    for run in runs.values():
        run()
    times = defaultdict(list)
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append((time.perf_counter() - start) / len(images))
    seconds = {name: float(np.median(values)) for name, values in times.items()}
    plain = seconds.pop("plain forward")
    return {
        "plain_forward_seconds_per_image": plain,
        "methods": {
            m: {"seconds_per_image": v, "ratio_to_plain_forward": v / plain} for m, v in seconds.items()
        },
    }


def ood_sets_of(items) -> dict[str, list]:
    """OOD items grouped by set name."""
    sets = defaultdict(list)
    for item in items:
        sets[ood_set_name(item)].append(item)
    return sets


def evaluate_detector(detector, segmenter, ind_images: np.ndarray, sets: dict, artefact_base) -> dict:
    """Every column of one method: per-set and per-category OOD metrics, severity rho per artefact, and
    risk-coverage (AURC) of the segmenter's failures on the clean and artefact images."""
    ind_scores = _scores(detector, ind_images)
    row = {"sets": {}}
    by_artefact = defaultdict(lambda: ([], [], [], []))  # scores, severities, images, labels
    clean = np.stack([i["image"] for i in artefact_base]).astype(np.float32)
    clean_labels = np.stack([i["label"][0] for i in artefact_base])
    clean_scores = _scores(detector, clean)
    for key, items in sorted(sets.items()):
        images = np.stack([i.image for i in items]).astype(np.float32)
        scores = _scores(detector, images)
        row["sets"][key] = {"category": items[0].category, "n": len(items), **ood_metrics(ind_scores, scores)}
        if items[0].artefact is not None:
            bucket = by_artefact[items[0].artefact]
            bucket[0].extend(scores)
            bucket[1].extend([items[0].severity] * len(items))
            bucket[2].extend(images)
            bucket[3].extend(i.label[0] for i in items)
    row["severity_spearman"] = {}
    failure_scores, failure_images, failure_labels = list(clean_scores), list(clean), list(clean_labels)
    for name, (scores, severities, images, labels) in sorted(by_artefact.items()):
        row["severity_spearman"][name] = severity_correlation(
            list(clean_scores) + scores, [0] * len(clean) + severities
        )
        failure_scores += scores
        failure_images += images
        failure_labels += labels
    risks = 1.0 - dice_per_image(
        _segment(segmenter, np.stack(failure_images).astype(np.float32)), np.stack(failure_labels), 4
    )
    row["failure"] = risk_coverage(failure_scores, risks)
    row["categories"] = category_means(row["sets"])
    row["mean"] = {m: float(np.mean([v[m] for v in row["sets"].values()])) for m in OOD_METRICS}
    return row


def run_seed(preset: dict, seed: int, out: Path) -> dict:
    prep = SlicePreprocessing(**preset["preprocessing"])
    torch.manual_seed(seed)
    data = load_brain_dataset(preprocessing=prep)
    test = data["test"]
    ind_items = list(test) + list(brain_test_variants(test, seed=seed))
    artefact_base = (
        test if preset["test_slices_for_artefacts"] is None else test[: preset["test_slices_for_artefacts"]]
    )
    ood_items = load_ood_sets(artefact_base, preprocessing=prep, seed=seed)
    detectors, facts = _build_detectors(data, preset, prep, seed, out / f"seed{seed}")

    ind_images = np.stack([i["image"] for i in ind_items]).astype(np.float32)
    sets = ood_sets_of(ood_items)
    costs = measure_costs(detectors, detectors["MSP"][1], ind_images)
    results = {"facts": facts, "costs": costs, "methods": {}}
    for method, (detector, segmenter) in detectors.items():
        row = evaluate_detector(detector, segmenter, ind_images, sets, artefact_base)
        row["time_ratio_to_plain_forward"] = costs["methods"][method]["ratio_to_plain_forward"]
        results["methods"][method] = row
    return results


def timing_only(preset: dict, seed: int) -> dict:
    """:func:`measure_costs` with untrained models of exactly the benchmark's architectures: the cost of
    a method does not depend on its weights, so every method is timed in one run in about a minute."""
    from monai_ood.detectors import AutoencoderDetector, FCDDNet
    from monai_ood.networks import create_prototype_network

    prep = SlicePreprocessing(**preset["preprocessing"])
    data = load_brain_dataset(preprocessing=prep)
    torch.manual_seed(seed)

    def network(**extra):
        kwargs = {**preset["network_kwargs"], **extra}
        return create_prototype_network(
            "unet", 2, 1, 4, preset["head_channels"], network_kwargs=kwargs
        ).eval()

    head, plain, dropout = network(), network(), network(dropout=0.2)
    improved = create_prototype_network(
        "unet",
        2,
        1,
        4,
        preset["head_channels"],
        network_kwargs=preset["network_kwargs"],
        **TrainingConfig(head_config="default").wrapper_kwargs,
    ).eval()
    train = data["train"][:16]
    improved.refit(
        [
            (
                torch.from_numpy(np.stack([i["image"] for i in train])),
                torch.from_numpy(np.stack([i["label"] for i in train])),
            )
        ]
    )
    members = [plain.backbone] + [network().backbone for _ in range(1, preset["ensemble_members"])]
    fcdd_net = FCDDNet(network().backbone).eval()
    autoencoder = AutoencoderDetector(steps=0, seed=seed).fit(data["train"])
    detectors = _assemble(
        head, plain, dropout, members, fcdd_net, autoencoder, data["train"], preset, seed, improved
    )
    test = data["test"]
    images = np.stack([i["image"] for i in list(test) + list(brain_test_variants(test, seed=seed))]).astype(
        np.float32
    )
    return measure_costs(detectors, plain.backbone, images)


def timing_markdown(costs: dict, command: str) -> str:
    lines = [f"Cost per image as a ratio to one plain forward pass (`{command}`; one run, medians of 3):", ""]
    lines += ["| method | seconds / image | ratio to plain forward |", "|---|---|---|"]
    lines.append(f"| plain forward | {costs['plain_forward_seconds_per_image']:.4f} | 1.000 |")
    for method, row in costs["methods"].items():
        lines.append(f"| {method} | {row['seconds_per_image']:.4f} | {row['ratio_to_plain_forward']:.3f} |")
    return "\n".join(lines) + "\n"


def _mean_std(values) -> str:
    values = np.asarray(values, dtype=float)
    return f"{values.mean():.3f}" if values.size == 1 else f"{values.mean():.3f} ± {values.std(ddof=1):.3f}"


def markdown(report: dict, timing: dict | None = None) -> str:
    """The tables; with ``timing`` (a ``timing.json``), its cost ratios replace the per-run ones."""
    seeds = report["seeds"]
    runs = [report["runs"][str(s)] for s in seeds]
    methods = list(runs[0]["methods"])
    categories = sorted(runs[0]["methods"][methods[0]]["categories"])
    lines = [
        f"# OOD benchmark ({report['preset']})",
        "",
        f"Command: `{report['command']}`; seeds {seeds}.",
        "",
    ]
    lines += [
        "| method | "
        + " | ".join(f"AUROC {c}" for c in categories)
        + " | mean AUROC | mean FPR@95TPR | AURC | severity ρ (mean) | time / plain fwd"
        + (" (timing.json)" if timing is not None else "")
        + " |"
    ]
    lines += ["|---" * (len(categories) + 6) + "|"]
    for method in methods:
        rows = [run["methods"][method] for run in runs]
        cells = [_mean_std([r["categories"][c]["auroc"] for r in rows]) for c in categories]
        cells += [
            _mean_std([r["mean"]["auroc"] for r in rows]),
            _mean_std([r["mean"]["fpr95"] for r in rows]),
        ]
        cells += [_mean_std([r["failure"]["aurc"] for r in rows])]
        cells += [_mean_std([np.mean(list(r["severity_spearman"].values())) for r in rows])]
        if timing is not None:
            cells += [f"{timing['methods'][method]['ratio_to_plain_forward']:.2f}"]
        else:
            cells += [_mean_std([r["time_ratio_to_plain_forward"] for r in rows])]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += ["", "Dice on the InD test slices (segmentation with and without the head):", ""]
    lines += ["| network | " + " | ".join(CLASS_NAMES[1:]) + " | mean |", "|---" * len(CLASS_NAMES) + "|---|"]
    for network in ("with head", "with default head", "plain"):
        dice = [r["facts"]["dice"][network] for r in runs if network in r["facts"]["dice"]]
        if not dice:
            continue
        cells = [_mean_std([d["per_class"][c] for d in dice]) for c in CLASS_NAMES[1:]]
        lines.append(f"| {network} | " + " | ".join(cells + [_mean_std([d["mean"] for d in dice])]) + " |")
    lines += [
        "",
        "Per OOD set (AUROC, first seed):",
        "",
        "| set | category | " + " | ".join(methods) + " |",
        "|---" * (len(methods) + 2) + "|",
    ]
    first = runs[0]["methods"]
    for key, values in first[methods[0]]["sets"].items():
        lines.append(
            f"| {key} | {values['category']} | "
            + " | ".join(f"{first[m]['sets'][key]['auroc']:.3f}" for m in methods)
            + " |"
        )
    return "\n".join(lines) + "\n"


def rewrite_markdown(results_json: Path) -> None:
    """Regenerate ``results.md`` beside a ``results.json`` (the table layout may change after a run)."""
    report = json.loads(Path(results_json).read_text(encoding="utf-8"))
    timing_path = Path(results_json).with_name("timing.json")
    timing = json.loads(timing_path.read_text(encoding="utf-8")) if timing_path.exists() else None
    text = markdown(report, timing)
    if timing is not None:
        text += "\n" + timing_markdown(timing, timing["command"])
    atomic_write_text(Path(results_json).with_suffix(".md"), text, overwrite=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument(
        "--quick", action="store_const", const="quick", dest="preset", help="tiny: every method and column"
    )
    group.add_argument(
        "--full", action="store_const", const="full", dest="preset", help="the real table (about an hour)"
    )
    parser.add_argument("--seeds", type=int, nargs="+", help="override the preset's seeds")
    parser.add_argument(
        "--epochs", type=int, help="override the preset's training epochs (e.g. a smoke test)"
    )
    parser.add_argument(
        "--timing-only", action="store_true", help="only time every method (untrained models) -> timing.json"
    )
    parser.add_argument("--output", type=Path, help="results folder (default: benchmarks/results/<preset>)")
    parser.add_argument(
        "--work-dir",
        type=Path,
        help="checkpoints of the trained models (default: outputs/benchmarks/<preset>)",
    )
    args = parser.parse_args(argv)
    preset = dict(PRESETS[args.preset])
    if args.epochs is not None:
        preset["epochs"] = args.epochs
    seeds = args.seeds or preset["seeds"]
    output = args.output or Path(__file__).parent / "results" / args.preset
    import monai

    report = {
        "preset": args.preset,
        "command": "python benchmarks/run.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "seeds": seeds,
        "settings": preset,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "monai": monai.__version__,
        },
        "runs": {},
    }
    if args.timing_only:
        costs = timing_only(preset, seeds[0])
        command = report["command"]
        atomic_write_text(
            output / "timing.json",
            json.dumps({"command": command, "seed": seeds[0], **costs}, indent=2),
            overwrite=True,
        )
        print(timing_markdown(costs, command))
        return 0
    work = args.work_dir or Path("outputs") / "benchmarks" / args.preset
    for seed in seeds:
        print(f"== seed {seed}", flush=True)
        report["runs"][str(seed)] = run_seed(preset, seed, work)
    atomic_write_text(output / "results.json", json.dumps(report, indent=2), overwrite=True)
    atomic_write_text(output / "results.md", markdown(report), overwrite=True)
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The OOD benchmark v2 of ``../shared/BENCHMARK.md``: every method, same backbone, data and step budget.

Presets:

* ``--quick``: tiny networks, a few optimiser steps, a few artefact slices: checks that every method and
  every column is produced (runs inside the test suite; its numbers mean nothing);
* ``--full``: the real table (MONAI UNet 16-256 on 2 mm 112x96 axial slices of the four-brain InD pool,
  the same number of optimiser steps for every trained model, 5 ensemble members, 10 MC-dropout passes,
  seeds 0 1 2).

Data, sets and metrics come from :mod:`monai_ood.benchmark` (the pool, the OOD sets, the lesion set, and
:func:`monai_ood.benchmark.harness.evaluate`, the same code path as ``monai-ood evaluate``).

Methods: the prototype head as published (``paper``), the project's default head (the paper's training,
then its post-hoc steps: prototypes refitted on the training features and the Gaussian term, Weibull
hazards on validation), MSP, predictive entropy, energy, MC dropout entropy, deep ensemble entropy, deep
ensemble pairwise Dice, FCDD on the same encoder layer (trained with the same outliers), single-Gaussian
Mahalanobis on pooled bottleneck features, multi-layer feature statistics (FRODO), intensity-histogram
features (IHF), the MECAM-style multi-exit CAM masking score and an autoencoder reconstruction error.

Budget: ``steps`` optimiser steps for every trained model (batch 8). Models trained by ``monai-ood
train``'s engine run whole epochs, ``ceil(steps / batches per epoch)`` of them, under one cosine cycle
over the run (``warm_restart_epochs`` = the epochs, no restart); FCDD and the autoencoder then train for
exactly the steps those runs took.

Outputs (``--output``, default ``benchmarks/results/v2/<preset>``): ``seeds/seed<N>.json`` after each seed
(a re-run skips the seeds already there: the run is resumable, ``--overwrite`` starts again),
``results.json`` (every number and score, the command, seeds, sources present, package versions and the
wall time), ``results.md`` (the tables) and ``plots/`` (ROC curves per category and score histograms per
method, first seed).

Run: ``python benchmarks/run.py --quick`` or ``python benchmarks/run.py --full``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from monai_ood.benchmark.harness import MEAN_CATEGORIES, benchmark_sets, detector_scorer, evaluate
from monai_ood.benchmark.pool import CLASS_NAMES as POOL_CLASS_NAMES
from monai_ood.benchmark.pool import load_brain_dataset
from monai_ood.calibration import DegreeCalibrator
from monai_ood.engines.checkpoint import build_network, load_model, make_model_config
from monai_ood.engines.training import TrainingConfig, train
from monai_ood.files import atomic_write_text
from monai_ood.preprocessing import SlicePreprocessing

PRESETS = {
    "quick": {
        "preprocessing": {"spacing": (4.0, 4.0), "size": (48, 40)},
        "network_kwargs": {"channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 1},
        "head_channels": 16,
        "steps": 8,
        "ensemble_members": 2,
        "mc_passes": 3,
        "artefact_limit": 4,
        "seeds": [0],
        "num_workers": 0,
    },
    "full": {
        "preprocessing": {"spacing": (2.0, 2.0), "size": (112, 96)},
        "network_kwargs": {},
        "head_channels": 64,
        "steps": 500,
        "ensemble_members": 5,
        "mc_passes": 10,
        "artefact_limit": None,
        "seeds": [0, 1, 2],
        "num_workers": 2,
    },
}
CLASS_NAMES = list(POOL_CLASS_NAMES)
BATCH_SIZE = 8
METHODS = (
    "default (fused)",
    "prototype head (paper)",
    "prototype head (default)",
    "MSP",
    "entropy",
    "energy",
    "MC dropout",
    "ensemble entropy",
    "ensemble pairwise Dice",
    "FCDD",
    "Mahalanobis",
    "feature statistics (FRODO)",
    "intensity histogram (IHF)",
    "MECAM",
    "autoencoder",
)


def epochs_for(steps: int, num_train: int) -> int:
    """Whole epochs of batch :data:`BATCH_SIZE` that reach ``steps`` optimiser steps."""
    return max(1, math.ceil(steps / math.ceil(num_train / BATCH_SIZE)))


def _train_segmenter(name, data, preset, prep, seed, out, lambda_out, network_kwargs=None):
    """One run of ``monai-ood train``'s engine (paper head, or a plain network with lambda_out = 0)."""
    epochs = epochs_for(preset["steps"], len(data["train"]))
    config = TrainingConfig(
        head_config="paper",
        network_kwargs={**preset["network_kwargs"], **(network_kwargs or {})},
        head_channels=preset["head_channels"],
        lambda_out=lambda_out,
        outlier_batch_size=None if lambda_out > 0 else 0,
        batch_size=BATCH_SIZE,
        max_epochs=epochs,
        warm_restart_epochs=epochs,
        warm_restart_mult=1,
        seed=seed,
        num_workers=preset["num_workers"],
    )
    start = time.perf_counter()
    result = train(data["train"], data["validation"], config, out / name, prep, CLASS_NAMES, overwrite=True)
    seconds = time.perf_counter() - start
    steps = int(result.history[-1]["iteration"])
    return load_model(result.best_checkpoint, device="cpu").net, {"steps": steps, "seconds": seconds}


def _batches(items, key="image", batch_size=32):
    for start in range(0, len(items), batch_size):
        yield torch.from_numpy(np.stack([np.asarray(i[key]) for i in items[start : start + batch_size]]))


def default_head_from(paper_net, data, preset):
    """The default head from a paper head's weights: the two train identically, the default then refits
    its prototypes on the training features, fits the Gaussian term, and fits the terms' Weibull hazards
    on the validation images (what ``monai-ood train`` + ``calibrate`` do with ``--head-config default``)."""
    wrapper = TrainingConfig(head_config="default").wrapper_kwargs
    config = make_model_config(
        "unet", 2, 1, len(CLASS_NAMES), preset["head_channels"], preset["network_kwargs"], wrapper
    )
    net = build_network(config)
    missing, unexpected = net.load_state_dict(paper_net.state_dict(), strict=False)
    if unexpected or any(not k.startswith(("gaussian", "term_weibull")) for k in missing):
        raise RuntimeError(f"default head: unexpected state-dict mismatch {missing!r} {unexpected!r}")
    net.refit(zip(_batches(data["train"]), _batches(data["train"], "label"), strict=True), prototypes=True)
    if net.term_weibull is not None:
        net.fit_score_combination(_batches(data["validation"]))
    return net.eval()


def build_methods(data, preset, prep, seed, work: Path, wanted=METHODS, ablation: bool = True):
    """Train the models the ``wanted`` methods need (one seed); returns ``({method: (detector,
    segmenter)}, {ablation variant: (detector, segmenter)}, facts)``."""
    from monai_ood.detectors import (
        AutoencoderDetector,
        EnergyDetector,
        EnsembleDetector,
        EnsembleDiceDetector,
        EntropyDetector,
        FCDDDetector,
        FeatureStatisticsDetector,
        FusedDetector,
        IntensityHistogramDetector,
        MahalanobisDetector,
        MaxSoftmaxDetector,
        MCDropoutDetector,
        MECAMDetector,
        PrototypeDetector,
        train_fcdd,
    )
    from monai_ood.networks.presets import PRESETS as NETWORKS

    facts = {"training": {}}
    models: dict = {}

    def model(name):  # trained once, on first use
        if name in models:
            return models[name]
        if name == "head":
            net, facts["training"]["paper head"] = _train_segmenter(
                "head", data, preset, prep, seed, work, 0.1
            )
        elif name == "default head":
            start = time.perf_counter()
            net = default_head_from(model("head"), data, preset)
            facts["training"]["default head post-hoc seconds"] = time.perf_counter() - start
        elif name in ("plain", "dropout"):
            kwargs = {"dropout": 0.2} if name == "dropout" else None
            net, facts["training"][name] = _train_segmenter(name, data, preset, prep, seed, work, 0.0, kwargs)
        elif name == "members":
            net = [model("plain").backbone]
            for m in range(1, preset["ensemble_members"]):
                member, facts["training"][f"member{m}"] = _train_segmenter(
                    f"member{m}", data, preset, prep, seed * 100 + m, work, 0.0
                )
                net.append(member.backbone)
        elif name == "fcdd":
            model("plain")  # the budget: the steps the plain network took
            steps = facts["training"]["plain"]["steps"]
            start = time.perf_counter()
            backbone = NETWORKS["unet"].build(2, 1, len(CLASS_NAMES), **preset["network_kwargs"])
            epochs = epochs_for(preset["steps"], len(data["train"]))
            net = train_fcdd(backbone, data["train"], steps=steps, seed=seed, warm_restart_epochs=epochs)
            facts["training"]["FCDD"] = {"steps": steps, "seconds": time.perf_counter() - start}
        elif name == "autoencoder":
            model("plain")  # the budget: the steps the plain network took
            steps = facts["training"]["plain"]["steps"]
            start = time.perf_counter()
            net = AutoencoderDetector(steps=steps, seed=seed).fit(data["train"])
            facts["training"]["autoencoder"] = {"steps": steps, "seconds": time.perf_counter() - start}
        elif name.startswith("fused"):  # "fused <network>[ unwarped]"
            network = model("plain" if "plain" in name else "head").backbone
            start = time.perf_counter()
            net = FusedDetector(
                network, len(CLASS_NAMES), warped_copies=0 if "unwarped" in name else 1, seed=seed
            ).fit(data["train"], data["validation"])
            facts["training"][f"{name} post-hoc seconds"] = time.perf_counter() - start
        models[name] = net
        return net

    builders = {
        "default (fused)": lambda: (model("fused head"), model("head").backbone),
        "prototype head (paper)": lambda: (PrototypeDetector(model("head")), model("head").backbone),
        "prototype head (default)": lambda: (
            PrototypeDetector(model("default head")),
            model("default head").backbone,
        ),
        "MSP": lambda: (MaxSoftmaxDetector(model("plain").backbone), model("plain").backbone),
        "entropy": lambda: (EntropyDetector(model("plain").backbone), model("plain").backbone),
        "energy": lambda: (EnergyDetector(model("plain").backbone), model("plain").backbone),
        "MC dropout": lambda: (
            MCDropoutDetector(model("dropout").backbone, num_passes=preset["mc_passes"], seed=seed),
            model("dropout").backbone,
        ),
        "ensemble entropy": lambda: (EnsembleDetector(model("members")), model("members")[0]),
        "ensemble pairwise Dice": lambda: (EnsembleDiceDetector(model("members")), model("members")[0]),
        "FCDD": lambda: (FCDDDetector(model("fcdd")), model("fcdd")),
        "Mahalanobis": lambda: (
            MahalanobisDetector(model("plain").backbone).fit(data["train"]),
            model("plain").backbone,
        ),
        "feature statistics (FRODO)": lambda: (
            FeatureStatisticsDetector(model("plain").backbone).fit(data["train"], data["validation"]),
            model("plain").backbone,
        ),
        "intensity histogram (IHF)": lambda: (
            IntensityHistogramDetector().fit(data["train"], data["validation"]),
            model("plain").backbone,
        ),
        # larger feature change = more OOD, as the issue defines it (the MECAM abstract hypothesises the
        # opposite, the class default)
        "MECAM": lambda: (
            MECAMDetector(model("plain").backbone, ood_if="larger_change"),
            model("plain").backbone,
        ),
        "autoencoder": lambda: (model("autoencoder"), model("plain").backbone),
    }
    assert set(builders) == set(METHODS)
    methods = {name: builders[name]() for name in METHODS if name in wanted}
    variants = ablation_variants(model) if ablation else {}
    return methods, variants, facts, model


#: the ablation of the default detector: each term family alone and left out, each fusion rule, the same
#: detector on the plain network (no head training) and fitted without warped copies
ABLATION = (
    "statistics only",
    "prototypes only",
    "intensity only",
    "without statistics",
    "without prototypes",
    "without intensity",
    "fusion sum",
    "fusion max",
    "fusion hazard",
    "on the plain network",
    "fitted without warped copies",
)


def ablation_variants(model) -> dict:
    fused, segmenter = model("fused head"), model("head").backbone
    names = fused.term_names

    def family(kind):
        return [n for n in names if n.split(":")[0] == kind]

    out = {}
    for kind in ("statistics", "prototypes", "intensity"):
        out[f"{kind} only"] = (fused.subset(family(kind)), segmenter)
        out[f"without {kind}"] = (fused.subset([n for n in names if n not in family(kind)]), segmenter)
    for rule in ("sum", "max", "hazard"):
        out[f"fusion {rule}"] = (fused.subset(names, rule), segmenter)
    out["on the plain network"] = (model("fused plain"), model("plain").backbone)
    out["fitted without warped copies"] = (model("fused head unwarped"), segmenter)
    assert set(out) == set(ABLATION)
    return {name: out[name] for name in ABLATION}


@torch.no_grad()
def measure_costs(methods: dict, plain_net, images: np.ndarray, repeats: int = 3) -> dict:
    """Seconds per image of every method and of one plain forward pass, in one run: each warmed up once,
    then timed in alternation (so all see the same machine load), medians over ``repeats``."""
    batch = torch.from_numpy(images)

    def plain():
        plain_net.eval()
        plain_net(batch)

    runs = {"plain forward": plain}
    runs.update({m: (lambda d=detector: d(batch)) for m, (detector, _) in methods.items()})
    for run in runs.values():
        run()
    times = defaultdict(list)
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append((time.perf_counter() - start) / len(images))
    seconds = {name: float(np.median(values)) for name, values in times.items()}
    plain_seconds = seconds.pop("plain forward")
    return {
        "plain_forward_seconds_per_image": plain_seconds,
        "methods": {
            m: {"seconds_per_image": v, "ratio_to_plain_forward": v / plain_seconds}
            for m, v in seconds.items()
        },
    }


def _dice_without_head(model, sets) -> dict:
    """Dice on the InD reference of the network trained with the head (the paper head's, the default
    head's and the default detector's network: one backbone) and of the plain network."""
    from monai_ood.evaluation import dice_per_class

    images = np.stack([i["image"] for i in sets.ind]).astype(np.float32)
    labels = np.stack([i["label"][0] for i in sets.ind])
    out = {}
    for name, network in (
        ("with paper head", "head"),
        ("with default head", "default head"),
        ("plain", "plain"),
    ):
        segmenter = model(network).backbone.eval()
        with torch.no_grad():
            prediction = np.concatenate(
                [
                    segmenter(torch.from_numpy(images[i : i + 32])).argmax(1).numpy()
                    for i in range(0, len(images), 32)
                ]
            )
        dice = dice_per_class(prediction, labels, len(CLASS_NAMES))
        out[name] = {
            "per_class": dict(zip(CLASS_NAMES[1:], dice.tolist(), strict=True)),
            "mean": float(np.nanmean(dice)),
        }
    return out


def _evaluate_all(detectors: dict, sets, costs: dict, validation_images: np.ndarray) -> dict:
    """Every metric of each detector; its OOD degree is fitted on its validation image scores (as
    ``monai-ood calibrate`` fits it) and measured on the InD test images."""
    rows = {}
    for name, (detector, segmenter) in detectors.items():
        print(f"   evaluating {name}", flush=True)
        scorer = detector_scorer(detector, segmenter)
        validation_scores = np.asarray(scorer(validation_images).image_score, dtype=np.float64)
        degree = DegreeCalibrator().fit(validation_scores)
        row = evaluate(scorer, sets, len(CLASS_NAMES), CLASS_NAMES, degree=degree)
        row["degree"]["validation_scores"] = validation_scores.tolist()
        row["time_ratio_to_plain_forward"] = costs["methods"][name]["ratio_to_plain_forward"]
        rows[name] = row
    return rows


def run_seed(preset: dict, seed: int, work: Path, wanted=METHODS, previous: dict | None = None) -> dict:
    """One seed: train what the ``wanted`` methods need, evaluate them and the default detector's
    ablation. With ``previous`` (the stored run of this seed), only ``wanted`` are run again and merged
    into it; the plain network's Dice, retrained with the same seed, is checked against the stored one."""
    prep = SlicePreprocessing(**preset["preprocessing"])
    start = time.perf_counter()
    torch.manual_seed(seed)
    data = load_brain_dataset(preprocessing=prep)
    sets = benchmark_sets(prep, seed=seed, artefact_limit=preset["artefact_limit"])
    methods, variants, facts, model = build_methods(data, preset, prep, seed, work / f"seed{seed}", wanted)
    facts["data"] = {split: len(items) for split, items in data.items()}
    facts["sets"] = sets.summary()
    facts["dice"] = _dice_without_head(model, sets)
    ind_images = np.stack([i["image"] for i in sets.ind]).astype(np.float32)
    costs = measure_costs({**methods, **variants}, model("plain").backbone, ind_images[: 4 * BATCH_SIZE])
    validation_images = np.stack([i["image"] for i in data["validation"]]).astype(np.float32)
    results = {
        "facts": facts,
        "costs": costs,
        "methods": _evaluate_all(methods, sets, costs, validation_images),
    }
    results["ablation"] = _evaluate_all(variants, sets, costs, validation_images)
    fused = model("fused head")
    results["default_detector"] = {"terms": fused.term_names, "selection": fused.selection_}
    seconds = time.perf_counter() - start
    if previous is None:
        plain_step = facts["training"]["plain"]["seconds"] / facts["training"]["plain"]["steps"]
        facts["training_step_ratio_to_plain"] = {
            name: (row["seconds"] / row["steps"]) / plain_step
            for name, row in facts["training"].items()
            if isinstance(row, dict)
        }
        results["seconds"] = seconds
        return results
    merged = copy.deepcopy(previous)
    stored, new = previous["facts"]["dice"]["plain"]["mean"], facts["dice"]["plain"]["mean"]
    merged["facts"]["reproduction"] = {
        "plain Dice stored": stored,
        "plain Dice retrained": new,
        "same": bool(abs(stored - new) < 1e-9),
    }
    merged["facts"]["training"].update(facts["training"])
    merged["facts"]["dice"].update(facts["dice"])
    merged["methods"].update(results["methods"])
    merged["ablation"] = results["ablation"]
    merged["default_detector"] = results["default_detector"]
    merged["costs"]["partial"] = costs
    for name in results["methods"]:
        merged["costs"]["methods"][name] = costs["methods"][name]
    order = [m for m in METHODS if m in merged["methods"]]
    merged["methods"] = {m: merged["methods"][m] for m in order}
    merged.setdefault("partial_runs", []).append({"methods": sorted(results["methods"]), "seconds": seconds})
    merged["seconds"] = previous["seconds"] + seconds
    return merged


# ------------------------------------------------------------------------------------------- tables


def _mean_std(values) -> str:
    values = np.asarray([v for v in values if v is not None], dtype=float)
    if values.size == 0:
        return "–"
    return f"{values.mean():.3f}" if values.size == 1 else f"{values.mean():.3f} ± {values.std(ddof=1):.3f}"


def _get(row, *keys):
    for key in keys:
        if row is None:
            return None
        row = row.get(key)
    return row


def markdown(report: dict) -> str:
    """The tables of ``results.json`` (mean ± std over seeds)."""
    seeds = report["seeds"]
    runs = [report["runs"][str(s)] for s in seeds]
    methods = list(runs[0]["methods"])
    first = runs[0]["methods"]
    categories = sorted({c for m in methods for c in first[m]["categories"]})
    lines = [
        f"# OOD benchmark v2 ({report['preset']})",
        "",
        f"Command: `{report['command']}`; seeds {seeds}; wall time {report.get('wall_minutes', float('nan')):.1f}"
        f" min on this machine; budget {report['settings']['steps']} optimiser steps per trained model "
        f"(took {runs[0]['facts']['training']['plain']['steps']}).",
        "",
        "Sources present: "
        + ", ".join(
            f"{k} {'yes' if v else 'NO (skipped)'}" for k, v in runs[0]["facts"]["sets"]["sources"].items()
        )
        + ".",
        "",
        "AUROC per category (OOD positive; mean over the category's sets), mean over the C1-C3 sets, "
        "FPR@95TPR, failure detection (AURC, lower is better), severity ρ (mean over artefacts), "
        "localisation on the lesion set (pixel AUROC, AUPRO at FPR ≤ 0.3), cost per image / plain forward:",
        "",
        "| method | "
        + " | ".join(f"AUROC {c}" for c in categories)
        + " | mean AUROC | mean FPR@95TPR | AURC | severity ρ | pixel AUROC | AUPRO | time / plain fwd |",
        "|---" * (len(categories) + 8) + "|",
    ]
    for method in methods:
        rows = [run["methods"][method] for run in runs]
        cells = [_mean_std([_get(r, "categories", c, "auroc") for r in rows]) for c in categories]
        cells += [
            _mean_std([r["mean"].get("auroc") for r in rows]),
            _mean_std([r["mean"].get("fpr95") for r in rows]),
            _mean_std([_get(r, "failure", "aurc") for r in rows]),
            _mean_std([np.mean(list(r["severity_spearman"].values())) for r in rows]),
            _mean_std([_get(r, "localisation", "pixel_auroc") for r in rows]),
            _mean_std([_get(r, "localisation", "aupro") for r in rows]),
            _mean_std([r["time_ratio_to_plain_forward"] for r in rows]),
        ]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += ["", "Dice on the InD test set (segmentation with and without the head):", ""]
    lines += ["| network | " + " | ".join(CLASS_NAMES[1:]) + " | mean |", "|---" * len(CLASS_NAMES) + "|---|"]
    for network in runs[0]["facts"]["dice"]:
        dice = [r["facts"]["dice"][network] for r in runs]
        cells = [_mean_std([d["per_class"][c] for d in dice]) for c in CLASS_NAMES[1:]]
        lines.append(f"| {network} | " + " | ".join(cells + [_mean_std([d["mean"] for d in dice])]) + " |")
    artefacts = sorted(first[methods[0]]["severity_spearman"])
    lines += ["", "Severity ρ per artefact (Spearman, score vs severity 0-3):", ""]
    lines += ["| method | " + " | ".join(artefacts) + " |", "|---" * (len(artefacts) + 1) + "|"]
    for method in methods:
        rows = [run["methods"][method] for run in runs]
        lines.append(
            f"| {method} | "
            + " | ".join(_mean_std([r["severity_spearman"][a] for r in rows]) for a in artefacts)
            + " |"
        )
    lines += ["", "AUROC per OOD set (mean ± std over seeds):", ""]
    lines += ["| set | category | n | " + " | ".join(methods) + " |", "|---" * (len(methods) + 3) + "|"]
    for key, values in first[methods[0]]["sets"].items():
        cells = [_mean_std([run["methods"][m]["sets"][key]["auroc"] for run in runs]) for m in methods]
        lines.append(f"| {key} | {values['category']} | {values['n']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Resampling sensitivity: AUROC of the InD reference's warped variants against its clean slices "
        "(0.5 = the one mild warp does not move the score; BENCHMARK.md pitfalls), and of the mild noise "
        "set against the clean slices it was made from:",
        "",
        "| method | warped vs clean | noise severity 1 vs its clean slices |",
        "|---|---|---|",
    ]
    for method in methods:
        rows = [run["methods"][method] for run in runs]
        lines.append(
            f"| {method} | {_mean_std([r['ind']['warped_vs_clean_auroc'] for r in rows])} | "
            f"{_mean_std([_artefact_vs_clean(r, 'noise severity 1') for r in rows])} |"
        )
    lines += degree_markdown(report)
    lines += ["", "Training step cost / plain step (same run, first seed):", ""]
    ratios = runs[0]["facts"]["training_step_ratio_to_plain"]
    lines += ["| model | ratio |", "|---|---|"] + [f"| {k} | {v:.2f} |" for k, v in ratios.items()]
    lines += ablation_markdown(report)
    if report.get("plots"):
        lines += [
            "",
            "Plots (first seed): "
            + ", ".join(f"[{Path(p).name}](plots/{Path(p).name})" for p in report["plots"]),
        ]
    return "\n".join(lines) + "\n"


DEFAULT = "default (fused)"


def degree_markdown(report: dict) -> list[str]:
    """The OOD degree of the methods whose runs measured it: calibration on the InD test images and
    Spearman ρ of the degree with artefact severity."""
    runs = [report["runs"][str(s)] for s in report["seeds"]]
    methods = [m for m in runs[0]["methods"] if all(r["methods"][m].get("degree") for r in runs)]
    if not methods:
        return []
    first = runs[0]["methods"][methods[0]]["degree"]
    thresholds = [row["threshold"] for row in first["calibration"]]
    lines = [
        "",
        "OOD degree (`monai_ood.calibration.DegreeCalibrator` fitted on each method's validation image "
        "scores, as `monai-ood calibrate` does): fraction of InD images with a degree above t, promised "
        "1 - t. InD reference = the test slices and their mild variants; clean = the test slices alone "
        f"(n = {first['calibration'][0]['n']} and {first['subsets']['clean test slices'][0]['n']} per seed; "
        "in brackets the 95% range of the fraction if the promise held, binomial):",
        "",
        "| method | InD images | " + " | ".join(f"> {t:g} (promised {1 - t:.2f})" for t in thresholds) + " |",
        "|---" * (len(thresholds) + 2) + "|",
    ]
    for method in methods:
        for label, get in (
            ("reference", lambda d: d["calibration"]),
            ("clean", lambda d: d["subsets"]["clean test slices"]),
        ):
            rows = [get(r["methods"][method]["degree"]) for r in runs]
            cells = [
                _mean_std([row[k]["observed_above"] for row in rows])
                + f" [{rows[0][k]['range95'][0]:.2f}, {rows[0][k]['range95'][1]:.2f}]"
                for k in range(len(thresholds))
            ]
            lines.append(f"| {method} | {label} | " + " | ".join(cells) + " |")
    artefacts = sorted(first["severity_spearman"])
    lines += ["", "Severity ρ of the OOD degree per artefact (Spearman, degree vs severity 0-3):", ""]
    lines += ["| method | " + " | ".join(artefacts) + " | mean |", "|---" * (len(artefacts) + 2) + "|"]
    for method in methods:
        rows = [r["methods"][method]["degree"]["severity_spearman"] for r in runs]
        cells = [_mean_std([row[a] for row in rows]) for a in artefacts]
        cells.append(_mean_std([np.mean(list(row.values())) for row in rows]))
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    if report.get("degree_plot"):
        lines += [
            "",
            f"Calibration plot ({DEFAULT}, every seed): [{report['degree_plot']}]({report['degree_plot']})",
        ]
    return lines


def _seed_mean(values) -> float | None:
    values = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(values)) if values else None


def _goal(measured, target, met: bool | None, **extra) -> dict:
    return {"measured": measured, "target": target, "met": None if measured is None else bool(met), **extra}


def goals(report: dict) -> dict:
    """The goals of the default detector (issue "A default detector that detects"), each with its value
    measured here (mean over seeds), its target and whether it is met."""
    runs = [report["runs"][str(s)] for s in report["seeds"]]
    if not all(DEFAULT in run["methods"] for run in runs):
        return {}
    rows = [run["methods"][DEFAULT] for run in runs]
    baselines = [m for m in runs[0]["methods"] if m != DEFAULT]

    def mean_of(method, getter):
        return _seed_mean([getter(run["methods"][method]) for run in runs])

    out: dict = {}

    def category_auroc(category):
        return lambda r: _get(r, "categories", category, "auroc")

    getters = {f"AUROC {c}": category_auroc(c) for c in sorted(rows[0]["categories"])}
    getters["AURC"] = lambda r: _get(r, "failure", "aurc")
    getters["severity rho"] = lambda r: float(np.mean(list(r["severity_spearman"].values())))
    for name, getter in getters.items():
        lower = name == "AURC"
        ours = mean_of(DEFAULT, getter)
        values = {m: mean_of(m, getter) for m in baselines}
        values = {m: v for m, v in values.items() if v is not None}
        best = (min if lower else max)(values, key=values.get)
        met = ours <= values[best] if lower else ours >= values[best]
        out[f"{name} >= every baseline" if not lower else "AURC <= every baseline"] = _goal(
            ours, values[best], met, best_baseline=best
        )

    def set_mean(predicate):
        return _seed_mean(
            [float(np.mean([v["auroc"] for k, v in r["sets"].items() if predicate(k, v)])) for r in rows]
        )

    for category, target in (("C1", 0.995), ("C2", 0.95)):
        value = mean_of(DEFAULT, lambda r, c=category: _get(r, "categories", c, "auroc"))
        out[f"AUROC {category}"] = _goal(value, target, value is not None and value >= target)
    for severity, target in (("3", 0.99), ("2", 0.95)):
        value = set_mean(lambda k, v, s=severity: k.endswith(f"severity {s}"))
        out[f"AUROC C3 artefacts severity {severity}"] = _goal(value, target, value >= target)
    for name in ("t2_2009c", "b0_dwi"):
        value = _seed_mean([_get(r, "sets", name, "auroc") for r in rows])
        out[f"AUROC {name}"] = _goal(value, 0.99, value is not None and value >= 0.99)
    value = _seed_mean([r["mean"]["fpr95"] for r in rows])
    out["mean FPR@95TPR"] = _goal(value, 0.15, value <= 0.15)
    per_artefact = {
        a: _seed_mean([r["severity_spearman"][a] for r in rows]) for a in rows[0]["severity_spearman"]
    }
    worst = min(per_artefact, key=per_artefact.get)
    out["severity rho, every artefact"] = _goal(
        per_artefact[worst], 0.9, per_artefact[worst] >= 0.9, worst=worst, per_artefact=per_artefact
    )
    value = _seed_mean([_get(r, "localisation", "pixel_auroc") for r in rows])
    out["pixel AUROC on the lesion set"] = _goal(value, 0.90, value is not None and value >= 0.90)
    with_head = _seed_mean([run["facts"]["dice"]["with paper head"]["mean"] for run in runs])
    plain = _seed_mean([run["facts"]["dice"]["plain"]["mean"] for run in runs])
    out["Dice with the detector >= plain - 0.005"] = _goal(
        with_head - plain, -0.005, with_head - plain >= -0.005, dice_with_detector=with_head, dice_plain=plain
    )
    value = _seed_mean([r["time_ratio_to_plain_forward"] for r in rows])
    out["inference time / plain forward"] = _goal(value, 1.05, value <= 1.05)
    value = _seed_mean([run["facts"]["training"].get("fused head post-hoc seconds") for run in runs])
    out["post-hoc fit of every term on the pool (s)"] = _goal(
        value, 60.0, value is not None and value <= 60.0
    )
    return out


def _fmt(value) -> str:
    return "–" if value is None else f"{value:.3f}"


def ablation_markdown(report: dict) -> list[str]:
    runs = [report["runs"][str(s)] for s in report["seeds"]]
    if not all("ablation" in run for run in runs):
        return []
    first = runs[0]
    categories = sorted(first["methods"][DEFAULT]["categories"])
    lines = [
        "",
        "## The default detector",
        "",
        "Terms: " + ", ".join(f"`{t}`" for t in first["default_detector"]["terms"]) + ".",
        "",
        "Chosen on outliers synthesised from the validation split (which term families enter the image "
        "score, and the fusion rule: the best mean AUROC over the ops; in brackets the runner-up and the "
        "leave-one-op-out estimate of the choice), per seed: "
        + "; ".join(
            f"seed {s}: **{sel.get('chosen', sel['rule'])}** ("
            + (
                f"{max(sel['mean_auroc'].values()):.3f}; runner-up "
                f"{sorted(sel['mean_auroc'], key=sel['mean_auroc'].get)[-2]} "
                f"{sorted(sel['mean_auroc'].values())[-2]:.3f}; leave-one-op-out "
                f"{_fmt(sel.get('leave_one_op_out_auroc'))}"
                if "mean_auroc" in sel
                else "given"
            )
            + ")"
            for s, sel in (
                (s, run["default_detector"]["selection"])
                for s, run in zip(report["seeds"], runs, strict=True)
            )
        )
        + ".",
        "",
        "Ablation (every variant from the same fitted detector of each seed, except the last two, fitted "
        "again; maps of the variants without prototype terms are none):",
        "",
        "| variant | "
        + " | ".join(f"AUROC {c}" for c in categories)
        + " | mean AUROC | AURC | severity ρ | pixel AUROC | warped vs clean |",
        "|---" * (len(categories) + 6) + "|",
    ]
    variants = [DEFAULT, *first["ablation"]]
    for variant in variants:
        rows = [run["methods"][DEFAULT] if variant == DEFAULT else run["ablation"][variant] for run in runs]
        cells = [_mean_std([_get(r, "categories", c, "auroc") for r in rows]) for c in categories]
        cells += [
            _mean_std([r["mean"].get("auroc") for r in rows]),
            _mean_std([_get(r, "failure", "aurc") for r in rows]),
            _mean_std([np.mean(list(r["severity_spearman"].values())) for r in rows]),
            _mean_std([_get(r, "localisation", "pixel_auroc") for r in rows]),
            _mean_std([_get(r, "ind", "warped_vs_clean_auroc") for r in rows]),
        ]
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    report_goals = report.get("goals") or goals(report)
    if report_goals:
        lines += ["", "## Goals (mean over seeds; `goals` in results.json)", ""]
        lines += ["| goal | measured | target | met |", "|---|---|---|---|"]
        for name, goal in report_goals.items():
            extra = f" ({goal['best_baseline']})" if "best_baseline" in goal else ""
            extra = f" ({goal['worst']})" if "worst" in goal else extra
            met = {True: "yes", False: "**no**", None: "–"}[goal["met"]]
            lines.append(f"| {name} | {_fmt(goal['measured'])} | {_fmt(goal['target'])}{extra} | {met} |")
    return lines


def _artefact_vs_clean(row: dict, name: str) -> float | None:
    """AUROC of an artefact set against the clean slices it was made from: the InD reference is the test
    slices followed by their warped variants (:func:`~monai_ood.benchmark.harness.benchmark_sets`), and the
    artefacts are made from the whole test split in --full, so the clean slices are the reference's first
    ``len(set)`` scores."""
    from monai_ood.evaluation import ood_metrics

    scores = row["scores"].get(name)
    ind = row["scores"]["ind"]
    if not scores or 2 * len(scores) != len(ind):
        return None
    return ood_metrics(ind[: len(scores)], scores)["auroc"]


def add_warp_sensitivity(report: dict) -> None:
    """Fill ``ind.warped_vs_clean_auroc`` from the stored scores where a run predates it (the InD reference
    is the clean test slices followed by as many warped variants)."""
    from monai_ood.benchmark.harness import warp_sensitivity

    for run in report["runs"].values():
        for row in [*run["methods"].values(), *run.get("ablation", {}).values()]:
            if row["ind"].get("warped_vs_clean_auroc") is None:
                n = len(row["scores"]["ind"])
                row["ind"]["warped_vs_clean_auroc"] = warp_sensitivity(
                    row["scores"]["ind"], [None] * (n // 2) + ["affine"] * (n - n // 2)
                )


def write_plots(report: dict, folder: Path) -> list[str]:
    """ROC curves per category and score histograms (InD vs each category) of every method, first seed."""
    from monai_ood.benchmark.plots import method_plots

    run = report["runs"][str(report["seeds"][0])]
    paths = []
    for method, row in run["methods"].items():
        sets = {name: (v["category"], np.asarray(row["scores"][name])) for name, v in row["sets"].items()}
        paths += [str(p) for p in method_plots(method, np.asarray(row["scores"]["ind"]), sets, folder)]
    return paths


def write_degree_plot(report: dict, output: Path) -> None:
    """The default detector's degree calibration on the InD test images, one curve per seed, in
    ``output/plots``; ``report["degree_plot"]`` is its path relative to ``output``, or ``None`` when the
    runs did not measure the degree."""
    from monai_ood.benchmark.plots import degree_calibration_plot

    report["degree_plot"] = None
    runs = {s: report["runs"][str(s)]["methods"].get(DEFAULT) for s in report["seeds"]}
    if not all(row and (row.get("degree") or {}).get("validation_scores") for row in runs.values()):
        return
    degrees = {
        f"InD reference, seed {seed}": DegreeCalibrator()
        .fit(row["degree"]["validation_scores"])
        .transform(row["scores"]["ind"])
        for seed, row in runs.items()
    }
    path = degree_calibration_plot(
        degrees,
        output / "plots" / "default-fused_degree_calibration.png",
        f"{DEFAULT}: OOD degree on the InD test images",
    )
    report["degree_plot"] = str(path.relative_to(output))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument(
        "--quick", action="store_const", const="quick", dest="preset", help="tiny: every column"
    )
    group.add_argument("--full", action="store_const", const="full", dest="preset", help="the real table")
    parser.add_argument("--seeds", type=int, nargs="+", help="override the preset's seeds")
    parser.add_argument("--steps", type=int, help="override the preset's optimiser steps per model")
    parser.add_argument(
        "--output", type=Path, help="results folder (default: benchmarks/results/v2/<preset>)"
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        help="checkpoints of the trained models (default: outputs/benchmarks/v2/<preset>)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="run every seed again, even those already saved"
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=METHODS,
        metavar="METHOD",
        help="run only these methods (and the default detector's ablation) again and merge them into the "
        "stored seeds (which must exist); the models they need are retrained with the same seeds",
    )
    parser.add_argument(
        "--rewrite",
        action="store_true",
        help="only rewrite results.md (and derived fields) from an existing results.json in --output",
    )
    args = parser.parse_args(argv)
    preset = copy.deepcopy(PRESETS[args.preset])
    output = args.output or Path(__file__).parent / "results" / "v2" / args.preset
    if args.rewrite:
        report = json.loads((output / "results.json").read_text(encoding="utf-8"))
        add_warp_sensitivity(report)
        write_degree_plot(report, output)
        report["goals"] = goals(report)
        atomic_write_text(output / "results.json", json.dumps(report, indent=1), overwrite=True)
        atomic_write_text(output / "results.md", markdown(report), overwrite=True)
        print(f"rewrote {output / 'results.md'}")
        return 0
    if args.steps is not None:
        preset["steps"] = args.steps
    seeds = args.seeds or preset["seeds"]
    work = args.work_dir or Path("outputs") / "benchmarks" / "v2" / args.preset
    import monai

    command = "python benchmarks/run.py " + " ".join(sys.argv[1:] if argv is None else argv)
    settings = json.loads(json.dumps(preset))
    report = {
        "preset": args.preset,
        "command": command,
        "seeds": seeds,
        "settings": settings,
        "mean_categories": list(MEAN_CATEGORIES),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "monai": monai.__version__,
        },
        "runs": {},
    }
    start = time.perf_counter()
    for seed in seeds:
        path = output / "seeds" / f"seed{seed}.json"
        if args.methods:
            if not path.exists():
                parser.error(f"--methods merges into stored seeds, but {path} does not exist: run it in full")
            saved = json.loads(path.read_text(encoding="utf-8"))
            if saved.get("settings") != settings:
                parser.error(f"--methods: {path} was made with other settings")
            done = saved.get("commands", [])[1:]
            if command in done and not args.overwrite:
                print(
                    f"== seed {seed}: {path} already has {args.methods} from this command; kept", flush=True
                )
                report["runs"][str(seed)] = saved["run"]
                continue
            print(f"== seed {seed}: running {args.methods} again, merged into {path}", flush=True)
            run = run_seed(preset, seed, work, wanted=set(args.methods), previous=saved["run"])
            commands = saved.get("commands", [saved.get("command")]) + [command]
            atomic_write_text(
                path,
                json.dumps(
                    {"settings": settings, "command": saved.get("command"), "commands": commands, "run": run}
                ),
                overwrite=True,
            )
            report["runs"][str(seed)] = run
            continue
        if path.exists() and not args.overwrite:
            saved = json.loads(path.read_text(encoding="utf-8"))
            if saved.get("settings") == settings:
                print(f"== seed {seed}: already in {path}, kept (--overwrite runs it again)", flush=True)
                report["runs"][str(seed)] = saved["run"]
                continue
            print(f"== seed {seed}: {path} has other settings; running it again", flush=True)
        print(f"== seed {seed}", flush=True)
        run = run_seed(preset, seed, work)
        atomic_write_text(
            path, json.dumps({"settings": settings, "command": command, "run": run}), overwrite=True
        )
        report["runs"][str(seed)] = run
    report["wall_minutes"] = sum(r["seconds"] for r in report["runs"].values()) / 60.0
    report["this_invocation_minutes"] = (time.perf_counter() - start) / 60.0
    report["plots"] = [str(Path(p).relative_to(output)) for p in write_plots(report, output / "plots")]
    write_degree_plot(report, output)
    add_warp_sensitivity(report)
    report["goals"] = goals(report)
    atomic_write_text(output / "results.json", json.dumps(report, indent=1), overwrite=True)
    atomic_write_text(output / "results.md", markdown(report), overwrite=True)
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

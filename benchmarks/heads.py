"""Ablation of the prototype head's levers (issue 5): each lever alone on top of the paper's head, and all
together (the library's ``default`` head config), on the protocol of ``benchmarks/run.py``.

Trained variants (one training each): ``paper``, ``+class-balanced L_out``, ``+multi-scale``, ``+global
term``, ``+local outliers`` and ``default`` (every trained lever). Post-hoc variants of the trained paper
head (no training): ``+quantile``, ``+foreground``, ``+refit``, ``+Gaussian (hybrid)``, ``+last epoch``.

Selection data (no test set): every variant is also scored on the validation slices against outliers
made from them by each operation of ``OutlierSynthesis`` (the paper's six and the local ones), so a
default can be chosen without a test OOD set (``validation`` in the results).

Run: ``python benchmarks/heads.py --full`` (seeds 0 1 2, 30 epochs; the single-lever trained variants on
``--ablation-seeds``, default the first seed) or ``--quick``. Results: ``benchmarks/results/v1/heads/{results.json,results.md}`` (v1 data).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from run import CLASS_NAMES, PRESETS, _mean_std, epochs_for  # noqa: E402

from monai_ood.benchmark.harness import benchmark_sets, detector_scorer, evaluate  # noqa: E402
from monai_ood.benchmark.pool import load_brain_dataset  # noqa: E402
from monai_ood.detectors import PrototypeDetector  # noqa: E402
from monai_ood.engines.checkpoint import load_model, load_training_state  # noqa: E402
from monai_ood.engines.training import TrainingConfig, train  # noqa: E402
from monai_ood.evaluation import dice_per_class, ood_metrics  # noqa: E402
from monai_ood.files import atomic_write_text  # noqa: E402
from monai_ood.losses.outlier_exposure import class_inclusion_fractions  # noqa: E402
from monai_ood.preprocessing import SlicePreprocessing  # noqa: E402
from monai_ood.transforms.outlier_synthesis import LOCAL_OPS, PAPER_OPS, OutlierSynthesis  # noqa: E402

TRAINED = {
    "paper": {"head_config": "paper"},
    "+class-balanced": {"head_config": "paper", "class_balanced": True},
    "+multi-scale": {"head_config": "paper", "extra_layers": 2},
    "+global term": {"head_config": "paper", "global_head": True},
    "+local outliers": {"head_config": "paper", "outlier_ops": PAPER_OPS + LOCAL_OPS},
    "default (all)": {"head_config": "all"},
}


def _scores(detector, images: np.ndarray) -> np.ndarray:
    return detector_scorer(detector)(images).image_score


def _segment(net, images: np.ndarray) -> np.ndarray:
    net.eval()
    with torch.no_grad():
        return np.concatenate(
            [net(torch.from_numpy(images[i : i + 32])).argmax(1).numpy() for i in range(0, len(images), 32)]
        )


def _fit_posthoc_terms(net, data) -> None:
    """What ``calibrate`` does for a multi-term head: the terms' Weibull hazards on the validation images."""
    if net.term_weibull is not None:
        val = np.stack([i["image"] for i in data["validation"]]).astype(np.float32)
        net.fit_score_combination(torch.from_numpy(val[i : i + 32]) for i in range(0, len(val), 32))


def _pairs(items, size: int = 32):
    for i in range(0, len(items), size):
        chunk = items[i : i + size]
        yield (
            torch.from_numpy(np.stack([x["image"] for x in chunk]).astype(np.float32)),
            torch.from_numpy(np.stack([x["label"] for x in chunk])),
        )


def _with_gaussian_term(paper, data, refit_prototypes: bool):
    """A copy of the paper head with the Gaussian term added, fitted as ``train`` + ``calibrate`` do."""
    net = type(paper)(
        copy.deepcopy(paper.backbone),
        paper.num_classes,
        paper.layer,
        head_channels=paper.num_dims,
        gaussian_term=True,
    )
    net.load_state_dict(paper.state_dict(), strict=False)
    net.refit(_pairs(data["train"]), prototypes=refit_prototypes)
    _fit_posthoc_terms(net, data)
    return net.eval()


def _posthoc_variants(paper, run_dir: Path, data) -> dict:
    """Post-hoc levers applied to the trained paper head (copies; the paper head is unchanged)."""
    variants = {}
    quantile = copy.deepcopy(paper)
    quantile.aggregation = "quantile"
    variants["+quantile (0.9)"] = quantile
    foreground = copy.deepcopy(paper)
    foreground.aggregation = "foreground"
    variants["+foreground"] = foreground
    variants["+refit"] = copy.deepcopy(paper).refit(_pairs(data["train"]))
    variants["+Gaussian (hybrid)"] = _with_gaussian_term(paper, data, refit_prototypes=False)
    variants["+refit +Gaussian"] = _with_gaussian_term(paper, data, refit_prototypes=True)
    last = copy.deepcopy(paper)
    last.load_state_dict(load_training_state(run_dir / "last.pt")["model"])
    variants["+last epoch"] = last.eval()
    return variants


def validation_selection(net, data, seed: int) -> dict:
    """AUROC of validation InD slices against outliers made from them by each op (no test data)."""
    val = np.stack([i["image"] for i in data["validation"]]).astype(np.float32)
    detector = PrototypeDetector(net)
    ind = _scores(detector, val)
    per_op = {}
    for op in PAPER_OPS + LOCAL_OPS:
        synthesis = OutlierSynthesis(ops=(op,))
        synthesis.set_random_state(seed)
        outliers = np.stack([np.asarray(synthesis(torch.from_numpy(x))) for x in val]).astype(np.float32)
        per_op[op] = ood_metrics(ind, _scores(detector, outliers))["auroc"]
    return {
        "auroc_per_op": per_op,
        "mean_auroc": float(np.mean(list(per_op.values()))),
        "mean_auroc_local_ops": float(np.mean([per_op[o] for o in LOCAL_OPS])),
        "mean_auroc_paper_ops": float(np.mean([per_op[o] for o in PAPER_OPS])),
    }


def _test_data(preset: dict, seed: int):
    prep = SlicePreprocessing(**preset["preprocessing"])
    data = load_brain_dataset(preprocessing=prep)
    sets = benchmark_sets(prep, seed=seed, artefact_limit=preset["artefact_limit"])
    ind_images = np.stack([i["image"] for i in sets.ind]).astype(np.float32)
    return prep, data, ind_images, sets.artefact_base, sets


def _train_variant(name: str, preset: dict, seed: int, work: Path, prep, data, facts: dict):
    config = TrainingConfig(
        network_kwargs=preset["network_kwargs"],
        head_channels=preset["head_channels"],
        max_epochs=epochs_for(preset["steps"], len(data["train"])),
        seed=seed,
        num_workers=preset["num_workers"],
        **TRAINED[name],
    )
    run_dir = work / f"seed{seed}" / name.strip("+").replace(" ", "_").replace("(", "").replace(")", "")
    start = time.perf_counter()
    result = train(data["train"], data["validation"], config, run_dir, prep, CLASS_NAMES, overwrite=True)
    facts[name] = {"train_seconds": time.perf_counter() - start, "config": config.to_dict()}
    net = load_model(result.best_checkpoint, device="cpu").net
    _fit_posthoc_terms(net, data)  # what `calibrate` does for a multi-term head
    return net, run_dir


def _evaluate(net, data, seed, ind_images, base, sets) -> dict:
    net.eval()
    test_images = np.stack([i["image"] for i in data["test"]]).astype(np.float32)
    test_labels = np.stack([i["label"][0] for i in data["test"]])
    row = evaluate(detector_scorer(PrototypeDetector(net), net.backbone), sets, len(CLASS_NAMES), CLASS_NAMES)
    dice = dice_per_class(_segment(net, test_images), test_labels, 4)
    row["dice"] = {"per_class": dice.tolist(), "mean": float(np.nanmean(dice))}
    row["validation"] = validation_selection(net, data, seed)
    fractions = []
    with torch.no_grad():
        for images, labels in _pairs(data["train"]):
            fractions.append(class_inclusion_fractions(net.ood(images).distances, labels, net.num_dims))
    row["train_inclusion_fraction_95"] = dict(
        zip(CLASS_NAMES, np.nanmean(torch.stack(fractions).numpy(), axis=0).tolist(), strict=True)
    )
    return row


def run_seed(preset: dict, seed: int, work: Path, paper_runs: Path | None, posthoc: bool = True) -> dict:
    """The paper head (trained, or reused from ``paper_runs/seed<seed>/head``), its post-hoc variants
    and the default head."""
    prep, data, ind_images, base, sets = _test_data(preset, seed)
    facts, nets = {}, {}
    if paper_runs is not None:
        run_dir = paper_runs / f"seed{seed}" / "head"
        nets["paper"] = load_model(run_dir / "model.pt", device="cpu").net
        facts["paper"] = {"reused_checkpoint": str(run_dir / "model.pt")}
    else:
        nets["paper"], run_dir = _train_variant("paper", preset, seed, work, prep, data, facts)
    if posthoc:
        nets.update(_posthoc_variants(nets["paper"], run_dir, data))
    nets["default (all)"], _ = _train_variant("default (all)", preset, seed, work, prep, data, facts)
    results = {"facts": facts, "variants": {}}
    for name, net in nets.items():
        print(f"   evaluating {name}", flush=True)
        results["variants"][name] = _evaluate(net, data, seed, ind_images, base, sets)
    return results


def run_posthoc(preset: dict, seed: int, work: Path, paper_runs: Path, only=None) -> dict:
    """Post-hoc variants from saved checkpoints (no training): the paper head's and ``default + refit``."""
    prep, data, ind_images, base, sets = _test_data(preset, seed)
    run_dir = paper_runs / f"seed{seed}" / "head"
    paper = load_model(run_dir / "model.pt", device="cpu").net
    nets = _posthoc_variants(paper, run_dir, data)
    default = load_model(work / f"seed{seed}" / "default_all" / "model.pt", device="cpu").net
    refitted = copy.deepcopy(default).refit(_pairs(data["train"]))
    _fit_posthoc_terms(refitted, data)
    nets["default + refit"] = refitted
    results = {"facts": {}, "variants": {}}
    for name, net in nets.items():
        if only and name not in only:
            continue
        print(f"   evaluating {name}", flush=True)
        results["variants"][name] = _evaluate(net, data, seed, ind_images, base, sets)
    return results


def run_ablation(preset: dict, seed: int, work: Path, results: dict, on_variant=lambda: None) -> None:
    """The single trained levers on ``seed``, added to that seed's ``results``."""
    prep, data, ind_images, base, sets = _test_data(preset, seed)
    for name in TRAINED:
        if name in ("paper", "default (all)"):
            continue
        net, _ = _train_variant(name, preset, seed, work, prep, data, results["facts"])
        print(f"   evaluating {name}", flush=True)
        results["variants"][name] = _evaluate(net, data, seed, ind_images, base, sets)
        on_variant()


def _mean_table(names, runs, title: str, values) -> list[str]:
    """A markdown table of ``values(row)`` (a dict of columns) per variant, mean over the seeds that have it."""
    columns = list(values(runs[0]["variants"][names[0]]))
    lines = ["", f"{title} (mean over seeds):", ""]
    lines += ["| variant | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name in names:
        rows = [values(r["variants"][name]) for r in runs if name in r["variants"]]
        lines.append(
            f"| {name} | " + " | ".join(f"{np.mean([v[c] for v in rows]):.2f}" for c in columns) + " |"
        )
    return lines


def markdown(report: dict) -> str:
    seeds = [s for s in report["seeds"] if str(s) in report["runs"]]
    runs = [report["runs"][str(s)] for s in seeds]
    names = list(dict.fromkeys(n for r in runs for n in r["variants"]))
    counts = {n: sum(n in r["variants"] for r in runs) for n in names}
    categories = sorted(runs[0]["variants"][names[0]]["categories"])
    lines = [
        "# Prototype head: ablation of the levers",
        "",
        f"Command: `{report['command']}`; seeds {seeds}. Test columns: the protocol of `benchmarks/run.py`. "
        "`val AUROC (ops)`: validation slices vs outliers made from them by each synthesis op (the only "
        "column used to choose the default). `CSF in 95%`: fraction of training CSF pixels inside the "
        "chi-square 95% bound of their prototype.",
        "",
        "| variant | "
        + " | ".join(f"AUROC {c}" for c in categories)
        + " | mean AUROC | mean FPR@95 | AURC | severity ρ (mean) | Dice | val AUROC (ops) | CSF in 95% |",
        "|---" * (len(categories) + 8) + "|",
    ]
    for name in names:
        rows = [r["variants"][name] for r in runs if name in r["variants"]]
        cells = [_mean_std([r["categories"][c]["auroc"] for r in rows]) for c in categories]
        cells += [
            _mean_std([r["mean"]["auroc"] for r in rows]),
            _mean_std([r["mean"]["fpr95"] for r in rows]),
            _mean_std([r["failure"]["aurc"] for r in rows]),
            _mean_std([np.mean(list(r["severity_spearman"].values())) for r in rows]),
            _mean_std([r["dice"]["mean"] for r in rows]),
            _mean_std([r["validation"]["mean_auroc"] for r in rows]),
            _mean_std([r["train_inclusion_fraction_95"]["CSF"] for r in rows]),
        ]
        lines.append(
            f"| {name} ({counts[name]} seed{'s' if counts[name] > 1 else ''}) | " + " | ".join(cells) + " |"
        )
    lines += _mean_table(names, runs, "Severity ρ per artefact", lambda row: row["severity_spearman"])
    lines += _mean_table(
        names, runs, "Validation AUROC per synthesis op", lambda row: row["validation"]["auroc_per_op"]
    )
    return "\n".join(lines) + "\n"


#: the ablation variant that the validation criterion chose as the library's ``default`` head config
DEFAULT_VARIANT = "+refit +Gaussian"


def comparison_markdown(baselines: dict, heads: dict) -> str:
    """The default head beside the paper's and every baseline (same seeds, data, protocol), with the goals."""
    seeds = [str(s) for s in heads["seeds"] if str(s) in heads["runs"] and str(s) in baselines["runs"]]
    rows = {}
    for method in baselines["runs"][seeds[0]]["methods"]:
        if method.startswith("prototype head"):
            continue
        rows[method] = [baselines["runs"][s]["methods"][method] for s in seeds]
    rows["prototype head (paper)"] = [heads["runs"][s]["variants"]["paper"] for s in seeds]
    rows["prototype head (default)"] = [heads["runs"][s]["variants"][DEFAULT_VARIANT] for s in seeds]
    categories = sorted(rows["prototype head (paper)"][0]["categories"])
    artefacts = sorted(rows["prototype head (paper)"][0]["severity_spearman"])
    lines = [
        "# The default head against the paper's and every baseline",
        "",
        f"Seeds {[int(s) for s in seeds]}. Baselines: `{baselines['command']}`; heads: `{heads['command']}` "
        "(the paper heads are the checkpoints of the baselines' run; the default head is those weights "
        "after the default's post-training step, prototypes refitted and the Gaussian term fitted).",
        "",
        "| method | "
        + " | ".join(f"AUROC {c}" for c in categories)
        + " | mean AUROC | AURC | min severity ρ |",
        "|---" * (len(categories) + 4) + "|",
    ]

    def mean(rows_, key):
        return float(np.mean([key(r) for r in rows_]))

    summary = {}
    for method, method_rows in rows.items():
        cat = {c: mean(method_rows, lambda r, c=c: r["categories"][c]["auroc"]) for c in categories}
        aurc = mean(method_rows, lambda r: r["failure"]["aurc"])
        severity = {a: mean(method_rows, lambda r, a=a: r["severity_spearman"][a]) for a in artefacts}
        summary[method] = (cat, aurc, severity)
        cells = [_mean_std([r["categories"][c]["auroc"] for r in method_rows]) for c in categories]
        cells += [
            _mean_std([r["mean"]["auroc"] for r in method_rows]),
            _mean_std([r["failure"]["aurc"] for r in method_rows]),
            f"{min(severity.values()):.2f}",
        ]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    cat, aurc, severity = summary["prototype head (default)"]
    others = {m: v for m, v in summary.items() if not m.startswith("prototype head")}
    beaten = {c: [m for m, v in others.items() if v[0][c] > cat[c]] for c in categories}
    lines += ["", "Goals of issue 5 for the default head (means over the seeds):", ""]
    for c in categories:
        lines.append(
            f"- {c} AUROC {cat[c]:.3f} ≥ every baseline: {'yes' if not beaten[c] else 'no, below ' + ', '.join(beaten[c])}"
        )
    better_aurc = [m for m, v in others.items() if v[1] < aurc]
    lines.append(
        f"- AURC {aurc:.3f} ≤ every baseline: {'yes' if not better_aurc else 'no, above ' + ', '.join(better_aurc)}"
    )
    for c, goal in (("C1", 0.99), ("C2", 0.98), ("C3", 0.90)):
        if c in cat:
            lines.append(f"- {c} ≥ {goal}: {cat[c]:.3f} ({'met' if cat[c] >= goal else 'missed'})")
    lines.append(
        "- Spearman with severity ≥ 0.9 per artefact: "
        + ", ".join(f"{a} {v:.2f}" for a, v in severity.items())
        + (" (met)" if min(severity.values()) >= 0.9 else " (missed)")
    )
    dice = [heads["runs"][s]["variants"][DEFAULT_VARIANT]["dice"]["mean"] for s in seeds]
    plain = [baselines["runs"][s]["facts"]["dice"]["plain"]["mean"] for s in seeds]
    lines.append(
        f"- Dice ≥ plain − 0.005: {np.mean(dice):.3f} vs plain {np.mean(plain):.3f} "
        f"({'met' if np.mean(dice) >= np.mean(plain) - 0.005 else 'missed'}; the default keeps the paper "
        "head's segmentation weights)"
    )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--quick", action="store_const", const="quick", dest="preset")
    group.add_argument("--full", action="store_const", const="full", dest="preset")
    parser.add_argument("--seeds", type=int, nargs="+")
    parser.add_argument(
        "--ablation-seeds",
        type=int,
        nargs="*",
        help="seeds that also train the single-lever variants (default: the first seed); the paper and "
        "default heads and the post-hoc variants run on every seed",
    )
    parser.add_argument("--steps", type=int, help="override the preset's optimiser steps per model")
    parser.add_argument(
        "--paper-runs",
        type=Path,
        help="reuse the paper heads trained by `run.py` (its --work-dir, e.g. outputs/benchmarks/full) "
        "instead of training them again",
    )
    parser.add_argument(
        "--ablation-only",
        action="store_true",
        help="only the single trained levers on --ablation-seeds (to run beside a main run)",
    )
    parser.add_argument(
        "--merge",
        type=Path,
        help="add the variants of this results.json (an --ablation-only run) to --output's results.json",
    )
    parser.add_argument(
        "--posthoc-only",
        action="store_true",
        help="only the post-hoc variants, from the checkpoints of --paper-runs and --work-dir",
    )
    parser.add_argument("--only", nargs="+", help="with --posthoc-only: evaluate only these variants")
    parser.add_argument(
        "--no-posthoc", action="store_true", help="skip the post-hoc variants of the paper head"
    )
    parser.add_argument(
        "--compare",
        type=Path,
        help="a run.py results.json: write comparison.md (default head vs paper head vs baselines) beside "
        "--output's results.json",
    )
    parser.add_argument("--output", type=Path)
    parser.add_argument("--work-dir", type=Path)
    args = parser.parse_args(argv)
    preset = dict(PRESETS[args.preset])
    if args.steps is not None:
        preset["steps"] = args.steps
    seeds = args.seeds or preset["seeds"]
    output = args.output or Path(__file__).parent / "results" / "v2" / "heads" / args.preset
    work = args.work_dir or Path("outputs") / "benchmarks" / f"heads_{args.preset}"
    if args.ablation_only:
        seeds = args.ablation_seeds if args.ablation_seeds is not None else seeds[:1]
    report = {
        "command": "python benchmarks/heads.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "seeds": seeds,
        "settings": preset,
        "runs": {},
    }
    ablation_seeds = args.ablation_seeds if args.ablation_seeds is not None else seeds[:1]
    report["ablation_seeds"] = ablation_seeds
    report["paper_runs"] = None if args.paper_runs is None else str(args.paper_runs)

    def save():  # after every step, so a cut-off run keeps what it finished
        atomic_write_text(output / "results.json", json.dumps(report, indent=2), overwrite=True)
        atomic_write_text(output / "results.md", markdown(report), overwrite=True)

    if args.compare is not None:
        baselines = json.loads(args.compare.read_text(encoding="utf-8"))
        heads = json.loads((output / "results.json").read_text(encoding="utf-8"))
        text = comparison_markdown(baselines, heads)
        atomic_write_text(output / "comparison.md", text, overwrite=True)
        print(text)
        return 0
    if args.merge is not None:
        report = json.loads((output / "results.json").read_text(encoding="utf-8"))
        extra = json.loads(args.merge.read_text(encoding="utf-8"))
        for seed, run in extra["runs"].items():
            if seed not in report["runs"]:
                report["runs"][seed] = run
                report["seeds"] = sorted({*report["seeds"], int(seed)})
            else:
                report["runs"][seed]["variants"].update(run["variants"])
                report["runs"][seed]["facts"].update(run["facts"])
        report.setdefault("merged_commands", []).append(extra["command"])
        save()
        print(markdown(report))
        return 0
    if args.posthoc_only:
        for seed in seeds:
            print(f"== post-hoc, seed {seed}", flush=True)
            report["runs"][str(seed)] = run_posthoc(preset, seed, work, args.paper_runs, args.only)
            save()
        return 0
    if args.ablation_only:
        for seed in ablation_seeds:
            report["runs"][str(seed)] = {"facts": {}, "variants": {}}
    for seed in [] if args.ablation_only else seeds:
        print(f"== seed {seed}", flush=True)
        report["runs"][str(seed)] = run_seed(preset, seed, work, args.paper_runs, not args.no_posthoc)
        save()
    for seed in ablation_seeds:
        print(f"== ablation, seed {seed}", flush=True)
        run_ablation(preset, seed, work, report["runs"][str(seed)], on_variant=save)
        save()
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

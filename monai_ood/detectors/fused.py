"""The default detector: terms at several depths of the network (and on the image), standardised on
validation images and fused into one image score and one map, from one forward pass.

Data flow: images -> one pass of the network capturing every stage a term reads (and the segmentation)
-> each term's image score (and map) -> fusion -> score (calibration of the map: the Weibull of
:mod:`monai_ood.calibration`, fitted by ``monai-ood calibrate`` on the fused map).

Why these terms (BENCHMARK.md, "Aggregation and depth"): artefacts show in the statistics of shallow
stages, layout and viewpoint in deep ones, intensity remaps in the image histogram; the paper's head
reads the bottleneck only.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.utils import look_up_option
from torch import nn

from ..networks.capture import capture_features, named_module
from ..networks.presets import encoder_stages
from ..networks.prototype_net import PrototypeOODNet
from .base import Detector, DetectorOutput, NotFittedError, eval_mode, module_device, to_input_size
from .terms import (
    ClassPrototypeTerm,
    Features,
    IntensityTerm,
    StageStatisticsTerm,
    Term,
    term_from_state,
)

__all__ = [
    "DETECTOR_FORMAT",
    "FUSIONS",
    "SELECTION_OPS",
    "FusedDetector",
    "default_terms",
    "fuse_scores",
]

DETECTOR_FORMAT = "monai-ood-detector"
DETECTOR_VERSION = 1
FUSIONS = ("sum", "max", "hazard")
#: the outlier ops the fusion rule is chosen on (synthesised from validation images): the training
#: outlier generator's ops, none of which makes a test OOD set of the benchmark
SELECTION_OPS = (
    "rotate180",
    "vflip",
    "patch_permute",
    "swap",
    "gamma",
    "elastic",
    "local_shuffle",
    "cutpaste",
    "local_noise",
    "local_blur",
    "blob",
)


def default_terms(
    network: nn.Module,
    num_classes: int,
    layers: Sequence[str] | None = None,
    prototype_stages: int = 2,
    intensity: bool = True,
) -> list[Term]:
    """The default terms: :class:`StageStatisticsTerm` on every encoder stage, :class:`ClassPrototypeTerm`
    on the ``prototype_stages`` shallowest ones (maps at 1/2 to 1/4 of the input resolution for UNets),
    and an :class:`IntensityTerm`.

    Args:
        network: the segmentation network (its encoder stages from the backbone registry,
            :func:`monai_ood.networks.presets.encoder_stages`, unless ``layers`` are given).
        num_classes: K, for the class prototypes.
        layers: dotted module names of the stages to read, shallow to deep (``None``: the registry's).
        prototype_stages: how many of the shallowest stages also get class prototypes (0: none).
        intensity: add the intensity histogram term.
    """
    layers = list(encoder_stages(network) if layers is None else layers)
    if not layers:
        raise ValueError("default_terms needs at least one layer")
    terms: list[Term] = [StageStatisticsTerm(layer) for layer in layers]
    terms += [ClassPrototypeTerm(layer, num_classes) for layer in layers[: max(0, int(prototype_stages))]]
    if intensity:
        terms.append(IntensityTerm())
    return terms


def fuse_scores(
    raw: torch.Tensor, rule: str, loc: torch.Tensor, scale: torch.Tensor, weibull: torch.Tensor
) -> torch.Tensor:
    """Fuse per-term scores ``raw`` ``(N, T)`` into ``(N,)`` (float64).

    * ``"sum"``: the sum of the standardised scores ``(s_t - loc_t) / scale_t`` (mean and standard
      deviation of each term on validation images);
    * ``"max"``: their maximum (the most atypical term decides);
    * ``"hazard"``: ``log sum_t (s_t / lambda_t) ** k_t``, the log of the summed Weibull cumulative hazards
      (``weibull`` rows ``(k_t, lambda_t)`` fitted on validation): ``-log`` of the product of the terms'
      survival probabilities, as the multi-term head combines its terms.
    """
    raw = raw.double()
    if rule == "sum":
        return ((raw - loc) / scale).sum(dim=1)
    if rule == "max":
        return ((raw - loc) / scale).max(dim=1).values
    if rule == "hazard":
        shape, lam = weibull[:, 0], weibull[:, 1]
        return torch.logsumexp(shape * (raw.clamp_min(1e-30) / lam).log(), dim=1)
    raise ValueError(f"fusion rule must be one of {FUSIONS}, got {rule!r}")


def _candidate_name(families: Sequence[str], rule: str) -> str:
    return f"{'+'.join(families)} / {rule}"


def _auroc(inliers: np.ndarray, outliers: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    y = np.r_[np.zeros(len(inliers)), np.ones(len(outliers))]
    return float(roc_auc_score(y, np.r_[inliers, outliers]))


class FusedDetector(Detector):
    """Multi-depth feature statistics, class-prototype maps and an intensity term, fused into one score.

    * **Terms** (:mod:`monai_ood.detectors.terms`; default :func:`default_terms`): every term reads the
      features of **one** forward pass (:func:`monai_ood.networks.capture.capture_features`), which also
      gives the segmentation, so :meth:`segment_and_score` costs one network pass plus the terms.
    * **Fit** (``fit(train_items, val_items)``, InD only, labels optional): the terms are fitted on the
      training items and ``warped_copies`` warped versions of each (one mild affine resampling, the
      training augmentation: post-hoc statistics fitted on un-warped images rate every interpolated
      image as atypical, BENCHMARK.md "Resampling shortcut"); class prototypes use the items' labels,
      or the network's prediction where an item has none.
    * **Standardisation**, on the validation items and their warped copies: per term the mean and
      standard deviation (``loc_``, ``scale_``) and a Weibull fit (``weibull_``) of its scores; per map
      term the median of its map (``map_scale_``).
    * **Fusion** (:func:`fuse_scores`): ``"sum"`` of standardised scores, their ``"max"``, or the
      ``"hazard"`` sum, over the terms that enter the image score (``score_mask_``; the map always comes
      from every map term). ``fusion="auto"`` chooses the rule **and** which term families (statistics,
      prototypes, intensity: every non-empty combination) enter the score, on validation data only: for
      every op of ``selection_ops`` (:class:`~monai_ood.transforms.OutlierSynthesis`, applied to the
      validation images and their warped copies) the AUROC of the op's outliers against those images,
      averaged over the ops (InD and outliers alike include the warped copies, so telling warped from
      un-warped images gains nothing); the candidate with the highest mean wins (ties: more families,
      then the order of :data:`FUSIONS`). ``selection_`` keeps the table and a leave-one-op-out
      estimate (each op's AUROC under the candidate chosen on the other ops). No test OOD set is ever
      used.
    * **Map**: the mean of the map terms' maps, each divided by its validation median and brought to the
      finest map grid (linear interpolation); about 1 on typical InD tissue. :meth:`predict` returns it at
      the input size.

    Args:
        network: the trained segmentation network (a :class:`~monai_ood.networks.PrototypeOODNet` is
            unwrapped to its backbone; the trained head is not a term).
        num_classes: K for the default class prototypes (``None``: the network's output channels, read
            from the first fitting batch).
        terms: the terms (``None``: :func:`default_terms` on ``layers``).
        layers: stage names for the default terms (``None``: the backbone registry's encoder stages).
        fusion: ``"auto"`` or one of :data:`FUSIONS`.
        warped_copies: warped versions of each training and validation item added for fitting (0: none).
        selection_ops: the outlier ops of the automatic fusion choice.
        batch_size: images per forward pass while fitting.
        seed: seed of the warps and the selection outliers.

    Example:
        >>> from monai.networks.nets import UNet
        >>> net = UNet(2, 1, 3, channels=(4, 8, 16), strides=(2, 2))
        >>> items = [{"image": np.random.rand(1, 32, 32).astype("float32")} for _ in range(8)]
        >>> detector = FusedDetector(net, fusion="sum").fit(items[:5], items[5:])
        >>> out = detector(torch.rand(2, 1, 32, 32))
        >>> out.image_score.shape, out.score_map.shape
        (torch.Size([2]), torch.Size([2, 1, 32, 32]))
    """

    name = "fused"
    requires_fit = True

    def __init__(
        self,
        network: nn.Module,
        num_classes: int | None = None,
        terms: Sequence[Term] | None = None,
        layers: Sequence[str] | None = None,
        fusion: str = "auto",
        warped_copies: int = 1,
        selection_ops: Sequence[str] = SELECTION_OPS,
        batch_size: int = 16,
        seed: int = 0,
    ) -> None:
        if fusion != "auto":
            fusion = look_up_option(fusion, FUSIONS)
        if isinstance(warped_copies, bool) or not isinstance(warped_copies, int) or warped_copies < 0:
            raise ValueError(f"warped_copies must be an int >= 0, got {warped_copies!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if fusion == "auto" and not selection_ops:
            raise ValueError("fusion='auto' needs at least one selection op")
        super().__init__()
        if isinstance(network, PrototypeOODNet):
            network = network.backbone
        self.network = network
        self.num_classes = num_classes
        self._layers_arg = None if layers is None else list(layers)
        if terms is not None:
            terms = list(terms)
            if not terms:
                raise ValueError("terms must not be empty")
        elif num_classes is not None:
            terms = default_terms(network, num_classes, layers)
        elif layers is None:
            encoder_stages(network)  # an unknown network fails here, not after a fitting pass
        self.terms: list[Term] | None = terms
        self.fusion = fusion
        self.warped_copies = warped_copies
        self.selection_ops = tuple(selection_ops)
        self.batch_size = batch_size
        self.seed = int(seed)
        self.fusion_: str | None = None if fusion == "auto" else fusion
        self.loc_ = self.scale_ = self.weibull_ = self.map_scale_ = None
        self.selection_: dict[str, Any] | None = None
        self.score_mask_: torch.Tensor | None = None
        self.num_train_: int | None = None
        self._modules: tuple[list[str], list[nn.Module]] | None = None

    # -- passes -----------------------------------------------------------------------------------------
    @property
    def layers(self) -> list[str]:
        """Every network layer a term reads, in first-use order."""
        return list(dict.fromkeys(layer for term in self.terms or () for layer in term.layers))

    @property
    def term_names(self) -> list[str]:
        return [term.name for term in self.terms or ()]

    def features(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> Features:
        """One whole pass of the network (eval mode, no gradients): logits and every term's layers."""
        device = module_device(self.network, images.device)
        images = images.to(device)
        layers = self.layers
        if self._modules is None or self._modules[0] != layers:
            self._modules = (layers, [named_module(self.network, name) for name in layers])
        with eval_mode(self.network), torch.no_grad():
            logits, stages = capture_features(self.network, layers, images, True, self._modules[1])
        if logits is not None:
            logits = logits.float()
        return Features(images, stages, logits, None if labels is None else labels.to(device))

    def _item_batches(self, items: Sequence[dict], with_labels: bool):
        """Stacks of up to ``batch_size`` consecutive items of one shape (3D volumes may differ)."""
        chunks, chunk = [], []
        for item in items:
            shape = np.shape(item["image"])
            if chunk and (len(chunk) == self.batch_size or np.shape(chunk[0]["image"]) != shape):
                chunks.append(chunk)
                chunk = []
            chunk.append(item)
        if chunk:
            chunks.append(chunk)
        for chunk in chunks:
            images = torch.from_numpy(np.stack([np.asarray(i["image"], dtype=np.float32) for i in chunk]))
            labels = None
            if with_labels and any(i.get("label") is not None for i in chunk):
                # -1 marks an item without a label: its prototypes' labels come from the prediction
                shape = (1, *np.shape(chunk[0]["image"])[1:])
                labels = torch.from_numpy(
                    np.stack(
                        [
                            np.full(shape, -1) if i.get("label") is None else np.asarray(i["label"])
                            for i in chunk
                        ]
                    ).astype(np.int64)
                )
            yield images, labels

    def _term_outputs(self, features: Features) -> tuple[torch.Tensor, list[torch.Tensor]]:
        outputs = [term.predict_features(features) for term in self.terms]
        raw = torch.stack([o.image_score.double() for o in outputs], dim=1)
        maps = [o.score_map for o, term in zip(outputs, self.terms, strict=True) if term.has_map]
        return raw, maps

    def _fused_map(self, maps: Sequence[torch.Tensor]) -> torch.Tensor | None:
        if not maps:
            return None
        finest = max((m.shape[2:] for m in maps), key=lambda s: torch.Size(s).numel())
        scales = self.map_scale_.to(maps[0].device)
        return sum(to_input_size(m.double() / scales[t], finest) for t, m in enumerate(maps)) / len(maps)

    def _raw_scores(self, items: Sequence[dict]) -> tuple[np.ndarray, list[np.ndarray]]:
        raws, map_values = [], []
        for images, _ in self._item_batches(items, with_labels=False):
            raw, maps = self._term_outputs(self.features(images))
            raws.append(raw.cpu())
            map_values.append([m.flatten().cpu() for m in maps])
        per_map = [torch.cat([batch[t] for batch in map_values]).numpy() for t in range(len(map_values[0]))]
        return torch.cat(raws).numpy(), per_map

    # -- fit --------------------------------------------------------------------------------------------
    def _fit(self, train_items: Sequence[dict], val_items: Sequence[dict] | None) -> None:
        from ..calibration import WeibullCalibrator
        from ..transforms.augmentation import warped_copies

        if len(train_items) < 2:
            raise ValueError(f"FusedDetector.fit needs at least 2 training images, got {len(train_items)}")
        if val_items is None or len(val_items) < 2:
            raise ValueError(
                "FusedDetector.fit needs at least 2 validation images (val_items) to standardise its terms"
            )
        train = list(train_items) + warped_copies(train_items, self.seed, self.warped_copies)
        if self.terms is None:
            num_classes = self.num_classes
            if num_classes is None:
                images, _ = next(self._item_batches(train[:1], with_labels=False))
                num_classes = int(self.features(images).logits.shape[1])
            self.num_classes = num_classes
            self.terms = default_terms(self.network, num_classes, self._layers_arg)

        def stream():
            for images, labels in self._item_batches(train, with_labels=True):
                yield self.features(images, labels)

        for term in self.terms:
            term._begin()
        count = 0
        for features in stream():
            count += int(features.images.shape[0])
            for term in self.terms:
                term._add(features)
        for term in self.terms:
            term._end(count)
            term._fitted = True
        self.num_train_ = count

        val = list(val_items) + warped_copies(val_items, self.seed + 1, self.warped_copies)
        raw, maps = self._raw_scores(val)
        if not np.isfinite(raw).all():
            raise ValueError("the terms gave NaN or infinite scores on the validation images")
        loc, scale = raw.mean(axis=0), raw.std(axis=0, ddof=1)
        for name, value in zip(self.term_names, scale, strict=True):
            if not np.isfinite(value) or value <= 0:
                raise ValueError(f"the validation scores of term {name!r} have no spread (std {value})")
        weibull = []
        for t in range(raw.shape[1]):
            fit = WeibullCalibrator(min_samples=2).fit(raw[:, t])
            weibull.append([fit.shape, fit.scale])
        self.loc_, self.scale_ = torch.from_numpy(loc), torch.from_numpy(scale)
        self.weibull_ = torch.tensor(weibull, dtype=torch.float64)
        self.map_scale_ = torch.tensor([max(float(np.median(m)), 1e-12) for m in maps], dtype=torch.float64)
        self._select(val, raw)

    def _select(self, val_items: list[dict], val_raw: np.ndarray) -> None:
        """Choose which term families enter the image score and the fusion rule, on outliers synthesised
        from the validation images (see the class)."""
        from ..transforms.outlier_synthesis import OutlierSynthesis

        self.score_mask_ = torch.ones(len(self.terms), dtype=torch.bool)
        if self.fusion != "auto":
            self.fusion_ = self.fusion
            self.selection_ = {"rule": self.fusion, "chosen_by": "given"}
            return
        kinds = list(dict.fromkeys(term.kind for term in self.terms))
        families = [
            combo
            for size in range(len(kinds), 0, -1)
            for combo in itertools.combinations(kinds, size)  # all families first: ties keep the most
        ]
        candidates = [(combo, rule) for combo in families for rule in FUSIONS]
        masks = {combo: torch.tensor([t.kind in combo for t in self.terms]) for combo in families}
        raw_val = torch.from_numpy(val_raw)
        names = [_candidate_name(combo, rule) for combo, rule in candidates]
        # the validation side of every AUROC does not depend on the op: fused once per candidate
        inliers = {
            name: self._fuse_masked(raw_val, rule, masks[combo]).numpy()
            for name, (combo, rule) in zip(names, candidates, strict=True)
        }
        table: dict[str, dict[str, float]] = {}
        for k, op in enumerate(self.selection_ops):
            synth = OutlierSynthesis(ops=(op,), prob=1.0)
            synth.set_random_state(self.seed + 1000 + k)
            outliers = [
                {"image": np.asarray(synth(np.asarray(i["image"], dtype=np.float32)), dtype=np.float32)}
                for i in val_items
            ]
            raw_op = torch.from_numpy(self._raw_scores(outliers)[0])
            for name, (combo, rule) in zip(names, candidates, strict=True):
                outliers_fused = self._fuse_masked(raw_op, rule, masks[combo]).numpy()
                table.setdefault(name, {})[op] = _auroc(inliers[name], outliers_fused)
        means = {name: float(np.mean(list(table[name].values()))) for name in names}

        def best_of(ops) -> int:
            return max(
                range(len(names)), key=lambda c: (round(np.mean([table[names[c]][o] for o in ops]), 6), -c)
            )

        chosen = best_of(self.selection_ops)
        held_out = {}  # leave-one-op-out: choose on the other ops, measure on the one left out
        for op in self.selection_ops:
            others = [o for o in self.selection_ops if o != op]
            if others:
                c = best_of(others)
                held_out[op] = {"chosen": names[c], "auroc": table[names[c]][op]}
        combo, rule = candidates[chosen]
        self.fusion_, self.score_mask_ = rule, masks[combo].clone()
        self.selection_ = {
            "rule": rule,
            "score_terms": list(combo),
            "chosen": names[chosen],
            "chosen_by": "mean AUROC over outlier ops synthesised from the validation images "
            "(and their warped copies)",
            "mean_auroc": means,
            "auroc_per_op": table,
            "leave_one_op_out": held_out,
            "leave_one_op_out_auroc": float(np.mean([v["auroc"] for v in held_out.values()]))
            if held_out
            else None,
        }

    def _fuse_masked(self, raw: torch.Tensor, rule: str, mask: torch.Tensor) -> torch.Tensor:
        device = raw.device
        mask = mask.to(device)
        return fuse_scores(
            raw[:, mask],
            rule,
            self.loc_.to(device)[mask],
            self.scale_.to(device)[mask],
            self.weibull_.to(device)[mask],
        )

    # -- scoring ----------------------------------------------------------------------------------------
    def _check_fitted(self) -> None:
        if self.terms is None or self.loc_ is None or self.fusion_ is None or self.score_mask_ is None:
            raise NotFittedError("FusedDetector must be fitted first: call .fit(train_items, val_items)")

    def term_scores(self, images: torch.Tensor) -> torch.Tensor:
        """Raw per-term image scores ``(B, T)`` (float64), columns as :attr:`term_names`."""
        self._check_fitted()
        return self._term_outputs(self.features(images))[0]

    def fuse(self, raw: torch.Tensor, rule: str | None = None) -> torch.Tensor:
        """Fused scores ``(B,)`` of raw term scores ``(B, T)`` by ``rule`` (default: the fitted one), over
        the terms that enter the image score (``score_mask_``)."""
        self._check_fitted()
        return self._fuse_masked(raw, rule or self.fusion_, self.score_mask_)

    @torch.no_grad()
    def segment_and_score(self, images: torch.Tensor):
        """One pass: ``(logits, DetectorOutput(image_score, map at input size), map at its own grid)``;
        the maps are ``None`` without map terms."""
        self._check_fitted()
        if not isinstance(images, torch.Tensor) or images.dim() < 3:
            raise ValueError(
                f"images must be a tensor (B, C, *spatial), got {getattr(images, 'shape', None)}"
            )
        features = self.features(images)
        raw, maps = self._term_outputs(features)
        low = self._fused_map(maps)
        score_map = None if low is None else to_input_size(low, images.shape[2:]).float()
        image_score = self.fuse(raw).float()
        return features.logits, DetectorOutput(image_score, score_map), None if low is None else low.float()

    def _predict(self, images: torch.Tensor) -> DetectorOutput:
        return self.segment_and_score(images)[1]

    def subset(self, keep: Sequence[str], rule: str | None = None) -> FusedDetector:
        """A fitted detector with only the terms named in ``keep`` (their standardisation kept) and the
        fusion ``rule`` (default: this one's): the ablation of the detector without refitting."""
        self._check_fitted()
        names = self.term_names
        unknown = [k for k in keep if k not in names]
        if unknown or not keep:
            raise ValueError(f"keep must name some of the terms {names}, got {list(keep)!r}")
        columns = [i for i, n in enumerate(names) if n in keep]
        maps = [i for i, t in enumerate(self.terms) if t.has_map]
        sub = FusedDetector(
            self.network,
            num_classes=self.num_classes,
            terms=[self.terms[i] for i in columns],
            fusion=rule or self.fusion_,
            warped_copies=self.warped_copies,
            selection_ops=self.selection_ops,
            batch_size=self.batch_size,
            seed=self.seed,
        )
        sub.fusion_ = rule or self.fusion_
        sub.score_mask_ = torch.ones(len(columns), dtype=torch.bool)
        sub.loc_, sub.scale_ = self.loc_[columns], self.scale_[columns]
        sub.weibull_ = self.weibull_[columns]
        sub.map_scale_ = self.map_scale_[[maps.index(i) for i in columns if i in maps]]
        sub.selection_ = {"rule": sub.fusion_, "chosen_by": "subset of a fitted detector"}
        sub.num_train_ = self.num_train_
        sub._fitted = True
        return sub

    # -- storage ----------------------------------------------------------------------------------------
    def to_state(self) -> dict[str, Any]:
        """Everything needed to rebuild the fitted detector on the same network: plain values and CPU
        tensors only (``torch.load(..., weights_only=True)`` reads it)."""
        self._check_fitted()
        return {
            "format": DETECTOR_FORMAT,
            "version": DETECTOR_VERSION,
            "name": self.name,
            "config": {
                "num_classes": self.num_classes,
                "fusion": self.fusion,
                "warped_copies": self.warped_copies,
                "selection_ops": list(self.selection_ops),
                "batch_size": self.batch_size,
                "seed": self.seed,
            },
            "terms": [{"kind": t.kind, "config": t.config(), "state": t.state()} for t in self.terms],
            "fusion_rule": self.fusion_,
            "score_mask": self.score_mask_.clone(),
            "loc": self.loc_.clone(),
            "scale": self.scale_.clone(),
            "weibull": self.weibull_.clone(),
            "map_scale": self.map_scale_.clone(),
            "selection": self.selection_,
            "num_train": self.num_train_,
        }

    @classmethod
    def from_state(cls, network: nn.Module, state: Mapping[str, Any]) -> FusedDetector:
        """Rebuild a fitted detector stored by :meth:`to_state` on ``network``.

        Raises:
            ValueError: for another format or version, or a stored layer the network does not have.
        """
        if not isinstance(state, Mapping) or state.get("format") != DETECTOR_FORMAT:
            raise ValueError(
                f"not a stored monai-ood detector (format {getattr(state, 'get', dict)('format')!r})"
            )
        if state.get("version") != DETECTOR_VERSION:
            raise ValueError(
                f"stored detector version {state.get('version')!r}; this monai-ood reads {DETECTOR_VERSION}"
            )
        terms = [term_from_state(entry) for entry in state["terms"]]
        detector = cls(network, terms=terms, **dict(state["config"]))
        modules = dict(detector.network.named_modules())
        unknown = [layer for layer in detector.layers if layer not in modules]
        if unknown:
            raise ValueError(f"the stored detector reads layers {unknown} that the network does not have")
        detector.fusion_ = state["fusion_rule"]
        mask = state.get("score_mask")
        detector.score_mask_ = torch.ones(len(terms), dtype=torch.bool) if mask is None else mask.bool()
        if len(detector.score_mask_) != len(terms) or not detector.score_mask_.any():
            raise ValueError("the stored detector's score mask does not match its terms")
        detector.loc_, detector.scale_ = state["loc"].double(), state["scale"].double()
        detector.weibull_, detector.map_scale_ = state["weibull"].double(), state["map_scale"].double()
        detector.selection_ = state.get("selection")
        detector.num_train_ = state.get("num_train")
        detector._fitted = True
        return detector

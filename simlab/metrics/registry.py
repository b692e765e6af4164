"""Segmentation metrics as plug-ins: evaluation, results, ``simlab compare`` and the report iterate one registry.

A metric is a subclass of :class:`SegmentationMetric` marked with ``@register``: a ``name`` (the
row and summary key), its better ``direction``, a one-line ``definition``, a ``source`` (what
computes it, shown in ``summary.json`` and the report), and :meth:`SegmentationMetric.scores`,
the per-image × foreground-class array for one test set. Adding a metric is one class here (or in
a module imported by this one) with one ``@register`` line; nothing else lists metrics by hand.

Score arrays and the empty-structure rule
-----------------------------------------
``scores(pred, target, num_classes)`` returns float64 ``[B, num_classes - 1]`` (column ``c - 1``
belongs to class ``c``) where every entry is one of

* a finite number: the metric is defined for that image and class;
* NaN: the pair is *excluded* (neither the label nor the prediction holds the structure, and the
  metric has nothing to measure): it is not counted anywhere;
* +inf: the pair is *missed*: the structure is in the label but not in the prediction, or in the
  prediction but not in the label, and a distance to a surface that does not exist is infinite.
  These pairs are left out of the mean and counted instead (row ``<name>_missed``), so a model
  that misses structures cannot look good by being scored only where it found something.

Each metric's docstring states its own rule. Dice never produces NaN or inf (its empty cases
have values); HD95 uses all three.

Rows of one evaluation (:func:`metric_rows`), for test domain ``d``:

* ``<name>/<d>``: mean over the finite entries, all images and classes pooled (NaN if none);
* ``<name>_c<k>/<d>``: the same for class ``k``;
* ``<name>_missed/<d>`` (metrics with ``counts_missed``): share of the pairs that count (the
  structure is in the label or in the prediction) that are missed; NaN if no pair counts.

A model that predicts nothing on a domain whose labels hold structures has every pair missed:
``hd95_missed = 1`` and ``hd95`` undefined (null), never a good-looking number.

This module imports no torch or MONAI at import time (the metrics import them when they
compute), so that ``simlab compare`` and ``simlab report`` read the registry cheaply.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, ClassVar, Literal

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = [
    "HEADLINE",
    "REGISTRY",
    "Dice",
    "HD95",
    "SegmentationMetric",
    "metric_labels",
    "metric_rows",
    "register",
]

HEADLINE = "dice"
"""The metric behind the arm-level ``acc``/``bwt``/``fwt``/``forgetting`` and their variants,
``R/<arm>/<hospital>.csv`` and ``final_dice``."""


class SegmentationMetric:
    """One segmentation metric. Subclasses set the class attributes and implement :meth:`scores`."""

    name: ClassVar[str]
    label: ClassVar[str]
    """Short display name (table headers)."""
    direction: ClassVar[Literal["higher", "lower"]]
    definition: ClassVar[str]
    source: ClassVar[str]
    unit: ClassVar[str] = ""
    counts_missed: ClassVar[bool] = False
    """True when :meth:`scores` may return +inf (missed / false structures), counted in ``<name>_missed``."""
    tolerance: ClassVar[str] = "abs:0.02"
    """Default regression tolerance of ``simlab compare`` for the arm-level value."""
    digits: ClassVar[int] = 3

    def scores(self, pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> np.ndarray:
        """Per image × foreground class, float64 ``[B, num_classes - 1]``: finite, NaN (excluded) or +inf (missed)."""
        raise NotImplementedError

    @property
    def missed_name(self) -> str:
        return f"{self.name}_missed"


REGISTRY: dict[str, SegmentationMetric] = {}
"""name → metric, in registration order (the order of rows, summary blocks and table columns)."""


def register(cls: type[SegmentationMetric]) -> type[SegmentationMetric]:
    """Class decorator: add one instance of ``cls`` to :data:`REGISTRY` (names must be unique)."""
    metric = cls()
    for attr in ("name", "label", "direction", "definition", "source"):
        if not getattr(metric, attr, None):
            raise TypeError(f"{cls.__name__}: a registered metric needs {attr!r}")
    if metric.direction not in ("higher", "lower"):
        raise ValueError(f"{cls.__name__}: direction must be 'higher' or 'lower', got {metric.direction!r}")
    if metric.name in REGISTRY:
        raise ValueError(f"metric {metric.name!r} is registered twice")
    REGISTRY[metric.name] = metric
    return cls


@register
class Dice(SegmentationMetric):
    """Dice, ``2|T∩P| / (|T|+|P|)`` per image and class (:func:`simlab.metrics.segmentation.dice_per_class`).

    Empty-structure rule: label and prediction both empty → 1.0 (correctly absent); label empty but
    structure predicted → 0.0 (false structure); label present but nothing predicted → 0.0 (missed,
    by the formula). Never NaN or inf, so every image × class pair counts in the mean.
    """

    name = "dice"
    label = "Dice"
    direction = "higher"
    definition = ("Dice 2|T∩P|/(|T|+|P|) per image and foreground class, mean over images and classes; "
                  "both empty = 1, one empty = 0")
    source = "MONAI DiceMetric(include_background=False, ignore_empty=False)"
    tolerance = "abs:0.02"

    def scores(self, pred, target, num_classes):
        from simlab.metrics.segmentation import dice_per_class

        return dice_per_class(pred, target, num_classes)


@register
class HD95(SegmentationMetric):
    """95th-percentile symmetric Hausdorff distance per image and class, in pixels (unit spacing).

    Computed by MONAI ``compute_hausdorff_distance(percentile=95)`` through
    :func:`simlab.metrics.segmentation.hd95_per_class` (boundary = mask XOR its erosion; per
    direction the 95th percentile of the nearest-boundary distances; the larger direction).

    Empty-structure rule: label and prediction both empty → NaN, excluded (no surface to measure;
    Dice = 1 records that the absence was right). Label present but prediction empty (missed
    structure) or prediction present but label empty (false structure) → +inf: not averaged,
    counted in ``hd95_missed`` (share of the counting pairs). ``hd95`` is the mean over the pairs
    where both hold the structure, and must be read together with ``hd95_missed``.
    """

    name = "hd95"
    label = "HD95"
    direction = "lower"
    unit = "px"
    counts_missed = True
    definition = ("95th-percentile symmetric Hausdorff distance (pixels) per image and foreground class, mean "
                  "over the pairs where label and prediction both hold the structure; both empty = excluded; "
                  "one empty = missed, counted in hd95_missed")
    source = "MONAI compute_hausdorff_distance(percentile=95), as HausdorffDistanceMetric"
    tolerance = "rel:0.25"
    digits = 2

    def scores(self, pred, target, num_classes):
        import torch

        from simlab.metrics.segmentation import hd95_per_class

        out = hd95_per_class(pred, target, num_classes)
        t = torch.as_tensor(target).reshape(len(out), -1)
        p = torch.as_tensor(pred).reshape(len(out), -1)
        for c in range(1, num_classes):
            in_t = (t == c).any(dim=1).numpy()
            in_p = (p == c).any(dim=1).numpy()
            out[in_t != in_p, c - 1] = math.inf
        return out


# ------------------------------------------------------------------------------------ rows
def _mean(values: np.ndarray) -> float:
    """Mean over the finite entries; the plain mean when all are finite (Dice: today's exact numbers)."""
    finite = np.isfinite(values)
    if finite.all():
        return float(values.mean()) if values.size else math.nan
    return float(values[finite].mean()) if finite.any() else math.nan


def metric_rows(
    domain: str,
    pred: torch.Tensor,
    target: torch.Tensor,
    num_classes: int,
    *,
    names: tuple[str, ...] | None = None,
    suffix: str = "",
    per_class: bool = True,
) -> dict[str, float]:
    """Evaluation rows ``{"<name><suffix>/<domain>": value, ...}`` for every registered metric (or ``names``).

    Per metric: ``<name><suffix>`` (mean over the finite entries), with ``per_class`` also
    ``<name><suffix>_c<k>`` per foreground class ``k``, and for a metric that counts missed
    structures ``<name><suffix>_missed`` (share of the pairs with the structure in the label or
    the prediction that are missed). Values may be NaN (undefined); the run log writes them as null.
    """
    out: dict[str, float] = {}
    for name in names if names is not None else tuple(REGISTRY):
        metric = REGISTRY[name]
        s = metric.scores(pred, target, num_classes)
        key = f"{name}{suffix}"
        out[f"{key}/{domain}"] = _mean(s)
        if per_class:
            for c in range(s.shape[1]):
                out[f"{key}_c{c + 1}/{domain}"] = _mean(s[:, c])
        if metric.counts_missed:
            counted = ~np.isnan(s)
            out[f"{key}_missed/{domain}"] = float(np.isinf(s).sum() / counted.sum()) if counted.any() else math.nan
    return out


# ---------------------------------------------------------------------------------- labels
def metric_labels() -> dict[str, str]:
    """Labels for ``summary.json``'s ``metric_labels``: every registered metric, and the fields of its block."""
    labels: dict[str, str] = {}
    for m in REGISTRY.values():
        labels[m.name] = f"{m.definition}; {m.direction} is better ({m.source})"
        if m.counts_missed:
            labels[m.missed_name] = (f"share of image x class pairs with the structure in the label or the prediction "
                                     f"where {m.name} is undefined because one of them lacks it (missed or false "
                                     f"structure); lower is better")
    labels.update({
        "metrics.<metric>.mean": "mean of the final row of the pooled R of that metric (the GEM ACC formula, in the "
                                 "metric's units; better in the metric's direction)",
        "metrics.<metric>.bwt": "BWT of that metric's R, oriented so that positive = better after later stages: "
                                "mean over j<N of R[N][j]-R[j][j] (higher-is-better) or R[j][j]-R[N][j] "
                                "(lower-is-better)",
        "metrics.<metric>.fwt": "FWT of that metric's R as in the ODEx paper, oriented so that positive = training "
                                "on a stage made its domain better: mean over i>=2 of R[i][i]-R[i-1][i] "
                                "(higher-is-better) or R[i-1][i]-R[i][i] (lower-is-better)",
        "metrics.<metric>.gem_fwt": "GEM FWT of that metric's R, oriented so that positive = better than the "
                                    "untrained model: mean over j>=2 of R[j-1][j]-b[j] (higher-is-better) or "
                                    "b[j]-R[j-1][j] (lower-is-better)",
        "metrics.<metric>.chaudhry_forgetting": "Chaudhry forgetting of that metric's R, positive = got worse: mean "
                                                "over j<N of the best earlier value minus the final one "
                                                "(higher-is-better: max-R[N][j]; lower-is-better: R[N][j]-min)",
        "metrics.<metric>.forgetting": "headline forgetting of that metric, positive = got worse: mean over the "
                                       "test domains that left every stream of max(0, change for the worse from "
                                       "the last round each was trained on to the end)",
        "metrics.<metric>.missed": "mean of the final row of the pooled R of <metric>_missed (metrics that count "
                                   "missed structures)",
    })
    return labels

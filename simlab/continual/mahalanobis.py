r"""Shift detection for ODEx: the normalisation, threshold and calibration of Mahalanobis scores.

Everything here is numpy float64; nothing knows about torch or Flower. The Gaussians and their
mergeable statistics are :mod:`simlab.continual.gaussian`.

Normalisation and threshold (ODEx) (:class:`Calibration`)
----------------------------------------------------------
From in-distribution (ID) scores u_1..u_M of one history entry:
u_min = min u_i, u_max = max u_i, upper = max_factor * u_max (max_factor = 2: "doubled maximum"),

    uhat(u) = (clip(u, u_min, upper) - u_min) / (upper - u_min)  in [0, 1],
    xi = threshold_factor * mean_i uhat(u_i)                     (threshold_factor = 2: "xi = 2 mu").

ID scores lie in [u_min, u_max], inside the clip range, so mean_i uhat(u_i) =
(mean_i u_i - u_min) / (upper - u_min) exactly; that makes calibrations computed against the
same Gaussian on several hospitals merge exactly (min of mins, max of maxes, count-weighted mean).
If upper == u_min (all ID scores equal and max_factor = 1, or all zero) uhat is the step
1[u > u_min].

Which ID scores.  A window's own features scored against a Gaussian fitted on those same features
are optimistically small (for the MLE with N > d the in-sample mean D^2 is exactly d, while a fresh
ID point scores about d N/(N - d - 2)), which would put xi too low and fork on fresh ID data.  The
ID scores are therefore **cross-fitted** (``ShiftParams.calib_folds`` = k, default 5): image i goes
to fold i mod k (interleaved, no randomness) and is scored under the Gaussian of the statistics
*without* its fold (``subtract``), so every score is out-of-sample while the entry's Gaussian still
uses all images.  ``calib_folds = 0`` (or a window of one image) uses in-sample scores.

History and pool decisions
--------------------------
A member's history is a list of entries (one per window that trained it).  A window's score under
an entry is the mean normalised score of its images; entries combine by ``ShiftParams.history``:
``"sum"`` (ODEx Eq. 4), ``"mean"``, ``"min"`` (nearest entry) or ``"last"`` (latest entry only).
The member's threshold combines the entries' xi by the same rule, so "sum" compares sum of scores
to sum of thresholds.  For "min" this is conservative: min_e s_e <= min_e xi_e implies that some
entry accepts the window on its own.  The pool decision and routed inference built on these scores
are :func:`simlab.continual.odex.decide` and :func:`simlab.continual.odex.route`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from simlab.continual.gaussian import Estimator, Gaussian, GaussianStats, _as_features

__all__ = ["ShiftParams", "Calibration", "HistoryEntry", "fold_ids", "id_scores"]


# ---------------------------------------------------------------------------------------------
# Parameters and calibration
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShiftParams:
    """How windows are scored against a member's history (ODEx shift detection)."""

    estimator: Literal["ledoit_wolf", "empirical", "identity"] = field(
        default="ledoit_wolf",
        metadata={"help": "covariance estimator: Ledoit-Wolf shrinkage, MLE (ridge only if singular), or identity "
                          "(Euclidean distance to the mean: with features.reduction gram, the Gram detector)"},
    )
    distance: Literal["squared", "root"] = field(
        default="squared",
        metadata={"help": "score with the squared Mahalanobis distance D^2 (reference code) or D"},
    )
    threshold_factor: float = field(
        default=2.0,
        metadata={"gt": 0.0, "le": 1000.0,
                  "why": "normalised scores lie in [0, 1], so once xi reaches 1 no window forks; the paper's factor is 2",
                  "help": "xi = factor x mean normalised in-distribution score"},
    )
    max_factor: float = field(
        default=2.0,
        metadata={"ge": 1.0, "le": 1000.0,
                  "why": "a normaliser this far above the in-distribution scores squeezes every window's score "
                         "towards 0; the paper doubles the maximum (2)",
                  "help": "normaliser upper bound = factor x max in-distribution score"},
    )
    history: Literal["sum", "mean", "min", "last"] = field(
        default="sum",
        metadata={"help": "combine a member's history entries: sum (ODEx Eq. 4), mean, min or last"},
    )
    calib_folds: int = field(
        default=5,
        metadata={"ge": 0, "le": 1000, "why": "every fold fits the Gaussian again, so k folds cost k fits per window",
                  "help": "k-fold cross-fitted in-distribution scores (0 = in-sample)"},
    )

    def check(self) -> list[tuple[str, str]]:
        if self.calib_folds == 1:
            return [("calib_folds", "use 0 (in-sample) or at least 2 folds")]
        return []


@dataclass(frozen=True)
class Calibration:
    """Normalisation of one history entry's scores, from its in-distribution scores.

    ``min_id``/``max_id``: smallest/largest ID score; ``mean_norm_id``: mean normalised ID score;
    ``n_id``: number of ID scores; ``max_factor``: upper bound = max_factor x max_id;
    ``estimator``/``distance``: how the scores were computed (scoring with other settings is
    refused, since the normalisation would not match).
    """

    min_id: float
    max_id: float
    mean_norm_id: float
    n_id: int = 0
    max_factor: float = 2.0
    estimator: str = "ledoit_wolf"
    distance: str = "squared"

    @classmethod
    def from_scores(
        cls,
        u: Any,
        max_factor: float = 2.0,
        estimator: str = "ledoit_wolf",
        distance: str = "squared",
    ) -> Calibration:
        u = np.asarray(u, dtype=np.float64).ravel()
        if u.size == 0:
            raise ValueError("need at least one in-distribution score")
        if not np.all(np.isfinite(u)):
            raise ValueError("in-distribution scores must be finite")
        lo, hi = float(u.min()), float(u.max())
        denom = max_factor * hi - lo
        mean_norm = float((u.mean() - lo) / denom) if denom > 0.0 else 0.0
        return cls(lo, hi, mean_norm, int(u.size), float(max_factor), estimator, distance)

    @property
    def upper(self) -> float:
        return self.max_factor * self.max_id

    @property
    def mean_id(self) -> float:
        """Mean raw ID score (recovered exactly: ID scores are never clipped)."""
        return self.min_id + self.mean_norm_id * max(self.upper - self.min_id, 0.0)

    def normalize(self, u: Any) -> np.ndarray:
        """uhat = (clip(u, min_id, upper) - min_id) / (upper - min_id), in [0, 1]."""
        u = np.asarray(u, dtype=np.float64)
        denom = self.upper - self.min_id
        if denom <= 0.0:
            return (u > self.min_id).astype(np.float64)
        return (np.clip(u, self.min_id, self.upper) - self.min_id) / denom

    def threshold(self, threshold_factor: float = 2.0) -> float:
        """xi = threshold_factor x mean normalised ID score."""
        return float(threshold_factor * self.mean_norm_id)

    @staticmethod
    def merge(a: Calibration, b: Calibration) -> Calibration:
        """Pool two calibrations whose ID scores were computed against the *same* Gaussian."""
        if (a.max_factor, a.estimator, a.distance) != (b.max_factor, b.estimator, b.distance):
            raise ValueError("calibrations with different settings cannot be merged")
        if a.n_id <= 0 or b.n_id <= 0:
            raise ValueError("merging needs the number of ID scores (n_id > 0) on both sides")
        n = a.n_id + b.n_id
        lo, hi = min(a.min_id, b.min_id), max(a.max_id, b.max_id)
        mean_u = (a.n_id * a.mean_id + b.n_id * b.mean_id) / n
        denom = a.max_factor * hi - lo
        mean_norm = (mean_u - lo) / denom if denom > 0.0 else 0.0
        return Calibration(lo, hi, float(mean_norm), n, a.max_factor, a.estimator, a.distance)

    def to_dict(self) -> dict[str, float | int | str]:
        return {
            "min_id": self.min_id, "max_id": self.max_id, "mean_norm_id": self.mean_norm_id,
            "n_id": self.n_id, "max_factor": self.max_factor,
            "estimator": self.estimator, "distance": self.distance,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Calibration:
        return cls(
            float(d["min_id"]), float(d["max_id"]), float(d["mean_norm_id"]), int(d["n_id"]),
            float(d["max_factor"]), str(d["estimator"]), str(d["distance"]),
        )


def fold_ids(n: int, folds: int) -> np.ndarray:
    """Interleaved fold of each of ``n`` images: i mod k with k = min(folds, n)."""
    k = min(int(folds), int(n))
    return np.arange(n) % max(k, 1)


def id_scores(stats: GaussianStats, z: Any, params: ShiftParams) -> np.ndarray:
    """In-distribution scores of the rows of ``z``, whose samples are contained in ``stats``.

    With ``params.calib_folds`` = k >= 2 (and at least 2 rows), rows of fold f are scored under the
    Gaussian of ``stats - stats(fold f)``, i.e. out-of-sample; otherwise under ``stats`` itself.
    ``stats`` may be a merged (federated) statistic that includes ``z``.
    """
    x = _as_features(z)
    n = x.shape[0]
    if stats.n < n:
        raise ValueError(f"stats hold {stats.n} samples, fewer than the {n} rows that must be in them")
    if params.calib_folds < 2 or n < 2:
        return Gaussian.from_stats(stats, params.estimator).distance(x, params.distance)
    folds = fold_ids(n, params.calib_folds)
    u = np.empty(n)
    for f in np.unique(folds):
        rows = folds == f
        rest = stats - GaussianStats.from_features(x[rows])
        u[rows] = Gaussian.from_stats(rest, params.estimator).distance(x[rows], params.distance)
    return u


# ---------------------------------------------------------------------------------------------
# History entries and scores
# ---------------------------------------------------------------------------------------------


@dataclass(eq=False)
class HistoryEntry:
    """One Gaussian of a member's history with its calibration (Gaussians cached per estimator)."""

    stats: GaussianStats
    calibration: Calibration
    _gaussians: dict[str, Gaussian] = field(default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def fit(cls, z: Any, params: ShiftParams) -> HistoryEntry:
        """Entry from a window's features: statistics of all rows, cross-fitted calibration."""
        stats = GaussianStats.from_features(z)
        if stats.n == 0:
            raise ValueError("cannot fit a history entry on zero images")
        u = id_scores(stats, z, params)
        return cls(stats, Calibration.from_scores(u, params.max_factor, params.estimator, params.distance))

    def gaussian(self, estimator: Estimator = "ledoit_wolf") -> Gaussian:
        if estimator not in self._gaussians:
            self._gaussians[estimator] = Gaussian.from_stats(self.stats, estimator)
        return self._gaussians[estimator]

    def _check(self, params: ShiftParams) -> None:
        c = self.calibration
        if (c.estimator, c.distance, c.max_factor) != (params.estimator, params.distance, params.max_factor):
            raise ValueError(
                f"entry calibrated with estimator={c.estimator}, distance={c.distance}, "
                f"max_factor={c.max_factor}; scored with {params.estimator}, {params.distance}, "
                f"{params.max_factor}"
            )

    def raw_scores(self, z: Any, params: ShiftParams) -> np.ndarray:
        """Per-image distances u (D^2 or D) under this entry's Gaussian, [n]."""
        self._check(params)
        return self.gaussian(params.estimator).distance(z, params.distance)

    def normalized_scores(self, z: Any, params: ShiftParams) -> np.ndarray:
        """Per-image normalised scores uhat in [0, 1], [n]."""
        return self.calibration.normalize(self.raw_scores(z, params))

    def threshold(self, params: ShiftParams) -> float:
        return self.calibration.threshold(params.threshold_factor)


def _combine(values: np.ndarray, mode: str) -> np.ndarray:
    """Combine along axis 0 (one row per history entry, oldest first)."""
    if values.shape[0] == 0:
        raise ValueError("a member needs at least one history entry")
    if mode == "sum":
        return values.sum(axis=0)
    if mode == "mean":
        return values.mean(axis=0)
    if mode == "min":
        return values.min(axis=0)
    if mode == "last":
        return values[-1]
    raise ValueError(f"unknown history mode {mode!r}")

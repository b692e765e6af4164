r"""Shift detection for ODEx: mergeable Gaussian statistics, Ledoit-Wolf, Mahalanobis, normalisation.

Everything here is numpy float64 and scipy.linalg; nothing knows about torch or Flower.

Sufficient statistics (:class:`GaussianStats`)
-----------------------------------------------
A member's history entry is a Gaussian of the feature vectors z_k in R^d (k = 1..N) of the data
that trained it.  Hospitals send statistics, never features, and the server merges them, so the
statistics must (i) give the mean, the MLE covariance and the Ledoit-Wolf covariance and (ii) merge
exactly.  With y_k = z_k - m (m the mean) they are

    N,   m,   M2 = sum_k y_k y_k^T,   M3 = sum_k |y_k|^2 y_k,   M4 = sum_k |y_k|^4.

(N, m, M2) are equivalent to (N, sum z, sum z z^T): ``sum_z = N m`` and
``sum_zz = M2 + N m m^T`` (properties :attr:`GaussianStats.sum_z`, :attr:`GaussianStats.sum_zz`).
They are stored *centred* because the raw-sum form loses digits by cancellation
(sum z z^T / N - m m^T) when |m| is large against the spread.

Why M3 and M4.  Ledoit-Wolf needs b^2 = (1/N^2) sum_k |y_k y_k^T - S|_F^2 with S = M2 / N.
Expanding, |y y^T - S|^2 = |y|^4 - 2 y^T S y + |S|^2 and sum_k y_k^T S y_k = tr(S M2) = N |S|^2, so

    b^2 = (1/N^2) (M4 - N |S|_F^2) = (1/N) (M4 / N - |S|_F^2),

i.e. the centred fourth moment M4 is the one extra number LW needs.  M4 is a sum over the set, but
about the set's own mean; when two sets are merged the common mean moves, and re-centring the fourth
moment about a point shifted by delta needs M3 (and M2):

    M2' = M2 + N dd^T
    M3' = M3 + tr(M2) d + 2 M2 d + N c d
    M4' = M4 + 4 M3^T d + 2 c tr(M2) + 4 d^T M2 d + N c^2          (d = delta, c = |delta|^2)

(from |y + d|^2 = |y|^2 + 2 y^T d + c and sum_k y_k = 0).  Sums about a *common* point add, so
``merge(a, b)`` re-centres both about the pooled mean and adds: the result equals the statistics of
the pooled data up to rounding (Chan-Golub-LeVeque style pairwise update).  ``subtract`` is the
inverse (remove a subset), used for cross-fitted calibration inside a merged Gaussian.

Ledoit-Wolf (matches ``sklearn.covariance.LedoitWolf(assume_centered=False)``)
------------------------------------------------------------------------------
mu = tr(S)/d,  dbar^2 = |S - mu I|_F^2 / d,  bbar^2 = min(b^2 / d, dbar^2),
shrinkage = bbar^2 / dbar^2 (0 when bbar^2 = 0; 0 when d = 1, as scikit-learn),
Sigma_LW = (1 - shrinkage) S + shrinkage mu I.  The /d on both terms is LW's normalised Frobenius
norm and cancels in the ratio.  Rounding can make b^2 a hair negative; shrinkage is clipped to [0, 1].

Distances (:class:`Gaussian`)
-----------------------------
Sigma = L L^T by Cholesky (cached); D^2(z) = |L^{-1}(z - mu)|^2 by ``solve_triangular``; no inverse
is ever formed.  If the Cholesky factorisation fails (singular MLE covariance when N <= d, or
constant features) a ridge eps I is added, eps = 1e-6 tr(Sigma)/d (1e-6 max(1, |mu|^2/d) when the
trace is 0), multiplied by 10 until it succeeds (at most 8 times); the ridge used is kept in
:attr:`Gaussian.ridge`.  Ledoit-Wolf is positive definite whenever tr(S) > 0 and shrinkage > 0, so
the ridge is mainly a guard for the empirical estimator.

Scores use the **squared** distance D^2 by default, like the reference code (scikit-learn's
``.mahalanobis`` returns D^2); ``distance="root"`` uses D.  The min / doubled-max normalisation is
not invariant to this choice: with D^2 the in-distribution scores spread further and saturation
at 1 comes earlier for shifted data.

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
entry accepts the window on its own.  :func:`decide` picks the member with the lowest score and
trains it if the score is within its threshold, else forks it; :func:`route` sends each image to
the member with the lowest per-image score.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import scipy.linalg

__all__ = [
    "GaussianStats",
    "Gaussian",
    "ShiftParams",
    "Calibration",
    "HistoryEntry",
    "ledoit_wolf_shrinkage",
    "fold_ids",
    "id_scores",
    "score_history",
    "history_threshold",
    "score_images",
    "score_pool",
    "decide",
    "route",
]

Estimator = Literal["ledoit_wolf", "empirical"]
Distance = Literal["squared", "root"]


def _as_features(z: Any) -> np.ndarray:
    arr = np.asarray(z, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise ValueError(f"features must be [n, d], got shape {arr.shape}")
    return arr


def _frozen(a: np.ndarray) -> np.ndarray:
    a = np.array(a, dtype=np.float64, copy=True)
    a.setflags(write=False)
    return a


# ---------------------------------------------------------------------------------------------
# Sufficient statistics
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class GaussianStats:
    """Mergeable statistics of a set of feature vectors (see module docstring).

    Fields: ``n`` samples, ``mean`` [d], ``m2`` = sum y y^T [d, d], ``m3`` = sum |y|^2 y [d],
    ``m4`` = sum |y|^4, with y = z - mean.  Arrays are stored as read-only copies.
    """

    n: int
    mean: np.ndarray
    m2: np.ndarray
    m3: np.ndarray
    m4: float

    def __post_init__(self) -> None:
        d = int(np.asarray(self.mean).shape[-1]) if np.ndim(self.mean) == 1 else -1
        if d < 0:
            raise ValueError("mean must be a vector")
        if np.shape(self.m2) != (d, d) or np.shape(self.m3) != (d,):
            raise ValueError(f"inconsistent shapes: mean {d}, m2 {np.shape(self.m2)}, m3 {np.shape(self.m3)}")
        if int(self.n) < 0:
            raise ValueError("n must be >= 0")
        object.__setattr__(self, "n", int(self.n))
        object.__setattr__(self, "mean", _frozen(self.mean))
        object.__setattr__(self, "m2", _frozen(self.m2))
        object.__setattr__(self, "m3", _frozen(self.m3))
        object.__setattr__(self, "m4", float(self.m4))

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def empty(cls, dim: int) -> GaussianStats:
        """Statistics of no samples (the identity of :meth:`merge`)."""
        return cls(0, np.zeros(dim), np.zeros((dim, dim)), np.zeros(dim), 0.0)

    @classmethod
    def from_features(cls, z: Any) -> GaussianStats:
        """Statistics of the rows of ``z`` ([n, d]; a single vector [d] counts as one row)."""
        x = _as_features(z)
        n, d = x.shape
        if n == 0:
            return cls.empty(d)
        mean = x.mean(axis=0)
        y = x - mean
        r = np.einsum("ij,ij->i", y, y)
        return cls(n, mean, y.T @ y, y.T @ r, float(r @ r))

    # -- views --------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    @property
    def sum_z(self) -> np.ndarray:
        """sum_k z_k."""
        return self.n * self.mean

    @property
    def sum_zz(self) -> np.ndarray:
        """sum_k z_k z_k^T."""
        return self.m2 + self.n * np.outer(self.mean, self.mean)

    def _about(self, point: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
        """(M2, M3, M4) of this set about ``point`` instead of about its own mean."""
        if self.n == 0:
            d = self.dim
            return np.zeros((d, d)), np.zeros(d), 0.0
        delta = self.mean - point
        c = float(delta @ delta)
        tr = float(np.trace(self.m2))
        m2d = self.m2 @ delta
        m2 = self.m2 + self.n * np.outer(delta, delta)
        m3 = self.m3 + tr * delta + 2.0 * m2d + self.n * c * delta
        m4 = self.m4 + 4.0 * float(self.m3 @ delta) + 2.0 * c * tr + 4.0 * float(delta @ m2d) + self.n * c * c
        return m2, m3, m4

    # -- algebra ------------------------------------------------------------------------------
    @staticmethod
    def merge(a: GaussianStats, b: GaussianStats) -> GaussianStats:
        """Statistics of the union of the two sample sets."""
        if a.dim != b.dim:
            raise ValueError(f"cannot merge statistics of dimension {a.dim} and {b.dim}")
        if a.n == 0:
            return b
        if b.n == 0:
            return a
        n = a.n + b.n
        mean = a.mean + (b.n / n) * (b.mean - a.mean)
        a2, a3, a4 = a._about(mean)
        b2, b3, b4 = b._about(mean)
        return GaussianStats(n, mean, a2 + b2, a3 + b3, a4 + b4)

    def __add__(self, other: GaussianStats) -> GaussianStats:
        if not isinstance(other, GaussianStats):
            return NotImplemented
        return GaussianStats.merge(self, other)

    @staticmethod
    def subtract(total: GaussianStats, part: GaussianStats) -> GaussianStats:
        """Statistics of ``total`` without the samples of ``part`` (inverse of :meth:`merge`).

        ``part`` must be a subset of the samples behind ``total``; the result is exact up to
        rounding, which grows when ``part`` is most of ``total``.
        """
        if total.dim != part.dim:
            raise ValueError(f"dimension mismatch {total.dim} vs {part.dim}")
        n = total.n - part.n
        if n < 0:
            raise ValueError(f"cannot remove {part.n} samples from {total.n}")
        if part.n == 0:
            return total
        if n == 0:
            return GaussianStats.empty(total.dim)
        mean = (total.n * total.mean - part.n * part.mean) / n
        t2, t3, t4 = total._about(mean)
        p2, p3, p4 = part._about(mean)
        m2 = t2 - p2
        return GaussianStats(n, mean, 0.5 * (m2 + m2.T), t3 - p3, max(t4 - p4, 0.0))

    def __sub__(self, other: GaussianStats) -> GaussianStats:
        if not isinstance(other, GaussianStats):
            return NotImplemented
        return GaussianStats.subtract(self, other)

    # -- estimators ---------------------------------------------------------------------------
    def empirical_covariance(self) -> np.ndarray:
        """MLE covariance S = M2 / N (divides by N, like ``np.cov(..., bias=True)``)."""
        if self.n == 0:
            raise ValueError("no samples")
        s = self.m2 / self.n
        return 0.5 * (s + s.T)

    def ledoit_wolf_shrinkage(self) -> float:
        """Ledoit-Wolf shrinkage intensity in [0, 1] (module docstring)."""
        if self.n == 0:
            raise ValueError("no samples")
        d = self.dim
        if d == 1:
            return 0.0
        s = self.empirical_covariance()
        mu = float(np.trace(s)) / d
        s_fro2 = float(np.sum(s * s))
        b2 = (self.m4 / self.n - s_fro2) / (d * self.n)
        centred = s - mu * np.eye(d)
        d2 = float(np.sum(centred * centred)) / d
        b2 = min(b2, d2)
        if b2 <= 0.0 or d2 <= 0.0:
            return 0.0
        return float(min(b2 / d2, 1.0))

    def covariance(self, estimator: Estimator = "ledoit_wolf") -> np.ndarray:
        """Covariance estimate: ``"ledoit_wolf"`` (default) or ``"empirical"`` (MLE, /N)."""
        s = self.empirical_covariance()
        if estimator == "empirical":
            return s
        if estimator == "ledoit_wolf":
            shrink = self.ledoit_wolf_shrinkage()
            mu = float(np.trace(s)) / self.dim
            return (1.0 - shrink) * s + shrink * mu * np.eye(self.dim)
        raise ValueError(f"unknown estimator {estimator!r}")

    # -- transport ----------------------------------------------------------------------------
    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain arrays for transport: ``n`` and ``m4`` as 0-d arrays."""
        return {
            "n": np.asarray(self.n, dtype=np.int64),
            "mean": np.array(self.mean),
            "m2": np.array(self.m2),
            "m3": np.array(self.m3),
            "m4": np.asarray(self.m4, dtype=np.float64),
        }

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, Any]) -> GaussianStats:
        # Scalars may arrive as 0-d or as single-element arrays (transport flattens 0-d arrays).
        return cls(
            int(np.asarray(arrays["n"]).reshape(())),
            np.asarray(arrays["mean"], dtype=np.float64),
            np.asarray(arrays["m2"], dtype=np.float64),
            np.asarray(arrays["m3"], dtype=np.float64),
            float(np.asarray(arrays["m4"]).reshape(())),
        )


def ledoit_wolf_shrinkage(z: Any) -> float:
    """Ledoit-Wolf shrinkage of the rows of ``z`` (data are centred first)."""
    return GaussianStats.from_features(z).ledoit_wolf_shrinkage()


# ---------------------------------------------------------------------------------------------
# Gaussian with cached Cholesky factor
# ---------------------------------------------------------------------------------------------


class Gaussian:
    """A Gaussian N(mean, cov) with a Cholesky factor computed once (ridge only if needed)."""

    def __init__(self, mean: Any, cov: Any) -> None:
        mean = np.asarray(mean, dtype=np.float64)
        cov = np.asarray(cov, dtype=np.float64)
        d = mean.shape[0]
        if mean.ndim != 1 or cov.shape != (d, d):
            raise ValueError(f"mean [d] and cov [d, d] expected, got {mean.shape} and {cov.shape}")
        if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(cov))):
            raise ValueError("mean and covariance must be finite")
        cov = 0.5 * (cov + cov.T)
        self.mean = _frozen(mean)
        self.ridge = 0.0
        chol = self._try_cholesky(cov)
        if chol is None:
            tr = float(np.trace(cov)) / d
            scale = tr if tr > 0.0 else max(1.0, float(mean @ mean) / d)
            eps = 1e-6 * scale
            for _ in range(8):
                chol = self._try_cholesky(cov + eps * np.eye(d))
                if chol is not None:
                    self.ridge = eps
                    break
                eps *= 10.0
            else:
                raise np.linalg.LinAlgError("covariance is not positive definite even with a ridge")
        self.cov = _frozen(cov + self.ridge * np.eye(d))
        self.chol = _frozen(chol)

    @staticmethod
    def _try_cholesky(cov: np.ndarray) -> np.ndarray | None:
        try:
            return scipy.linalg.cholesky(cov, lower=True, check_finite=False)
        except np.linalg.LinAlgError:
            return None

    @classmethod
    def from_stats(cls, stats: GaussianStats, estimator: Estimator = "ledoit_wolf") -> Gaussian:
        return cls(stats.mean, stats.covariance(estimator))

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    def sq_distance(self, z: Any) -> np.ndarray:
        """Squared Mahalanobis distances D^2 = |L^{-1}(z - mean)|^2 of the rows of ``z``, [n]."""
        x = _as_features(z)
        if x.shape[1] != self.dim:
            raise ValueError(f"features have d={x.shape[1]}, Gaussian has d={self.dim}")
        w = scipy.linalg.solve_triangular(self.chol, (x - self.mean).T, lower=True, check_finite=False)
        return np.einsum("ij,ij->j", w, w)

    def distance(self, z: Any, kind: Distance = "squared") -> np.ndarray:
        """D^2 (``"squared"``) or D (``"root"``) of the rows of ``z``, [n]."""
        d2 = self.sq_distance(z)
        if kind == "squared":
            return d2
        if kind == "root":
            return np.sqrt(d2)
        raise ValueError(f"unknown distance {kind!r}")


# ---------------------------------------------------------------------------------------------
# Parameters and calibration
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShiftParams:
    """How windows are scored against a member's history (ODEx shift detection)."""

    estimator: Literal["ledoit_wolf", "empirical"] = field(
        default="ledoit_wolf",
        metadata={"help": "covariance estimator: Ledoit-Wolf shrinkage or MLE (ridge only if singular)"},
    )
    distance: Literal["squared", "root"] = field(
        default="squared",
        metadata={"help": "score with the squared Mahalanobis distance D^2 (reference code) or D"},
    )
    threshold_factor: float = field(
        default=2.0,
        metadata={"gt": 0.0, "help": "xi = factor x mean normalised in-distribution score"},
    )
    max_factor: float = field(
        default=2.0,
        metadata={"ge": 1.0, "help": "normaliser upper bound = factor x max in-distribution score"},
    )
    history: Literal["sum", "mean", "min", "last"] = field(
        default="sum",
        metadata={"help": "combine a member's history entries: sum (ODEx Eq. 4), mean, min or last"},
    )
    calib_folds: int = field(
        default=5,
        metadata={"ge": 0, "le": 1000, "help": "k-fold cross-fitted in-distribution scores (0 = in-sample)"},
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


def score_history(entries: Sequence[HistoryEntry], z: Any, params: ShiftParams) -> float:
    """Window score under a member: mean uhat of the window per entry, combined by ``params.history``."""
    per_entry = np.array([float(np.mean(e.normalized_scores(z, params))) for e in entries])
    return float(_combine(per_entry, params.history))


def history_threshold(entries: Sequence[HistoryEntry], params: ShiftParams) -> float:
    """Member threshold: the entries' xi combined by ``params.history`` (same rule as the score)."""
    return float(_combine(np.array([e.threshold(params) for e in entries]), params.history))


def score_images(entries: Sequence[HistoryEntry], z: Any, params: ShiftParams) -> np.ndarray:
    """Per-image score under a member: uhat per entry, combined by ``params.history``, [n]."""
    if len(entries) == 0:
        raise ValueError("a member needs at least one history entry")
    per_entry = np.stack([e.normalized_scores(z, params) for e in entries])
    return _combine(per_entry, params.history)


def score_pool(
    pool: Mapping[Hashable, Sequence[HistoryEntry]], z: Any, params: ShiftParams
) -> tuple[dict[Hashable, float], dict[Hashable, float]]:
    """Window scores and thresholds of every member of a pool (inputs of :func:`decide`)."""
    scores = {k: score_history(v, z, params) for k, v in pool.items()}
    thresholds = {k: history_threshold(v, params) for k, v in pool.items()}
    return scores, thresholds


# ---------------------------------------------------------------------------------------------
# Pool decisions
# ---------------------------------------------------------------------------------------------


def decide(
    scores: Mapping[Hashable, float], thresholds: Mapping[Hashable, float]
) -> tuple[Literal["train", "fork"], Hashable]:
    """("train", best) if the lowest-scoring member accepts the window, else ("fork", best).

    best = argmin score (ties: first in ``scores``' iteration order); it accepts when
    score <= its threshold.
    """
    if not scores:
        raise ValueError("empty pool")
    for k, s in scores.items():
        if not np.isfinite(s):
            raise ValueError(f"score of member {k!r} is not finite: {s}")
    best = min(scores, key=lambda k: scores[k])
    if best not in thresholds:
        raise KeyError(f"no threshold for member {best!r}")
    return ("train" if scores[best] <= thresholds[best] else "fork"), best


def route(per_member_scores: Any) -> np.ndarray:
    """Member index (column) with the lowest score for each image (row); ties -> lowest index."""
    s = np.asarray(per_member_scores, dtype=np.float64)
    if s.ndim != 2 or s.shape[1] == 0:
        raise ValueError(f"expected scores [n, K] with K >= 1, got shape {s.shape}")
    return np.argmin(s, axis=1)

r"""Gaussians for shift detection: mergeable sufficient statistics, Ledoit-Wolf, Mahalanobis distances.

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

"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import scipy.linalg

__all__ = ["GaussianStats", "Gaussian", "ledoit_wolf_shrinkage"]

Estimator = Literal["ledoit_wolf", "empirical", "identity"]
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
        """Covariance estimate: ``"ledoit_wolf"`` (default), ``"empirical"`` (MLE, /N) or ``"identity"``
        (Σ = I whatever the data: D² is the squared Euclidean distance to the mean, the Gram
        detector's distance with Gram features)."""
        if estimator == "identity":
            return np.eye(self.dim)
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

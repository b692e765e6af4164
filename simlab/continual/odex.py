"""ODEx, federated: a pool of models that grows when Mahalanobis shift detection says a hospital's
data left every member's history; inference routes each image to its closest member.

The pieces here know nothing about Flower: the server keeps a :class:`Pool` of :class:`Member`\\ s and
decides per hospital (:func:`decide`); hospitals compute features and scores with
:mod:`simlab.continual.odex_features`. ``simlab.federated`` moves them between the two.

Choices (each a scenario option where a researcher would vary it):

- **Features** (``features``): per-channel spatial mean and std of the *input* of the network's first
  normalisation layer (d = 2C = 32 for the default U-Net), i.e. the first convolution's response.
  Every history entry keeps the first-block weights it was computed with (a few hundred numbers),
  and windows are scored under *those* weights. Without that, training the first convolution
  would move every feature away from the stored Gaussians and cause false alarms.
- **Statistics**: hospitals send sufficient statistics of their window. Per member and round the
  server merges, exactly, the statistics of hospitals whose windows agree (each one's expected
  normalised score under the other's Gaussian within the other's threshold); windows that do not
  agree stay separate entries, so a member's history is a set of Gaussians rather than one broad
  Gaussian over unlike hospitals. Hospitals with clearly different data therefore train different
  members, and a hospital that later leaves its domain leaves behind a member that nobody trains
  any more, which is what keeps that domain from being forgotten.
  Ledoit-Wolf by default, distances D² (squared) by Cholesky solves
  (see :mod:`simlab.continual.mahalanobis`).
- **Calibration**: each hospital cross-fits in-distribution scores of its own window under its own
  statistics; the server merges calibrations (min of mins, max of maxes, count-weighted mean). With
  several hospitals this is an approximation: the merged Gaussian is wider than each hospital's.
- **Score and threshold**: a window's score under an entry is the mean of its images' normalised
  scores û (min / doubled-max of ID scores); a member combines its entries by ``shift.history``
  (``sum`` as in ODEx Eq. 4, ``mean``, ``min``, ``last``) and compares with its entries' ξ = 2·mean
  ID û combined by the same rule. Members are compared by score / threshold, so a member's history
  length does not bias the choice; with this, ``sum`` and ``mean`` take the same decisions.
- **First round**: there is no history to score against, so hospitals send the statistics of their
  first window; hospitals whose windows agree share the initial member and every other group starts
  its own copy of the initial model (not counted as forks).
- **Fork**: when the best member's score is over its threshold the hospital trains a copy of it (a
  fork). ``fork_history: fresh`` (default) starts the fork's history with the window that caused it;
  ``inherit`` copies the parent's history first, as the paper does ("The history of the new model
  B_i is initialized with B̂, so the history of each model contains information pertaining to all
  data distributions used to train it"). The default deviates from the paper on purpose: with
  normalised scores in [0, 1] and ξ = 2·mean ID û (about 0.1–0.3), every inherited entry of the old
  domain adds close to 1 to the fork's summed score of the next window of the new domain but only
  its ξ to the summed threshold, so with ``sum``/``mean`` the fork's ratio stays over 1 and the
  next round forks again; ``fresh`` keeps the parent's history with the parent, where it still routes
  the old domain. ``inherit`` stays available for the paper's exact rule.
- **Merging forks**: forks of the same parent in the same round merge when each window's expected
  normalised score under the other's Gaussian is within the other's threshold (expected D² from the
  sufficient statistics: tr(Σ_a⁻¹S_b) + (μ_b−μ_a)ᵀΣ_a⁻¹(μ_b−μ_a)).
- **Cap**: at ``max_members`` no fork is created; the hospital's update goes to the parent.
- **Routing**: each test image goes to the member with the smallest per-image score / threshold.
- **Ablations** (the paper's Table 2). They change *when* to fork and keep ODEx's selection of the
  member (``selection: scores``, the paper: "two versions of ODEx that use our proposed strategy for
  selecting the best model but detect domain shifts in a different fashion"); ``selection: current``
  trains the member the hospital trained last instead.
  ``expansion: oracle`` is ODEx −∞ξ: a fork at every stage, placed exactly at every true domain
  boundary of a hospital (the simulator's knowledge; the paper forks at every stage of its schedule);
  ``expansion: dice`` is DiceEx (Chen et al. 2020): fork when the Dice of the chosen member on the
  new window, before training, drops by more than ``dice_drop`` (relative; the paper's 10 %) below
  its last value at that hospital; ``shift.history: last`` is ODEx −B (the distance to the last stage
  only); ``features.reduction: gram`` with ``shift.estimator: identity`` is the Gram detector (the
  Gram distance instead of Mahalanobis for both training and testing, Perkonigg et al. 2021).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from simlab.continual.features import FeatureSpec
from simlab.continual.method import Method
from simlab.continual.gaussian import GaussianStats
from simlab.continual.mahalanobis import Calibration, HistoryEntry, ShiftParams, _combine


@dataclass(frozen=True)
class OdexParams:
    features: FeatureSpec = field(default_factory=FeatureSpec,
                                  metadata={"help": "which layer's input, and how it is reduced to a feature vector"})
    shift: ShiftParams = field(default_factory=ShiftParams,
                               metadata={"help": "Mahalanobis scores, their normalisation, threshold and history rule"})
    expansion: Literal["detect", "oracle", "dice"] = field(
        default="detect", metadata={"help": "detect: Mahalanobis (ODEx); oracle: fork at every true boundary; "
                                            "dice: DiceEx (fork when training Dice drops)"})
    selection: Literal["scores", "current"] = field(
        default="scores", metadata={"help": "oracle/dice expansion: train the member the scores choose (the "
                                            "paper's ablations) or the hospital's last member"})
    fork_history: Literal["fresh", "inherit"] = field(
        default="fresh", metadata={"help": "a fork's history starts fresh, or copies its parent's first"})
    max_members: int = field(default=6, metadata={
        "ge": 1, "le": 64, "why": "every member is a whole model: the server keeps each, writes each to every "
                                  "checkpoint and sends each to the hospitals that evaluate the routed pool",
        "help": "pool size cap"})
    merge_forks: bool = field(default=True, metadata={"help": "merge same-round forks whose statistics agree"})
    dice_drop: float = field(default=0.10, metadata={"gt": 0.0, "lt": 1.0,
                                                     "help": "DiceEx: relative Dice drop that forks"})


# ------------------------------------------------------------------------------ history entries
@dataclass
class Entry:
    """One history entry: Gaussian of a round's training windows of a member, its calibration, and the
    first-block weights the features were computed with."""

    first_block: dict[str, np.ndarray]
    stats: GaussianStats
    calibration: Calibration
    round: int

    def history_entry(self) -> HistoryEntry:
        if not hasattr(self, "_he"):
            self._he = HistoryEntry(self.stats, self.calibration)
        return self._he

    def threshold(self, params: ShiftParams) -> float:
        return self.calibration.threshold(params.threshold_factor)

    def to_arrays(self) -> dict[str, np.ndarray]:
        out = {f"fb.{k}": v for k, v in self.first_block.items()}
        out.update({f"st.{k}": np.asarray(v) for k, v in self.stats.to_arrays().items()})
        cal = self.calibration.to_dict()
        out["cal.num"] = np.array([cal["min_id"], cal["max_id"], cal["mean_norm_id"], cal["n_id"],
                                   cal["max_factor"], self.round], dtype=np.float64)
        out["cal.kind"] = np.frombuffer(f"{cal['estimator']}|{cal['distance']}".encode(), dtype=np.uint8).copy()
        return out

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> Entry:
        fb = {k[3:]: v for k, v in arrays.items() if k.startswith("fb.")}
        st = GaussianStats.from_arrays({k[3:]: v for k, v in arrays.items() if k.startswith("st.")})
        num = arrays["cal.num"]
        estimator, distance = bytes(arrays["cal.kind"]).decode().split("|")
        cal = Calibration(min_id=float(num[0]), max_id=float(num[1]), mean_norm_id=float(num[2]), n_id=int(num[3]),
                          max_factor=float(num[4]), estimator=estimator, distance=distance)
        return cls(fb, st, cal, int(num[5]))


def fit_entry(z: np.ndarray, first_block: dict[str, np.ndarray], params: ShiftParams, t: int) -> Entry:
    he = HistoryEntry.fit(z, params)
    return Entry(first_block, he.stats, he.calibration, t)


def merge_entries(entries: list[Entry]) -> Entry:
    """Entries of one member and round from several hospitals (same first block): exact statistics,
    merged calibration."""
    stats, cal = entries[0].stats, entries[0].calibration
    for e in entries[1:]:
        stats = GaussianStats.merge(stats, e.stats)
        cal = Calibration.merge(cal, e.calibration)
    return Entry(entries[0].first_block, stats, cal, entries[0].round)


def combine(per_entry: np.ndarray, params: ShiftParams) -> np.ndarray:
    """Combine per-entry values (axis 0) by the history rule."""
    return _combine(np.asarray(per_entry, dtype=np.float64), params.history)


def member_threshold(history: list[Entry], params: ShiftParams) -> float:
    return max(float(combine(np.array([e.threshold(params) for e in history]), params)), 1e-12)


# ------------------------------------------------------------------------------ decisions
@dataclass(frozen=True)
class Decision:
    member: int
    fork: bool
    ratio: float = math.nan  # best score / threshold (detect mode)


def decide(per_member: dict[int, np.ndarray], histories: dict[int, list[Entry]], params: ShiftParams) -> Decision:
    """Which member a window belongs to: ``per_member`` maps member id → the window's per-entry scores
    (mean û); the lowest score / threshold wins (ties: lowest id), and a ratio over 1 forks it. The
    server and the hospitals decide with this one function, from the same numbers."""
    ratios = {m: float(combine(s, params)) / member_threshold(histories[m], params) for m, s in per_member.items()}
    best = min(ratios, key=lambda m: (ratios[m], m))
    return Decision(best, ratios[best] > 1.0, ratios[best])


def route(per_entry: dict[int, np.ndarray], histories: dict[int, list[Entry]], params: ShiftParams) -> np.ndarray:
    """Routed inference: the member of every image, the one with the lowest per-image score /
    threshold (ties: the first member listed). ``per_entry`` maps member id → û [entries, n]."""
    members = list(per_entry)
    S = np.stack([combine(per_entry[m], params) / member_threshold(histories[m], params) for m in members], axis=1)
    return np.array(members)[np.argmin(S, axis=1)]


def expected_normalised_score(a: Entry, b: Entry, params: ShiftParams) -> float:
    """Expected û of b's data under a's Gaussian, from sufficient statistics only."""
    g = a.history_entry().gaussian(params.estimator)
    cov_b = b.stats.empirical_covariance()
    L = g.chol
    import scipy.linalg

    w = scipy.linalg.solve_triangular(L, cov_b, lower=True)
    trace = float(np.trace(scipy.linalg.solve_triangular(L, w.T, lower=True)))
    diff = scipy.linalg.solve_triangular(L, b.stats.mean - g.mean, lower=True)
    d2 = trace + float(diff @ diff)
    u = d2 if params.distance == "squared" else math.sqrt(max(d2, 0.0))
    return float(a.calibration.normalize(np.array([u]))[0])


def forks_agree(a: Entry, b: Entry, params: ShiftParams) -> bool:
    return (expected_normalised_score(a, b, params) <= a.threshold(params)
            and expected_normalised_score(b, a, params) <= b.threshold(params))


def cluster_entries(entries: list[Entry], params: ShiftParams) -> list[list[int]]:
    """Group one round's entries (in hospital order) whose statistics agree with the group's first."""
    groups: list[list[int]] = []
    for i, e in enumerate(entries):
        home = next((g for g in groups if forks_agree(entries[g[0]], e, params)), None)
        if home is None:
            groups.append([i])
        else:
            home.append(i)
    return groups


class Odex(Method):
    """ODEx at the hospital: it trains the member the server chose like sequential training; the pool,
    the shift decisions, forks and routing are the ``pool`` federation's (see the module docstring)."""

    name = "odex"
    help = "model pool grown by Mahalanobis shift detection, routed inference"
    family = "expansion"
    Params = OdexParams
    server = "pool"
    with_frequency_augmentation = False

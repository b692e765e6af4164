"""Continual-learning metrics from an accuracy matrix R, and building R from a domain stream.

Convention
----------
``R`` is an ``N x N`` array with ``R[i][j]`` = score (Dice) on stage ``j``'s domain after
training stage ``i``. Code indices are 0-based; the formulas below are written 1-based as
in the papers, so formula ``R[i][j]`` is ``R[i-1, j-1]`` in code. Entries with ``j > i``
are zero-shot scores on stages not yet seen. ``b`` is the length-``N`` vector of the
initial (untrained) model's scores, ``b_j`` on stage ``j``'s domain.

Missing values
--------------
NaN entries of ``R`` (e.g. a domain never evaluated) propagate: a metric that reads a NaN
entry is NaN. Nothing is dropped silently (no ``nanmean``/``nanmax``).

With a single stage (``N == 1``) only the accuracies are defined (``acc = diaz_acc =
R[1][1]``); every backward/forward-transfer and forgetting metric needs a second stage
and is NaN.

A *stage* is a maximal run of consecutive rounds in which a hospital's stream sits in one
true domain (:func:`stages_from_domains`); a recurring stream A→B→A has three stages, and
its R has two columns that measure domain A.

Forgetting where it happens
---------------------------
:func:`departure_forgetting` is not a formula on R: it reads the score of each domain that
has left every stream at the last round it was trained on and at the end (see its
docstring); :data:`FORGETTING_LABELS` labels it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import numpy as np

__all__ = [
    "METRIC_LABELS",
    "FORGETTING_LABELS",
    "Stage",
    "abs_fwt_seq",
    "all_metrics",
    "build_R",
    "bwt_plus",
    "chaudhry_forgetting",
    "chaudhry_task_forgetting",
    "departure_forgetting",
    "diaz_acc",
    "diaz_bwt",
    "diaz_fwt",
    "gem_acc",
    "gem_bwt",
    "gem_fwt",
    "initial_scores",
    "odex_fwt",
    "relative_bwt",
    "relative_fwt",
    "rem",
    "stages_from_domains",
]


# --------------------------------------------------------------------------------------
# validation helpers


def _as_R(R: Sequence[Sequence[float]] | np.ndarray, name: str = "R") -> np.ndarray:
    arr = np.asarray(R, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1] or arr.shape[0] < 1:
        raise ValueError(f"{name} must be a non-empty square N x N matrix, got shape {arr.shape}")
    return arr


def _as_b(b: Sequence[float] | np.ndarray, n: int) -> np.ndarray:
    arr = np.asarray(b, dtype=np.float64)
    if arr.shape != (n,):
        raise ValueError(f"b must be a vector of length N={n}, got shape {arr.shape}")
    return arr


# --------------------------------------------------------------------------------------
# GEM (Lopez-Paz & Ranzato, NeurIPS 2017)


def gem_acc(R: Sequence[Sequence[float]] | np.ndarray) -> float:
    """Average final accuracy, GEM (Lopez-Paz & Ranzato 2017).

    ``ACC = (1/N) Σ_{j=1..N} R[N][j]``: the mean of the last row. Defined for ``N >= 1``.
    """
    A = _as_R(R)
    return float(A[-1].mean())


def gem_bwt(R: Sequence[Sequence[float]] | np.ndarray) -> float:
    """Backward transfer, GEM (Lopez-Paz & Ranzato 2017).

    ``BWT = (1/(N−1)) Σ_{j=1..N−1} (R[N][j] − R[j][j])``. Negative = forgetting.
    Divides by ``N − 1`` as in the paper (the reference code averages over all ``N``
    entries including a zero, i.e. divides by ``N``). NaN for ``N == 1``. At the end of a
    stream this equals Avalanche's ``StreamBWT``.
    """
    A = _as_R(R)
    n = A.shape[0]
    if n < 2:
        return math.nan
    j = np.arange(n - 1)
    return float((A[-1, j] - A[j, j]).mean())


def gem_fwt(R: Sequence[Sequence[float]] | np.ndarray, b: Sequence[float] | np.ndarray) -> float:
    """Forward transfer, GEM (Lopez-Paz & Ranzato 2017).

    ``FWT = (1/(N−1)) Σ_{j=2..N} (R[j−1][j] − b_j)``: zero-shot score on stage ``j`` just
    before training on it, minus the initial model's score there. Divides by ``N − 1``
    (the reference code divides by ``N``). NaN for ``N == 1``. Equals Avalanche's
    ``StreamForwardTransfer``.
    """
    A = _as_R(R)
    n = A.shape[0]
    bb = _as_b(b, n)
    if n < 2:
        return math.nan
    j = np.arange(1, n)
    return float((A[j - 1, j] - bb[j]).mean())


# --------------------------------------------------------------------------------------
# ODEx (González et al., DART 2022)


def odex_fwt(R: Sequence[Sequence[float]] | np.ndarray) -> float:
    """Forward transfer as reported in the ODEx paper (González et al., DART 2022, Table 1).

    ``FWT = (1/(N−1)) Σ_{i=2..N} (R[i][i] − R[i−1][i])``: what training on stage ``i`` adds
    on stage ``i``'s test data, relative to the zero-shot score of the model just before
    ("FWT instead measures what impact training on each stage has on test data (x,y)∼T_i
    ... FWT is high if enough plasticity is maintained to acquire new knowledge"; averaged
    over the tasks). Stage 1 is left out: its "before" is the untrained model, whose near-
    zero score would dominate the mean. Needs no initial scores ``b`` and no reference run,
    so plain sequential fine-tuning has a positive FWT when it learns each new stage (the
    paper reports .14 and .09), unlike :func:`relative_fwt` (0 for Sequential by
    construction) and :func:`gem_fwt` (a zero-shot score minus the untrained model's).
    NaN for ``N == 1``.
    """
    A = _as_R(R)
    n = A.shape[0]
    if n < 2:
        return math.nan
    i = np.arange(1, n)
    return float((A[i, i] - A[i - 1, i]).mean())


# --------------------------------------------------------------------------------------
# Chaudhry et al. 2018 (RWalk) forgetting


def chaudhry_task_forgetting(R: Sequence[Sequence[float]] | np.ndarray, k: int | None = None) -> np.ndarray:
    """Per-task forgetting after stage ``k``, Chaudhry et al. 2018 (RWalk).

    ``f_j^k = max_{l∈{1..k−1}} R[l][j] − R[k][j]`` for ``j < k`` (1-based). The maximum is
    over *all* earlier rows, as in the paper, so it includes zero-shot rows ``l < j``.
    ``k`` is 1-based and defaults to ``N``; returns an array of length ``k − 1`` (empty for
    ``k == 1``). A NaN anywhere in the rows read makes that ``f_j`` NaN.
    """
    A = _as_R(R)
    n = A.shape[0]
    kk = n if k is None else int(k)
    if not 1 <= kk <= n:
        raise ValueError(f"k must be in 1..{n}, got {k}")
    if kk == 1:
        return np.empty(0, dtype=np.float64)
    prev = A[: kk - 1, : kk - 1]  # rows l = 1..k-1, columns j = 1..k-1
    return np.max(prev, axis=0) - A[kk - 1, : kk - 1]


def chaudhry_forgetting(R: Sequence[Sequence[float]] | np.ndarray, k: int | None = None) -> float:
    """Average forgetting ``F_k``, Chaudhry et al. 2018 (RWalk); reported as ``F_N``.

    ``F_k = (1/(k−1)) Σ_{j<k} f_j^k`` with ``f_j^k`` from :func:`chaudhry_task_forgetting`
    (max-based). Unlike ``−BWT`` it measures the drop from the *best* earlier score, so an
    improvement followed by a decline counts in full. NaN for ``k == 1``.
    """
    f = chaudhry_task_forgetting(R, k)
    if f.size == 0:
        return math.nan
    return float(f.mean())


# --------------------------------------------------------------------------------------
# Díaz-Rodríguez et al. 2018, "Don't forget, there is more than forgetting"


def diaz_acc(R: Sequence[Sequence[float]] | np.ndarray) -> float:
    """Accuracy over the whole run, Díaz-Rodríguez et al. 2018.

    ``ACC = Σ_{i≥j} R[i][j] / (N(N+1)/2)``: mean of the lower triangle including the
    diagonal (every score on a seen stage, at every stage). Defined for ``N >= 1``.
    """
    A = _as_R(R)
    n = A.shape[0]
    i, j = np.tril_indices(n)
    return float(A[i, j].sum() / (n * (n + 1) / 2))


def diaz_bwt(R: Sequence[Sequence[float]] | np.ndarray) -> float:
    """Backward transfer, Díaz-Rodríguez et al. 2018.

    ``BWT = Σ_{i=2..N} Σ_{j<i} (R[i][j] − R[j][j]) / (N(N−1)/2)``: the change on every
    earlier stage measured after *every* later stage, not only the last (GEM). NaN for
    ``N == 1``.
    """
    A = _as_R(R)
    n = A.shape[0]
    if n < 2:
        return math.nan
    i, j = np.tril_indices(n, k=-1)
    return float((A[i, j] - A[j, j]).sum() / (n * (n - 1) / 2))


def rem(R: Sequence[Sequence[float]] | np.ndarray) -> float:
    """Remembering, Díaz-Rodríguez et al. 2018: ``REM = 1 − |min(BWT, 0)|`` with their BWT.

    1 means no forgetting. NaN when their BWT is NaN (``N == 1`` or NaN entries).
    """
    bwt = diaz_bwt(R)
    return float(1.0 - abs(np.minimum(bwt, 0.0)))


def bwt_plus(R: Sequence[Sequence[float]] | np.ndarray) -> float:
    """Positive backward transfer, Díaz-Rodríguez et al. 2018: ``BWT⁺ = max(BWT, 0)`` with their BWT.

    NaN when their BWT is NaN.
    """
    return float(np.maximum(diaz_bwt(R), 0.0))


def diaz_fwt(R: Sequence[Sequence[float]] | np.ndarray) -> float:
    """Forward transfer, Díaz-Rodríguez et al. 2018.

    ``FWT = Σ_{i<j} R[i][j] / (N(N−1)/2)``: mean of the strict upper triangle (zero-shot
    scores on future stages), with no initial-model baseline. NaN for ``N == 1``.
    """
    A = _as_R(R)
    n = A.shape[0]
    if n < 2:
        return math.nan
    i, j = np.triu_indices(n, k=1)
    return float(A[i, j].sum() / (n * (n - 1) / 2))


# --------------------------------------------------------------------------------------
# Lifelong nnU-Net / ODEx group variants


def _relative_change(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """``(num − den) / den`` elementwise, NaN where ``den == 0`` (relative change from 0 is undefined)."""
    out = np.full(num.shape, np.nan)
    ok = den != 0
    out[ok] = (num[ok] - den[ok]) / den[ok]
    out[np.isnan(num) | np.isnan(den)] = np.nan
    return out


def relative_bwt(R: Sequence[Sequence[float]] | np.ndarray) -> float:
    """Relative backward transfer, Lifelong nnU-Net group (``create_confusion.py``).

    ``BWT_rel = mean_{i=1..N−1} (R[N][i] − R[i][i]) / R[i][i]``: the fraction of each
    stage's just-trained score that is lost (negative) or gained by the end.

    Zero denominators: a term with ``R[i][i] == 0`` is undefined and is NaN, and — like any
    NaN — it makes the mean NaN rather than being skipped. NaN for ``N == 1``.
    """
    A = _as_R(R)
    n = A.shape[0]
    if n < 2:
        return math.nan
    i = np.arange(n - 1)
    return float(_relative_change(A[-1, i], A[i, i]).mean())


def _later_diagonals(R, R_seq) -> tuple[np.ndarray, np.ndarray] | None:
    """``(R[i][i], R_seq[i][i])`` for stages 2..N; None when N == 1."""
    A = _as_R(R)
    S = _as_R(R_seq, "R_seq")
    if S.shape != A.shape:
        raise ValueError(f"R_seq must have the shape of R {A.shape}, got {S.shape}")
    if A.shape[0] < 2:
        return None
    i = np.arange(1, A.shape[0])
    return A[i, i], S[i, i]


def relative_fwt(
    R: Sequence[Sequence[float]] | np.ndarray, R_seq: Sequence[Sequence[float]] | np.ndarray
) -> float:
    """Relative forward transfer against Sequential fine-tuning, Lifelong nnU-Net group (``table_generic.py``).

    ``FWT_rel = mean_{i=2..N} (R[i][i] − R^Seq[i][i]) / R^Seq[i][i]`` where ``R_seq`` is the
    matrix of plain sequential fine-tuning on the same stream. It measures plasticity lost
    or gained relative to fine-tuning; Sequential itself has 0 by construction.

    Zero denominators: a term with ``R^Seq[i][i] == 0`` is NaN and makes the mean NaN. NaN
    for ``N == 1``.
    """
    diag = _later_diagonals(R, R_seq)
    return math.nan if diag is None else float(_relative_change(*diag).mean())


def abs_fwt_seq(
    R: Sequence[Sequence[float]] | np.ndarray, R_seq: Sequence[Sequence[float]] | np.ndarray
) -> float:
    """Absolute forward transfer against Sequential fine-tuning (Lifelong nnU-Net table scripts).

    ``FWT_abs = mean_{i=2..N} (R[i][i] − R^Seq[i][i])``. The group's later scripts use the
    absolute differences (pooled per subject); from a matrix of per-stage means this is the
    stage mean. (Their absolute BWT, ``mean_{i<N} (R[N][i] − R[i][i])``, is GEM's BWT.)
    NaN for ``N == 1``.
    """
    diag = _later_diagonals(R, R_seq)
    return math.nan if diag is None else float((diag[0] - diag[1]).mean())


# --------------------------------------------------------------------------------------
# everything at once

METRIC_LABELS: dict[str, str] = {
    "acc": "ACC, mean of the final row (GEM, Lopez-Paz & Ranzato 2017)",
    "bwt": "BWT, final minus just-trained score, mean over j<N (GEM, Lopez-Paz & Ranzato 2017)",
    "fwt": "FWT, just-trained minus zero-shot score on stage i, mean over i>=2 of R[i][i]-R[i-1][i] "
           "(ODEx, González et al. 2022; quote this one against the paper)",
    "gem_fwt": "GEM FWT, zero-shot score before training minus initial model's, mean over j>=2 of R[j-1][j]-b[j] "
               "(GEM, Lopez-Paz & Ranzato 2017)",
    "chaudhry_forgetting": "Forgetting F_N, best earlier minus final score, mean over j<N (Chaudhry et al. 2018, "
                           "RWalk); not the headline forgetting",
    "diaz_acc": "ACC, mean of the lower triangle incl. diagonal (Díaz-Rodríguez et al. 2018)",
    "diaz_bwt": "BWT, mean over all i>j of R[i][j]-R[j][j] (Díaz-Rodríguez et al. 2018)",
    "rem": "REM, 1-|min(BWT,0)| with Díaz BWT (Díaz-Rodríguez et al. 2018)",
    "bwt_plus": "BWT+, max(BWT,0) with Díaz BWT (Díaz-Rodríguez et al. 2018)",
    "diaz_fwt": "FWT, mean of the strict upper triangle (Díaz-Rodríguez et al. 2018)",
    "rel_bwt": "Relative BWT, mean over i<N of (R[N][i]-R[i][i])/R[i][i] (Lifelong nnU-Net group)",
    "rel_fwt": "Relative FWT vs Sequential, mean over i>=2 of (R[i][i]-Rseq[i][i])/Rseq[i][i] (Lifelong nnU-Net group)",
    "abs_fwt_seq": "Absolute FWT vs Sequential, mean over i>=2 of R[i][i]-Rseq[i][i] (Lifelong nnU-Net group)",
}
"""Labels of the metrics computed from one R (:func:`all_metrics`)."""

FORGETTING_LABELS: dict[str, str] = {
    "forgetting": "Headline forgetting, positive = Dice lost: mean over the domains that left every stream before "
                  "the end of max(0, D_d(L_d) - D_d(T)), L_d = last round d contributes to a training window, T = "
                  "last round, D = mean over hospitals of each one's deployed model (per hospital: the domains that "
                  "left its own stream, its own model); null when no domain left",
    "forgetting_by_domain": "per departed domain: last_trained_round L_d, the score then and at the end, and the "
                            "signed forgetting then - final (a gain is negative here; the headline clips it at 0)",
    "forgetting_note": "why the headline forgetting is null, else null",
}
"""Labels of the headline forgetting and its details (:func:`departure_forgetting`)."""


def all_metrics(
    R: Sequence[Sequence[float]] | np.ndarray,
    b: Sequence[float] | np.ndarray | None = None,
    R_seq: Sequence[Sequence[float]] | np.ndarray | None = None,
) -> dict[str, float]:
    """Every metric in :data:`METRIC_LABELS` for one R, as plain floats.

    ``gem_fwt`` is NaN when ``b`` is None; ``rel_fwt`` and ``abs_fwt_seq`` are NaN when
    ``R_seq`` is None. With ``N == 1`` only ``acc`` and ``diaz_acc`` are finite. NaN
    entries of ``R`` propagate into every metric that reads them.
    """
    A = _as_R(R)
    out: dict[str, float] = {
        "acc": gem_acc(A),
        "bwt": gem_bwt(A),
        "fwt": odex_fwt(A),
        "gem_fwt": gem_fwt(A, b) if b is not None else math.nan,
        "chaudhry_forgetting": chaudhry_forgetting(A),
        "diaz_acc": diaz_acc(A),
        "diaz_bwt": diaz_bwt(A),
        "rem": rem(A),
        "bwt_plus": bwt_plus(A),
        "diaz_fwt": diaz_fwt(A),
        "rel_bwt": relative_bwt(A),
        "rel_fwt": relative_fwt(A, R_seq) if R_seq is not None else math.nan,
        "abs_fwt_seq": abs_fwt_seq(A, R_seq) if R_seq is not None else math.nan,
    }
    return out


# --------------------------------------------------------------------------------------
# forgetting where it happens


def departure_forgetting(then: Mapping[str, float], final: Mapping[str, float]) -> tuple[float, dict[str, float]]:
    """Headline forgetting: ``(F, {d: f_d})`` over the domains that left every stream.

    ``then[d] = D_d(L_d)``, the score on domain ``d``'s test set after ``L_d``, the last round
    in which ``d`` contributes to a training window; ``final[d] = D_d(T)`` after the last
    round. ``f_d = D_d(L_d) − D_d(T)`` (signed: positive = lost, negative = gained) and

        ``F = (1/|D|) Σ_{d∈D} max(f_d, 0)``.

    Positive = score lost. Clipping each domain at 0 means a gain on one departed domain
    cannot offset a loss on another; the price is that evaluation noise on a domain that is
    not forgotten only ever adds, so ``F`` is biased slightly upward (read the signed
    ``f_d`` with it). Unlike BWT on a pooled R, only domains nobody trains on any more
    count, so the learning of domains still in some stream is never credited as backward
    transfer. A NaN score makes its ``f_d`` and ``F`` NaN; no domain gives NaN.
    """
    if set(then) != set(final):
        raise ValueError(f"then and final must name the same domains, got {sorted(then)} and {sorted(final)}")
    f = {d: float(then[d]) - float(final[d]) for d in then}
    if not f:
        return math.nan, f
    return float(np.mean([max(v, 0.0) if not math.isnan(v) else math.nan for v in f.values()])), f


# --------------------------------------------------------------------------------------
# stages and R from a stream


class Stage(NamedTuple):
    """One stage: a maximal run of consecutive rounds with the same true domain.

    ``index`` is the 0-based stage number (row/column of R); ``first_round`` and
    ``last_round`` are inclusive round numbers.
    """

    index: int
    domain: str
    first_round: int
    last_round: int


def stages_from_domains(domain_per_round: Sequence[str], first_round: int = 0) -> list[Stage]:
    """Split a per-round list of true domains into stages.

    Position ``k`` of ``domain_per_round`` is round ``first_round + k`` (use
    ``first_round=1`` for Flower's 1-based server rounds). Consecutive equal domains form
    one stage, so ``A A B B A`` gives three stages (A, B, A): a domain that recurs starts a
    new stage. An empty list gives no stages.
    """
    stages: list[Stage] = []
    start = 0
    for k in range(1, len(domain_per_round) + 1):
        if k == len(domain_per_round) or domain_per_round[k] != domain_per_round[start]:
            stages.append(
                Stage(len(stages), str(domain_per_round[start]), first_round + start, first_round + k - 1)
            )
            start = k
    return stages


def build_R(stages: Sequence[Stage], dice_at: Callable[[int, str], float]) -> np.ndarray:
    """``R[i][j] = dice_at(stages[i].last_round, stages[j].domain)``, an ``N x N`` float array.

    The model at the end of stage ``i`` is scored on stage ``j``'s domain. ``dice_at`` is
    called once per distinct ``(round, domain)`` pair (results are reused, so a recurring
    domain is evaluated once per row). Values are stored as given, NaN included.
    """
    n = len(stages)
    if n == 0:
        raise ValueError("build_R needs at least one stage")
    cache: dict[tuple[int, str], float] = {}
    R = np.empty((n, n), dtype=np.float64)
    for i, si in enumerate(stages):
        for j, sj in enumerate(stages):
            key = (si.last_round, sj.domain)
            if key not in cache:
                cache[key] = float(dice_at(si.last_round, sj.domain))
            R[i, j] = cache[key]
    return R


def initial_scores(stages: Sequence[Stage], dice_at0: Callable[[str], float]) -> np.ndarray:
    """``b[j] = dice_at0(stages[j].domain)``: the initial (untrained) model's score per stage.

    ``dice_at0`` is called once per distinct domain.
    """
    cache: dict[str, float] = {}
    b = np.empty(len(stages), dtype=np.float64)
    for j, s in enumerate(stages):
        if s.domain not in cache:
            cache[s.domain] = float(dice_at0(s.domain))
        b[j] = cache[s.domain]
    return b

"""Continual-learning metrics on hand-made R matrices, and the stage / R builders."""

from __future__ import annotations

import math

import numpy as np
import pytest

from simlab.metrics.continual import (
    METRIC_LABELS,
    Stage,
    abs_fwt_seq,
    all_metrics,
    build_R,
    bwt_plus,
    chaudhry_forgetting,
    chaudhry_task_forgetting,
    diaz_acc,
    diaz_bwt,
    departure_forgetting,
    diaz_fwt,
    gem_acc,
    gem_bwt,
    gem_fwt,
    initial_scores,
    odex_fwt,
    relative_bwt,
    relative_fwt,
    rem,
    stages_from_domains,
)

# R[i][j]: score on stage j after training stage i (0-based here).
# Task 0 improves after stage 1 (0.8 -> 0.95) and then drops to 0.5, so max-based
# forgetting (Chaudhry) and final-vs-diagonal BWT (GEM) disagree.
R3 = np.array(
    [
        [0.80, 0.30, 0.20],
        [0.95, 0.90, 0.40],
        [0.50, 0.70, 0.85],
    ]
)
B3 = np.array([0.10, 0.20, 0.15])
RSEQ3 = np.array(
    [
        [0.80, 0.00, 0.00],
        [0.00, 0.95, 0.00],
        [0.00, 0.00, 0.90],
    ]
)


def test_gem_on_hand_matrix():
    assert gem_acc(R3) == pytest.approx((0.50 + 0.70 + 0.85) / 3)
    # (R[2][0]-R[0][0] + R[2][1]-R[1][1]) / (N-1) = (-0.30 - 0.20) / 2
    assert gem_bwt(R3) == pytest.approx(-0.25)
    # (R[0][1]-b1 + R[1][2]-b2) / 2 = (0.10 + 0.25) / 2
    assert gem_fwt(R3, B3) == pytest.approx(0.175)


def test_odex_fwt_on_hand_matrix():
    # The ODEx paper's FWT: (R[2][2]-R[1][2] + R[3][3]-R[2][3]) / 2, 1-based = training on a stage
    # minus the zero-shot score just before it: ((0.90-0.30) + (0.85-0.40)) / 2
    assert odex_fwt(R3) == pytest.approx((0.60 + 0.45) / 2)
    # GEM's FWT on the same R (zero-shot minus untrained) is another number: 0.175
    assert abs(odex_fwt(R3) - gem_fwt(R3, B3)) > 0.3
    assert math.isnan(odex_fwt([[0.7]]))


def test_odex_and_gem_fwt_disagree_on_a_plastic_learner():
    # Learns every stage to 0.9 but knows nothing of a stage before training on it (zero-shot = the
    # untrained model's 0.1): GEM FWT 0 (no transfer to unseen stages), the paper's FWT 0.8 (plastic).
    R = np.array([[0.9, 0.1, 0.1], [0.9, 0.9, 0.1], [0.9, 0.9, 0.9]])
    b = np.array([0.1, 0.1, 0.1])
    assert gem_fwt(R, b) == pytest.approx(0.0)
    assert odex_fwt(R) == pytest.approx(0.8)
    # Sequential fine-tuning against itself: relative FWT 0 by construction, the paper's FWT is not
    assert relative_fwt(R, R) == 0.0 and odex_fwt(R) > 0


def test_departure_forgetting_clips_each_domain():
    f, signed = departure_forgetting({"legacy": 0.67, "young": 0.3}, {"legacy": 0.36, "young": 0.9})
    assert signed == {"legacy": pytest.approx(0.31), "young": pytest.approx(-0.6)}
    assert f == pytest.approx(0.31 / 2)  # the gain on young does not offset legacy's loss
    assert math.isnan(departure_forgetting({}, {})[0])
    assert math.isnan(departure_forgetting({"a": math.nan}, {"a": 0.5})[0])
    with pytest.raises(ValueError):
        departure_forgetting({"a": 0.5}, {"b": 0.5})


def test_chaudhry_on_hand_matrix():
    # f_0 = max(0.80, 0.95) - 0.50 = 0.45 ; f_1 = max(0.30, 0.90) - 0.70 = 0.20
    np.testing.assert_allclose(chaudhry_task_forgetting(R3), [0.45, 0.20])
    assert chaudhry_forgetting(R3) == pytest.approx((0.45 + 0.20) / 2)
    # F_2 (after stage 2, 1-based k=2): f_0 = R[0][0] - R[1][0] = 0.80 - 0.95
    np.testing.assert_allclose(chaudhry_task_forgetting(R3, k=2), [-0.15])
    assert chaudhry_forgetting(R3, k=2) == pytest.approx(-0.15)
    assert math.isnan(chaudhry_forgetting(R3, k=1))
    with pytest.raises(ValueError):
        chaudhry_task_forgetting(R3, k=4)
    # Max-based forgetting counts the peak (0.95), so it exceeds -BWT (0.25).
    assert chaudhry_forgetting(R3) > -gem_bwt(R3) + 0.05


def test_chaudhry_max_includes_zero_shot_rows():
    # Before training task 1 the model already scores 0.9 on it (zero-shot row 0);
    # training on it lowers it to 0.6 and the end leaves 0.6: f_1 = 0.9 - 0.6.
    R = np.array([[0.7, 0.9, 0.0], [0.7, 0.6, 0.0], [0.7, 0.6, 0.8]])
    np.testing.assert_allclose(chaudhry_task_forgetting(R), [0.0, 0.3])


def test_diaz_on_hand_matrix():
    # lower triangle incl. diagonal: 0.80 + 0.95 + 0.90 + 0.50 + 0.70 + 0.85 = 4.70 over 6
    assert diaz_acc(R3) == pytest.approx(4.70 / 6)
    # (R10-R00) + (R20-R00) + (R21-R11) = 0.15 - 0.30 - 0.20 = -0.35 over 3
    assert diaz_bwt(R3) == pytest.approx(-0.35 / 3)
    assert rem(R3) == pytest.approx(1 - 0.35 / 3)
    assert bwt_plus(R3) == 0.0
    # upper triangle: 0.30 + 0.20 + 0.40 = 0.90 over 3
    assert diaz_fwt(R3) == pytest.approx(0.30)
    # GEM and Díaz differ: Díaz averages over every later row, GEM only the last.
    assert gem_bwt(R3) == pytest.approx(-0.25)
    assert abs(gem_bwt(R3) - diaz_bwt(R3)) > 0.1
    assert abs(gem_acc(R3) - diaz_acc(R3)) > 0.05


def test_positive_transfer_bwt_plus_and_rem():
    # Every earlier task improves by 0.1 after each later stage.
    R = np.array([[0.5, 0.0], [0.6, 0.7]])
    assert diaz_bwt(R) == pytest.approx(0.1)
    assert bwt_plus(R) == pytest.approx(0.1)
    assert rem(R) == pytest.approx(1.0)
    assert gem_bwt(R) == pytest.approx(0.1)
    assert chaudhry_forgetting(R) == pytest.approx(-0.1)


def test_relative_variants_on_hand_matrix():
    # mean((0.50-0.80)/0.80, (0.70-0.90)/0.90) = mean(-0.375, -0.2222...)
    assert relative_bwt(R3) == pytest.approx((-0.375 + (-0.2 / 0.9)) / 2)
    # mean((0.90-0.95)/0.95, (0.85-0.90)/0.90)
    assert relative_fwt(R3, RSEQ3) == pytest.approx(((0.90 - 0.95) / 0.95 + (0.85 - 0.90) / 0.90) / 2)
    assert abs_fwt_seq(R3, RSEQ3) == pytest.approx(-0.05)
    # Sequential against itself: 0 by construction.
    assert relative_fwt(R3, R3) == 0.0
    assert abs_fwt_seq(R3, R3) == 0.0


def test_relative_zero_denominator_is_nan():
    R = np.array([[0.0, 0.1], [0.2, 0.8]])  # R[0][0] = 0: relative change undefined
    assert math.isnan(relative_bwt(R))
    Rseq = np.array([[0.5, 0.0], [0.0, 0.0]])  # Rseq[1][1] = 0
    assert math.isnan(relative_fwt(np.array([[0.5, 0.1], [0.2, 0.8]]), Rseq))
    # A non-zero denominator is unaffected: (0.2 - 0.4) / 0.4
    assert relative_bwt(np.array([[0.4, 0.1], [0.2, 0.8]])) == pytest.approx(-0.5)


def test_no_forgetting_matrix():
    # Each column stays at its diagonal value once trained.
    R = np.array([[0.7, 0.1, 0.2], [0.7, 0.8, 0.3], [0.7, 0.8, 0.9]])
    m = all_metrics(R)
    assert m["bwt"] == 0.0
    assert m["chaudhry_forgetting"] == 0.0
    assert m["diaz_bwt"] == 0.0
    assert m["rem"] == 1.0
    assert m["bwt_plus"] == 0.0
    assert m["rel_bwt"] == 0.0


def test_single_task_drop_0p9_to_0p3():
    # Task 0 drops 0.9 -> 0.3, task 1 unchanged: BWT = ((0.3-0.9) + 0) / 2 = -0.3
    R = np.array([[0.9, 0.2, 0.1], [0.9, 0.8, 0.2], [0.3, 0.8, 0.7]])
    assert gem_bwt(R) == pytest.approx(-0.3)
    assert chaudhry_forgetting(R) == pytest.approx(0.3)
    # Díaz: (0.9-0.9) + (0.3-0.9) + (0.8-0.8) = -0.6 over 3
    assert diaz_bwt(R) == pytest.approx(-0.2)
    assert rem(R) == pytest.approx(0.8)
    # relative: mean(-0.6/0.9, 0) = -1/3
    assert relative_bwt(R) == pytest.approx(-1 / 3)


def test_all_metrics_keys_labels_and_values():
    m = all_metrics(R3, B3, RSEQ3)
    assert set(m) == set(METRIC_LABELS)
    assert all(isinstance(v, float) for v in m.values())
    assert all(isinstance(v, str) and v for v in METRIC_LABELS.values())
    expected = {
        "acc": 2.05 / 3,
        "bwt": -0.25,
        "fwt": 0.525,
        "gem_fwt": 0.175,
        "chaudhry_forgetting": 0.325,
        "diaz_acc": 4.70 / 6,
        "diaz_bwt": -0.35 / 3,
        "rem": 1 - 0.35 / 3,
        "bwt_plus": 0.0,
        "diaz_fwt": 0.30,
        "rel_bwt": (-0.375 - 0.2 / 0.9) / 2,
        "rel_fwt": (-0.05 / 0.95 - 0.05 / 0.90) / 2,
        "abs_fwt_seq": -0.05,
    }
    for k, v in expected.items():
        assert m[k] == pytest.approx(v), k
    # Optional references absent -> NaN for the metrics that need them, others unchanged.
    m2 = all_metrics(R3.tolist())
    assert math.isnan(m2["gem_fwt"]) and math.isnan(m2["rel_fwt"]) and math.isnan(m2["abs_fwt_seq"])
    assert m2["fwt"] == pytest.approx(0.525)  # the paper's FWT needs no initial scores
    assert m2["bwt"] == pytest.approx(-0.25)


def test_n_equals_one():
    m = all_metrics([[0.7]], b=[0.1], R_seq=[[0.6]])
    assert m["acc"] == pytest.approx(0.7)
    assert m["diaz_acc"] == pytest.approx(0.7)
    for k in METRIC_LABELS:
        if k not in ("acc", "diaz_acc"):
            assert math.isnan(m[k]), k
    assert chaudhry_task_forgetting([[0.7]]).shape == (0,)


def test_nan_entries_propagate():
    R = R3.copy()
    R[2, 0] = np.nan  # final model never evaluated on stage 0's domain
    m = all_metrics(R, B3, RSEQ3)
    for k in ("acc", "bwt", "chaudhry_forgetting", "diaz_acc", "diaz_bwt", "rem", "bwt_plus", "rel_bwt"):
        assert math.isnan(m[k]), k
    # Metrics that never read R[2][0] keep their values.
    assert m["gem_fwt"] == pytest.approx(0.175) and m["fwt"] == pytest.approx(0.525)
    assert m["diaz_fwt"] == pytest.approx(0.30)
    assert m["rel_fwt"] == pytest.approx((-0.05 / 0.95 - 0.05 / 0.90) / 2)
    # A NaN in an earlier (non-max) row still poisons the max-based forgetting.
    R2 = R3.copy()
    R2[1, 0] = np.nan
    assert math.isnan(chaudhry_task_forgetting(R2)[0])
    assert chaudhry_task_forgetting(R2)[1] == pytest.approx(0.20)


def test_matches_loop_reference_on_random_matrices():
    rng = np.random.default_rng(0)
    for n in (2, 3, 5):
        R = rng.uniform(0.05, 1.0, size=(n, n))
        b = rng.uniform(0.0, 0.2, size=n)
        S = rng.uniform(0.05, 1.0, size=(n, n))
        N = n
        # 1-based loops straight from the formulas; r(i, j) = R[i][j] (1-based)
        r = lambda i, j: R[i - 1, j - 1]  # noqa: E731
        acc = sum(r(N, j) for j in range(1, N + 1)) / N
        bwt = sum(r(N, j) - r(j, j) for j in range(1, N)) / (N - 1)
        fwt = sum(r(j - 1, j) - b[j - 1] for j in range(2, N + 1)) / (N - 1)
        ofwt = sum(r(i, i) - r(i - 1, i) for i in range(2, N + 1)) / (N - 1)
        forg = sum(max(r(l, j) for l in range(1, N)) - r(N, j) for j in range(1, N)) / (N - 1)
        dacc = sum(r(i, j) for i in range(1, N + 1) for j in range(1, i + 1)) / (N * (N + 1) / 2)
        dbwt = sum(r(i, j) - r(j, j) for i in range(2, N + 1) for j in range(1, i)) / (N * (N - 1) / 2)
        dfwt = sum(r(i, j) for i in range(1, N + 1) for j in range(i + 1, N + 1)) / (N * (N - 1) / 2)
        rbwt = sum((r(N, i) - r(i, i)) / r(i, i) for i in range(1, N)) / (N - 1)
        rfwt = sum((r(i, i) - S[i - 1, i - 1]) / S[i - 1, i - 1] for i in range(2, N + 1)) / (N - 1)
        m = all_metrics(R, b, S)
        assert m["acc"] == pytest.approx(acc)
        assert m["bwt"] == pytest.approx(bwt)
        assert m["gem_fwt"] == pytest.approx(fwt)
        assert m["fwt"] == pytest.approx(ofwt)
        assert m["chaudhry_forgetting"] == pytest.approx(forg)
        assert m["diaz_acc"] == pytest.approx(dacc)
        assert m["diaz_bwt"] == pytest.approx(dbwt)
        assert m["rem"] == pytest.approx(1 - abs(min(dbwt, 0)))
        assert m["bwt_plus"] == pytest.approx(max(dbwt, 0))
        assert m["diaz_fwt"] == pytest.approx(dfwt)
        assert m["rel_bwt"] == pytest.approx(rbwt)
        assert m["rel_fwt"] == pytest.approx(rfwt)


def test_input_validation():
    with pytest.raises(ValueError):
        gem_acc(np.zeros((2, 3)))
    with pytest.raises(ValueError):
        gem_acc(np.zeros((0, 0)))
    with pytest.raises(ValueError):
        gem_fwt(R3, [0.1, 0.2])
    with pytest.raises(ValueError):
        relative_fwt(R3, np.eye(2))
    with pytest.raises(ValueError):
        all_metrics(R3, b=[0.1])


def test_stages_abrupt():
    st = stages_from_domains(["A", "A", "A", "B", "B"])
    assert st == [Stage(0, "A", 0, 2), Stage(1, "B", 3, 4)]


def test_stages_recurring_and_offset():
    st = stages_from_domains(["A", "A", "B", "B", "A", "A", "A"], first_round=1)
    assert [(s.index, s.domain, s.first_round, s.last_round) for s in st] == [
        (0, "A", 1, 2),
        (1, "B", 3, 4),
        (2, "A", 5, 7),
    ]


def test_stages_constant_single_and_empty():
    assert stages_from_domains(["X"] * 6) == [Stage(0, "X", 0, 5)]
    assert stages_from_domains(["X"]) == [Stage(0, "X", 0, 0)]
    assert stages_from_domains([]) == []
    # Alternating every round: one stage per round.
    st = stages_from_domains(["A", "B", "A", "B"])
    assert [s.domain for s in st] == ["A", "B", "A", "B"]
    assert all(s.first_round == s.last_round == s.index for s in st)


def test_build_R_and_initial_scores():
    stages = stages_from_domains(["A", "A", "B", "B", "B", "A"])
    # last rounds: 1, 4, 5 ; domains A, B, A
    table = {
        (1, "A"): 0.8, (1, "B"): 0.2,
        (4, "A"): 0.6, (4, "B"): 0.9,
        (5, "A"): 0.85, (5, "B"): 0.7,
    }
    calls: list[tuple[int, str]] = []

    def dice_at(rnd: int, dom: str) -> float:
        calls.append((rnd, dom))
        return table[(rnd, dom)]

    R = build_R(stages, dice_at)
    expected = np.array(
        [
            [0.8, 0.2, 0.8],
            [0.6, 0.9, 0.6],
            [0.85, 0.7, 0.85],
        ]
    )
    np.testing.assert_array_equal(R, expected)
    # Recurring domain: columns 0 and 2 measure the same domain, evaluated once per row.
    assert sorted(calls) == sorted(table)
    b_calls: list[str] = []
    b = initial_scores(stages, lambda d: b_calls.append(d) or {"A": 0.05, "B": 0.1}[d])
    np.testing.assert_array_equal(b, [0.05, 0.1, 0.05])
    assert sorted(b_calls) == ["A", "B"]
    # Plugging into the metrics: GEM BWT = ((0.85-0.8) + (0.7-0.9)) / 2
    assert gem_bwt(R) == pytest.approx((0.05 - 0.2) / 2)
    assert gem_fwt(R, b) == pytest.approx(((0.2 - 0.1) + (0.6 - 0.05)) / 2)


def test_build_R_keeps_nan_and_rejects_empty():
    stages = stages_from_domains(["A", "B"])
    R = build_R(stages, lambda r, d: math.nan if (r, d) == (1, "A") else 0.5)
    assert math.isnan(R[1, 0]) and np.isfinite(R[0, 0])
    assert math.isnan(gem_bwt(R))
    with pytest.raises(ValueError):
        build_R([], lambda r, d: 0.0)

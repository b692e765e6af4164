from __future__ import annotations

import pytest

from simlab.data.drift import contribution_span, plan, true_domains
from simlab.data.drift import DriftSpec


def test_abrupt_switches_in_the_named_round():
    d = DriftSpec(type="abrupt", domains=["A", "B", "A"], at=[4, 7])
    assert true_domains(d, 9) == ["A"] * 3 + ["B"] * 3 + ["A"] * 3
    assert plan(d, 4).weights == {"B": 1.0}


def test_recurring_cycles():
    d = DriftSpec(type="recurring", domains=["A", "B"], period=2)
    assert true_domains(d, 7) == ["A", "A", "B", "B", "A", "A", "B"]


def test_gradual_mix_ramps_linearly():
    d = DriftSpec(type="gradual", domains=["A", "B"], start=2, end=6, mode="mix")
    assert plan(d, 2).weights == {"A": 1.0}
    assert plan(d, 3).weights == pytest.approx({"A": 0.75, "B": 0.25})
    assert plan(d, 4).weights == pytest.approx({"A": 0.5, "B": 0.5})
    assert plan(d, 6).weights == {"B": 1.0}
    # ties go to the earlier domain; past the midpoint the window counts as B
    assert true_domains(d, 7) == ["A", "A", "A", "A", "B", "B", "B"]


def test_shifting_source_moves_through_every_domain_in_equal_segments():
    d = DriftSpec(type="shifting", domains=["A", "B", "C"], start=3, end=11)
    assert plan(d, 3).weights == {"A": 1.0} and plan(d, 7).weights == {"B": 1.0} and plan(d, 11).weights == {"C": 1.0}
    assert plan(d, 4).weights == pytest.approx({"A": 0.75, "B": 0.25})
    assert plan(d, 9).weights == pytest.approx({"B": 0.5, "C": 0.5})
    assert true_domains(d, 12) == ["A"] * 5 + ["B"] * 4 + ["C"] * 3
    assert contribution_span(d, 12) == {"A": (1, 6), "B": (4, 10), "C": (8, 12)}
    two = DriftSpec(type="shifting", domains=["A", "B"], start=2, end=6)
    gradual = DriftSpec(type="gradual", domains=["A", "B"], start=2, end=6, mode="mix")
    assert all(plan(two, t).weights == pytest.approx(plan(gradual, t).weights) for t in range(1, 8))


def test_every_drift_type_describes_its_schedule_in_words():
    from simlab.data.drift import describe

    assert describe({"type": "abrupt", "domains": ["A", "B", "A"], "at": [4, 7]}) == "A, then B from round 4, then A from round 7"
    assert describe({"type": "none", "domain": "A"}) == "A throughout"
    assert describe({"type": "shifting", "domains": ["A", "B", "C"], "start": 3, "end": 11}) == \
        "a case mix shifting A → B → C over rounds 3–11"
    assert describe({"type": "recurring", "domains": ["A", "B"], "period": 2}) == "A, B in turn, 2 rounds each, repeated"
    assert describe({"type": "teleport", "domains": ["A"]}) == "teleport"  # unknown to this version: its name


def test_gradual_interpolation_carries_the_fraction():
    d = DriftSpec(type="gradual", domains=["A", "B"], start=1, end=5, mode="interpolate")
    assert plan(d, 2).interpolate == ("A", "B", pytest.approx(0.25))
    assert plan(d, 4).true_domain == "B" and plan(d, 2).true_domain == "A"
    assert plan(d, 5).weights == {"B": 1.0}


def test_population_mixture_moves_between_weight_vectors():
    d = DriftSpec(type="population", domains=["young", "old"], weights_start=[0.8, 0.2],
                  weights_end=[0.2, 0.8], start=1, end=11)
    assert plan(d, 1).weights == pytest.approx({"young": 0.8, "old": 0.2})
    assert plan(d, 6).weights == pytest.approx({"young": 0.5, "old": 0.5})
    assert plan(d, 11).weights == pytest.approx({"young": 0.2, "old": 0.8})
    assert sum(plan(d, 3).weights.values()) == pytest.approx(1.0)
    assert true_domains(d, 11)[:5] == ["young"] * 5 and true_domains(d, 11)[-1] == "old"


def test_contribution_span_counts_a_fading_domain_until_its_weight_is_zero():
    d = DriftSpec(type="gradual", domains=["A", "B"], start=2, end=6, mode="interpolate")
    assert plan(d, 5).contributing == ("A", "B")  # 3/4 of the way to B: both ends still contribute
    assert contribution_span(d, 8) == {"A": (1, 5), "B": (3, 8)}
    pop = DriftSpec(type="population", domains=["A", "B", "C"], weights_start=[1.0, 0.0, 0.0],
                    weights_end=[0.0, 0.5, 0.5], start=1, end=3)
    assert contribution_span(pop, 4) == {"A": (1, 2), "B": (2, 4), "C": (2, 4)}  # a zero weight is no contribution
    recurring = DriftSpec(type="recurring", domains=["A", "B"], period=2)
    assert contribution_span(recurring, 7) == {"A": (1, 6), "B": (3, 7)}


def test_none_is_constant_and_rounds_start_at_one():
    d = DriftSpec(type="none", domain="A")
    assert set(true_domains(d, 5)) == {"A"}
    with pytest.raises(ValueError):
        plan(d, 0)


@pytest.mark.parametrize("spec, key", [
    (dict(type="abrupt", domains=["A"], at=[]), "domains"),
    (dict(type="recurring", domains=["A", "B"]), "period"),
    (dict(type="gradual", domains=["A", "B"], start=5, end=5), "end"),
    (dict(type="population", domains=["A", "B"], weights_start=[1.0], weights_end=[0.0, 1.0]), "weights_start"),
    (dict(type="abrupt", domains=["A", "B"], at=[1]), "at"),
    (dict(type="shifting", domains=["A"], start=1, end=4), "domains"),
    (dict(type="shifting", domains=["A", "B", "C"], start=4, end=4), "end"),
])
def test_inconsistent_schedules_are_reported(spec, key):
    assert key in dict(DriftSpec(**spec).check())

"""The segmentation-metric registry: plug-in properties, Dice through it, HD95 and its empty-structure rule, rows."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from simlab.metrics.registry import (HEADLINE, REGISTRY, SegmentationMetric, metric_labels, metric_rows,
                                     register)
from simlab.metrics.segmentation import dice_per_class
from tests.test_metrics_segmentation import _hd95_reference, disc_pairs


def _random_pair(seed: int, shape=(5, 16, 16), num_classes=3):
    rng = np.random.default_rng(seed)
    t = rng.integers(0, num_classes, size=shape)
    p = np.where(rng.random(shape) < 0.7, t, rng.integers(0, num_classes, size=shape))
    return torch.from_numpy(p), torch.from_numpy(t)


def test_every_registered_metric_is_described():
    assert HEADLINE == "dice" and list(REGISTRY)[:2] == ["dice", "hd95"]
    for name, m in REGISTRY.items():
        assert m.name == name
        assert m.direction in ("higher", "lower")
        for attr in ("label", "definition", "source"):
            text = getattr(m, attr)
            assert isinstance(text, str) and text.strip() and "\n" not in text, (name, attr)
        assert type(m).__doc__ and "empty" in type(m).__doc__.lower(), f"{name}: state the empty-structure rule"
    assert REGISTRY["dice"].direction == "higher" and REGISTRY["hd95"].direction == "lower"
    assert not REGISTRY["dice"].counts_missed and REGISTRY["hd95"].counts_missed


def test_register_rejects_duplicates_and_incomplete_metrics():
    before = dict(REGISTRY)

    class Again(SegmentationMetric):
        name, label, direction, definition, source = "dice", "D", "higher", "again", "here"

    class NoSource(SegmentationMetric):
        name, label, direction, definition = "nosource", "N", "higher", "none"

    class Sideways(SegmentationMetric):
        name, label, direction, definition, source = "sideways", "S", "either", "no direction", "here"

    with pytest.raises(ValueError, match="registered twice"):
        register(Again)
    with pytest.raises(TypeError, match="source"):
        register(NoSource)
    with pytest.raises(ValueError, match="direction"):
        register(Sideways)
    assert REGISTRY == before


def test_labels_cover_every_metric_and_block_field():
    labels = metric_labels()
    for m in REGISTRY.values():
        assert m.source in labels[m.name] and m.direction in labels[m.name]
    assert "lower is better" in labels["hd95_missed"]
    for field in ("mean", "bwt", "fwt", "forgetting", "missed"):
        assert labels[f"metrics.<metric>.{field}"]
    assert "positive = got worse" in labels["metrics.<metric>.forgetting"]


# ----------------------------------------------------------------------------------- Dice
def test_dice_through_the_registry_is_dice_per_class():
    p, t = _random_pair(0)
    np.testing.assert_array_equal(REGISTRY["dice"].scores(p, t, 3), dice_per_class(p, t, 3))


def test_dice_rows_are_bit_identical_to_the_previous_evaluation_rows():
    for seed in range(4):
        p, t = _random_pair(seed, shape=(7, 20, 20), num_classes=4)
        d = dice_per_class(p, t, 4)
        before = {"dice/A": float(d.mean()), **{f"dice_c{c + 1}/A": float(d[:, c].mean()) for c in range(3)}}
        rows = metric_rows("A", p, t, 4)
        dice_rows = {k: v for k, v in rows.items() if k.split("/")[0] in ("dice", "dice_c1", "dice_c2", "dice_c3")}
        assert list(dice_rows) == list(before)
        assert all(dice_rows[k] == before[k] for k in before)  # exact, not approx
        oracle = metric_rows("A", p, t, 4, names=("dice",), suffix="_oracle", per_class=False)
        assert oracle == {"dice_oracle/A": float(d.mean())}


# ----------------------------------------------------------------------------------- HD95
def test_hd95_through_the_registry_matches_scipy_reference():
    preds, targets = disc_pairs(5, size=32, n=4, centre=(9, 23), radius=(3, 7), shift=4, scale=(0.6, 1.4))
    h = REGISTRY["hd95"].scores(torch.from_numpy(np.stack(preds)), torch.from_numpy(np.stack(targets)), 2)
    ref = [_hd95_reference(p == 1, t == 1) for p, t in zip(preds, targets)]
    np.testing.assert_allclose(h[:, 0], ref, rtol=1e-5)
    assert (h > 0).all()


def _empty_cases() -> tuple[torch.Tensor, torch.Tensor]:
    """Four images, class 1: both present 5 px apart; both empty; missed; false structure."""
    t = torch.zeros(4, 8, 8, dtype=torch.int64)
    p = torch.zeros(4, 8, 8, dtype=torch.int64)
    t[0, 0, 0], p[0, 3, 4] = 1, 1  # single pixels (0,0) and (3,4): every boundary distance is 5
    t[2, 2:5, 2:5] = 1  # label only: missed structure
    p[3, 6, 6] = 1  # prediction only: false structure
    return p, t


def test_hd95_empty_structure_rule():
    p, t = _empty_cases()
    h = REGISTRY["hd95"].scores(p, t, 2)[:, 0]
    assert h[0] == pytest.approx(5.0)
    assert math.isnan(h[1])  # both empty: excluded
    assert h[2] == math.inf and h[3] == math.inf  # missed / false: infinite, counted


def test_missed_structures_are_counted_in_the_rows_not_dropped():
    p, t = _empty_cases()
    rows = metric_rows("A", p, t, 2)
    assert rows["hd95/A"] == pytest.approx(5.0)  # mean over the one defined pair
    assert rows["hd95_c1/A"] == pytest.approx(5.0)
    assert rows["hd95_missed/A"] == pytest.approx(2 / 3)  # 2 of the 3 pairs that count (image 1 excluded)
    assert rows["dice/A"] == pytest.approx((0 + 1 + 0 + 0) / 4)
    assert set(rows) == {"dice/A", "dice_c1/A", "hd95/A", "hd95_c1/A", "hd95_missed/A"}


def test_a_model_that_misses_everything_does_not_look_good():
    t = torch.zeros(3, 8, 8, dtype=torch.int64)
    t[:, 2:5, 2:5] = 1
    t[:, 6:, 6:] = 2
    rows = metric_rows("A", torch.zeros_like(t), t, 3)
    assert rows["hd95_missed/A"] == 1.0
    assert math.isnan(rows["hd95/A"]) and math.isnan(rows["hd95_c1/A"]) and math.isnan(rows["hd95_c2/A"])
    assert rows["dice/A"] == 0.0
    perfect = metric_rows("A", t.clone(), t, 3)
    assert perfect["hd95/A"] == 0.0 and perfect["hd95_missed/A"] == 0.0 and perfect["dice/A"] == 1.0


def test_per_class_rows_and_nothing_to_measure():
    t = torch.zeros(2, 10, 10, dtype=torch.int64)
    p = torch.zeros(2, 10, 10, dtype=torch.int64)
    t[0, 1, 1], p[0, 1, 4] = 1, 1  # class 1: 3 px apart in image 0
    t[1, 5:8, 5:8] = 2
    p[1, 5:8, 5:8] = 2  # class 2: exact in image 1, absent from both in image 0
    rows = metric_rows("B", p, t, 3)
    assert rows["hd95_c1/B"] == pytest.approx(3.0) and rows["hd95_c2/B"] == 0.0
    assert rows["hd95/B"] == pytest.approx(1.5) and rows["hd95_missed/B"] == 0.0
    nothing = metric_rows("B", torch.zeros_like(t), torch.zeros_like(t), 3)
    assert math.isnan(nothing["hd95/B"]) and math.isnan(nothing["hd95_missed/B"])
    assert nothing["dice/B"] == 1.0

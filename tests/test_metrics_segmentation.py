"""Dice / HD95 on hand-made masks, the empty-structure rules, NaN counting, and predict."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.metrics import DiceMetric
from monai.networks.utils import one_hot
from scipy.ndimage import binary_erosion
from scipy.spatial.distance import cdist

from simlab.metrics.segmentation import dice_per_class, hd95_per_class, mean_dice, predict, summarise


def _labels(*rows_per_case: list[list[int]]) -> torch.Tensor:
    return torch.tensor(rows_per_case, dtype=torch.int64)


def test_dice_two_thirds_by_hand():
    # class 1: target has 2 pixels, prediction has 1 of them -> 2*1 / (2+1) = 2/3
    target = _labels([[0, 1, 1], [0, 0, 0]])
    pred = _labels([[0, 1, 0], [0, 0, 0]])
    d = dice_per_class(pred, target, num_classes=2)
    assert d.shape == (1, 1)
    assert d.dtype == np.float64
    assert d[0, 0] == pytest.approx(2 / 3)


def test_dice_multiclass_by_hand_and_shape():
    target = _labels(
        [[1, 1, 2, 2], [1, 1, 2, 2], [0, 0, 0, 0]],
        [[0, 0, 0, 0], [0, 3, 3, 0], [0, 0, 0, 0]],
    )
    pred = _labels(
        [[1, 1, 1, 2], [1, 1, 2, 2], [0, 0, 0, 3]],
        [[0, 0, 0, 0], [0, 3, 0, 0], [0, 0, 0, 0]],
    )
    d = dice_per_class(pred, target, num_classes=4)
    assert d.shape == (2, 3)
    # case 0: class 1 T=4, P=5, overlap 4 -> 8/9 ; class 2 T=4, P=3, overlap 3 -> 6/7 ;
    #         class 3 absent from target but predicted (1 px) -> 0
    # case 1: class 1 absent from both -> 1 ; class 2 absent from both -> 1 ;
    #         class 3 T=2, P=1, overlap 1 -> 2/3
    np.testing.assert_allclose(d, [[8 / 9, 6 / 7, 0.0], [1.0, 1.0, 2 / 3]])
    assert mean_dice(pred, target, 4) == pytest.approx((8 / 9 + 6 / 7 + 0 + 1 + 1 + 2 / 3) / 6)


def test_empty_structure_rules():
    target = torch.zeros(3, 4, 4, dtype=torch.int64)
    pred = torch.zeros(3, 4, 4, dtype=torch.int64)
    pred[1, 0, 0] = 1  # absent from target, predicted -> 0
    target[2, 1:3, 1:3] = 1  # present in target, not predicted -> 0
    d = dice_per_class(pred, target, num_classes=2)
    np.testing.assert_array_equal(d[:, 0], [1.0, 0.0, 0.0])
    assert not np.isnan(d).any()


def test_installed_monai_ignore_empty_false_matches_rule():
    # The module relies on ignore_empty=False meaning exactly the stated rule.
    t = torch.zeros(2, 1, 4, 4, dtype=torch.int64)
    p = torch.zeros(2, 1, 4, 4, dtype=torch.int64)
    p[1, 0, 2, 2] = 1
    raw = DiceMetric(include_background=False, reduction="none", ignore_empty=False)(one_hot(p, 2), one_hot(t, 2))
    np.testing.assert_array_equal(raw.numpy()[:, 0], [1.0, 0.0])
    raw_default = DiceMetric(include_background=False, reduction="none")(one_hot(p, 2), one_hot(t, 2))
    assert torch.isnan(raw_default).all()  # default would drop both cases


def test_perfect_prediction_and_3d():
    rng = np.random.default_rng(1)
    target = torch.from_numpy(rng.integers(0, 3, size=(2, 5, 6, 7)))
    d = dice_per_class(target.clone(), target, num_classes=4)  # class 3 absent everywhere -> 1
    assert d.shape == (2, 3)
    np.testing.assert_array_equal(d, np.ones((2, 3)))


def test_dice_matches_numpy_reference_on_random_labels():
    rng = np.random.default_rng(2)
    t = rng.integers(0, 3, size=(4, 12, 12))
    p = np.where(rng.random((4, 12, 12)) < 0.7, t, rng.integers(0, 3, size=(4, 12, 12)))
    d = dice_per_class(torch.from_numpy(p), torch.from_numpy(t), num_classes=3)
    for b in range(4):
        for c in (1, 2):
            tm, pm = t[b] == c, p[b] == c
            ref = 2 * (tm & pm).sum() / (tm.sum() + pm.sum())
            assert d[b, c - 1] == pytest.approx(ref)


def test_dice_input_validation():
    t = torch.zeros(1, 4, 4, dtype=torch.int64)
    with pytest.raises(ValueError):
        dice_per_class(torch.zeros(1, 4, 5, dtype=torch.int64), t, 2)
    with pytest.raises(ValueError):
        dice_per_class(t + 2, t, 2)
    with pytest.raises(ValueError):
        dice_per_class(t, t, 1)
    with pytest.raises(TypeError):
        dice_per_class(t.float(), t, 2)


def disc_pairs(seed: int, size: int, n: int, centre: tuple, radius: tuple, shift: float, scale: tuple):
    """``n`` (prediction, target) pairs of discs: the prediction shifted by up to ``shift`` pixels and
    scaled in radius by a factor in ``scale``; int64 masks of ``size`` × ``size``."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    targets, preds = [], []
    for _ in range(n):
        cy, cx, r = rng.uniform(*centre), rng.uniform(*centre), rng.uniform(*radius)
        tm = (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2
        pm = ((yy - cy - rng.uniform(-shift, shift)) ** 2 + (xx - cx - rng.uniform(-shift, shift)) ** 2
              <= (r * rng.uniform(*scale)) ** 2)
        targets.append(tm.astype(np.int64))
        preds.append(pm.astype(np.int64))
    return preds, targets


def _hd95_reference(pm: np.ndarray, tm: np.ndarray, spacing=(1.0, 1.0)) -> float:
    """Boundary = mask XOR erosion (cross structure, outside = background); 95th pct per side."""
    ep = np.argwhere(pm & ~binary_erosion(pm)) * np.asarray(spacing)
    et = np.argwhere(tm & ~binary_erosion(tm)) * np.asarray(spacing)
    dist = cdist(ep, et)
    return max(np.percentile(dist.min(axis=1), 95), np.percentile(dist.min(axis=0), 95))


def test_hd95_known_distances():
    # Single pixels (0,0) vs (3,4): every boundary distance is 5.
    t = torch.zeros(1, 8, 8, dtype=torch.int64)
    p = torch.zeros(1, 8, 8, dtype=torch.int64)
    t[0, 0, 0] = 1
    p[0, 3, 4] = 1
    assert hd95_per_class(p, t, 2)[0, 0] == pytest.approx(5.0)
    # Anisotropic spacing (2, 1): the offset (3, 4) becomes (6, 4) -> sqrt(52)
    assert hd95_per_class(p, t, 2, spacing=(2.0, 1.0))[0, 0] == pytest.approx(math.sqrt(52.0))
    # Perfect prediction -> 0
    assert hd95_per_class(t, t, 2)[0, 0] == 0.0


def test_hd95_matches_scipy_reference():
    preds, targets = disc_pairs(3, size=24, n=3, centre=(7, 17), radius=(3, 6), shift=3, scale=(0.7, 1.3))
    t = torch.from_numpy(np.stack(targets))
    p = torch.from_numpy(np.stack(preds))
    h = hd95_per_class(p, t, 2)
    assert h.shape == (3, 1)
    for b in range(3):
        assert h[b, 0] == pytest.approx(_hd95_reference(preds[b] == 1, targets[b] == 1), rel=1e-5)
        assert h[b, 0] > 0


def test_hd95_nan_where_undefined_and_summarise_counts():
    t = torch.zeros(3, 8, 8, dtype=torch.int64)
    p = torch.zeros(3, 8, 8, dtype=torch.int64)
    t[0, 2:4, 2:4] = 1
    p[0, 2:4, 2:4] = 1  # defined, 0
    t[1, 2:4, 2:4] = 1  # target only -> NaN
    p[2, 2:4, 2:4] = 1  # prediction only -> NaN
    h = hd95_per_class(p, t, num_classes=3)  # class 2 absent from both everywhere -> NaN
    assert h.shape == (3, 2)
    assert h[0, 0] == 0.0
    assert np.isnan(h[1:, 0]).all() and np.isnan(h[:, 1]).all()
    s = summarise(h)
    assert s == {"mean": 0.0, "n": 1, "n_nan": 5}


def test_summarise():
    assert summarise([0.5, math.nan, 1.0]) == {"mean": 0.75, "n": 2, "n_nan": 1}
    s = summarise(np.array([math.nan, math.nan]))
    assert math.isnan(s["mean"]) and s["n"] == 0 and s["n_nan"] == 2
    s = summarise([])
    assert math.isnan(s["mean"]) and s["n"] == 0 and s["n_nan"] == 0
    s = summarise(torch.tensor([[1.0, 2.0], [float("nan"), 3.0]]))
    assert s == {"mean": 2.0, "n": 3, "n_nan": 1}
    assert summarise(x for x in (1.0, 3.0))["mean"] == 2.0


class _Fixed(torch.nn.Module):
    """Logits (x0, x1, 0) per pixel, with dropout that would change them in train mode."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 3, kernel_size=1, bias=False)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[0, 0] = 1.0
            self.conv.weight[1, 1] = 1.0
        self.drop = torch.nn.Dropout(p=0.9)
        self.seen_training: list[bool] = []
        self.seen_grad: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen_training.append(self.training)
        self.seen_grad.append(torch.is_grad_enabled())
        return self.drop(self.conv(x))


def test_predict_argmax_eval_nograd_and_batching():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(7, 2, 5, 5, generator=gen)
    logits = torch.stack([x[:, 0], x[:, 1], torch.zeros_like(x[:, 0])], dim=1)
    expected = logits.argmax(dim=1)
    model = _Fixed()
    model.train()
    out = predict(model, x, batch_size=3, device="cpu")
    assert out.dtype == torch.int64 and out.shape == (7, 5, 5)
    assert torch.equal(out, expected)
    assert model.seen_training == [False, False, False]  # 3 + 3 + 1
    assert model.seen_grad == [False, False, False]
    assert model.training  # mode restored
    # Batch size does not change the result; numpy input accepted.
    assert torch.equal(predict(model, x.numpy(), batch_size=7, device="cpu"), expected)
    assert predict(model, x[:0], batch_size=2, device="cpu").shape == (0, 5, 5)
    with pytest.raises(ValueError):
        predict(model, x, batch_size=0, device="cpu")

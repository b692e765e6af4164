"""Segmentation scores: per-class Dice and HD95 (via MONAI), NaN-aware summaries, prediction.

Conventions
-----------
* Label maps are integer tensors of shape ``[B, *spatial]`` (2-D ``[B, H, W]`` or 3-D
  ``[B, D, H, W]``) with values in ``0 .. num_classes-1``; class 0 is background.
* Scores are returned per case and per foreground class as ``np.ndarray`` of shape
  ``[B, num_classes - 1]`` (column ``c - 1`` belongs to class ``c``), in float64.
* Both metrics are computed by MONAI (``DiceMetric`` on one-hot tensors with
  ``include_background=False``; ``compute_hausdorff_distance``, the function behind
  ``HausdorffDistanceMetric``, on the binary masks of one class); the cases where a
  structure is missing are decided here, explicitly, so that the result does not depend
  on how a given MONAI version treats empty masks.

Empty-structure rule for Dice
-----------------------------
For case ``b`` and class ``c`` with target mask ``T`` and predicted mask ``P``::

    Dice = 2 |T ∩ P| / (|T| + |P|)     if |T| > 0
    Dice = 1.0                         if |T| = 0 and |P| = 0   (correctly absent)
    Dice = 0.0                         if |T| = 0 and |P| > 0   (hallucinated structure)

so Dice is never NaN. This is MONAI's ``ignore_empty=False`` behaviour (MONAI's default,
``ignore_empty=True``, instead returns NaN whenever the target is empty, which would
silently drop hallucinations from any mean). The metric is built with
``ignore_empty=False`` and the two empty cases are then overwritten from the masks
themselves, which is the same value and keeps the rule independent of MONAI internals.

HD95 rule
---------
HD95 is the symmetric 95th-percentile Hausdorff distance between the boundary voxels of
``T`` and ``P`` (MONAI: boundary = mask XOR its binary erosion; for each direction the
95th percentile, linear interpolation, of the nearest-boundary distances; the larger of
the two directions). It is **undefined (NaN)** unless both ``T`` and ``P`` are
non-empty: with one mask empty the distance is infinite, and with both empty there is no
surface to measure (the "correctly absent" information is carried by Dice = 1). NaNs
are kept so that :func:`summarise` can count them rather than silently averaging over
fewer cases.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from monai.metrics import DiceMetric, compute_hausdorff_distance
from monai.networks.utils import one_hot

__all__ = [
    "dice_per_class",
    "hd95_per_class",
    "mean_dice",
    "predict",
    "summarise",
]


def _check_labels(
    pred_labels: torch.Tensor, target: torch.Tensor, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate two label maps and return them as int64 CPU tensors of shape [B, *spatial]."""
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2 (background + >= 1 structure), got {num_classes!r}")
    pred = torch.as_tensor(pred_labels)
    tgt = torch.as_tensor(target)
    if pred.shape != tgt.shape:
        raise ValueError(f"prediction and target shapes differ: {tuple(pred.shape)} vs {tuple(tgt.shape)}")
    if pred.ndim not in (3, 4):
        raise ValueError(f"label maps must be [B, H, W] or [B, D, H, W], got shape {tuple(pred.shape)}")
    if pred.is_floating_point() or tgt.is_floating_point():
        raise TypeError("label maps must be integer tensors (class indices), not floating point")
    pred = pred.detach().to("cpu", torch.int64)
    tgt = tgt.detach().to("cpu", torch.int64)
    for name, t in (("prediction", pred), ("target", tgt)):
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_classes):
            raise ValueError(
                f"{name} labels must lie in [0, {num_classes - 1}], got range [{int(t.min())}, {int(t.max())}]"
            )
    return pred, tgt


def _presence(labels: torch.Tensor, num_classes: int) -> np.ndarray:
    """Boolean [B, num_classes-1]: whether each foreground class occurs in each case."""
    flat = labels.reshape(labels.shape[0], -1)
    present = np.zeros((labels.shape[0], num_classes - 1), dtype=bool)
    for c in range(1, num_classes):
        present[:, c - 1] = (flat == c).any(dim=1).numpy()
    return present


def _one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    return one_hot(labels.unsqueeze(1), num_classes=num_classes, dim=1)


def dice_per_class(pred_labels: torch.Tensor, target: torch.Tensor, num_classes: int) -> np.ndarray:
    """Per-case, per-foreground-class Dice, shape ``[B, num_classes - 1]``.

    ``Dice = 2|T∩P| / (|T|+|P|)`` computed by MONAI ``DiceMetric(include_background=False,
    ignore_empty=False, reduction="none")`` on one-hot tensors. Empty-structure rule (see the
    module docstring): target and prediction both empty → 1.0; target empty but class
    predicted → 0.0. Never NaN.
    """
    pred, tgt = _check_labels(pred_labels, target, num_classes)
    metric = DiceMetric(include_background=False, reduction="none", ignore_empty=False)
    scores = metric(_one_hot(pred, num_classes), _one_hot(tgt, num_classes))
    out = scores.detach().to("cpu", torch.float64).numpy().reshape(pred.shape[0], num_classes - 1).copy()
    t_present = _presence(tgt, num_classes)
    p_present = _presence(pred, num_classes)
    out[~t_present & ~p_present] = 1.0
    out[~t_present & p_present] = 0.0
    return out


def mean_dice(pred_labels: torch.Tensor, target: torch.Tensor, num_classes: int) -> float:
    """Mean of :func:`dice_per_class` over all cases and foreground classes (one number per test set).

    Every case and class counts equally; because Dice is never NaN under the empty rule,
    no entry is dropped.
    """
    return float(dice_per_class(pred_labels, target, num_classes).mean())


def hd95_per_class(
    pred_labels: torch.Tensor,
    target: torch.Tensor,
    num_classes: int,
    spacing: float | Sequence[float] | None = None,
) -> np.ndarray:
    """Per-case, per-foreground-class 95th-percentile symmetric Hausdorff distance, ``[B, num_classes - 1]``.

    Computed by MONAI ``compute_hausdorff_distance(percentile=95)`` (the function behind
    ``HausdorffDistanceMetric``) on the pairs where both the target and the prediction hold
    the class; ``spacing`` (voxel size, scalar or one value per spatial axis) turns voxel
    units into physical units (``None`` = unit spacing). Entries where the target or the
    prediction lacks the class are NaN (undefined; see the module docstring) and are not
    handed to MONAI at all, as is any non-finite value MONAI might return.
    """
    pred, tgt = _check_labels(pred_labels, target, num_classes)
    out = np.full((pred.shape[0], num_classes - 1), np.nan, dtype=np.float64)
    defined = _presence(tgt, num_classes) & _presence(pred, num_classes)
    kwargs = {} if spacing is None else {"spacing": spacing}
    for c in range(1, num_classes):
        rows = np.flatnonzero(defined[:, c - 1])
        if not rows.size:
            continue
        sel = torch.from_numpy(rows)
        p_mask = (pred[sel] == c).unsqueeze(1)
        t_mask = (tgt[sel] == c).unsqueeze(1)
        with warnings.catch_warnings():
            # MONAI emits a deprecation notice about its own internal call of get_mask_edges.
            warnings.filterwarnings("ignore", message=r".*always_return_as_numpy.*", category=FutureWarning)
            scores = compute_hausdorff_distance(p_mask, t_mask, include_background=True, percentile=95.0, **kwargs)
        out[rows, c - 1] = scores.detach().to("cpu", torch.float64).numpy().reshape(-1)
    out[~np.isfinite(out)] = np.nan
    return out


def summarise(values: Iterable[float] | np.ndarray | torch.Tensor) -> dict[str, float | int]:
    """Mean over the non-NaN values, with the NaNs counted instead of silently dropped.

    Returns ``{"mean": mean of non-NaN values (NaN if there are none), "n": number of
    non-NaN values, "n_nan": number of NaN values}``. Values of any shape are flattened.
    Only NaN means "missing"; ±inf is kept (and makes the mean infinite).
    """
    if isinstance(values, torch.Tensor):
        arr = values.detach().to("cpu", torch.float64).numpy().ravel()
    else:
        arr = np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype=np.float64).ravel()
    nan = np.isnan(arr)
    n = int((~nan).sum())
    mean = float(arr[~nan].mean()) if n else math.nan
    return {"mean": mean, "n": n, "n_nan": int(nan.sum())}


def predict(
    model: torch.nn.Module,
    images: torch.Tensor | np.ndarray,
    batch_size: int,
    device: str | torch.device,
) -> torch.Tensor:
    """Label maps ``argmax_c model(x)[:, c]`` for ``images`` ``[N, C, *spatial]``, as int64 CPU ``[N, *spatial]``.

    Runs in mini-batches of ``batch_size`` on ``device`` with the model in eval mode (so
    dropout is off and batch norm uses running statistics, making a case's label map
    independent of its batch companions) and without autograd. The model's previous
    train/eval mode is restored afterwards. The model itself is moved to ``device``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    x_all = torch.as_tensor(images)
    if x_all.ndim < 3:
        raise ValueError(f"images must be [N, C, *spatial], got shape {tuple(x_all.shape)}")
    if not x_all.is_floating_point():
        x_all = x_all.float()
    dev = torch.device(device)
    was_training = model.training
    model.to(dev)
    model.eval()
    outs: list[torch.Tensor] = []
    try:
        with torch.no_grad():
            for start in range(0, x_all.shape[0], batch_size):
                x = x_all[start : start + batch_size].to(dev)
                logits = model(x)
                outs.append(torch.argmax(logits, dim=1).to("cpu", torch.int64))
    finally:
        model.train(was_training)
    if not outs:
        return torch.empty((0, *x_all.shape[2:]), dtype=torch.int64)
    return torch.cat(outs, dim=0)

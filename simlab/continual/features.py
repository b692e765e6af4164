"""Shift-detection features: a small vector per image taken at one layer of a member's network.

ODEx scores how far a window of images lies from the data that trained a pool member by a
Mahalanobis distance in a feature space.  This module produces those feature vectors.

Choices
-------
* **Layer.**  By default the *first normalisation layer* of the network (the first
  BatchNorm / InstanceNorm / GroupNorm in ``model.modules()`` order).  For the MONAI
  ``UNet(spatial_dims=2, channels=(16, 32, 64, 128), strides=(2, 2, 2), num_res_units=1,
  norm="batch")`` that is ``model.0.conv.unit0.adn.N`` (``BatchNorm2d(16)``), whose input is
  the output of the first strided convolution ``model.0.conv.unit0.conv``.  Any module path
  from ``model.named_modules()`` may be given instead.
* **The layer's input, not its output.**  The input of the first norm layer is the raw
  response of the first convolution: it reflects intensity, contrast and texture changes
  (scanner, protocol) and does not depend on the norm layer's running statistics, so it is
  the same in train and eval mode and does not drift while the member trains.
* **Reduction** (``FeatureSpec.reduction``) of the activation ``a`` of shape ``[C, *spatial]``:

  - ``"mean_std"`` (default): ``z = [mean_c(a), std_c(a)]`` for c = 1..C, i.e. the C
    per-channel spatial means followed by the C per-channel spatial standard deviations,
    ``d = 2C``.  The standard deviation is the population one (divide by the number of
    voxels, ``correction=0``): it is a descriptive statistic of one image, not an
    estimate.  Means capture brightness / offset shifts, standard deviations contrast
    and texture shifts; ``d = 32`` keeps the covariance well-conditioned with windows of
    a few dozen images.
  - ``"mean"``: the per-channel spatial means only, ``d = C`` (Lee et al. 2018).
  - ``"pooled"``: adaptive average pooling to ``pool_size`` per spatial axis, flattened
    channel-major, ``d = C * pool_size ** n_spatial``; keeps a coarse spatial layout like
    the reference nnU-Net code, at the price of a much larger ``d``.
  - ``"gram"``: the Gram matrix of the channels, ``G = F Fᵀ / N`` with ``F`` the ``C × N``
    activation (N voxels), the "style" statistic of Perkonigg et al. 2021 (dynamic memory,
    Nat. Commun.) that the ODEx paper's Table 2 compares with ("Gram": the Gram distance
    instead of Mahalanobis for both training and testing). ``G`` is symmetric, so the
    vector keeps its upper triangle, row by row, with the off-diagonal entries multiplied
    by √2: then the squared Euclidean distance of two vectors is the squared Frobenius
    distance ``‖G_a − G_b‖²_F`` of the matrices. ``d = C (C + 1) / 2`` (136 for C = 16).
    Scored with ``shift.estimator: identity`` (Σ = I, D² = ‖z − μ‖²) this is the Gram
    distance of an image to the mean Gram matrix of a history entry's window; with a
    covariance estimator it is a Mahalanobis distance on Gram features.

  Reductions are computed in float64 on a detached copy of the activation.  The standard
  deviation is computed in two passes, sqrt(mean((a - mean)^2)), with vectorised sums: it
  agrees with ``torch.std`` (a one-pass Welford loop) to about 1e-15 relative and is about
  ten times faster.  ODEx's scoring (``simlab.continual.odex``) does not reduce activations
  when the layer's input is a plain convolution of the image: it takes ``mean`` and
  ``mean_std`` from the moments of the convolution's input patches instead (same values,
  computed without running the convolution once per history entry).

The extraction itself (a hook on the layer, or patch moments) is ODEx's,
:mod:`simlab.continual.odex_features`; the tests keep a plain forward-hook extractor as the
reference it is checked against.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

__all__ = ["FeatureSpec", "first_norm_layer", "resolve_layer", "reduce_activation"]

_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm{1,2,3}d, SyncBatchNorm, InstanceNorm{1,2,3}d
    nn.GroupNorm,
)


@dataclass(frozen=True)
class FeatureSpec:
    """Where and how the shift-detection feature vector of an image is taken."""

    layer: str = field(
        default="first_norm",
        metadata={"help": "'first_norm' or a module path from model.named_modules(); its INPUT is used"},
    )
    reduction: Literal["mean_std", "mean", "pooled", "gram"] = field(
        default="mean_std",
        metadata={"help": "per-channel spatial mean+std (d=2C), mean (d=C), adaptive avg pool (d=C*p^k) or "
                          "the channels' Gram matrix (d=C(C+1)/2; the Gram detector with shift.estimator: identity)"},
    )
    pool_size: int = field(
        default=4,
        metadata={"ge": 1, "le": 64, "why": "d = C·pool_size² features: at 64 a 64-channel layer gives 262,144 "
                                            "features and a d × d covariance no memory holds",
                  "help": "output size per spatial axis for reduction='pooled'"},
    )

    def check(self) -> list[tuple[str, str]]:
        problems: list[tuple[str, str]] = []
        if not self.layer.strip():
            problems.append(("layer", "must be 'first_norm' or a non-empty module path"))
        return problems


def first_norm_layer(model: nn.Module) -> tuple[str, nn.Module]:
    """Return ``(name, module)`` of the first BatchNorm / InstanceNorm / GroupNorm of ``model``.

    "First" is the order of ``model.named_modules()`` (registration order, which for
    MONAI's UNet is also execution order).  Raises ``ValueError`` if the model has none.
    """
    for name, module in model.named_modules():
        if isinstance(module, _NORM_TYPES):
            return name, module
    raise ValueError(f"{type(model).__name__} has no BatchNorm/InstanceNorm/GroupNorm layer")


def resolve_layer(model: nn.Module, spec: FeatureSpec) -> tuple[str, nn.Module]:
    """Return ``(name, module)`` of the layer named by ``spec.layer``."""
    if spec.layer == "first_norm":
        return first_norm_layer(model)
    modules = dict(model.named_modules())
    if spec.layer not in modules:
        some = ", ".join(list(modules)[1:8])
        raise KeyError(f"no module {spec.layer!r} in {type(model).__name__} (e.g. {some}, ...)")
    return spec.layer, modules[spec.layer]


def reduce_activation(act: torch.Tensor, spec: FeatureSpec) -> torch.Tensor:
    """Reduce a batch of activations ``[B, C, *spatial]`` to features ``[B, d]`` (float64).

    Works on a detached float64 copy, so it never takes part in autograd.
    """
    if act.dim() < 3:
        raise ValueError(f"expected activations [B, C, *spatial], got shape {tuple(act.shape)}")
    a = act.detach().to(torch.float64)
    b, c = a.shape[:2]
    flat = a.reshape(b, c, -1)
    if spec.reduction == "mean":
        return flat.mean(dim=2)
    if spec.reduction == "mean_std":
        mean = flat.mean(dim=2, keepdim=True)
        # (flat - mean) is a new tensor: squaring it in place never touches ``act`` (which ``a`` is,
        # when ``act`` is already float64).
        std = (flat - mean).square_().mean(dim=2).sqrt_()
        return torch.cat([mean[:, :, 0], std], dim=1)
    if spec.reduction == "pooled":
        n_spatial = a.dim() - 2
        pool = {1: nn.functional.adaptive_avg_pool1d, 2: nn.functional.adaptive_avg_pool2d,
                3: nn.functional.adaptive_avg_pool3d}.get(n_spatial)
        if pool is None:
            raise ValueError(f"pooled reduction supports 1-3 spatial axes, got {n_spatial}")
        return pool(a, spec.pool_size).reshape(b, -1)
    if spec.reduction == "gram":
        return gram_vectors(flat)
    raise ValueError(f"unknown reduction {spec.reduction!r}")


def gram_vectors(flat: torch.Tensor) -> torch.Tensor:
    """``[B, C, N]`` activations → ``[B, C(C+1)/2]``: the upper triangle of G = F Fᵀ / N per image,
    off-diagonal entries × √2 (so that squared Euclidean distances are squared Frobenius distances)."""
    c, n = flat.shape[1], flat.shape[2]
    g = torch.einsum("bcn,bdn->bcd", flat, flat) / n
    rows, cols = torch.triu_indices(c, c)
    weight = torch.where(rows == cols, 1.0, 2.0 ** 0.5).to(g.dtype)
    return g[:, rows, cols] * weight

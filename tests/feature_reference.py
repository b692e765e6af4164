"""A plain forward-hook feature extractor: the reference ODEx's features are checked against.

It runs the network (eval mode, no gradients) and reduces the first normalisation layer's input
with :func:`simlab.continual.features.reduce_activation`, which is what
:mod:`simlab.continual.odex_features` computes without running the convolution per history entry.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from simlab.continual.features import FeatureSpec, reduce_activation, resolve_layer


def feature_dim(n_channels: int, spec: FeatureSpec, spatial_dims: int = 2) -> int:
    """Length ``d`` of the feature vector for a layer input with ``n_channels`` channels."""
    if spec.reduction == "mean":
        return n_channels
    if spec.reduction == "mean_std":
        return 2 * n_channels
    return n_channels * spec.pool_size**spatial_dims


class FeatureCollector:
    """Accumulates reduced features of every forward pass through the hooked layer."""

    def __init__(self, spec: FeatureSpec, layer_name: str) -> None:
        self.spec = spec
        self.layer_name = layer_name
        self._chunks: list[torch.Tensor] = []

    def _hook(self, module: nn.Module, args: tuple) -> None:
        # Forward pre-hook: sees the layer's positional inputs; returning None leaves them as is.
        self._chunks.append(reduce_activation(args[0], self.spec).cpu())

    def __len__(self) -> int:
        return sum(int(ch.shape[0]) for ch in self._chunks)

    def features(self) -> np.ndarray:
        """All features captured so far, ``[n, d]`` float64 (``[0, 0]`` if none)."""
        if not self._chunks:
            return np.zeros((0, 0), dtype=np.float64)
        return torch.cat(self._chunks, dim=0).numpy().astype(np.float64, copy=False)

    def clear(self) -> None:
        self._chunks.clear()


@contextlib.contextmanager
def capture_features(model: nn.Module, spec: FeatureSpec) -> Iterator[FeatureCollector]:
    """Record the features of every forward pass run inside the ``with`` block.

    Usable during training: the hook reads a detached copy of the layer's input and changes
    neither the forward values, the autograd graph nor the model's mode.  The hook is removed
    on exit, also when the block raises.
    """
    name, layer = resolve_layer(model, spec)
    collector = FeatureCollector(spec, name)
    handle = layer.register_forward_pre_hook(collector._hook)
    try:
        yield collector
    finally:
        handle.remove()


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def extract_features(
    model: nn.Module,
    images: np.ndarray | torch.Tensor,
    spec: FeatureSpec,
    batch_size: int = 64,
) -> np.ndarray:
    """Features of ``images`` (``[n, C_in, *spatial]``) at ``spec``'s layer, ``[n, d]`` float64.

    Runs the model in eval mode without gradients, in batches of ``batch_size``, on the
    model's device and dtype; restores each submodule's train/eval flag afterwards.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    x_all = torch.as_tensor(images)
    n = int(x_all.shape[0])
    device = _model_device(model)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad(), capture_features(model, spec) as col:
            for start in range(0, n, batch_size):
                model(x_all[start : start + batch_size].to(device=device, dtype=dtype))
        feats = col.features()
    finally:
        for m, was_training in modes.items():
            m.training = was_training
    if n == 0:
        return np.zeros((0, feats.shape[1] if feats.ndim == 2 else 0), dtype=np.float64)
    if feats.shape[0] != n:
        raise RuntimeError(
            f"layer {col.layer_name!r} ran {feats.shape[0]} times for {n} images; "
            "features need a layer that runs once per forward pass"
        )
    return feats

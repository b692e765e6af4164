"""Normalisation layers in a federation: which state entries they own, and AdaBN.

``norm_state_keys``: the ``state_dict`` entries of the network's normalisation layers (BatchNorm,
InstanceNorm, GroupNorm: affine weight and bias; BatchNorm also ``running_mean``, ``running_var`` and
``num_batches_tracked``). ``federation.norm: local`` (FedBN, Li et al. 2021, "FedBN: Federated
Learning on Non-IID Features via Local Batch Normalization") keeps exactly these at each hospital:
they never leave it and are never averaged.

``adapt_batchnorm``: AdaBN (Li et al. 2018, "Adaptive Batch Normalization for practical domain
adaptation"): the running statistics of every BatchNorm layer are replaced by the statistics of the
given images, without labels and without changing any weight. The statistics are PyTorch's
cumulative average over batches (``momentum=None``): with all images in one batch (the evaluation
batch size at least the test-set size) they are the images' own mean and unbiased variance of every
layer's input; with several batches, the mean over the batches of the batch statistics.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm)  # BatchNorm, InstanceNorm, SyncBatchNorm; GroupNorm


def norm_state_keys(model: nn.Module) -> list[str]:
    """The state_dict keys that belong to normalisation layers, in state_dict order."""
    prefixes = [f"{name}." for name, m in model.named_modules() if isinstance(m, _NORMS)]
    return [k for k in model.state_dict() if any(k.startswith(p) and "." not in k[len(p):] for p in prefixes)]


def adapt_batchnorm(model: nn.Module, images: np.ndarray, batch_size: int, device: str) -> nn.Module:
    """A copy of ``model`` whose BatchNorm running statistics are those of ``images`` (AdaBN); every
    other module stays in eval mode (no dropout), no weight changes, no gradient is taken."""
    adapted = copy.deepcopy(model).to(device).eval()
    bns = [m for m in adapted.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
        m.train()
    x = torch.from_numpy(np.ascontiguousarray(images))
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            adapted(x[start : start + batch_size].to(device))
    for m in bns:
        m.eval()
    return adapted

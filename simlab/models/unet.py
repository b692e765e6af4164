"""The segmentation network: a MONAI 2D U-Net with BatchNorm, and its Dice+CE loss.

BatchNorm (not MONAI's default InstanceNorm) because shift detection reads the statistics of the
first normalisation layer's input, and BatchNorm's running statistics are part of what federated
aggregation shares.
"""

from __future__ import annotations

import torch
from monai.losses import DiceCELoss
from monai.networks.nets import UNet

from simlab.scenario.schema import ModelSpec


def build_model(spec: ModelSpec, num_classes: int, in_channels: int = 1) -> torch.nn.Module:
    return UNet(
        spatial_dims=2,
        in_channels=in_channels,
        out_channels=num_classes,
        channels=tuple(spec.channels),
        strides=(2,) * (len(spec.channels) - 1),
        num_res_units=spec.num_res_units,
        norm="batch",
        dropout=spec.dropout,
    )


def build_loss() -> torch.nn.Module:
    """Dice + cross-entropy on softmax outputs against integer labels (one-hot inside)."""
    return DiceCELoss(to_onehot_y=True, softmax=True)


def state_to_numpy(model: torch.nn.Module) -> dict[str, "np.ndarray"]:  # noqa: F821
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def load_numpy_state(model: torch.nn.Module, state: dict) -> None:
    own = model.state_dict()
    model.load_state_dict({k: torch.as_tensor(v).reshape(own[k].shape) if k in own else torch.as_tensor(v)
                           for k, v in state.items()}, strict=True)


def trainable_keys(model: torch.nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}

"""The segmentation network: a MONAI 2D U-Net with BatchNorm, and its Dice+CE loss.

BatchNorm (not MONAI's default InstanceNorm) because shift detection reads the statistics of the
first normalisation layer's input, and BatchNorm's running statistics are part of what federated
aggregation shares.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from monai.losses import DiceCELoss
from monai.networks.nets import UNet


@dataclass(frozen=True)
class ModelSpec:
    """The MONAI U-Net's shape: channels per level (stride 2 between levels), residual units, dropout."""

    channels: list[int] = field(default_factory=lambda: [16, 32, 64, 128])
    num_res_units: int = field(default=1, metadata={"ge": 0})
    dropout: float = field(default=0.0, metadata={"ge": 0.0, "lt": 1.0})

    def check(self):
        if len(self.channels) < 2 or any(c < 1 for c in self.channels):
            return [("channels", f"expected at least 2 positive channel counts, found {self.channels}")]
        return []


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

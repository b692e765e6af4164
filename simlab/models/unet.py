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


MAX_LEVELS = 10
MAX_CHANNELS = 4096


@dataclass(frozen=True)
class ModelSpec:
    """The MONAI U-Net's shape: channels per level (stride 2 between levels), residual units, dropout."""

    channels: list[int] = field(default_factory=lambda: [16, 32, 64, 128], metadata={
        "help": "channels per level, 2 to 10 levels of at most 4096 each; each level after the first halves the "
                "image, so data.image_size must be a multiple of 2^(levels - 1)"})
    num_res_units: int = field(default=1, metadata={"ge": 0, "le": 16, "why": "residual units per level"})
    dropout: float = field(default=0.0, metadata={"ge": 0.0, "lt": 1.0})

    def check(self):
        if not 2 <= len(self.channels) <= MAX_LEVELS or any(not 1 <= c <= MAX_CHANNELS for c in self.channels):
            return [("channels", f"expected 2 to {MAX_LEVELS} channel counts between 1 and {MAX_CHANNELS} (the "
                                  f"network is held in memory on every hospital), found {self.channels}")]
        return []

    @property
    def size_multiple(self) -> int:
        """The input's side must be a multiple of this: each stride-2 level halves it, and the decoder's
        skip connections need the halves to come back to the same size."""
        return 2 ** (len(self.channels) - 1)

    def image_size_problem(self, size: int, smallest: int, largest: int) -> str | None:
        """Why a ``size × size`` input does not fit this network (None when it does), with the sizes in
        ``[smallest, largest]`` nearest to it that do."""
        m = self.size_multiple
        if size % m == 0:
            return None
        why = (f"the U-Net (model.channels: {len(self.channels)} levels) halves the image {len(self.channels) - 1} "
               f"times, so the size must be a multiple of {m}, found {size}")
        near = [n for n in (size // m * m, size // m * m + m) if smallest <= n <= largest]
        if near:
            return why + f"; nearest that work: {' or '.join(map(str, near))}"
        return why + f"; no size in {smallest}..{largest} is, so use fewer levels in model.channels"


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

"""simlab: federated, continual medical image segmentation across drifting hospitals."""

__version__ = "0.1.0"

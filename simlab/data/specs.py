"""The data-side specs a scenario is assembled from: the data source, named domains and hospitals.

Each spec is a frozen dataclass validated by :func:`simlab.config.build` (unknown keys, types, bounds,
``check()``); :mod:`simlab.scenario.schema` only assembles them into a :class:`Scenario`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from simlab.data.appearance import ScannerParams
from simlab.data.drift import DriftSpec
from simlab.data.nifti import NiftiSourceParams
from simlab.data.phantom import PopulationParams


MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 16, 1024


@dataclass(frozen=True)
class DataSpec:
    source: Literal["phantom", "nifti"] = field(
        default="phantom", metadata={"help": "phantom: embedded MNI152 anatomy; nifti: nnU-Net-layout folders"})
    image_size: int = field(default=128, metadata={
        "ge": MIN_IMAGE_SIZE, "le": MAX_IMAGE_SIZE, "why": "images are held in memory as size² float32",
        "help": "2D slice size (pixels); a multiple of 2^(levels - 1) of model.channels (8 for 4 levels)"})
    datasets: dict[str, NiftiSourceParams] = field(
        default_factory=dict, metadata={"help": "nifti source: named datasets that domains refer to"})
    test_case_fraction: float = field(
        default=0.2, metadata={"gt": 0.0, "lt": 1.0,
                               "help": "nifti source: share of each dataset's cases held out for testing"})
    allow_repeat: bool = field(
        default=False, metadata={"help": "nifti source: reuse slices when a hospital's stream runs out"})
    cache_dir: str | None = field(
        default=None, metadata={"help": "generated-data cache (default $SIMLAB_CACHE or ~/.cache/simlab)"})

    def check(self):
        problems = []
        if self.source == "nifti" and not self.datasets:
            problems.append(("datasets", "source 'nifti' needs at least one dataset"))
        return problems


@dataclass(frozen=True)
class DomainSpec:
    scanner: ScannerParams = field(default_factory=ScannerParams)
    population: PopulationParams = field(default_factory=PopulationParams)
    dataset: str | None = field(default=None, metadata={"help": "nifti source: name under data.datasets"})


@dataclass(frozen=True)
class HospitalSpec:
    id: str
    drift: DriftSpec
    size: int = field(default=32, metadata={
        "ge": 1, "le": 100_000, "why": "a window is held in memory: 100,000 images of 128² px take 6.6 GB",
        "help": "training images in each round's window (at most 100,000: a window is held in memory)"})
    label_fraction: float = field(default=1.0, metadata={
        "ge": 0.0, "le": 1.0, "help": "share of window images with labels (at least one image when > 0; 0: a site "
                                      "without labels, which trains only through federation.semi_supervised or "
                                      "not at all)"})
    participates: bool = field(default=True, metadata={
        "help": "false: never sampled for training (nor asked for amplitude blocks); still evaluated, and its "
                "domains still tested"})
    corruption: Literal["none", "swap_labels", "random_labels"] = field(
        default="none",
        metadata={"help": "a broken hospital: swap_labels exchanges the foreground classes (1<->2), "
                          "random_labels draws every pixel's label at random; training labels only"})
    corruption_fraction: float = field(default=1.0, metadata={"ge": 0.0, "le": 1.0,
                                                              "help": "share of training images corrupted"})


def num_classes_of(data: DataSpec) -> int:
    """3 for the phantom; for NIfTI the largest label count over the datasets (after label_map)."""
    if data.source == "phantom":
        return 3
    from simlab.data.nifti import read_dataset_json

    counts = [len(set(ds.label_map.values()) | {0}) if ds.label_map else len(read_dataset_json(ds.root).labels)
              for ds in data.datasets.values()]
    return max(counts)

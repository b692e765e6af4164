"""Real anatomy for the embedded phantom: the MNI ICBM152 2009c template shipped by nilearn.

nilearn ships, inside its package (no download), the symmetric MNI ICBM152 2009 template
(T1 image and grey/white-matter probability maps, 197 x 233 x 189 voxels of 1 mm, values
0-255, skull-stripped). This module reads those three files once and derives everything the
phantom needs:

* ``t1``, ``gm``, ``wm``: float32 volumes scaled to [0, 1] (value / 255).
* ``mask``: the template's brain mask, ``t1 > 0`` (the template is skull-stripped, so every
  voxel of the intracranial volume it keeps has a positive T1 value). ``gm`` and ``wm`` are
  multiplied by it, because the probability maps are smoother than the mask and leak a few
  voxels outside it.
* ``csf = clip(mask - gm - wm, 0, 1)``: everything inside the brain mask that is neither grey
  nor white matter (ventricles, sulci, the rim at the brain surface). With these definitions
  ``csf + gm + wm == mask`` exactly (``gm + wm <= 1`` holds in the template).
* ``z_range``: the axial slices where both tissues are present in meaningful amounts: the hard
  label ``argmax(1 - gm - wm, gm, wm)`` has at least 5 % of its largest per-slice area of grey
  matter *and* of white matter (slices 25-146, 122 slices).
* ``t1_means``: the T1 value of each pure tissue under the partial-volume mixture model
  ``t1 ~ sum_c p_c * mu_c``, fitted by least squares over the brain mask (about 0.28, 0.66,
  0.88 for csf, gm, wm; the residual has a standard deviation of about 0.024, the template's
  "texture"). The phantom uses them to update T1 where atrophy moves tissue, the appearance
  model to separate texture from the tissue mixture. (Probability-weighted means would be
  biased by partial volume, e.g. the CSF rim at the brain surface.)

Array orientation: the NIfTI arrays are RAS+ with an identity affine (axis 0 = x, left to right;
axis 1 = y, posterior to anterior; axis 2 = z, inferior to superior). :func:`axial_stack`
returns axial slices as images whose rows run anterior (top) to posterior and whose columns
run along x (neurological convention).

The MNI ICBM152 template is Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging
Centre, Montreal Neurological Institute, McGill University; its terms allow use, copying and
distribution provided this copyright notice is kept.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TEMPLATE_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
"""Template files read from ``nilearn/datasets/data/``."""

VOXEL_MM = 1.0
"""Isotropic voxel size of the template in millimetres."""

MIN_TISSUE_SHARE = 0.05
"""A slice belongs to ``z_range`` when its GM and WM label areas each reach this share of their
largest per-slice area."""

CHANNELS = ("csf", "gm", "wm", "t1")
"""Channel order of :func:`axial_stack`."""


@dataclass(frozen=True, eq=False)
class Anatomy:
    """The template volumes (float32, shape ``(197, 233, 189)``, x/y/z) and derived facts."""

    t1: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    mask: np.ndarray
    z_range: tuple[int, int]
    """First and last axial index (inclusive) holding both tissues in meaningful amounts."""
    t1_means: tuple[float, float, float]
    """T1 value of pure csf, gm and wm under the least-squares partial-volume mixture model."""

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.t1.shape)  # type: ignore[return-value]


def template_dir() -> Path:
    """Folder of nilearn's packaged data files (located without importing nilearn)."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the embedded phantom needs the MNI152 template shipped by the 'nilearn' package, "
            "which is not installed (pip install nilearn)"
        )
    return Path(spec.origin).parent / "datasets" / "data"


def _read(name: str) -> np.ndarray:
    from simlab.data.nifti import read_nifti  # the one verified NIfTI reader

    path = template_dir() / TEMPLATE_FILES[name]
    if not path.is_file():
        raise FileNotFoundError(
            f"MNI152 template file '{TEMPLATE_FILES[name]}' not found in nilearn's data folder "
            f"({path.parent}); reinstall nilearn (>= 0.10) to restore it"
        )
    return np.asarray(read_nifti(path).dataobj, dtype=np.float32) / np.float32(255.0)


@functools.lru_cache(maxsize=1)
def load_mni() -> Anatomy:
    """Load the MNI152 2009 template and tissue maps (cached; about 0.3 s the first time)."""
    t1 = _read("t1")
    mask = (t1 > 0).astype(np.float32)
    gm = _read("gm") * mask
    wm = _read("wm") * mask
    csf = np.clip(mask - gm - wm, 0.0, 1.0)

    bg = 1.0 - gm - wm  # argmax(bg, gm, wm) by comparisons, first class on ties
    gm_area = ((gm > bg) & (gm >= wm)).sum(axis=(0, 1))
    wm_area = ((wm > bg) & (wm > gm)).sum(axis=(0, 1))
    ok = np.flatnonzero(
        (gm_area >= MIN_TISSUE_SHARE * gm_area.max()) & (wm_area >= MIN_TISSUE_SHARE * wm_area.max())
    )
    z_range = (int(ok.min()), int(ok.max()))

    inside = mask > 0
    design = np.stack([csf[inside], gm[inside], wm[inside]], axis=1).astype(np.float64)
    fit = np.linalg.solve(design.T @ design, design.T @ t1[inside].astype(np.float64))
    means = tuple(float(v) for v in fit)
    for a in (t1, gm, wm, csf, mask):
        a.setflags(write=False)
    return Anatomy(t1=t1, gm=gm, wm=wm, csf=csf, mask=mask, z_range=z_range, t1_means=means)  # type: ignore[arg-type]


def axial_plane(volume: np.ndarray, z: int) -> np.ndarray:
    """Axial slice ``z`` as an image: rows anterior to posterior, columns along x."""
    return np.ascontiguousarray(volume[:, :, z].T[::-1])


@functools.lru_cache(maxsize=4)
def axial_stack(size: int) -> np.ndarray:
    """The ``z_range`` slices of (csf, gm, wm, t1), resampled to ``size x size``.

    Each 233 x 197 axial plane is zero-padded symmetrically along x to a 233 x 233 square
    (keeps the aspect ratio and centres the brain), then area-averaged to ``size x size``
    (``torch.nn.functional.adaptive_avg_pool2d``: no aliasing when shrinking and, being linear
    with weights summing to one, it keeps ``csf + gm + wm = mask`` and the probabilities in
    [0, 1]). Returns float32 ``[n_slices, 4, size, size]``, read-only; one pixel spans
    ``233 / size`` mm.
    """
    import torch
    import torch.nn.functional as F

    if size < 8:
        raise ValueError(f"size must be at least 8, got {size}")
    anat = load_mni()
    z0, z1 = anat.z_range
    vols = [anat.csf, anat.gm, anat.wm, anat.t1]
    sub = np.stack([v[:, :, z0 : z1 + 1] for v in vols])  # [4, X, Y, Z]
    planes = np.transpose(sub, (3, 0, 2, 1))[:, :, ::-1, :]  # [Z, 4, Y (anterior first), X]
    ny, nx = planes.shape[2], planes.shape[3]
    side = max(ny, nx)
    py, px = side - ny, side - nx
    planes = np.pad(planes, ((0, 0), (0, 0), (py // 2, py - py // 2), (px // 2, px - px // 2)))
    out = F.adaptive_avg_pool2d(torch.from_numpy(np.ascontiguousarray(planes)), (size, size))
    arr = out.numpy().astype(np.float32, copy=False)
    arr.setflags(write=False)
    return arr


def template_side_mm() -> float:
    """Side of the padded square axial plane, in millimetres (233 mm)."""
    x, y, _ = load_mni().shape
    return max(x, y) * VOXEL_MM

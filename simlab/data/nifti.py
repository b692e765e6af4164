"""User NIfTI datasets in the nnU-Net v2 raw / Medical Segmentation Decathlon layout.

A dataset is a folder ``ROOT`` holding::

    ROOT/dataset.json
    ROOT/imagesTr/<case>_0000.nii.gz   (nnU-Net v2: one file per channel, suffix _0000, _0001 ...)
    ROOT/labelsTr/<case>.nii.gz

Two ``dataset.json`` flavours are understood:

* **nnU-Net v2** (has ``channel_names``): ``channel_names`` {"0": "T2", ...}, ``labels``
  {name: int} (a region entry {name: [int, ...]} is accepted; its values count as declared),
  ``numTraining`` and ``file_ending``. Cases are the identifiers found in ``imagesTr``
  (``<case>_XXXX<file_ending>``) and ``labelsTr`` (``<case><file_ending>``), or the optional
  ``dataset`` key {case: {"images": [...], "label": ...}} when present (paths relative to ROOT).
* **Decathlon** (has ``modality``): ``modality`` {"0": "MRI"}, ``labels`` {"0": name},
  ``training`` [{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}]; a
  multi-channel image is one 4D file whose last axis is the channel.

Reading. Files are read with nibabel only (NIfTI-1 and NIfTI-2, ``.nii`` or ``.nii.gz``). A
gzip file is decompressed completely with the standard ``gzip`` module before nibabel parses the
bytes: nibabel on its own stops after the bytes the header asks for, never reaches the gzip
CRC/length trailer, and so accepts a corrupted or tail-truncated file silently. Every failure
becomes a :class:`NiftiDataError` whose message starts with the offending file's path.

Geometry. Image and label are reoriented to the closest RAS+ canonical orientation
(``nibabel.as_closest_canonical``: axis permutations and flips only, no resampling), then
their shapes must be equal and their affines equal within ``atol = 1e-3``. Comparing after
reorientation accepts a label stored in another orientation of the same voxel grid (it is the
same data in world space) and rejects anything that would need resampling.

From volumes to 2D training slices (:func:`load_slices`): per-volume robust intensity
normalisation (:func:`normalise_volume`), optional label remapping, slicing along one axis
with a foreground rule (:func:`slice_case`), padding each slice to a square and resizing it
to ``size × size``. In-plane voxel spacing is not corrected: pixels are treated as square,
as in most 2D slice pipelines; slice along the axis that has isotropic in-plane spacing.

This module knows nothing about Flower.
"""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from simlab.data.nifti_dataset import Case, DatasetInfo, NiftiDataError, _err, list_cases, read_dataset_json

__all__ = [
    "AFFINE_ATOL",
    "Case",
    "DatasetInfo",
    "NiftiDataError",
    "NiftiSourceParams",
    "SliceSet",
    "list_cases",
    "load_case",
    "load_slices",
    "normalise_volume",
    "read_dataset_json",
    "read_nifti",
    "resize_slices",
    "slice_case",
]

AFFINE_ATOL = 1e-3
"""Absolute tolerance for image/label affine equality (mm, and unitless for direction terms)."""

_PERCENTILES = (0.5, 99.5)


# ---------------------------------------------------------------------------------------------
# Reading volumes
# ---------------------------------------------------------------------------------------------


def read_nifti(path: str | Path) -> nib.Nifti1Image | nib.Nifti2Image:
    """Read a NIfTI-1/2 file fully into memory and verify it.

    ``.gz`` files are decompressed completely with :mod:`gzip` (checking CRC and length, so a
    truncated or corrupted file is caught) and parsed from the bytes by nibabel; the voxel
    data are read once here so that a short data block fails now, with the path in the message.
    """
    path = Path(path)
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as fh:
                raw = fh.read()
        else:
            raw = path.read_bytes()
    except FileNotFoundError:
        raise _err(path, "file not found") from None
    except (OSError, EOFError, zlib.error) as exc:
        raise _err(path, f"unreadable or corrupt file ({type(exc).__name__}: {exc})") from exc
    if len(raw) < 4:
        raise _err(path, "not a NIfTI file (too short)")
    sizeof_hdr = {int.from_bytes(raw[:4], "little"), int.from_bytes(raw[:4], "big")}
    if 348 in sizeof_hdr:
        klass = nib.Nifti1Image
    elif 540 in sizeof_hdr:
        klass = nib.Nifti2Image
    else:
        raise _err(path, "not a NIfTI-1/NIfTI-2 file (bad header size)")
    try:
        img = klass.from_bytes(raw)
        data = np.asanyarray(img.dataobj)
    except (OSError, EOFError, ValueError, TypeError, nib.spatialimages.HeaderDataError, nib.filebasedimages.ImageFileError) as exc:
        raise _err(path, f"invalid NIfTI content ({type(exc).__name__}: {exc})") from exc
    return klass(data, img.affine, img.header)


def _spatial(data: np.ndarray, path: Path, what: str) -> np.ndarray:
    """Drop trailing singleton axes beyond the third; require 3 spatial axes."""
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise _err(path, f"{what} must be a 3D volume, got shape {tuple(data.shape)}")
    return data


def load_case(case: Case, info: DatasetInfo, channel: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Load one case as ``(image float32 [X,Y,Z], label [X,Y,Z])`` in RAS+ canonical orientation.

    ``channel`` picks the channel file (nnU-Net v2) or the index on the last axis of a 4D image
    (Decathlon). Checks, each raising :class:`NiftiDataError` naming the file: readable file
    (see :func:`read_nifti`), finite image values, equal image/label shapes and affines
    (``atol = 1e-3``) after reorientation, integer label values, and label values ⊂ declared
    labels. The label comes back as ``uint8`` when its values fit, else ``int32``.
    """
    n_channels = len(info.channel_names)
    if not 0 <= channel < n_channels:
        key = "channel_names" if info.flavour == "nnunetv2" else "modality"
        raise _err(info.json_path, f"channel {channel} requested but key '{key}' declares {n_channels} channel(s)")
    if len(case.images) > 1:
        image_path, index = case.images[channel], None
    else:
        image_path, index = case.images[0], (channel if n_channels > 1 else None)

    img = nib.as_closest_canonical(read_nifti(image_path))
    lab = nib.as_closest_canonical(read_nifti(case.label))

    data = np.asanyarray(img.dataobj)
    if index is not None:
        if data.ndim != 4 or data.shape[3] != n_channels:
            raise _err(image_path, f"expected a 4D image with {n_channels} channels on the last axis, got shape {tuple(data.shape)}")
        data = data[..., index]
    image = _spatial(data, image_path, "image").astype(np.float32)
    label_raw = _spatial(np.asanyarray(lab.dataobj), case.label, "label")

    if image.shape != label_raw.shape:
        raise _err(case.label, f"label shape {label_raw.shape} != image shape {image.shape} of {image_path.name} (after RAS+ reorientation)")
    if not np.allclose(img.affine, lab.affine, atol=AFFINE_ATOL, rtol=0.0):
        diff = float(np.max(np.abs(img.affine - lab.affine)))
        raise _err(case.label, f"label affine differs from the affine of {image_path.name} (max |difference| {diff:.3g} > {AFFINE_ATOL})")
    n_bad = int(np.size(image) - np.count_nonzero(np.isfinite(image)))
    if n_bad:
        raise _err(image_path, f"{n_bad} non-finite voxel value(s) (NaN/inf)")

    if not np.issubdtype(label_raw.dtype, np.integer):
        if not np.all(np.isfinite(label_raw)) or np.any(label_raw != np.round(label_raw)):
            raise _err(case.label, "label holds non-integer values")
    found = np.unique(label_raw).astype(np.int64)
    undeclared = sorted(set(found.tolist()) - set(info.label_values))
    if undeclared:
        raise _err(case.label, f"label values {undeclared} not declared in {info.json_path.name} 'labels' (declared {list(info.label_values)})")
    dtype = np.uint8 if found.size == 0 or (found.min() >= 0 and found.max() <= 255) else np.int32
    return image, label_raw.astype(dtype)


# ---------------------------------------------------------------------------------------------
# Normalisation, slicing, resizing
# ---------------------------------------------------------------------------------------------


def normalise_volume(image: np.ndarray, label: np.ndarray | None = None) -> np.ndarray:
    """Robust per-volume intensity scaling to [0, 1].

    ``lo, hi`` = the 0.5th and 99.5th percentiles (linear interpolation) of the statistics
    voxels, and ``out = clip((image - lo) / (hi - lo), 0, 1)`` as float32. The statistics voxels
    are the nonzero voxels — zero is taken as the padding/background of skull-stripped or
    cropped scans — together with the foreground (``label > 0``) voxels when ``label`` is given,
    so a structure that is exactly 0 in intensity still counts. Percentiles rather than
    min/max make the scale insensitive to a few hot or dark voxels. Degenerate cases: no
    statistics voxel → all zeros; ``hi - lo`` ≤ 1e-12·max(1, |hi|) (a constant volume) → 1 on
    the statistics voxels, 0 elsewhere.
    """
    image = np.asarray(image)
    mask = image != 0
    if label is not None:
        label = np.asarray(label)
        if label.shape != image.shape:
            raise ValueError(f"label shape {label.shape} != image shape {image.shape}")
        mask |= label > 0
    if not mask.any():
        return np.zeros(image.shape, dtype=np.float32)
    vals = image[mask].astype(np.float64)
    lo, hi = np.percentile(vals, _PERCENTILES)
    if hi - lo <= 1e-12 * max(1.0, abs(hi)):
        return mask.astype(np.float32)
    out = (image.astype(np.float64) - lo) / (hi - lo)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def slice_case(
    image: np.ndarray, label: np.ndarray, axis: int = 2, min_foreground: float = 0.01
) -> tuple[np.ndarray, np.ndarray]:
    """2D slices along ``axis`` that pass the foreground rule.

    Foreground rule: slice ``i`` is kept when its foreground fraction
    ``mean(label_slice > 0)`` (over all H·W pixels of the slice) is ``>= min_foreground``.
    ``min_foreground = 0`` keeps every slice, empty ones included. Slices come back in
    increasing index order as ``images [k,H,W]`` and ``labels [k,H,W]``, where H, W are the
    remaining axes in their original order (for ``axis=2`` on RAS+ data: H = x (R), W = y (A)).
    """
    idx = _kept_indices(label, axis, min_foreground, image.shape)
    images = np.ascontiguousarray(np.moveaxis(image, axis, 0)[idx])
    labels = np.ascontiguousarray(np.moveaxis(label, axis, 0)[idx])
    return images, labels


def _kept_indices(label: np.ndarray, axis: int, min_foreground: float, image_shape: tuple[int, ...]) -> np.ndarray:
    if label.ndim != 3 or tuple(image_shape) != label.shape:
        raise ValueError(f"image {tuple(image_shape)} and label {label.shape} must be equal 3D shapes")
    if axis not in (0, 1, 2):
        raise ValueError(f"axis must be 0, 1 or 2, got {axis}")
    if not 0.0 <= min_foreground <= 1.0:
        raise ValueError(f"min_foreground must be in [0, 1], got {min_foreground}")
    other = tuple(a for a in range(3) if a != axis)
    frac = (label > 0).mean(axis=other)
    return np.flatnonzero(frac >= min_foreground)


def resize_slices(images: np.ndarray, labels: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pad ``[k,H,W]`` slices to a square with zeros (centred), then resize to ``size × size``.

    Zero padding is background for both (normalised intensity 0, label 0); the extra pixel of an
    odd difference goes after. Images: bilinear, ``align_corners=False``, with antialiasing
    (a triangle filter widened by the scale factor when shrinking; identical to plain bilinear
    when enlarging), clipped back to [0, 1]. Labels: nearest neighbour at pixel centres
    (torch ``nearest-exact``: source index ``floor((i + 0.5)·S/size)``), so no label value is
    invented. Returns float32 ``[k,size,size]`` and labels with the input dtype.
    """
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    k, h, w = images.shape
    s = max(h, w)
    ph, pw = s - h, s - w
    pad = ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2))
    images = np.pad(images.astype(np.float32, copy=False), pad)
    labels = np.pad(labels, pad)
    if s == size or k == 0:
        if k == 0:
            return np.zeros((0, size, size), np.float32), np.zeros((0, size, size), labels.dtype)
        return images, labels
    ti = torch.from_numpy(np.ascontiguousarray(images))[:, None]
    out_i = F.interpolate(ti, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    tl = torch.from_numpy(labels.astype(np.float32))[:, None]
    out_l = F.interpolate(tl, size=(size, size), mode="nearest-exact")
    img = np.clip(out_i[:, 0].numpy(), 0.0, 1.0).astype(np.float32)
    lab = np.rint(out_l[:, 0].numpy()).astype(labels.dtype)
    return img, lab


@dataclass(frozen=True, eq=False)
class SliceSet:
    """2D slices from a NIfTI dataset.

    ``images`` float32 ``[n,1,size,size]`` in [0, 1]; ``labels`` uint8 ``[n,size,size]``;
    ``case_of_slice[i]`` the case id of slice i (split train/test by case, never by slice);
    ``slice_index[i]`` its index along the slicing axis of the RAS+ volume.
    """

    images: np.ndarray
    labels: np.ndarray
    case_of_slice: list[str]
    slice_index: np.ndarray

    def __len__(self) -> int:
        return int(self.images.shape[0])


def _apply_label_map(label: np.ndarray, label_map: dict[int, int]) -> np.ndarray:
    out = label.astype(np.int64, copy=True)
    for src, dst in label_map.items():
        out[label == src] = dst
    return out


def _select_cases(root: Path, by_id: dict, cases: list[str] | None) -> list[str]:
    if cases is None:
        return list(by_id)
    unknown = [c for c in cases if c not in by_id]
    if unknown:
        raise _err(root, f"unknown case id(s) {unknown}; the dataset has {len(by_id)} case(s), e.g. {list(by_id)[:5]}")
    if len(set(cases)) != len(cases):
        dup = sorted({c for c in cases if cases.count(c) > 1})
        raise _err(root, f"case id(s) {dup} requested more than once")
    return list(cases)


def _check_label_map(info: DatasetInfo, label_map: dict[int, int] | None) -> None:
    if not label_map:
        return
    bad_keys = sorted(k for k in label_map if k not in info.label_values)
    if bad_keys:
        raise _err(info.json_path, f"label_map keys {bad_keys} are not declared in 'labels' (declared {list(info.label_values)})")
    bad_vals = sorted(v for v in label_map.values() if not 0 <= v <= 255)
    if bad_vals:
        raise ValueError(f"label_map values must be in 0..255, got {bad_vals}")


def load_slices(
    root: str | Path,
    cases: list[str] | None,
    size: int,
    axis: int = 2,
    min_foreground: float = 0.01,
    channel: int = 0,
    label_map: dict[int, int] | None = None,
) -> SliceSet:
    """Read cases (all when ``cases`` is None, else in the given order) into 2D slices.

    Per case: :func:`load_case` → :func:`normalise_volume` (with the label) → label remapping →
    :func:`slice_case` → :func:`resize_slices`. ``label_map`` maps source label values to new
    ones (e.g. ``{2: 1}`` merges class 2 into 1, ``{3: 0}`` drops class 3); values absent from
    the map are kept. Its keys must be declared labels and its values in 0..255. The foreground
    rule applies to the remapped labels, i.e. to what the model will be trained on. Unknown
    case ids raise :class:`NiftiDataError` naming ``root`` and the case.
    """
    root = Path(root)
    info = read_dataset_json(root)
    by_id = {c.case_id: c for c in list_cases(root, info)}
    selected = _select_cases(root, by_id, cases)
    _check_label_map(info, label_map)
    imgs: list[np.ndarray] = []
    labs: list[np.ndarray] = []
    owners: list[str] = []
    indices: list[np.ndarray] = []
    for cid in selected:
        case = by_id[cid]
        image, label = load_case(case, info, channel=channel)
        image = normalise_volume(image, label)
        if label_map:
            label = _apply_label_map(label, label_map)
        if label.size and (label.min() < 0 or label.max() > 255):
            raise _err(case.label, "label values outside 0..255 cannot be stored as uint8; remap them with label_map")
        idx = _kept_indices(label, axis, min_foreground, image.shape)
        s_img, s_lab = slice_case(image, label, axis=axis, min_foreground=min_foreground)
        r_img, r_lab = resize_slices(s_img, s_lab.astype(np.uint8), size)
        imgs.append(r_img)
        labs.append(r_lab)
        owners.extend([cid] * len(idx))
        indices.append(idx)
    if imgs:
        images = np.concatenate(imgs)[:, None]
        labels = np.concatenate(labs).astype(np.uint8)
        slice_index = np.concatenate(indices).astype(np.int64)
    else:
        images = np.zeros((0, 1, size, size), np.float32)
        labels = np.zeros((0, size, size), np.uint8)
        slice_index = np.zeros(0, np.int64)
    return SliceSet(images=images.astype(np.float32, copy=False), labels=labels, case_of_slice=owners, slice_index=slice_index)


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NiftiSourceParams:
    """Where a hospital's NIfTI data lives and how it becomes 2D slices.

    ``label_map`` keys are source label values written as strings, because YAML/JSON mapping
    keys are read as strings in scenario files ({"2": 1} maps label 2 to 1); use
    :meth:`label_map_int` to get the integer mapping :func:`load_slices` takes.
    """

    root: str = field(default="", metadata={"help": "dataset folder holding dataset.json, imagesTr/, labelsTr/"})
    cases: list[str] | None = field(default=None, metadata={"help": "case ids to use; null = all cases"})
    axis: int = field(default=2, metadata={"ge": 0, "le": 2, "help": "slicing axis of the RAS+ volume (2 = axial)"})
    min_foreground: float = field(
        default=0.01, metadata={"ge": 0.0, "le": 1.0, "help": "keep slices whose fraction of label>0 pixels is at least this"}
    )
    channel: int = field(default=0, metadata={"ge": 0, "help": "image channel (nnU-Net _XXXX suffix / Decathlon 4th axis)"})
    label_map: dict[str, int] | None = field(
        default=None, metadata={"help": "source label value (as string) -> new label value (0..255); unlisted kept"}
    )

    def check(self) -> list[tuple[str, str]]:
        problems: list[tuple[str, str]] = []
        if not self.root.strip():
            problems.append(("root", "must name the dataset folder (holding dataset.json)"))
        if self.cases is not None:
            if not self.cases:
                problems.append(("cases", "empty list selects no case; use null for all cases"))
            elif len(set(self.cases)) != len(self.cases):
                problems.append(("cases", "lists a case id more than once"))
        if self.label_map is not None:
            for k, v in self.label_map.items():
                try:
                    int(k)
                except (TypeError, ValueError):
                    problems.append(("label_map", f"key {k!r} is not an integer label value"))
                if not 0 <= v <= 255:
                    problems.append(("label_map", f"value {v} for key {k!r} must be in 0..255"))
        return problems

    def file_problems(self) -> list[tuple[str, str]]:
        """What can be checked without reading a volume (``simlab validate`` and before a run): the root
        folder, its ``dataset.json``, the case files it implies, the selected cases and the label map's
        keys; (key, message) pairs, each message starting with the file concerned."""
        root = Path(self.root)
        if not root.is_dir():
            return [("root", f"{root}: {'not a folder' if root.exists() else 'folder not found'}")]
        try:
            info = read_dataset_json(root)
            by_id = {c.case_id: c for c in list_cases(root, info)}
        except NiftiDataError as exc:
            return [("root", str(exc))]
        if not by_id:
            return [("root", f"{root}: no case found (dataset.json and imagesTr/labelsTr list none)")]
        problems = []
        for key, check in (("cases", lambda: _select_cases(root, by_id, self.cases)),
                           ("label_map", lambda: _check_label_map(info, self.label_map_int()))):
            try:
                check()
            except (NiftiDataError, ValueError) as exc:
                problems.append((key, str(exc)))
        return problems

    def label_map_int(self) -> dict[int, int] | None:
        """``label_map`` with integer keys (None when unset)."""
        return None if self.label_map is None else {int(k): int(v) for k, v in self.label_map.items()}

    def load(self, size: int) -> SliceSet:
        """:func:`load_slices` with these parameters at ``size × size``."""
        return load_slices(
            self.root,
            self.cases,
            size,
            axis=self.axis,
            min_foreground=self.min_foreground,
            channel=self.channel,
            label_map=self.label_map_int(),
        )

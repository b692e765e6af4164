"""Tests for simlab.data.nifti: tiny nnU-Net v2 / Decathlon datasets written with nibabel."""

from __future__ import annotations

import dataclasses
import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from simlab.data.nifti import (
    NiftiDataError,
    NiftiSourceParams,
    list_cases,
    load_case,
    load_slices,
    normalise_volume,
    read_dataset_json,
    read_nifti,
    resize_slices,
    slice_case,
)

SHAPE = (16, 16, 8)
AFF = np.diag([1.0, 1.0, 2.0, 1.0])
LABELS_V2 = {"background": 0, "a": 1, "b": 2}


def _save(arr: np.ndarray, path: Path, affine: np.ndarray = AFF) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr, affine), str(path))


def _volume(seed: int, n_channels: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    vol = rng.uniform(10.0, 200.0, size=SHAPE + (n_channels,)).astype(np.float32)
    vol[:2] = 0.0  # a zero border (background)
    return vol if n_channels > 1 else vol[..., 0]


def _label(fg_pixels_per_slice: dict[int, int], value: int = 1, alternate: bool = False) -> np.ndarray:
    """Label whose axial slice z has exactly ``n`` foreground pixels, from x = 4 on (n <= 192).

    With ``alternate`` the foreground pixels of each slice take classes 1, 2, 1, 2, ...
    """
    lab = np.zeros(SHAPE, np.uint8)
    for z, n in fg_pixels_per_slice.items():
        flat = np.zeros(SHAPE[0] * SHAPE[1], np.uint8)
        start = 4 * SHAPE[1] if n <= 192 else 0
        flat[start : start + n] = 1 + np.arange(n) % 2 if alternate else value
        lab[:, :, z] = flat.reshape(SHAPE[:2])
    return lab


# 1% of a 16x16 slice is 2.56 pixels: 3 pixels pass, 2 fail.
FG = {
    "case_a": {1: 3, 2: 2, 5: 40},
    "case_b": {0: 256, 7: 2},
    "case_c": {3: 3, 4: 3},
}
KEPT = {"case_a": [1, 5], "case_b": [0], "case_c": [3, 4]}


def make_v2(root: Path, n_channels: int = 1, fg: dict | None = None, **json_overrides) -> dict:
    """Write an nnU-Net v2 dataset; return {case: (channels list, label)}."""
    fg = FG if fg is None else fg
    written = {}
    for i, (cid, spec) in enumerate(sorted(fg.items())):
        lab = _label(spec, alternate=True)
        chans = [_volume(10 * i + c) for c in range(n_channels)]
        for c, vol in enumerate(chans):
            _save(vol, root / "imagesTr" / f"{cid}_{c:04d}.nii.gz")
        _save(lab, root / "labelsTr" / f"{cid}.nii.gz")
        written[cid] = (chans, lab)
    meta = {
        "channel_names": {str(c): f"mod{c}" for c in range(n_channels)},
        "labels": LABELS_V2,
        "numTraining": len(fg),
        "file_ending": ".nii.gz",
        "name": "Tiny",
    }
    meta.update(json_overrides)
    meta = {k: v for k, v in meta.items() if v is not None}
    (root / "dataset.json").write_text(json.dumps(meta))
    return written


def make_decathlon(root: Path, n_channels: int = 2) -> dict:
    written = {}
    training = []
    for i, (cid, spec) in enumerate(sorted(FG.items())):
        lab = _label(spec, value=1)
        vol = _volume(100 + i, n_channels)
        _save(vol, root / "imagesTr" / f"{cid}.nii.gz")
        _save(lab, root / "labelsTr" / f"{cid}.nii.gz")
        training.append({"image": f"./imagesTr/{cid}.nii.gz", "label": f"./labelsTr/{cid}.nii.gz"})
        written[cid] = (vol, lab)
    # a macOS resource-fork file, as found in the original Decathlon archives
    (root / "imagesTr" / "._case_a.nii.gz").write_bytes(b"\x00\x05\x16\x07junk")
    meta = {
        "name": "Tiny Decathlon",
        "modality": {str(c): f"MR{c}" for c in range(n_channels)},
        "labels": {"0": "background", "1": "structure"},
        "numTraining": len(training),
        "training": training,
        "test": [],
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    return written


# ------------------------------------------------------------------ dataset.json and cases


def test_read_v2_dataset_json(tmp_path):
    make_v2(tmp_path, n_channels=2)
    (tmp_path / "imagesTr" / "._case_a_0000.nii.gz").write_bytes(b"junk")  # hidden: ignored
    info = read_dataset_json(tmp_path)
    assert info.flavour == "nnunetv2"
    assert info.labels == LABELS_V2
    assert info.label_values == (0, 1, 2)
    assert info.channel_names == ("mod0", "mod1")
    assert info.file_ending == ".nii.gz"
    assert info.case_ids == ("case_a", "case_b", "case_c")
    cases = list_cases(tmp_path, info)
    assert [c.case_id for c in cases] == ["case_a", "case_b", "case_c"]
    assert [p.name for p in cases[1].images] == ["case_b_0000.nii.gz", "case_b_0001.nii.gz"]
    assert cases[1].label.name == "case_b.nii.gz"


def test_read_decathlon_dataset_json_and_4d_channels(tmp_path):
    written = make_decathlon(tmp_path, n_channels=2)
    info = read_dataset_json(tmp_path)
    assert info.flavour == "decathlon"
    assert info.labels == {"background": 0, "structure": 1}
    assert info.channel_names == ("MR0", "MR1")
    assert info.case_ids == ("case_a", "case_b", "case_c")
    cases = list_cases(tmp_path, info)
    for ch in (0, 1):
        img, lab = load_case(cases[0], info, channel=ch)
        np.testing.assert_array_equal(img, written["case_a"][0][..., ch])
        np.testing.assert_array_equal(lab, written["case_a"][1])
    with pytest.raises(NiftiDataError, match=r"dataset\.json.*modality"):
        load_case(cases[0], info, channel=2)


def test_v2_region_labels_and_dataset_key(tmp_path):
    make_v2(tmp_path, labels={"background": 0, "a": 1, "b": 2, "whole": [1, 2]})
    meta = json.loads((tmp_path / "dataset.json").read_text())
    # explicit file list (nnU-Net v2 'dataset' key); only two cases listed
    meta["dataset"] = {
        c: {"images": [f"imagesTr/{c}_0000.nii.gz"], "label": f"labelsTr/{c}.nii.gz"} for c in ("case_c", "case_a")
    }
    meta["numTraining"] = 2
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    info = read_dataset_json(tmp_path)
    assert info.labels == LABELS_V2  # the region entry is not a plain label
    assert info.label_values == (0, 1, 2)
    assert [c.case_id for c in list_cases(tmp_path, info)] == ["case_a", "case_c"]


# ------------------------------------------------------------------ slicing and normalisation


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_slice_case_matches_loop_reference(axis):
    rng = np.random.default_rng(3)
    image = rng.normal(size=(6, 7, 5)).astype(np.float32)
    label = (rng.random((6, 7, 5)) < 0.08).astype(np.uint8)
    thr = 0.06
    imgs, labs = slice_case(image, label, axis=axis, min_foreground=thr)
    ref_i, ref_l = [], []
    for i in range(image.shape[axis]):
        sl_l = np.take(label, i, axis=axis)
        if np.count_nonzero(sl_l) / sl_l.size >= thr:
            ref_i.append(np.take(image, i, axis=axis))
            ref_l.append(sl_l)
    assert 0 < len(ref_i) < image.shape[axis]  # the threshold actually separates slices
    np.testing.assert_array_equal(imgs, np.stack(ref_i))
    np.testing.assert_array_equal(labs, np.stack(ref_l))


def test_slice_case_foreground_rule_boundaries():
    lab = _label({1: 3, 2: 2, 5: 40})
    img = np.arange(lab.size, dtype=np.float32).reshape(lab.shape)
    imgs, labs = slice_case(img, lab, axis=2, min_foreground=0.01)
    np.testing.assert_array_equal(imgs, np.moveaxis(img[:, :, [1, 5]], 2, 0))
    assert labs.shape == (2, 16, 16) and [int(s.sum()) for s in labs] == [3, 40]
    assert slice_case(img, lab, axis=2, min_foreground=0.0)[0].shape[0] == 8  # keeps empties
    assert slice_case(img, lab, axis=2, min_foreground=3 / 256)[0].shape[0] == 2  # >= inclusive
    assert slice_case(img, lab, axis=2, min_foreground=1.0)[0].shape[0] == 0
    with pytest.raises(ValueError):
        slice_case(img, lab, axis=3)


def test_normalise_volume_percentiles_and_range():
    rng = np.random.default_rng(1)
    vol = np.zeros((20, 20, 20), np.float32)
    vol[5:15, 5:15, 5:15] = rng.gamma(2.0, 50.0, size=(10, 10, 10))
    vol[6, 6, 6] = 1e6  # one hot voxel must not set the scale
    out = normalise_volume(vol)
    assert out.dtype == np.float32 and out.min() == 0.0 and out.max() == 1.0
    vals = np.sort(vol[vol != 0].astype(np.float64))
    n = vals.size
    # percentile by hand (linear interpolation between order statistics)
    def pct(q):
        pos = q / 100 * (n - 1)
        lo_i = int(np.floor(pos))
        return vals[lo_i] + (pos - lo_i) * (vals[min(lo_i + 1, n - 1)] - vals[lo_i])
    lo, hi = pct(0.5), pct(99.5)
    ref = np.clip((vol.astype(np.float64) - lo) / (hi - lo), 0, 1)
    np.testing.assert_allclose(out, ref, atol=1e-6)
    assert np.all(out[vol == 0] == 0.0)
    assert 0.004 < np.mean(out[vol != 0] == 1.0) < 0.007  # ~0.5% clipped on top
    np.testing.assert_allclose(normalise_volume(vol * 7.5), out, atol=1e-6)  # scale invariant


def test_normalise_volume_label_and_degenerate_cases():
    assert not normalise_volume(np.zeros((3, 3, 3))).any()
    const = np.zeros((4, 4, 4), np.float32)
    const[1:3] = 5.0
    np.testing.assert_array_equal(normalise_volume(const), (const != 0).astype(np.float32))
    # a labelled structure at intensity 0 joins the statistics and lowers the 0.5th percentile
    vol = np.zeros((10, 10, 10), np.float32)
    vol[2:8] = np.linspace(100, 200, 600).reshape(6, 10, 10)
    lab = np.zeros(vol.shape, np.uint8)
    lab[0] = 1
    without = normalise_volume(vol)
    with_lab = normalise_volume(vol, lab)
    vals = np.concatenate([vol[vol != 0], np.zeros(100)])
    lo, hi = np.percentile(vals, [0.5, 99.5])
    np.testing.assert_allclose(with_lab, np.clip((vol - lo) / (hi - lo), 0, 1), atol=1e-6)
    assert with_lab[4, 0, 0] > without[4, 0, 0]


def _bilinear_reference(img: np.ndarray, size: int) -> np.ndarray:
    """align_corners=False bilinear upsampling written from the definition."""
    s = img.shape[0]
    coords = np.clip((np.arange(size) + 0.5) * s / size - 0.5, 0, s - 1)
    i0 = np.floor(coords).astype(int)
    i1 = np.minimum(i0 + 1, s - 1)
    t = coords - i0
    rows = img[i0] * (1 - t)[:, None] + img[i1] * t[:, None]
    return rows[:, i0] * (1 - t)[None, :] + rows[:, i1] * t[None, :]


def _triangle_weights(src: int, dst: int) -> np.ndarray:
    """Row i: weights of source pixels for output pixel i, triangle of half-width src/dst."""
    scale = src / dst
    centres = (np.arange(dst) + 0.5) * scale
    w = np.maximum(0.0, 1.0 - np.abs(np.arange(src)[None, :] + 0.5 - centres[:, None]) / scale)
    return w / w.sum(axis=1, keepdims=True)


def test_resize_slices_pad_and_interpolation():
    rng = np.random.default_rng(5)
    imgs = rng.random((2, 6, 4)).astype(np.float32)
    labs = rng.integers(0, 3, size=(2, 6, 4)).astype(np.uint8)
    # no resize: only centred zero padding of the short axis (4 -> 6: one column each side)
    p_i, p_l = resize_slices(imgs, labs, 6)
    np.testing.assert_array_equal(p_i[:, :, 1:5], imgs)
    assert not p_i[:, :, [0, 5]].any() and not p_l[:, :, [0, 5]].any()
    # enlarge 6 -> 15
    r_i, r_l = resize_slices(imgs, labs, 15)
    assert r_i.shape == (2, 15, 15) and r_i.dtype == np.float32 and r_l.dtype == np.uint8
    padded = np.pad(imgs, ((0, 0), (0, 0), (1, 1)))
    np.testing.assert_allclose(r_i[1], _bilinear_reference(padded[1], 15), atol=1e-5)
    src = np.floor((np.arange(15) + 0.5) * 6 / 15).astype(int)
    np.testing.assert_array_equal(r_l, np.pad(labs, ((0, 0), (0, 0), (1, 1)))[:, src][:, :, src])
    # shrink 40 -> 13: antialiased bilinear = separable triangle filter of half-width 40/13
    big_i = rng.random((1, 40, 40)).astype(np.float32)
    big_l = rng.integers(0, 3, size=(1, 40, 40)).astype(np.uint8)
    s_i, s_l = resize_slices(big_i, big_l, 13)
    weights = _triangle_weights(40, 13)
    np.testing.assert_allclose(s_i[0], weights @ big_i[0] @ weights.T, atol=1e-5)
    assert s_i.min() >= 0 and s_i.max() <= 1 and set(np.unique(s_l)) <= {0, 1, 2}


# ------------------------------------------------------------------ load_slices end to end


def test_load_slices_v2_selected_slices(tmp_path):
    written = make_v2(tmp_path)
    ss = load_slices(tmp_path, None, size=16)
    assert ss.images.shape == (5, 1, 16, 16) and ss.images.dtype == np.float32
    assert ss.labels.shape == (5, 16, 16) and ss.labels.dtype == np.uint8
    assert ss.case_of_slice == ["case_a", "case_a", "case_b", "case_c", "case_c"]
    assert ss.slice_index.tolist() == KEPT["case_a"] + KEPT["case_b"] + KEPT["case_c"]
    assert len(ss) == 5
    vol, lab = written["case_a"][0][0], written["case_a"][1]
    norm = normalise_volume(vol, lab)
    np.testing.assert_array_equal(ss.images[1, 0], norm[:, :, 5])  # no resize at size 16
    np.testing.assert_array_equal(ss.labels[1], lab[:, :, 5])
    assert ss.images.min() >= 0 and ss.images.max() <= 1
    # a chosen subset in the caller's order, resized
    sub = load_slices(tmp_path, ["case_c", "case_b"], size=8)
    assert sub.case_of_slice == ["case_c", "case_c", "case_b"]
    assert sub.images.shape == (3, 1, 8, 8)
    assert set(np.unique(sub.labels)) <= {0, 1, 2}


def test_load_slices_label_map_and_foreground_after_remap(tmp_path):
    make_v2(tmp_path, fg={"only": {2: 40, 3: 6}})
    full = load_slices(tmp_path, None, size=16)
    assert set(np.unique(full.labels)) == {0, 1, 2}
    merged = load_slices(tmp_path, None, size=16, label_map={2: 1})
    np.testing.assert_array_equal(merged.labels, np.minimum(full.labels, 1))
    # dropping class 1 halves the foreground: slice 2 (40 -> 20 px) passes, slice 3 (6 -> 3 px) not
    dropped = load_slices(tmp_path, None, size=16, label_map={1: 0}, min_foreground=4 / 256)
    assert dropped.slice_index.tolist() == [2]
    assert set(np.unique(dropped.labels)) == {0, 2}
    with pytest.raises(NiftiDataError, match="label_map"):
        load_slices(tmp_path, None, size=16, label_map={7: 1})


def test_load_slices_axis_and_channel(tmp_path):
    written = make_v2(tmp_path, n_channels=2, fg={"x": {4: 256}})
    ss = load_slices(tmp_path, None, size=16, axis=0, min_foreground=0.0, channel=1)
    assert ss.images.shape == (16, 1, 16, 16)  # 16 sagittal slices of 16x8, padded to 16x16
    vol, lab = written["x"][0][1], written["x"][1]
    norm = normalise_volume(vol, lab)
    np.testing.assert_array_equal(ss.images[7, 0, :, 4:12], norm[7])
    assert not ss.images[:, :, :, :4].any()


def test_reorientation_to_ras(tmp_path):
    """An LPS-stored case comes back flipped on x and y; a label stored RAS on the same grid fits."""
    lps = np.diag([-1.0, -1.0, 2.0, 1.0])
    lps[:3, 3] = [15.0, 15.0, 0.0]  # voxel (15,15,z) of LPS storage sits at world (0,0,2z)
    vol = _volume(0)
    lab = _label({3: 50})
    _save(vol, tmp_path / "imagesTr" / "c_0000.nii.gz", affine=lps)
    ras_lab = lab[::-1, ::-1, :].copy()
    ras_aff = np.diag([1.0, 1.0, 2.0, 1.0])
    _save(ras_lab, tmp_path / "labelsTr" / "c.nii.gz", affine=ras_aff)
    (tmp_path / "dataset.json").write_text(
        json.dumps({"channel_names": {"0": "T1"}, "labels": {"background": 0, "x": 1}, "numTraining": 1, "file_ending": ".nii.gz"})
    )
    info = read_dataset_json(tmp_path)
    img, lab_out = load_case(list_cases(tmp_path, info)[0], info)
    np.testing.assert_array_equal(img, vol[::-1, ::-1, :])
    np.testing.assert_array_equal(lab_out, ras_lab)


def test_uncompressed_nii_and_params(tmp_path):
    vol, lab = _volume(0), _label({2: 10})
    _save(vol, tmp_path / "imagesTr" / "p_0000.nii")
    _save(lab, tmp_path / "labelsTr" / "p.nii")
    (tmp_path / "dataset.json").write_text(
        json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0, "x": 1}, "numTraining": 1, "file_ending": ".nii"})
    )
    params = NiftiSourceParams(root=str(tmp_path), label_map={"1": 3})
    assert params.check() == []
    ss = params.load(size=16)
    assert ss.slice_index.tolist() == [2] and set(np.unique(ss.labels)) == {0, 3}


# ------------------------------------------------------------------ corruptions


def _load_all(root: Path):
    info = read_dataset_json(root)
    for case in list_cases(root, info):
        load_case(case, info)


def test_shape_mismatch_names_label(tmp_path):
    make_v2(tmp_path)
    _save(np.zeros((16, 16, 7), np.uint8), tmp_path / "labelsTr" / "case_b.nii.gz")
    with pytest.raises(NiftiDataError, match=r"case_b\.nii\.gz.*shape"):
        _load_all(tmp_path)


def test_affine_mismatch_names_label(tmp_path):
    make_v2(tmp_path)
    aff = AFF.copy()
    aff[0, 3] = 0.01  # 10 micrometres: over the 1e-3 tolerance
    _save(_label({1: 3}), tmp_path / "labelsTr" / "case_c.nii.gz", affine=aff)
    with pytest.raises(NiftiDataError, match=r"case_c\.nii\.gz.*affine"):
        _load_all(tmp_path)
    aff[0, 3] = 5e-4  # within tolerance
    _save(_label({1: 3}), tmp_path / "labelsTr" / "case_c.nii.gz", affine=aff)
    _load_all(tmp_path)


@pytest.mark.parametrize("cut", ["half", "trailer"])
def test_truncated_gzip_names_file(tmp_path, cut):
    make_v2(tmp_path)
    path = tmp_path / "imagesTr" / "case_a_0000.nii.gz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if cut == "half" else data[:-3])
    with pytest.raises(NiftiDataError, match=r"case_a_0000\.nii\.gz") as exc:
        _load_all(tmp_path)
    assert "corrupt" in str(exc.value)


def test_corrupted_gzip_crc_and_garbage(tmp_path):
    make_v2(tmp_path)
    path = tmp_path / "labelsTr" / "case_b.nii.gz"
    raw = gzip.decompress(path.read_bytes())
    blob = bytearray(gzip.compress(raw))
    blob[-8] ^= 0xFF  # wrong CRC32 in the trailer
    path.write_bytes(bytes(blob))
    with pytest.raises(NiftiDataError, match=r"case_b\.nii\.gz"):
        _load_all(tmp_path)
    path.write_bytes(b"definitely not gzip")
    with pytest.raises(NiftiDataError, match=r"case_b\.nii\.gz"):
        read_nifti(path)
    path.write_bytes(gzip.compress(raw[:400]))  # valid gzip, NIfTI data block cut short
    with pytest.raises(NiftiDataError, match=r"case_b\.nii\.gz.*invalid NIfTI"):
        read_nifti(path)


def test_undeclared_label_value_names_label(tmp_path):
    make_v2(tmp_path)
    lab = _label({1: 3})
    lab[0, 0, 0] = 5
    _save(lab, tmp_path / "labelsTr" / "case_a.nii.gz")
    with pytest.raises(NiftiDataError, match=r"case_a\.nii\.gz.*\[5\]"):
        _load_all(tmp_path)


def test_non_integer_label_names_label(tmp_path):
    make_v2(tmp_path)
    lab = _label({1: 3}).astype(np.float32)
    lab[0, 0, 0] = 0.5
    _save(lab, tmp_path / "labelsTr" / "case_a.nii.gz")
    with pytest.raises(NiftiDataError, match=r"case_a\.nii\.gz.*non-integer"):
        _load_all(tmp_path)


def test_missing_label_and_missing_image(tmp_path):
    make_v2(tmp_path)
    (tmp_path / "labelsTr" / "case_b.nii.gz").unlink()
    with pytest.raises(NiftiDataError, match=r"case_b\.nii\.gz") as exc:
        list_cases(tmp_path, read_dataset_json(tmp_path))
    assert "without label" in str(exc.value)
    make_v2(tmp_path)
    (tmp_path / "imagesTr" / "case_c_0000.nii.gz").unlink()
    with pytest.raises(NiftiDataError, match=r"case_c.*without image"):
        list_cases(tmp_path, read_dataset_json(tmp_path))


def test_missing_channel_file(tmp_path):
    make_v2(tmp_path, n_channels=2)
    (tmp_path / "imagesTr" / "case_a_0001.nii.gz").unlink()
    with pytest.raises(NiftiDataError, match=r"case_a_0001\.nii\.gz"):
        list_cases(tmp_path, read_dataset_json(tmp_path))


def test_decathlon_missing_label_file(tmp_path):
    make_decathlon(tmp_path)
    (tmp_path / "labelsTr" / "case_c.nii.gz").unlink()
    with pytest.raises(NiftiDataError, match=r"case_c\.nii\.gz.*not found"):
        list_cases(tmp_path, read_dataset_json(tmp_path))


@pytest.mark.parametrize("key", ["labels", "numTraining", "file_ending"])
def test_missing_v2_key(tmp_path, key):
    make_v2(tmp_path, **{key: None})
    with pytest.raises(NiftiDataError, match=rf"dataset\.json.*'{key}'"):
        read_dataset_json(tmp_path)


@pytest.mark.parametrize("key", ["training", "labels"])
def test_missing_decathlon_key(tmp_path, key):
    make_decathlon(tmp_path)
    meta = json.loads((tmp_path / "dataset.json").read_text())
    del meta[key]
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(NiftiDataError, match=rf"dataset\.json.*'{key}'"):
        read_dataset_json(tmp_path)


def test_dataset_json_other_problems(tmp_path):
    with pytest.raises(NiftiDataError, match=r"dataset\.json.*not found"):
        read_dataset_json(tmp_path)
    (tmp_path / "dataset.json").write_text("{not json")
    with pytest.raises(NiftiDataError, match=r"dataset\.json.*JSON"):
        read_dataset_json(tmp_path)
    make_v2(tmp_path, labels={"a": 1, "b": 2})
    with pytest.raises(NiftiDataError, match=r"dataset\.json.*background"):
        read_dataset_json(tmp_path)
    make_v2(tmp_path, file_ending=".png")
    with pytest.raises(NiftiDataError, match=r"dataset\.json.*file_ending"):
        read_dataset_json(tmp_path)
    make_v2(tmp_path, numTraining=4)
    with pytest.raises(NiftiDataError, match=r"dataset\.json.*numTraining.*3 case"):
        list_cases(tmp_path, read_dataset_json(tmp_path))
    make_v2(tmp_path, channel_names=None)
    with pytest.raises(NiftiDataError, match=r"dataset\.json.*channel_names"):
        read_dataset_json(tmp_path)


def test_image_without_channel_suffix(tmp_path):
    make_v2(tmp_path)
    _save(_volume(0), tmp_path / "imagesTr" / "stray.nii.gz")
    with pytest.raises(NiftiDataError, match=r"stray\.nii\.gz.*_XXXX"):
        read_dataset_json(tmp_path)


def test_unknown_case_names_root_and_case(tmp_path):
    make_v2(tmp_path)
    with pytest.raises(NiftiDataError) as exc:
        load_slices(tmp_path, ["case_a", "case_zz"], size=8)
    assert str(tmp_path) in str(exc.value) and "case_zz" in str(exc.value)


# ------------------------------------------------------------------ configuration


def test_params_convention_and_check():
    p = NiftiSourceParams()
    assert [f.name for f in dataclasses.fields(p)] == ["root", "cases", "axis", "min_foreground", "channel", "label_map"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.root = "x"  # type: ignore[misc]
    meta = {f.name: f.metadata for f in dataclasses.fields(p)}
    assert (meta["axis"]["ge"], meta["axis"]["le"]) == (0, 2)
    assert (meta["min_foreground"]["ge"], meta["min_foreground"]["le"]) == (0.0, 1.0)
    assert all("help" in m for m in meta.values())
    assert [name for name, _ in p.check()] == ["root"]
    bad = NiftiSourceParams(root="d", cases=[], label_map={"x": 1, "2": 300})
    assert sorted(name for name, _ in bad.check()) == ["cases", "label_map", "label_map"]
    ok = NiftiSourceParams(root="d", cases=["a"], label_map={"2": 1})
    assert ok.check() == [] and ok.label_map_int() == {2: 1}
    assert NiftiSourceParams(root="d").label_map_int() is None

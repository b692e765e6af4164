"""Embedded phantom: MNI152 anatomy, patient model, and the generate() entry points."""

from __future__ import annotations

import dataclasses
import typing

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from simlab.data import anatomy, phantom
from simlab.data.anatomy import axial_plane, axial_stack, load_mni
from simlab.data.appearance import ScannerParams
from simlab.data.phantom import (
    Patients,
    PopulationParams,
    generate,
    generate_interpolated,
    interpolate,
    make_patients,
)

SIZE = 64


def _template_slice(size: int, z: int) -> np.ndarray:
    """(csf, gm, wm, t1) of template slice ``z`` at ``size``, computed independently of
    axial_stack: numpy transpose/flip of the x-y plane, explicit symmetric pad, torch pool."""
    anat = load_mni()
    planes = np.stack([v[:, :, z].T[::-1] for v in (anat.csf, anat.gm, anat.wm, anat.t1)])
    ny, nx = planes.shape[1:]
    pad = ny - nx
    planes = np.pad(planes, ((0, 0), (0, 0), (pad // 2, pad - pad // 2)))
    return F.adaptive_avg_pool2d(torch.from_numpy(np.ascontiguousarray(planes)), size).numpy()


def _csf(p: Patients) -> np.ndarray:
    return p.mask - p.tissue[:, 1] - p.tissue[:, 2]


# --------------------------------------------------------------------------- anatomy


def test_load_mni_volumes_and_extent():
    a = load_mni()
    assert a is load_mni()  # cached
    assert a.shape == (197, 233, 189)
    for v in (a.t1, a.gm, a.wm, a.csf, a.mask):
        assert v.dtype == np.float32 and v.shape == a.shape
        assert v.min() >= 0.0 and v.max() <= 1.0
    np.testing.assert_allclose(a.csf + a.gm + a.wm, a.mask, atol=1e-6)
    assert set(np.unique(a.mask)) == {0.0, 1.0}
    assert np.all(a.gm[a.mask == 0] == 0) and np.all(a.wm[a.mask == 0] == 0)
    z0, z1 = a.z_range
    assert 100 <= z1 - z0 + 1 <= 140  # about 120 axial slices hold both tissues
    # both tissues really are present at the ends of the extent, and not far outside it
    for z in (z0, z1):
        assert (a.gm[:, :, z] > 0.5).sum() > 200 and (a.wm[:, :, z] > 0.5).sum() > 50
    assert (a.wm[:, :, z1 + 15] > 0.5).sum() < 0.05 * (a.wm > 0.5).sum(axis=(0, 1)).max()
    # pure-tissue T1 under the mixture model: CSF dark, GM grey, WM bright (T1-weighted)
    csf, gm, wm = a.t1_means
    assert 0.15 < csf < gm < wm < 1.0
    inside = a.mask > 0
    model = a.csf * csf + a.gm * gm + a.wm * wm
    assert np.std((a.t1 - model)[inside]) < 0.05 < np.std(a.t1[inside])


def test_missing_template_file_names_the_file(monkeypatch, tmp_path):
    monkeypatch.setattr(anatomy, "template_dir", lambda: tmp_path)
    load_mni.cache_clear()
    try:
        with pytest.raises(FileNotFoundError, match="mni_icbm152_t1_tal_nlin_sym_09a_converted"):
            load_mni()
    finally:
        monkeypatch.undo()
        load_mni.cache_clear()
    assert load_mni().shape == (197, 233, 189)


def test_axial_stack_matches_independent_resampling():
    a = load_mni()
    stack = axial_stack(SIZE)
    z0, z1 = a.z_range
    assert stack.shape == (z1 - z0 + 1, 4, SIZE, SIZE) and stack.dtype == np.float32
    for k in (0, 40, len(stack) - 1):
        np.testing.assert_allclose(stack[k], _template_slice(SIZE, z0 + k), atol=1e-6)
    # orientation: rows run anterior (top) to posterior; the frontal pole is at the top,
    # and the template is centred left-right
    plane = axial_plane(a.gm, 90)
    assert plane.shape == (233, 197)
    for r in (40, 120, 200):  # row r holds y = 232 - r (RAS: y grows towards anterior)
        np.testing.assert_array_equal(plane[r], a.gm[:, 232 - r, 90])
    brain = stack[60, 1] + stack[60, 2]
    cols = np.nonzero(brain.sum(axis=0) > 0.1)[0]
    assert abs((cols[0] + cols[-1]) / 2 - (SIZE - 1) / 2) <= 1.5


# --------------------------------------------------------------------------- config


def test_population_params_convention_and_check():
    hints = typing.get_type_hints(PopulationParams)
    for f in dataclasses.fields(PopulationParams):
        assert f.default is not dataclasses.MISSING, f.name
        assert set(f.metadata) <= {"ge", "gt", "le", "lt", "help"} and f.metadata.get("help"), f.name
        assert f.name in hints
    assert PopulationParams.__dataclass_params__.frozen
    assert PopulationParams().check() == []
    assert [k for k, _ in PopulationParams(slices=(0.8, 0.2)).check()] == ["slices"]
    assert [k for k, _ in PopulationParams(atrophy=(0.0, 1.5)).check()] == ["atrophy"]
    assert [k for k, _ in PopulationParams(slices=(-0.1, 0.5), atrophy=(0.6, 0.5)).check()] == [
        "slices",
        "atrophy",
    ]
    with pytest.raises(ValueError, match="slices"):
        make_patients(PopulationParams(slices=(0.9, 0.1)), 2, SIZE, np.random.default_rng(0))


def test_interpolate_population():
    a = PopulationParams(slices=(0.2, 0.4), atrophy=(0.0, 0.2), elastic=0.0, flip=False)
    b = PopulationParams(slices=(0.6, 0.8), atrophy=(0.6, 1.0), elastic=2.0, flip=True)
    assert interpolate(a, b, 0.0) == a
    assert interpolate(a, b, 1.0) == b
    m = interpolate(a, b, 0.25)
    np.testing.assert_allclose(m.slices, (0.3, 0.5))
    np.testing.assert_allclose(m.atrophy, (0.15, 0.4))
    assert m.elastic == pytest.approx(0.5) and m.flip is False
    assert interpolate(a, b, 0.5).flip is True
    assert m.check() == []
    with pytest.raises(ValueError):
        interpolate(a, b, 1.5)
    with pytest.raises(TypeError):
        interpolate(a, ScannerParams(), 0.5)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- patients


@pytest.fixture(scope="module")
def patients() -> Patients:
    return make_patients(PopulationParams(atrophy=(0.0, 1.0)), 48, SIZE, np.random.default_rng(7))


def test_patients_shapes_probabilities_and_labels(patients):
    p = patients
    n = 48
    assert len(p) == n
    assert p.tissue.shape == (n, 3, SIZE, SIZE) and p.tissue.dtype == np.float32
    assert p.t1.shape == (n, 1, SIZE, SIZE) and p.t1.dtype == np.float32
    assert p.labels.shape == (n, SIZE, SIZE) and p.labels.dtype == np.uint8
    assert p.mask.shape == (n, SIZE, SIZE) and p.mask.dtype == np.float32
    assert p.tissue.min() >= 0.0 and p.tissue.max() <= 1.0
    np.testing.assert_allclose(p.tissue.sum(axis=1), 1.0, atol=1e-5)
    assert set(np.unique(p.labels)) == {0, 1, 2}
    np.testing.assert_array_equal(p.labels, np.argmax(p.tissue, axis=1))
    # class 0 and zero T1 outside the brain; every slice holds GM and WM
    outside = p.mask == 0
    assert outside.any() and np.all(p.labels[outside] == 0) and np.all(p.t1[:, 0][outside] == 0)
    brain = (p.mask > 0.5).sum(axis=(1, 2))
    for c in (1, 2):
        assert np.all((p.labels == c).sum(axis=(1, 2)) >= phantom.MIN_CLASS_SHARE * brain)
    assert np.all(_csf(p) > -1e-5)
    # the patients differ: slice positions, atrophy and flips are drawn
    lo, hi = PopulationParams().slices
    assert np.all((p.slice_pos >= lo) & (p.slice_pos <= hi)) and np.ptp(p.slice_pos) > 0.2
    assert np.all((p.atrophy >= 0.0) & (p.atrophy <= 1.0)) and np.ptp(p.atrophy) > 0.5
    assert 0 < p.flipped.sum() < n


def test_patients_deterministic(patients):
    again = make_patients(PopulationParams(atrophy=(0.0, 1.0)), 48, SIZE, np.random.default_rng(7))
    for f in ("tissue", "t1", "labels", "mask", "slice_pos"):
        np.testing.assert_array_equal(getattr(again, f), getattr(patients, f))
    other = make_patients(PopulationParams(atrophy=(0.0, 1.0)), 48, SIZE, np.random.default_rng(8))
    assert not np.array_equal(other.labels, patients.labels)


def test_undeformed_patient_is_the_template_slice():
    pos = 0.5
    pop = PopulationParams(slices=(pos, pos), elastic=0.0, flip=False)
    p = make_patients(pop, 2, SIZE, np.random.default_rng(0))
    z0, z1 = load_mni().z_range
    zf = z0 + pos * (z1 - z0)
    k = int(np.floor(zf))
    w = zf - k
    ref = (1 - w) * _template_slice(SIZE, k) + w * _template_slice(SIZE, k + 1)
    for i in range(2):
        np.testing.assert_allclose(p.tissue[i, 1], ref[1], atol=1e-5)
        np.testing.assert_allclose(p.tissue[i, 2], ref[2], atol=1e-5)
        np.testing.assert_allclose(p.t1[i, 0], ref[3], atol=1e-5)
        np.testing.assert_allclose(p.mask[i], ref[0] + ref[1] + ref[2], atol=1e-5)


def test_flip_mirrors_left_right():
    pop = PopulationParams(atrophy=(0.0, 1.0), elastic=1.0, flip=True)
    p = make_patients(pop, 16, SIZE, np.random.default_rng(3))
    q = make_patients(dataclasses.replace(pop, flip=False), 16, SIZE, np.random.default_rng(3))
    assert 0 < p.flipped.sum() < 16 and not q.flipped.any()
    np.testing.assert_array_equal(p.tissue[~p.flipped], q.tissue[~p.flipped])
    np.testing.assert_allclose(p.tissue[p.flipped], q.tissue[p.flipped][..., ::-1], atol=1e-6)
    np.testing.assert_array_equal(p.labels[p.flipped], q.labels[p.flipped][..., ::-1])
    # deformed slices are not left-right symmetric, so the flip is visible
    assert np.mean(q.labels[p.flipped] != p.labels[p.flipped]) > 0.02


def test_elastic_deformation_changes_shape_but_keeps_tissue_amounts():
    fixed = PopulationParams(slices=(0.5, 0.5), flip=False)
    rigid = make_patients(dataclasses.replace(fixed, elastic=0.0), 8, SIZE, np.random.default_rng(1))
    soft = make_patients(fixed, 8, SIZE, np.random.default_rng(1))
    strong = make_patients(dataclasses.replace(fixed, elastic=2.0), 8, SIZE, np.random.default_rng(1))
    d1 = np.mean(rigid.labels != soft.labels)
    d2 = np.mean(rigid.labels != strong.labels)
    assert 0.02 < d1 < d2 < 0.5
    for c in (1, 2):
        a0 = (rigid.labels == c).sum(axis=(1, 2)).mean()
        assert abs((soft.labels == c).sum(axis=(1, 2)).mean() / a0 - 1) < 0.2
    # one deformation moves every map: T1 and tissue stay consistent (WM bright in T1)
    wm = soft.labels == 2
    gm = soft.labels == 1
    assert soft.t1[:, 0][wm].mean() > soft.t1[:, 0][gm].mean() + 0.1


def test_atrophy_thins_grey_matter_and_grows_csf_monotonically():
    levels = (0.0, 0.5, 1.0)
    pats = [
        make_patients(PopulationParams(atrophy=(a, a)), 24, SIZE, np.random.default_rng(11)) for a in levels
    ]
    gm = [p.tissue[:, 1].mean() for p in pats]
    wm = [p.tissue[:, 2].mean() for p in pats]
    csf = [_csf(p).mean() for p in pats]
    gm_lab = [(p.labels == 1).mean() for p in pats]
    csf_lab = [((p.labels == 0) & (p.mask > 0.5)).mean() for p in pats]
    assert gm[0] > gm[1] > gm[2] and gm[2] < 0.9 * gm[0]
    assert csf[0] < csf[1] < csf[2] and csf[2] > 1.4 * csf[0]
    assert gm_lab[0] > gm_lab[1] > gm_lab[2]
    assert csf_lab[0] < csf_lab[1] < csf_lab[2]
    # white matter loses less than grey matter
    assert (wm[0] - wm[2]) / wm[0] < 0.5 * (gm[0] - gm[2]) / gm[0]
    # same draws apart from atrophy: same slice and deformation, so the intracranial volume
    # is untouched and the three probabilities still sum to it
    for p in pats[1:]:
        np.testing.assert_allclose(p.mask, pats[0].mask, atol=1e-5)
        np.testing.assert_array_equal(p.slice_pos, pats[0].slice_pos)
    # ventricles (CSF far from the brain's edge) enlarge too
    from scipy import ndimage

    def deep_csf(p: Patients) -> float:
        core = ndimage.binary_erosion(p.mask > 0.5, iterations=6, structure=np.ones((1, 3, 3)))
        return float(((p.labels == 0) & core).sum())

    assert deep_csf(pats[0]) < deep_csf(pats[1]) < deep_csf(pats[2])
    # T1 follows the tissue: where tissue turned to CSF, T1 got darker
    drop = pats[0].t1 - pats[2].t1
    assert drop.mean() > 0 and drop.min() > -1e-4


def test_slices_range_selects_axial_level():
    low = make_patients(PopulationParams(slices=(0.0, 0.1), elastic=0.0), 6, SIZE, np.random.default_rng(0))
    mid = make_patients(PopulationParams(slices=(0.45, 0.55), elastic=0.0), 6, SIZE, np.random.default_rng(0))
    # inferior slices (cerebellum, temporal lobes) are GM-rich; mid-level slices are WM-rich
    ratio = lambda p: (p.labels == 2).sum() / (p.labels == 1).sum()  # noqa: E731
    assert ratio(low) < 0.6 * ratio(mid)


def test_redraw_guarantees_class_share_or_raises(monkeypatch):
    monkeypatch.setattr(phantom, "MIN_CLASS_SHARE", 0.35)
    p = make_patients(PopulationParams(slices=(0.0, 1.0)), 24, SIZE, np.random.default_rng(0))
    brain = (p.mask > 0.5).sum(axis=(1, 2))
    for c in (1, 2):
        assert np.all((p.labels == c).sum(axis=(1, 2)) >= 0.35 * brain)
    monkeypatch.setattr(phantom, "MIN_CLASS_SHARE", 0.9)
    monkeypatch.setattr(phantom, "MAX_REDRAWS", 3)
    with pytest.raises(ValueError, match="grey and white matter"):
        make_patients(PopulationParams(), 4, SIZE, np.random.default_rng(0))


# --------------------------------------------------------------------------- generate


def test_generate_shapes_range_and_determinism():
    pop, scan = PopulationParams(atrophy=(0.0, 0.5)), ScannerParams(bias_field=0.2, noise=0.03)
    x, y = generate(pop, scan, 6, SIZE, seed=5)
    assert x.shape == (6, 1, SIZE, SIZE) and x.dtype == np.float32
    assert y.shape == (6, SIZE, SIZE) and y.dtype == np.uint8
    assert x.min() >= 0.0 and x.max() <= 1.0
    assert x[:, 0][y == 0].mean() < x[:, 0][y == 2].mean()
    x2, y2 = generate(pop, scan, 6, SIZE, seed=5)
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, y2)
    x3, y3 = generate(pop, scan, 6, SIZE, seed=6)
    assert not np.array_equal(x, x3) and not np.array_equal(y, y3)
    # anatomy depends only on the seed: another scanner sees the same patients
    x4, y4 = generate(pop, ScannerParams(contrast="inverted"), 6, SIZE, seed=5)
    np.testing.assert_array_equal(y, y4)
    assert np.abs(x4 - x).mean() > 0.1
    with pytest.raises(ValueError, match="intensity_scale"):
        generate(pop, ScannerParams(intensity_scale=(2.0, 1.0)), 2, SIZE, seed=0)


def test_generate_interpolated_endpoints_and_midpoint():
    pa, sa = PopulationParams(atrophy=(0.0, 0.0)), ScannerParams(noise=0.02)
    pb, sb = PopulationParams(atrophy=(1.0, 1.0)), ScannerParams(contrast="inverted", noise=0.06)
    for t, (p, s) in ((0.0, (pa, sa)), (1.0, (pb, sb))):
        xi, yi = generate_interpolated(pa, sa, pb, sb, t, 4, SIZE, seed=3)
        x, y = generate(p, s, 4, SIZE, seed=3)
        np.testing.assert_array_equal(xi, x)
        np.testing.assert_array_equal(yi, y)
    xm, ym = generate_interpolated(pa, sa, pb, sb, 0.5, 4, SIZE, seed=3)
    x0, y0 = generate(pa, sa, 4, SIZE, seed=3)
    x1, y1 = generate(pb, sb, 4, SIZE, seed=3)
    gm = [(y == 1).mean() for y in (y0, ym, y1)]
    assert gm[0] > gm[1] > gm[2]  # atrophy halfway
    # a blend of T1 and T2-like contrast: WM sits between the two extremes
    wm = [x[:, 0][y == 2].mean() for x, y in ((x0, y0), (xm, ym), (x1, y1))]
    assert wm[0] > wm[1] > wm[2]

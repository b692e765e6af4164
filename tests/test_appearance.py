"""Scanner appearance model: contrast, acquisition stages, normalisation, interpolation."""

from __future__ import annotations

import dataclasses
import typing

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from simlab.data.anatomy import load_mni
from simlab.data.appearance import (
    ScannerParams,
    acquire,
    apply_contrast,
    apply_scanner,
    foreground_mask,
    interpolate,
    normalise,
    render,
    render_blend,
)
from simlab.data.phantom import PopulationParams, make_patients

SIZE = 64


@pytest.fixture(scope="module")
def pts():
    return make_patients(PopulationParams(atrophy=(0.0, 0.5)), 12, SIZE, np.random.default_rng(2))


@pytest.fixture(scope="module")
def native(pts):
    return render(pts.tissue, pts.t1, ScannerParams(), np.random.default_rng(0), mask=pts.mask)


def _class_means(images: np.ndarray, pts) -> list[float]:
    """Mean intensity of CSF (class 0 inside the brain), GM and WM."""
    x = images[:, 0]
    inside = pts.mask > 0.5
    return [float(x[inside & (pts.labels == c)].mean()) for c in range(3)]


def _acq(x, pts, seed=0, **kw):
    return acquire(x, ScannerParams(**kw), np.random.default_rng(seed), mask=pts.mask > 0.5)


def _raw(x, pts, seed=0, **kw):
    return acquire(
        x, ScannerParams(**kw), np.random.default_rng(seed), mask=pts.mask > 0.5, normalise_output=False
    )


# --------------------------------------------------------------------------- config


def test_scanner_params_convention_and_check():
    hints = typing.get_type_hints(ScannerParams)
    for f in dataclasses.fields(ScannerParams):
        assert f.default is not dataclasses.MISSING, f.name
        assert set(f.metadata) <= {"ge", "gt", "le", "lt", "help"} and f.metadata.get("help"), f.name
        assert f.name in hints
    assert ScannerParams.__dataclass_params__.frozen
    assert typing.get_args(hints["contrast"]) == ("native", "inverted", "tissue")
    assert ScannerParams().check() == []
    assert [k for k, _ in ScannerParams(tissue_intensity=(0.2, 1.3, 0.5)).check()] == ["tissue_intensity"]
    assert [k for k, _ in ScannerParams(intensity_scale=(1.2, 0.8)).check()] == ["intensity_scale"]
    assert [k for k, _ in ScannerParams(intensity_scale=(0.0, 0.8)).check()] == ["intensity_scale"]


def test_interpolate_scanner_and_blend(pts):
    a = ScannerParams(noise=0.02, bias_field=0.1, tissue_intensity=(0.1, 0.5, 0.9), intensity_scale=(1.0, 1.0))
    b = ScannerParams(
        contrast="inverted", noise=0.06, bias_field=0.3, gamma=2.0, tissue_intensity=(0.3, 0.5, 0.7),
        intensity_scale=(0.5, 0.7),
    )
    assert interpolate(a, b, 0.0) == a
    assert interpolate(a, b, 1.0) == b
    m = interpolate(a, b, 0.25)
    assert m.noise == pytest.approx(0.03) and m.bias_field == pytest.approx(0.15)
    assert m.gamma == pytest.approx(1.25) and m.resolution == 1.0
    np.testing.assert_allclose(m.tissue_intensity, (0.15, 0.5, 0.85))
    np.testing.assert_allclose(m.intensity_scale, (0.875, 0.925))
    assert m.contrast == "native" and interpolate(a, b, 0.5).contrast == "inverted"
    assert m.check() == []
    with pytest.raises(ValueError):
        interpolate(a, b, -0.1)
    with pytest.raises(TypeError):
        interpolate(a, PopulationParams(), 0.5)  # type: ignore[arg-type]

    rng = np.random.default_rng(0)
    ra = render(pts.tissue, pts.t1, a, rng, mask=pts.mask)
    rb = render(pts.tissue, pts.t1, b, rng, mask=pts.mask)
    np.testing.assert_array_equal(render_blend(pts.tissue, pts.t1, a, b, 0.0, rng, mask=pts.mask), ra)
    np.testing.assert_array_equal(render_blend(pts.tissue, pts.t1, a, b, 1.0, rng, mask=pts.mask), rb)
    np.testing.assert_allclose(
        render_blend(pts.tissue, pts.t1, a, b, 0.3, rng, mask=pts.mask), 0.7 * ra + 0.3 * rb, atol=1e-6
    )


# --------------------------------------------------------------------------- contrast


def test_native_and_inverted_contrast_order(pts, native):
    np.testing.assert_array_equal(native, pts.t1)
    csf, gm, wm = _class_means(native, pts)
    assert wm > gm + 0.1 and gm > csf + 0.1  # T1-weighted
    inv = render(pts.tissue, pts.t1, ScannerParams(contrast="inverted"), None, mask=pts.mask)
    csf, gm, wm = _class_means(inv, pts)
    assert wm + 0.1 < gm and gm < csf  # T2-like: CSF bright, WM dark
    # outside the brain the background stays 0; inside, the inversion is exact
    outside = pts.mask == 0
    assert np.all(inv[:, 0][outside] == 0)
    core = pts.mask > 0.999
    xn = normalise(pts.t1, pts.mask > 0.5)
    np.testing.assert_allclose(inv[:, 0][core], np.clip(1 - xn[:, 0][core], 0, 1), atol=1e-3)
    # after the whole acquisition (noise, bias) the order survives
    for contrast, order in (("native", 1), ("inverted", -1)):
        scan = ScannerParams(contrast=contrast, noise=0.03, bias_field=0.2)
        rendered = render(pts.tissue, pts.t1, scan, None, mask=pts.mask)
        img = acquire(rendered, scan, np.random.default_rng(0), mask=pts.mask > 0.5)
        m = _class_means(img, pts)
        assert order * (m[2] - m[1]) > 0.05 and order * (m[1] - m[0]) > 0.05


def test_tissue_contrast_mixes_the_given_intensities(pts):
    intens = (0.9, 0.5, 0.1)
    flat = render(pts.tissue, pts.t1, ScannerParams(contrast="tissue", tissue_intensity=intens, texture=0.0), None, mask=pts.mask)
    csf = np.clip(pts.mask - pts.tissue[:, 1] - pts.tissue[:, 2], 0, 1)
    ref = csf * intens[0] + pts.tissue[:, 1] * intens[1] + pts.tissue[:, 2] * intens[2]
    np.testing.assert_allclose(flat[:, 0], ref, atol=1e-6)
    m = _class_means(flat, pts)
    assert m[0] > m[1] > m[2]  # follows the given intensities, here reversed
    # texture brings back the template's detail: correlation of the residual with T1's own
    textured = render(pts.tissue, pts.t1, ScannerParams(contrast="tissue", texture=1.0), None, mask=pts.mask)
    plain = render(pts.tissue, pts.t1, ScannerParams(contrast="tissue", texture=0.0), None, mask=pts.mask)
    mu = load_mni().t1_means
    model = csf * mu[0] + pts.tissue[:, 1] * mu[1] + pts.tissue[:, 2] * mu[2]
    core = pts.mask > 0.99
    r1 = (textured - plain)[:, 0][core]
    r2 = (pts.t1[:, 0] - model)[core]
    assert np.corrcoef(r1, r2)[0, 1] > 0.9
    half = render(pts.tissue, pts.t1, ScannerParams(contrast="tissue", texture=0.5), None, mask=pts.mask)
    np.testing.assert_allclose(half, 0.5 * (textured + plain), atol=1e-6)


def test_apply_contrast_on_real_like_images():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:48, :48]
    head = ((yy - 24) / 18.0) ** 2 + ((xx - 24) / 14.0) ** 2 < 1
    img = np.where(head, 1500.0 + 800.0 * (xx > 24), 0.0) + rng.normal(0, 5, (48, 48))
    img = np.abs(img)[None, None].astype(np.float32)
    fg = foreground_mask(img)
    assert fg.shape == (1, 48, 48) and np.mean(fg[0] == head) > 0.99
    inv = apply_contrast(img, "inverted")
    assert inv.min() >= 0 and inv.max() <= 1
    left, right = inv[0, 0][head & (xx < 20)].mean(), inv[0, 0][head & (xx > 28)].mean()
    assert left > right + 0.2 and inv[0, 0][~fg[0]].max() == 0
    np.testing.assert_array_equal(apply_contrast(img, "native"), img)
    with pytest.raises(ValueError, match="tissue"):
        apply_contrast(img, "tissue")
    out = apply_scanner(img, ScannerParams(contrast="inverted", noise=0.02), np.random.default_rng(1))
    assert out.shape == img.shape and out.min() >= 0 and out.max() <= 1
    assert out[0, 0][head & (xx < 20)].mean() > out[0, 0][head & (xx > 28)].mean() + 0.2
    with pytest.raises(ValueError, match="tissue"):
        apply_scanner(img, ScannerParams(contrast="tissue"), np.random.default_rng(1))


# --------------------------------------------------------------------------- normalisation


def test_normalise_uses_robust_foreground_percentiles():
    rng = np.random.default_rng(0)
    x = np.zeros((2, 1, 32, 32), np.float32)
    fg = np.zeros((2, 32, 32), bool)
    fg[:, 8:24, 8:24] = True
    x[0, 0][fg[0]] = rng.uniform(10, 50, fg[0].sum())
    x[1, 0] = rng.uniform(0, 2, (32, 32))  # noisy background
    x[1, 0][fg[1]] = rng.uniform(100, 300, fg[1].sum())
    out = normalise(x, fg)
    for i in range(2):
        vals = x[i, 0][fg[i]]
        p1, p99 = np.percentile(vals, [1, 99], method="lower")
        lo = min(p1, np.percentile(x[i, 0][~fg[i]], 50, method="lower"))
        np.testing.assert_allclose(out[i, 0], np.clip((x[i, 0] - lo) / (p99 - lo), 0, 1), atol=1e-6)
    assert out.min() == 0 and out.max() == 1
    np.testing.assert_array_equal(normalise(out, fg), out)  # idempotent
    assert out[1, 0][~fg[1]].mean() < 0.01  # background stays ~0
    # darkest tissue stays above the background
    assert np.percentile(out[1, 0][fg[1]], 5) > 0.3


# --------------------------------------------------------------------------- acquisition


def test_neutral_scanner_is_only_normalisation(pts, native):
    out = _acq(native, pts)
    np.testing.assert_array_equal(out, normalise(native, pts.mask > 0.5))
    assert out.dtype == np.float32 and out.shape == native.shape


def test_each_stage_changes_the_image_measurably(pts, native):
    base = _acq(native, pts)
    diffs = {}
    for kw in (
        {"bias_field": 0.3},
        {"noise": 0.05},
        {"blur": 1.0},
        {"gibbs": 0.6},
        {"resolution": 0.5},
        {"gamma": 0.6},
        {"intensity_scale": (0.6, 0.8)},
    ):
        diffs[next(iter(kw))] = float(np.abs(_acq(native, pts, **kw) - base).mean())
    for name, d in diffs.items():
        assert d > 0.01, (name, d)


def test_same_rng_same_image_different_rng_different(pts, native):
    kw = {"bias_field": 0.2, "noise": 0.04, "intensity_scale": (0.8, 1.0)}
    a, b, c = _acq(native, pts, 3, **kw), _acq(native, pts, 3, **kw), _acq(native, pts, 4, **kw)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).mean() > 0.01


def test_rician_noise_std_matches_parameter():
    sigma = 0.05
    x = np.zeros((8, 1, 64, 64), np.float32)
    fg = np.zeros((8, 64, 64), bool)
    fg[:, 8:56, 8:56] = True
    x[:, 0][fg] = 0.8
    x[:, 0, 8:56, 32:56] = 1.0  # a second level so that normalisation maps 0.8 -> 0.8
    noisy = acquire(x, ScannerParams(noise=sigma), np.random.default_rng(0), mask=fg, normalise_output=False)
    flat = noisy[:, 0, 10:54, 10:30]  # signal 0.8, far above sigma: Rician ~ Gaussian
    assert flat.std() == pytest.approx(sigma, rel=0.05)
    assert flat.mean() == pytest.approx(np.sqrt(0.8**2 + sigma**2), abs=0.005)
    back = noisy[:, 0][~fg]  # zero signal: Rayleigh, mean sigma * sqrt(pi / 2)
    assert back.mean() == pytest.approx(sigma * np.sqrt(np.pi / 2), rel=0.05)
    assert back.std() == pytest.approx(sigma * np.sqrt(2 - np.pi / 2), rel=0.05)
    # after output normalisation the std is still of the order of the parameter
    normed = acquire(x, ScannerParams(noise=sigma), np.random.default_rng(0), mask=fg)
    assert 0.6 * sigma < normed[:, 0, 10:54, 10:30].std() < 1.4 * sigma


def test_bias_field_is_exp_of_degree3_legendre(pts, native):
    clean = _raw(native, pts)
    biased = _raw(native, pts, bias_field=0.3)
    core = (pts.mask > 0.5) & (clean[:, 0] > 0.2)
    lv = np.linspace(-1, 1, SIZE)
    basis = []
    for i in range(4):  # MONAI's degree-3 basis: P_i(row) * P_j(col), 0 <= j <= i <= 3
        for j in range(i + 1):
            ci = np.zeros(i + 1)
            ci[i] = 1
            cj = np.zeros(j + 1)
            cj[j] = 1
            basis.append(np.outer(np.polynomial.legendre.legval(lv, ci), np.polynomial.legendre.legval(lv, cj)))
    basis = np.stack(basis, -1)
    spread = []
    for k in range(len(clean)):
        logr = np.log(biased[k, 0][core[k]] / clean[k, 0][core[k]])
        a = basis[core[k]]
        coef, *_ = np.linalg.lstsq(a, logr, rcond=None)
        assert np.abs(a @ coef - logr).max() < 1e-3
        assert np.all(np.abs(coef) <= 0.3 + 1e-3)
        spread.append(np.ptp(logr))
    assert np.mean(spread) > 0.2  # a visible shading across the brain


def test_resolution_is_area_down_bilinear_up(pts, native):
    low = _raw(native, pts, resolution=0.5)
    x = torch.from_numpy(normalise(native, pts.mask > 0.5))
    ref = F.interpolate(F.avg_pool2d(x, 2), size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    np.testing.assert_allclose(low, ref.numpy(), atol=1e-5)


def test_gibbs_is_circular_kspace_truncation(pts, native):
    alpha = 0.6
    out = _raw(native, pts, gibbs=alpha)
    x = normalise(native, pts.mask > 0.5)[:, 0].astype(np.float64)
    k = np.fft.fftshift(np.fft.fft2(x), axes=(-2, -1))
    c = (SIZE - 1) / 2
    yy, xx = np.mgrid[:SIZE, :SIZE]
    keep = np.hypot(yy - c, xx - c) <= (1 - alpha) * SIZE * np.sqrt(2) / 2
    ref = np.fft.ifft2(np.fft.ifftshift(k * keep, axes=(-2, -1))).real
    np.testing.assert_allclose(out[:, 0], ref, atol=1e-4)
    # ringing: values overshoot outside the original range near the brain edge
    assert out.min() < -0.01


def test_blur_removes_high_frequencies_monotonically(pts, native):
    def hf(img):  # energy of the discrete Laplacian
        x = img[:, 0]
        lap = x[:, 1:-1, 1:-1] * 4 - x[:, :-2, 1:-1] - x[:, 2:, 1:-1] - x[:, 1:-1, :-2] - x[:, 1:-1, 2:]
        return float(np.mean(lap**2))

    energies = [hf(_raw(native, pts, blur=s)) for s in (0.0, 0.7, 1.5)]
    assert energies[0] > 2 * energies[1] and energies[1] > 2 * energies[2]
    # the blur kernel sums to one: interior mean preserved
    a, b = _raw(native, pts), _raw(native, pts, blur=1.5)
    assert abs(a.mean() - b.mean()) < 0.01


def test_gamma_and_scale(pts, native):
    x = normalise(native, pts.mask > 0.5)
    g = _raw(native, pts, gamma=0.5)
    np.testing.assert_allclose(g, x**0.5, atol=2e-6)
    half = _acq(native, pts, intensity_scale=(0.5, 0.5))
    np.testing.assert_allclose(half, 0.5 * x, atol=1e-6)
    ranged = _acq(native, pts, intensity_scale=(0.5, 0.9))
    peak = ranged.reshape(len(ranged), -1).max(axis=1)
    assert np.all((peak >= 0.5 - 1e-6) & (peak <= 0.9 + 1e-6)) and np.ptp(peak) > 0.05
    bright = _acq(native, pts, intensity_scale=(1.5, 1.5))
    assert bright.max() == 1.0 and (bright == 1.0).mean() > (x == 1.0).mean() + 0.01


def test_low_resolution_noise_is_correlated(pts, native):
    """Noise is added on the acquisition grid, so at half resolution neighbours share it."""

    core = (pts.mask > 0.99) & (native[:, 0] > 0.3)  # bright tissue: Rician ~ Gaussian, zero mean
    core = core[:, None, :, :-1] & core[:, None, :, 1:]

    def lag1_corr(residual):
        return np.corrcoef(residual[..., :-1][core], residual[..., 1:][core])[0, 1]

    full = _raw(native, pts, seed=1, noise=0.05) - _raw(native, pts)
    half = _raw(native, pts, seed=1, noise=0.05, resolution=0.5) - _raw(native, pts, resolution=0.5)
    assert abs(lag1_corr(full)) < 0.1 and lag1_corr(half) > 0.4

"""Frequency-space amplitude interpolation: numbers, spectral properties, bank and augmenter."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from simlab.augment.frequency import (
    FrequencyAugmenter,
    FrequencyParams,
    bank_nbytes,
    half_width,
    interpolate_amplitude,
    low_freq_block,
    make_bank_entries,
)


def smooth_images(n: int, c: int, h: int, w: int, seed: int, dtype=torch.float64, scale=1.0, offset=0.0):
    """Real, smooth, non-negative test images (blurred noise + offset), like intensity images."""
    rng = np.random.default_rng(seed)
    x = rng.random((n, c, h, w))
    k = np.fft.fft2(x)
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.fftfreq(w)[None, :]
    x = np.real(np.fft.ifft2(k * np.exp(-(fy**2 + fx**2) / (2 * 0.08**2))))
    x = (x - x.min()) / (x.max() - x.min())
    return torch.as_tensor(offset + scale * x, dtype=dtype)


def wrapped(d: torch.Tensor) -> torch.Tensor:
    return torch.remainder(d + math.pi, 2 * math.pi) - math.pi


def centred_mask(h: int, w: int, b: int) -> torch.Tensor:
    m = torch.zeros(h, w, dtype=torch.bool)
    m[h // 2 - b : h // 2 + b + 1, w // 2 - b : w // 2 + b + 1] = True
    return torch.fft.ifftshift(m.to(torch.uint8), dim=(-2, -1)).bool()


def numpy_reference(local: np.ndarray, target: np.ndarray, alpha: float, lam: float) -> np.ndarray:
    """Independent NumPy version of the paper's interpolation, via fftshift and a slice window."""
    f = np.fft.fft2(local, axes=(-2, -1))
    amp, pha = np.abs(f), np.angle(f)
    a = np.fft.fftshift(amp, axes=(-2, -1))
    t = np.fft.fftshift(np.abs(np.fft.fft2(target, axes=(-2, -1))), axes=(-2, -1))
    h, w = a.shape[-2:]
    b = int(np.floor(min(h, w) * alpha))
    sl = (..., slice(h // 2 - b, h // 2 + b + 1), slice(w // 2 - b, w // 2 + b + 1))
    a[sl] = (1 - lam) * a[sl] + lam * t[sl]
    a = np.fft.ifftshift(a, axes=(-2, -1))
    return np.real(np.fft.ifft2(a * np.exp(1j * pha), axes=(-2, -1)))


# ------------------------------------------------------------------------------- params / window
def test_params_defaults_and_check():
    p = FrequencyParams()
    assert (p.enabled, p.alpha, p.lambda_dist, p.prob, p.bank_size) == (False, 0.01, "uniform", 0.5, 16)
    assert p.check() == []
    bad = FrequencyParams(lambda_low=0.8, lambda_high=0.2)
    assert [f for f, _ in bad.check()] == ["lambda_low"]
    assert FrequencyParams(lambda_low=0.8, lambda_high=0.2, lambda_dist="fixed").check() == []
    with pytest.raises(ValueError, match="lambda_low"):
        FrequencyAugmenter(bad, {}, "a", 0)


def test_params_load_through_scenario_loader():
    loader = pytest.importorskip("simlab.config")
    p = loader.build(FrequencyParams, {"enabled": True, "alpha": 0.02, "lambda_dist": "fixed"}, "t.yaml")
    assert p == FrequencyParams(enabled=True, alpha=0.02, lambda_dist="fixed")
    with pytest.raises(loader.ScenarioError, match="alpha"):
        loader.build(FrequencyParams, {"alpha": 0.7}, "t.yaml")
    with pytest.raises(loader.ScenarioError, match="lambda_low"):
        loader.build(FrequencyParams, {"lambda_low": 0.9, "lambda_high": 0.1}, "t.yaml")


@pytest.mark.parametrize(
    "h,w,alpha,b",
    [(128, 128, 0.01, 1), (64, 64, 0.01, 0), (384, 384, 0.003, 1), (100, 140, 0.29, 29), (9, 30, 0.45, 4)],
)
def test_half_width(h, w, alpha, b):
    assert half_width(h, w, alpha) == b


def test_half_width_rejects_block_larger_than_image():
    with pytest.raises(ValueError, match="does not fit"):
        half_width(8, 8, 0.5)
    assert FrequencyParams(alpha=0.1, reference_code=True).block_half_width(128, 128) == 0


@pytest.mark.parametrize("h,w", [(32, 32), (33, 27), (20, 31)])
def test_low_freq_block_equals_fftshift_slice(h, w):
    x = smooth_images(3, 2, h, w, seed=1)
    alpha = 0.1
    b = half_width(h, w, alpha)
    ref = np.abs(np.fft.fftshift(np.fft.fft2(x.numpy()), axes=(-2, -1)))
    ref = ref[..., h // 2 - b : h // 2 + b + 1, w // 2 - b : w // 2 + b + 1]
    got = low_freq_block(x, alpha)
    assert got.shape == (3, 2, 2 * b + 1, 2 * b + 1) and got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-12, atol=1e-9)
    # DC sits at the centre of the block and equals |sum of pixels|
    np.testing.assert_allclose(got[..., b, b].numpy(), x.sum(dim=(-2, -1)).abs().numpy(), rtol=1e-12)
    assert low_freq_block(x.float(), alpha).dtype == torch.float32


# ------------------------------------------------------------------------------- interpolation
def test_lambda_zero_returns_the_image():
    x = smooth_images(4, 1, 64, 64, seed=2, dtype=torch.float32)
    t = low_freq_block(smooth_images(4, 1, 64, 64, seed=3, scale=3.0, dtype=torch.float32), 0.05)
    y = interpolate_amplitude(x, t, torch.zeros(4))
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, x, atol=1e-5, rtol=0)


@pytest.mark.parametrize("h,w,alpha", [(48, 48, 0.06), (33, 40, 0.1)])
def test_matches_independent_numpy_reference(h, w, alpha):
    x = smooth_images(3, 2, h, w, seed=4)
    src = smooth_images(3, 2, h, w, seed=5, scale=2.0, offset=0.5)
    lam = torch.tensor([0.0, 0.37, 1.0], dtype=torch.float64)
    y = interpolate_amplitude(x, low_freq_block(src, alpha), lam)
    for i in range(3):
        ref = numpy_reference(x[i].numpy(), src[i].numpy(), alpha, float(lam[i]))
        np.testing.assert_allclose(y[i].numpy(), ref, atol=1e-10)


def test_only_the_block_amplitude_changes_and_mixes_linearly():
    h = w = 64
    alpha = 0.05
    b = half_width(h, w, alpha)
    x = smooth_images(4, 1, h, w, seed=6)
    src = smooth_images(4, 1, h, w, seed=7, scale=4.0, offset=1.0)
    tgt = low_freq_block(src, alpha)
    lam = torch.tensor([0.25, 0.5, 0.75, 1.0], dtype=torch.float64)
    y = interpolate_amplitude(x, tgt, lam)
    fx, fy = torch.fft.fft2(x), torch.fft.fft2(y)
    mask = centred_mask(h, w, b)
    scale = fx.abs().max()
    outside = (fy.abs() - fx.abs())[..., ~mask]
    assert outside.abs().max() < 1e-10 * scale
    # inside: (1 - λ) A + λ A_t, compared in centred order
    got = low_freq_block(y, alpha)
    want = (1 - lam.view(-1, 1, 1, 1)) * low_freq_block(x, alpha) + lam.view(-1, 1, 1, 1) * tgt
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-9 * float(scale))
    # and the block did change (source is brighter), so the test has teeth
    assert (got - low_freq_block(x, alpha)).abs().max() > 1.0


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 2e-3)])
def test_phase_is_kept_in_and_outside_the_block(dtype, tol):
    h, w, alpha = 64, 48, 0.06
    b = half_width(h, w, alpha)
    x = smooth_images(3, 1, h, w, seed=8, dtype=dtype)
    src = smooth_images(3, 1, h, w, seed=9, scale=3.0, offset=0.2, dtype=dtype)
    lam = torch.tensor([0.3, 0.6, 1.0])
    y = interpolate_amplitude(x, low_freq_block(src, alpha), lam)
    fx, fy = torch.fft.fft2(x.double()), torch.fft.fft2(y.double())
    mask = centred_mask(h, w, b)
    significant = (fx.abs() > 1e-3 * fx.abs().max()) & (fy.abs() > 1e-3 * fy.abs().max())
    dphi = wrapped(fy.angle() - fx.angle())
    for region in (mask, ~mask):
        sel = significant & region
        assert int(sel.sum()) > 0
        assert float(dphi[sel].abs().max()) < tol


def test_asymmetric_target_is_projected_by_the_real_part():
    """A block that is not the amplitude of a real image breaks Hermitian symmetry; real() averages.

    Scaling only A(k) (not A(−k)) by 5 gives, after real(ifft2), |F(k)| = |F(−k)| = (5 + 1)/2 · A(k)
    because the phases of a real image satisfy P(−k) = −P(k).
    """
    h = w = 32
    x = smooth_images(1, 1, h, w, seed=10)
    b = half_width(h, w, 0.1)
    base = low_freq_block(x, 0.1)
    tgt = base.clone()
    tgt[..., 0, 1] *= 5.0  # frequency (−b, 1−b); its partner (b, b−1) sits at [2b, 2b−1]
    got = low_freq_block(interpolate_amplitude(x, tgt, 1.0), 0.1)
    a = float(base[..., 0, 1])
    assert float(got[..., 0, 1]) == pytest.approx(3.0 * a, rel=1e-9)
    assert float(got[..., 2 * b, 2 * b - 1]) == pytest.approx(3.0 * a, rel=1e-9)
    other = torch.ones_like(got, dtype=torch.bool)
    other[..., 0, 1] = False
    other[..., 2 * b, 2 * b - 1] = False
    torch.testing.assert_close(got[other], base[other], rtol=1e-9, atol=1e-9)


def test_lambda_one_block_equals_target():
    alpha = 0.08
    x = smooth_images(2, 3, 50, 50, seed=11, dtype=torch.float32)
    src = smooth_images(2, 3, 50, 50, seed=12, scale=2.5, offset=0.3, dtype=torch.float32)
    tgt = low_freq_block(src, alpha)
    y = interpolate_amplitude(x, tgt, 1.0)
    got = low_freq_block(y, alpha)
    torch.testing.assert_close(got, tgt, rtol=1e-4, atol=1e-4 * float(tgt.max()))


def test_reference_code_mode_touches_only_dc():
    h, w = 40, 40
    params = FrequencyParams(enabled=True, reference_code=True, alpha=0.2, prob=1.0)
    local = smooth_images(2, 1, h, w, seed=13, offset=0.1)
    donor = smooth_images(3, 1, h, w, seed=14, scale=2.0, offset=1.0)
    entries = make_bank_entries(donor, params, np.random.default_rng(0))
    assert entries.shape == (3, 1, 1, 1)
    aug = FrequencyAugmenter(params, {"me": low_freq_block(local, 0.0), "other": entries}, "me", 3)
    d = aug.draw(2)
    assert torch.equal(d.lam, torch.ones(2, dtype=torch.float64))
    y = aug.apply(local, d)
    fx, fy = torch.fft.fft2(local), torch.fft.fft2(y)
    diff = (fy - fx).abs()
    assert diff[..., 0, 0].min() > 1.0  # DC moved
    diff[..., 0, 0] = 0
    assert diff.max() < 1e-9 * fx.abs().max()
    # hard swap: the image is shifted by a constant so that its pixel sum equals the donor's |sum|
    t = entries[d.entry_idx, 0, 0, 0].double()
    torch.testing.assert_close(y.sum(dim=(-2, -1)).flatten(), t, rtol=1e-6, atol=0)
    shift = y - local
    assert (shift - shift.mean(dim=(-2, -1), keepdim=True)).abs().max() < 1e-12


# ------------------------------------------------------------------------------- bank
def test_bank_entries_are_blocks_of_distinct_chosen_images_and_deterministic():
    params = FrequencyParams(alpha=0.05, bank_size=5)
    imgs = smooth_images(12, 2, 64, 64, seed=15, dtype=torch.float32)
    e1 = make_bank_entries(imgs, params, np.random.default_rng(42))
    e2 = make_bank_entries(imgs, params, np.random.default_rng(42))
    e3 = make_bank_entries(imgs, params, np.random.default_rng(43))
    assert e1.shape == (5, 2, 7, 7) and e1.dtype == torch.float32 and e1.device.type == "cpu"
    assert torch.equal(e1, e2) and not torch.equal(e1, e3)
    all_blocks = low_freq_block(imgs, 0.05)
    matches = [int(torch.nonzero((all_blocks - e).abs().amax(dim=(1, 2, 3)) < 1e-3).flatten()[0]) for e in e1]
    assert len(set(matches)) == 5
    assert bank_nbytes(e1) == 5 * 2 * 7 * 7 * 4
    assert bank_nbytes({"a": e1, "b": e3[:2]}) == 7 * 2 * 7 * 7 * 4
    # torch generator works too, and a small hospital shares each image once
    small = make_bank_entries(imgs[:3], params, torch.Generator().manual_seed(0))
    assert small.shape[0] == 3
    assert torch.allclose(small.sum(0), all_blocks[:3].sum(0), rtol=1e-5)


# ------------------------------------------------------------------------------- augmenter
def make_bank(params: FrequencyParams, h=32, w=32, c=1):
    return {
        hid: make_bank_entries(
            smooth_images(6, c, h, w, seed=100 + i, scale=1.0 + i, offset=0.3 * i, dtype=torch.float32),
            params,
            np.random.default_rng(i),
        )
        for i, hid in enumerate(["h0", "h1", "h2", "h3"])
    }


def test_augmenter_never_uses_own_hospital_and_covers_the_others():
    params = FrequencyParams(enabled=True, alpha=0.1, prob=1.0, bank_size=4)
    bank = make_bank(params)
    aug = FrequencyAugmenter(params, bank, "h2", torch.Generator().manual_seed(0))
    assert aug.donors == ("h0", "h1", "h3")
    seen = set()
    own_rows = {tuple(r.flatten().tolist()) for r in bank["h2"]}
    for _ in range(30):
        d = aug.draw(8)
        seen.update(d.donors)
        assert "h2" not in d.donors
        rows = aug.entries()[d.entry_idx]
        assert not any(tuple(r.flatten().tolist()) in own_rows for r in rows)
        for name, r in zip(d.donors, rows):
            assert any(torch.equal(r, e) for e in bank[name])
    assert seen == {"h0", "h1", "h3"}


def test_augmenter_is_noop_without_other_hospitals_or_when_disabled():
    params = FrequencyParams(enabled=True, alpha=0.1, prob=1.0)
    bank = make_bank(params)
    x = smooth_images(4, 1, 32, 32, seed=16, dtype=torch.float32)
    only_own = FrequencyAugmenter(params, {"h0": bank["h0"], "h1": bank["h1"][:0]}, "h0", 0)
    assert not only_own.active and only_own(x) is x
    off = FrequencyAugmenter(dataclasses.replace(params, enabled=False), bank, "h0", 0)
    assert off(x) is x
    on = FrequencyAugmenter(params, bank, "h0", 0)
    assert on.active and not torch.equal(on(x), x)


def test_prob_share_and_untouched_samples():
    params = FrequencyParams(enabled=True, alpha=0.1, prob=0.5)
    aug = FrequencyAugmenter(params, make_bank(params), "h0", 7)
    x = smooth_images(16, 1, 32, 32, seed=17, dtype=torch.float32)
    d = aug.draw(16)
    assert d.sample_idx.numel() == 8 and len(set(d.sample_idx.tolist())) == 8
    y = aug.apply(x, d)
    changed = (y - x).abs().amax(dim=(1, 2, 3)) > 1e-4
    assert set(torch.nonzero(changed).flatten().tolist()) == set(d.sample_idx.tolist())
    keep = torch.ones(16, dtype=torch.bool)
    keep[d.sample_idx] = False
    assert torch.equal(y[keep], x[keep])
    # non-integer prob·B: unbiased on average
    p3 = dataclasses.replace(params, prob=0.3)
    a3 = FrequencyAugmenter(p3, make_bank(p3), "h0", 8)
    counts = [a3.draw(5).sample_idx.numel() for _ in range(2000)]
    assert set(counts) == {1, 2}
    assert abs(np.mean(counts) - 1.5) < 0.05


def test_lambda_draws():
    p = FrequencyParams(enabled=True, alpha=0.1, prob=1.0, lambda_low=0.2, lambda_high=0.6)
    lam = torch.cat([FrequencyAugmenter(p, make_bank(p), "h0", 1).draw(500).lam])
    assert lam.min() >= 0.2 and lam.max() <= 0.6
    assert abs(float(lam.mean()) - 0.4) < 0.02 and float(lam.std()) > 0.1
    pf = dataclasses.replace(p, lambda_dist="fixed", lambda_value=0.35)
    assert torch.all(FrequencyAugmenter(pf, make_bank(pf), "h0", 1).draw(10).lam == 0.35)


def test_determinism_with_seeded_generator():
    params = FrequencyParams(enabled=True, alpha=0.1, prob=0.5)
    bank = make_bank(params)
    x = smooth_images(16, 1, 32, 32, seed=18, dtype=torch.float32)
    a = FrequencyAugmenter(params, bank, "h1", torch.Generator().manual_seed(5))
    b = FrequencyAugmenter(params, dict(reversed(list(bank.items()))), "h1", torch.Generator().manual_seed(5))
    c = FrequencyAugmenter(params, bank, "h1", torch.Generator().manual_seed(6))
    ya, yb, yc = a(x), b(x), c(x)
    assert torch.equal(ya, yb)
    assert not torch.equal(ya, yc)
    assert not torch.equal(a(x), ya)  # the generator advances between batches


def test_batched_equals_per_sample():
    params = FrequencyParams(enabled=True, alpha=0.1, prob=0.75, lambda_low=0.1, lambda_high=0.9)
    aug = FrequencyAugmenter(params, make_bank(params, c=2), "h3", 11)
    x = smooth_images(8, 2, 32, 32, seed=19, dtype=torch.float32)
    d = aug.draw(8)
    y = aug.apply(x, d)
    rows = aug.entries()
    for j, i in enumerate(d.sample_idx.tolist()):
        single = interpolate_amplitude(x[i : i + 1], rows[d.entry_idx[j] : d.entry_idx[j] + 1], float(d.lam[j]))
        torch.testing.assert_close(y[i : i + 1], single, atol=2e-6, rtol=0)
        # and the block amplitude of the result is the mixture with the drawn entry
        want = (1 - d.lam[j]) * low_freq_block(x[i : i + 1], 0.1) + d.lam[j] * rows[d.entry_idx[j]]
        torch.testing.assert_close(low_freq_block(y[i : i + 1], 0.1), want.float(), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_dtype_kept(dtype):
    params = FrequencyParams(enabled=True, alpha=0.1, prob=1.0)
    aug = FrequencyAugmenter(params, make_bank(params), "h0", 0)
    x = smooth_images(4, 1, 32, 32, seed=20).to(dtype)
    y = aug(x)
    assert y.dtype == dtype and y.shape == x.shape
    assert torch.isfinite(y.float()).all() and not torch.equal(y, x)


def test_clamp_keeps_each_image_in_its_input_range():
    params = FrequencyParams(enabled=True, alpha=0.1, prob=1.0, lambda_dist="fixed", lambda_value=1.0)
    bank = make_bank(params)
    x = smooth_images(8, 1, 32, 32, seed=21, dtype=torch.float32)
    free = FrequencyAugmenter(params, bank, "h0", 4)(x)
    clamped = FrequencyAugmenter(dataclasses.replace(params, clamp=True), bank, "h0", 4)(x)
    lo = x.amin(dim=(1, 2, 3))
    hi = x.amax(dim=(1, 2, 3))
    assert bool(((free.amax(dim=(1, 2, 3)) > hi + 1e-3) | (free.amin(dim=(1, 2, 3)) < lo - 1e-3)).any())
    assert bool((clamped.amin(dim=(1, 2, 3)) >= lo).all() and (clamped.amax(dim=(1, 2, 3)) <= hi).all())
    inside = (free >= lo.view(-1, 1, 1, 1)) & (free <= hi.view(-1, 1, 1, 1))
    assert torch.equal(clamped[inside], free[inside])


def test_mismatched_block_size_is_an_error():
    params = FrequencyParams(enabled=True, alpha=0.1, prob=1.0)
    aug = FrequencyAugmenter(params, make_bank(params, h=32, w=32), "h0", 0)
    with pytest.raises(ValueError, match="hospitals must share image size"):
        aug(smooth_images(2, 1, 64, 64, seed=22, dtype=torch.float32))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    params = FrequencyParams(enabled=True, alpha=0.1, prob=0.5)
    bank = make_bank(params)
    x = smooth_images(16, 1, 32, 32, seed=23, dtype=torch.float32)
    y_cpu = FrequencyAugmenter(params, bank, "h0", 9)(x)
    y_gpu = FrequencyAugmenter(params, bank, "h0", 9)(x.cuda())
    assert y_gpu.device.type == "cuda"
    torch.testing.assert_close(y_gpu.cpu(), y_cpu, atol=1e-5, rtol=0)

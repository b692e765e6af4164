"""Scanner appearance model: how a hospital's scanner and protocol turn anatomy into an image.

A scanner is a :class:`ScannerParams`. The pipeline has two stages:

1. **Contrast** (what the object looks like under this protocol):
   :func:`render` for the phantom (needs tissue maps), :func:`apply_contrast` for any image
   (native or inverted only).
2. **Acquisition** (:func:`acquire`, works on phantom and real images alike). Stages run in
   the order in which they act on the signal:

   ============  ===========================================================================
   bias field    receive-coil sensitivity multiplies the object's signal
                 (MONAI ``RandBiasField``, degree 3: the field is
                 ``exp(sum c_ij P_i(row) P_j(col))`` over ``0 <= j <= i <= 3``, Legendre
                 polynomials ``P`` on [-1, 1], ten coefficients uniform in ±bias_field)
   blur          the acquisition's point-spread function (MONAI ``GaussianSmooth``, sigma in
                 pixels of the output grid)
   resolution    sampling on a grid ``resolution`` times as fine, i.e. a smaller k-space
                 coverage (MONAI ``Resize``, ``area`` mode: the signal of each coarse pixel is
                 the mean over its footprint)
   Gibbs         truncation of that k-space by a circular window (MONAI ``GibbsNoise``,
                 alpha = gibbs) - ringing at sharp edges
   noise         thermal noise on the complex signal; the magnitude image is Rician
                 (MONAI ``RandRicianNoise``, std = noise, not relative, not resampled) -
                 added on the acquisition grid, so low-resolution images carry noise that
                 the reconstruction interpolates
   upsampling    reconstruction back to the common grid (MONAI ``Resize``, ``bilinear``)
   gamma         the reconstruction's or display's intensity non-linearity
                 (MONAI ``AdjustContrast``: ``((x - min) / range) ** gamma * range + min``)
   normalise     per image, robust percentiles of the foreground (:func:`normalise`)
   scale         a per-image global gain ``s ~ U(intensity_scale)`` applied *after* the
                 normalisation (before it, the normalisation would remove it), then clipped
                 to [0, 1] (s > 1 saturates bright tissue, s < 1 compresses the range): a
                 residual calibration difference that the pipeline does not undo
   ============  ===========================================================================

   Before the first stage the input is brought to [0, 1] with :func:`normalise`, so that
   ``noise`` is a standard deviation relative to the image's [0, 1] range whatever the
   source's units. A stage whose parameter is neutral (0, 1 or (1, 1)) is skipped exactly.

Randomness: every random draw comes from the numpy ``Generator`` passed in. :func:`acquire`
draws four seeds from it first, always (bias field, noise, scale, reserve), so that switching
one stage on or off does not change the random realisation of the others; each MONAI random
transform is seeded with ``set_random_state`` (MONAI's ``set_determinism`` does not reach them).

Gradual drift: :func:`interpolate` interpolates every numeric field linearly. The categorical
``contrast`` cannot be interpolated; the rule is: :func:`interpolate` takes the nearer end
(``a`` for ``t < 0.5``, else ``b``), and for images :func:`render_blend` renders with both
scanners and blends the images, ``(1 - t) * render(a) + t * render(b)``, which is exact at
``t = 0`` and ``t = 1`` and continuous in between.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import numpy as np

ContrastName = Literal["native", "inverted", "tissue"]

_MASK_THRESHOLD = 0.1
"""Foreground estimate for images without a mask: above this share of the image's 99th
percentile, holes filled."""

_TEXTURE_RATIO_RANGE = (0.5, 2.0)
"""Clip of the texture ratio t1 / model (guards partial-volume pixels at the brain edge)."""


@dataclass(frozen=True)
class ScannerParams:
    """One scanner and protocol (see the module docstring for the order of the stages)."""

    contrast: Literal["native", "inverted", "tissue"] = field(
        default="native",
        metadata={
            "help": "native: source intensities (template T1 / the real image); inverted: 1 - x "
            "inside the foreground (T2-like: CSF bright, WM dark); tissue: tissue_intensity "
            "mixed by the tissue probabilities (phantom only)"
        },
    )
    tissue_intensity: tuple[float, float, float] = field(
        default=(0.2, 0.55, 0.85),
        metadata={"help": "intensity of pure csf, gm, wm for contrast=tissue, each in [0, 1]"},
    )
    texture: float = field(
        default=0.3,
        metadata={
            "ge": 0.0,
            "le": 1.0,
            "help": "share of the template T1's texture (its residual from the tissue mixture) "
            "kept by contrast=tissue",
        },
    )
    bias_field: float = field(
        default=0.0,
        metadata={
            "ge": 0.0,
            "le": 1.0,
            "help": "magnitude of the smooth multiplicative bias field: degree-3 Legendre "
            "coefficients of its log drawn uniformly in +-bias_field",
        },
    )
    noise: float = field(
        default=0.0,
        metadata={"ge": 0.0, "le": 1.0, "help": "Rician noise standard deviation, relative to the [0, 1] intensity range"},
    )
    blur: float = field(
        default=0.0,
        metadata={"ge": 0.0, "le": 16.0, "help": "Gaussian blur sigma in pixels of the output grid"},
    )
    resolution: float = field(
        default=1.0,
        metadata={
            "gt": 0.0,
            "le": 1.0,
            "help": "acquisition grid as a fraction of the output grid (area-averaged down, "
            "bilinear back up); 1 = full resolution",
        },
    )
    gibbs: float = field(
        default=0.0,
        metadata={
            "ge": 0.0,
            "lt": 1.0,
            "help": "Gibbs ringing (MONAI alpha): k-space kept within radius (1 - gibbs) * N / sqrt(2); "
            "0 = none, visible ringing from about 0.5",
        },
    )
    gamma: float = field(
        default=1.0,
        metadata={"gt": 0.0, "le": 10.0, "help": "intensity gamma (<1 brightens mid-tones, >1 darkens them)"},
    )
    intensity_scale: tuple[float, float] = field(
        default=(1.0, 1.0),
        metadata={"help": "range of the per-image global gain applied after normalisation (then clipped to [0, 1])"},
    )

    def check(self) -> list[tuple[str, str]]:
        """Cross-field and per-element checks; (field, message) pairs, empty when valid."""
        problems: list[tuple[str, str]] = []
        if self.contrast not in ("native", "inverted", "tissue"):
            problems.append(("contrast", f"must be native, inverted or tissue, got {self.contrast!r}"))
        ti = tuple(self.tissue_intensity)
        if len(ti) != 3:
            problems.append(("tissue_intensity", f"needs 3 values (csf, gm, wm), got {len(ti)}"))
        elif not all(0.0 <= float(v) <= 1.0 for v in ti):
            problems.append(("tissue_intensity", f"values must lie in [0, 1], got {ti}"))
        sc = tuple(self.intensity_scale)
        if len(sc) != 2:
            problems.append(("intensity_scale", f"needs 2 values (low, high), got {len(sc)}"))
        else:
            lo, hi = float(sc[0]), float(sc[1])
            if lo <= 0.0:
                problems.append(("intensity_scale", f"low end must be > 0, got {lo}"))
            if lo > hi:
                problems.append(("intensity_scale", f"low end {lo} is above high end {hi}"))
        return problems


# --------------------------------------------------------------------------- helpers

_P = TypeVar("_P")


def interpolate_fields(a: _P, b: _P, t: float) -> _P:
    """Field-wise interpolation of two config dataclasses of the same type.

    float: ``(1 - t) * a + t * b`` (exactly ``a`` at t = 0 and ``b`` at t = 1); int: the same,
    rounded; tuples: element-wise; nested dataclasses: recursively; everything else (bool, str,
    None, lists, dicts): the nearer end, ``a`` for ``t < 0.5``, else ``b``.
    """
    if type(a) is not type(b) or not dataclasses.is_dataclass(a):
        raise TypeError(f"cannot interpolate {type(a).__name__} with {type(b).__name__}")
    t = float(t)
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"t must lie in [0, 1], got {t}")

    def mix(x: Any, y: Any) -> Any:
        if isinstance(x, bool) or isinstance(y, bool):
            return x if t < 0.5 else y
        if isinstance(x, int) and isinstance(y, int):
            return int(round((1.0 - t) * x + t * y))
        if isinstance(x, (int, float)) and isinstance(y, (int, float)):
            return (1.0 - t) * float(x) + t * float(y)
        if isinstance(x, tuple) and isinstance(y, tuple) and len(x) == len(y):
            return tuple(mix(u, v) for u, v in zip(x, y))
        if dataclasses.is_dataclass(x) and type(x) is type(y):
            return interpolate_fields(x, y, t)
        return x if t < 0.5 else y

    values = {f.name: mix(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a)}
    return dataclasses.replace(a, **values)  # type: ignore[type-var]


def interpolate(a: ScannerParams, b: ScannerParams, t: float) -> ScannerParams:
    """Scanner ``t`` of the way from ``a`` to ``b`` (see :func:`interpolate_fields`).

    ``contrast`` is categorical: the nearer end is taken; use :func:`render_blend` for images
    that move continuously between two contrasts.
    """
    if not isinstance(a, ScannerParams) or not isinstance(b, ScannerParams):
        raise TypeError("interpolate expects two ScannerParams")
    return interpolate_fields(a, b, t)


def _to_numpy(x: Any) -> np.ndarray:
    from monai.utils import convert_to_numpy

    return np.asarray(convert_to_numpy(x), dtype=np.float32)


def _seed(rng: np.random.Generator) -> int:
    return int(rng.integers(0, 2**31 - 1))


def _check_images(images: np.ndarray) -> np.ndarray:
    x = np.asarray(images, dtype=np.float32)
    if x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(f"images must have shape [n, 1, H, W], got {x.shape}")
    return x


def _as_mask(mask: np.ndarray | None, images: np.ndarray) -> np.ndarray:
    """Foreground as bool ``[n, H, W]``: ``mask > 0.5`` when given, else estimated."""
    n, _, h, w = images.shape
    if mask is None:
        return foreground_mask(images)
    m = np.asarray(mask)
    if m.ndim == 4:
        m = m[:, 0]
    if m.shape != (n, h, w):
        raise ValueError(f"mask must have shape [n, H, W] = {(n, h, w)}, got {m.shape}")
    return m > 0.5 if m.dtype != bool else m


def foreground_mask(images: np.ndarray) -> np.ndarray:
    """Estimated foreground (bool ``[n, H, W]``) of images with a dark background.

    A pixel is foreground when above 10 % of its image's 99th percentile; enclosed holes
    (e.g. dark ventricles in T1) are filled (``scipy.ndimage.binary_fill_holes``).
    """
    from scipy import ndimage

    x = _check_images(images)[:, 0]
    thr = _MASK_THRESHOLD * np.percentile(x.reshape(len(x), -1), 99, axis=1)
    fg = x > thr[:, None, None]
    return np.stack([ndimage.binary_fill_holes(f) for f in fg]) if len(fg) else fg


def normalise(images: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Per-image robust normalisation to [0, 1].

    ``hi`` = 99th percentile of the foreground; ``lo`` = the smaller of the foreground's 1st
    percentile and the background's median (the noise floor; 0 for skull-stripped data), so
    that the background maps to ~0 while the darkest tissue stays distinguishable from it.
    ``out = clip((x - lo) / (hi - lo), 0, 1)``. With no background pixels ``lo`` is the 1st
    percentile of the foreground; with no foreground pixels the whole image is used.
    Percentiles are order statistics (numpy's ``method="lower"``), so ``lo`` and ``hi`` map to
    exactly 0 and 1 and normalising a normalised image changes nothing.
    """
    x = _check_images(images)
    fg = _as_mask(mask, x)
    out = np.empty_like(x)
    for i in range(len(x)):
        xi, fi = x[i, 0], fg[i]
        vals = xi[fi] if fi.any() else xi.ravel()
        p1, hi = np.percentile(vals, [1.0, 99.0], method="lower")
        lo = min(p1, np.percentile(xi[~fi], 50.0, method="lower")) if (~fi).any() else p1
        span = max(hi - lo, 1e-6)
        out[i, 0] = np.clip((xi - lo) / span, 0.0, 1.0)
    return out


# --------------------------------------------------------------------------- contrast


def apply_contrast(
    images: np.ndarray, contrast: str, mask: np.ndarray | None = None
) -> np.ndarray:
    """Native or inverted contrast for any images ``[n, 1, H, W]`` (phantom or real).

    native: the images unchanged. inverted: ``clip(m - normalise(x), 0, 1)`` where ``m`` is the
    foreground: ``1 - x`` inside, 0 outside for a binary mask, and ``m * (1 - tissue value)`` for
    a soft (partial-volume) mask of an image that is itself ``m * tissue value``, as the phantom's.
    ``mask``: float or bool ``[n, H, W]``; estimated with :func:`foreground_mask` when absent.
    """
    x = _check_images(images)
    if contrast == "native":
        return x.copy()
    if contrast == "inverted":
        if mask is None:
            soft = foreground_mask(x).astype(np.float32)
        else:
            soft = np.asarray(mask, dtype=np.float32)
            soft = soft[:, 0] if soft.ndim == 4 else soft
        xn = normalise(x, soft > 0.5)
        return np.clip(soft[:, None] - xn, 0.0, 1.0).astype(np.float32)
    if contrast == "tissue":
        raise ValueError("contrast 'tissue' needs tissue maps: use render() (phantom only)")
    raise ValueError(f"unknown contrast {contrast!r}")


def render(
    tissue: np.ndarray,
    t1: np.ndarray,
    params: ScannerParams,
    rng: np.random.Generator,
    mask: np.ndarray | None = None,
) -> np.ndarray:
    """Phantom images ``[n, 1, H, W]`` float32 under ``params.contrast``.

    ``tissue``: ``[n, 3, H, W]`` (bg+csf, gm, wm) probabilities; ``t1``: ``[n, 1, H, W]`` template
    T1 deformed like the tissue; ``mask``: soft brain mask ``[n, H, W]`` (csf + gm + wm), which
    separates CSF from background (taken as ``t1 > 0`` when absent).

    tissue contrast: ``mix = csf * I_csf + gm * I_gm + wm * I_wm`` with ``I = tissue_intensity``;
    the T1 texture is the ratio ``r = t1 / sum_c p_c mu_c`` of the template T1 to its own
    partial-volume mixture model (``mu`` = :attr:`Anatomy.t1_means`; r clipped to [0.5, 2],
    1 where the model is below 0.05), and the image is ``mix * (1 - texture + texture * r)``.

    The contrast models are deterministic; ``rng`` is part of the signature so that every
    stage of the scanner pipeline is called the same way.
    """
    del rng
    tis = np.asarray(tissue, dtype=np.float32)
    t1a = _check_images(t1)
    if tis.ndim != 4 or tis.shape[1] != 3 or tis.shape[0] != t1a.shape[0] or tis.shape[2:] != t1a.shape[2:]:
        raise ValueError(f"tissue must be [n, 3, H, W] matching t1 {t1a.shape}, got {tis.shape}")
    if mask is None:
        m = (t1a[:, 0] > 0).astype(np.float32)
    else:
        m = np.asarray(mask, dtype=np.float32)
        m = m[:, 0] if m.ndim == 4 else m
    if params.contrast in ("native", "inverted"):
        return apply_contrast(t1a, params.contrast, m)
    if params.contrast != "tissue":
        raise ValueError(f"unknown contrast {params.contrast!r}")

    from .anatomy import load_mni

    gm, wm = tis[:, 1], tis[:, 2]
    csf = np.clip(m - gm - wm, 0.0, 1.0)
    i_csf, i_gm, i_wm = (float(v) for v in params.tissue_intensity)
    mix = csf * i_csf + gm * i_gm + wm * i_wm
    mu = load_mni().t1_means
    model = csf * mu[0] + gm * mu[1] + wm * mu[2]
    ratio = np.where(model > 0.05, t1a[:, 0] / np.maximum(model, 1e-6), 1.0)
    ratio = np.clip(ratio, *_TEXTURE_RATIO_RANGE)
    out = mix * (1.0 - params.texture + params.texture * ratio)
    return out[:, None].astype(np.float32)


def render_blend(
    tissue: np.ndarray,
    t1: np.ndarray,
    a: ScannerParams,
    b: ScannerParams,
    t: float,
    rng: np.random.Generator,
    mask: np.ndarray | None = None,
) -> np.ndarray:
    """``(1 - t) * render(a) + t * render(b)``: contrast drift between two scanners."""
    t = float(t)
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"t must lie in [0, 1], got {t}")
    if t == 0.0:
        return render(tissue, t1, a, rng, mask)
    if t == 1.0:
        return render(tissue, t1, b, rng, mask)
    ia = render(tissue, t1, a, rng, mask)
    ib = render(tissue, t1, b, rng, mask)
    return ((1.0 - t) * ia + t * ib).astype(np.float32)


# --------------------------------------------------------------------------- acquisition


def _acquisition_chain(x: np.ndarray, params: ScannerParams, seeds: list[int]) -> np.ndarray:
    """Bias field, blur, down-sampling, Gibbs ringing, Rician noise, up-sampling, gamma on normalised
    images ``[n, H, W]`` (MONAI transforms; MONAI sees the batch as channels where possible)."""
    from monai.transforms import (
        AdjustContrast,
        GaussianSmooth,
        GibbsNoise,
        RandBiasField,
        RandRicianNoise,
        Resize,
    )

    n, h, w = x.shape
    if params.bias_field > 0.0:
        bias = RandBiasField(degree=3, coeff_range=(-params.bias_field, params.bias_field), prob=1.0)
        bias.set_random_state(seed=seeds[0])
        x = np.stack([_to_numpy(bias(x[i : i + 1]))[0] for i in range(n)])
    if params.blur > 0.0:
        x = _to_numpy(GaussianSmooth(sigma=float(params.blur))(x))
    coarse = (max(1, int(round(h * params.resolution))), max(1, int(round(w * params.resolution))))
    low_res = params.resolution < 1.0 and coarse != (h, w)
    if low_res:
        x = _to_numpy(Resize(spatial_size=coarse, mode="area")(x))
    if params.gibbs > 0.0:
        x = _to_numpy(GibbsNoise(alpha=float(params.gibbs))(x))
    if params.noise > 0.0:
        rician = RandRicianNoise(
            prob=1.0, mean=0.0, std=float(params.noise), channel_wise=False, relative=False, sample_std=False
        )
        rician.set_random_state(seed=seeds[1])
        x = _to_numpy(rician(x))
    if low_res:
        x = _to_numpy(Resize(spatial_size=(h, w), mode="bilinear", align_corners=False)(x))
    if params.gamma != 1.0:
        adjust = AdjustContrast(gamma=float(params.gamma))
        x = np.stack([_to_numpy(adjust(np.clip(x[i : i + 1], 0.0, None)))[0] for i in range(n)])
    return x


def acquire(
    images: np.ndarray,
    params: ScannerParams,
    rng: np.random.Generator,
    mask: np.ndarray | None = None,
    normalise_output: bool = True,
) -> np.ndarray:
    """Acquisition model on images ``[n, 1, H, W]`` (phantom or real); float32, same shape.

    Stages, in order (see the module docstring for why): input normalisation, bias field, blur,
    down-sampling to the acquisition grid, Gibbs ringing, Rician noise, up-sampling, gamma,
    output normalisation (:func:`normalise`, skipped when ``normalise_output`` is False), global
    gain. ``mask``: foreground ``[n, H, W]`` (bool, or float thresholded at 0.5) used by the
    normalisations; estimated from the input when absent.
    """
    x = _check_images(images)
    n = x.shape[0]
    fg = _as_mask(mask, x)
    seeds = [_seed(rng) for _ in range(4)]  # bias, noise, scale, reserve: always drawn
    if n == 0:
        return x.copy()
    x = _acquisition_chain(normalise(x, fg)[:, 0], params, seeds)  # [n, H, W]

    out = x[:, None].astype(np.float32)
    if normalise_output:
        out = normalise(out, fg)
    lo, hi = (float(v) for v in params.intensity_scale)
    if (lo, hi) != (1.0, 1.0):
        gain = np.random.default_rng(seeds[2]).uniform(lo, hi, size=n).astype(np.float32)
        out = out * gain[:, None, None, None]
        if normalise_output:
            out = np.clip(out, 0.0, 1.0)
    return out.astype(np.float32, copy=False)


def apply_scanner(
    images: np.ndarray,
    params: ScannerParams,
    rng: np.random.Generator,
    mask: np.ndarray | None = None,
) -> np.ndarray:
    """The whole scanner model for images without tissue maps (real data):
    :func:`apply_contrast` (native or inverted) then :func:`acquire`."""
    x = _check_images(images)
    fg = _as_mask(mask, x)
    return acquire(apply_contrast(x, params.contrast, fg), params, rng, fg)

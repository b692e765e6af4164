"""The embedded phantom: labelled 2D axial brain slices from real anatomy.

Patients come from the MNI152 2009 template (:mod:`simlab.data.anatomy`); a
:class:`PopulationParams` describes how a hospital's patients vary, and a
:class:`~simlab.data.appearance.ScannerParams` how its scanner renders them.
Classes: 0 = background + CSF, 1 = grey matter, 2 = white matter.

One patient, in order (all at the output grid, vectorised over patients with torch):

1. **Slice.** A position ``f ~ U(slices)`` along the axial extent that holds both tissues
   (:attr:`Anatomy.z_range`); the plane at the fractional index is the linear interpolation of
   the two nearest template slices (pre-resampled by :func:`~simlab.data.anatomy.axial_stack`),
   so positions are continuous.
2. **Atrophy** ``a ~ U(atrophy)``. CSF spreads into the tissue next to it: the CSF probability
   is grey-level dilated by a radius ``rho = a * ATROPHY_RADIUS_MM`` (2.5 mm at a = 1; alternate
   3x3 cross and square max-filters approximate a disc, and a fractional radius blends the two
   neighbouring integer dilations, so the result is continuous and monotone in ``a``). The
   gained CSF mass ``delta = min(dilated, mask) - csf`` is taken from grey matter first,
   ``gm_loss = min(gm, delta)``; what is left comes from white matter at half rate,
   ``wm_loss = 0.5 * min(wm, delta - gm_loss)`` (white matter shrinks less). CSF gains
   exactly what the tissues lose, so ``csf + gm + wm`` still equals the brain mask: sulci widen
   and the cortex thins from the outside, ventricles enlarge, the intracranial volume is
   unchanged. T1 follows the mixture model: ``t1 += sum_c delta_c * mu_c`` with the template's
   pure-tissue T1 values ``mu`` (:attr:`Anatomy.t1_means`).
3. **Shape.** A smooth random deformation, scaled by ``elastic``: a displacement field from
   a 6x6 grid of control vectors (standard deviation ``ELASTIC_MM`` = 3 mm, truncated at 2.5
   sigma) upsampled bicubically over the image, plus a global similarity transform (rotation
   with standard deviation 4 degrees, isotropic log-scale 0.04 - head size -, translation
   3 mm), all times ``elastic``. The same sampling grid moves csf, gm, wm and T1 (bilinear;
   convex weights keep the probabilities summing to the mask). ``flip``: with probability 1/2
   the deformed image is mirrored left-right (folded into the same grid). The template is
   symmetric, so the flip matters through the (asymmetric) deformation it mirrors; every draw is made whether or not ``flip`` is on, so switching it off
   leaves all other draws unchanged.
4. **Labels** = argmax of (1 - gm - wm, gm, wm): class 0 wherever outside the brain.
   Every slice must hold at least ``MIN_CLASS_SHARE`` (1 %) of its brain pixels as grey matter
   and as white matter; patients that do not are redrawn (new slice, atrophy and shape) from
   the same generator, so the result stays a deterministic function of it.

Resolution: the 233 x 233 mm padded plane spans ``size`` pixels (1.82 mm at 128, 3.64 mm at
64); radii and displacements are given in mm and converted.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np

from .anatomy import axial_stack, load_mni, template_side_mm
from .appearance import (
    ScannerParams,
    acquire,
    interpolate_fields,
    render,
    render_blend,
)
from .appearance import interpolate as interpolate_scanner

ATROPHY_RADIUS_MM = 2.5
"""CSF dilation radius at atrophy = 1."""

WM_LOSS_RATE = 0.5
"""Share of the remaining CSF gain taken from white matter once grey matter is exhausted."""

ELASTIC_MM = 3.0
"""Standard deviation of the control-point displacements at elastic = 1."""

ELASTIC_GRID = 6
"""Control points per side of the displacement field."""

ROTATION_DEG = 4.0
LOG_SCALE = 0.04
TRANSLATION_MM = 3.0
TRUNCATE_SIGMA = 2.5

MIN_CLASS_SHARE = 0.01
"""Minimum share of the slice's brain pixels labelled GM, and labelled WM."""

MAX_REDRAWS = 50


@dataclass(frozen=True)
class PopulationParams:
    """How one hospital's patients vary (see the module docstring for the model)."""

    slices: tuple[float, float] = field(
        default=(0.30, 0.75),
        metadata={
            "help": "range of axial positions (fractions of the extent holding both GM and WM) "
            "from which each patient's slice is drawn uniformly"
        },
    )
    atrophy: tuple[float, float] = field(
        default=(0.0, 0.0),
        metadata={
            "help": "range of per-patient atrophy in [0, 1] (0 = template anatomy, 1 = severe): "
            "cortical thinning, wider sulci, larger ventricles"
        },
    )
    elastic: float = field(
        default=1.0,
        metadata={
            "ge": 0.0,
            "le": 4.0,
            "help": "scale of the smooth random deformation and head pose/size variation (0 = none)",
        },
    )
    flip: bool = field(default=True, metadata={"help": "random left-right flip"})

    def check(self) -> list[tuple[str, str]]:
        """Range checks of the two tuple fields; (field, message) pairs, empty when valid."""
        problems: list[tuple[str, str]] = []
        for name in ("slices", "atrophy"):
            rng = tuple(getattr(self, name))
            if len(rng) != 2:
                problems.append((name, f"needs 2 values (low, high), got {len(rng)}"))
                continue
            lo, hi = float(rng[0]), float(rng[1])
            if not (0.0 <= lo <= 1.0 and 0.0 <= hi <= 1.0):
                problems.append((name, f"values must lie in [0, 1], got ({lo}, {hi})"))
            if lo > hi:
                problems.append((name, f"low end {lo} is above high end {hi}"))
        return problems


def interpolate(a: PopulationParams, b: PopulationParams, t: float) -> PopulationParams:
    """Population ``t`` of the way from ``a`` to ``b``: numeric fields linearly (tuples
    element-wise), ``flip`` from the nearer end (``a`` for ``t < 0.5``)."""
    if not isinstance(a, PopulationParams) or not isinstance(b, PopulationParams):
        raise TypeError("interpolate expects two PopulationParams")
    return interpolate_fields(a, b, t)


@dataclass(frozen=True, eq=False)
class Patients:
    """A batch of phantom patients at one grid size."""

    tissue: np.ndarray
    """float32 [n, 3, S, S]: probabilities of (background + CSF, GM, WM), summing to 1."""
    t1: np.ndarray
    """float32 [n, 1, S, S]: template T1 intensities, deformed (and atrophied) like the tissue."""
    labels: np.ndarray
    """uint8 [n, S, S]: argmax of ``tissue``."""
    mask: np.ndarray
    """float32 [n, S, S]: brain (intracranial) probability, csf + gm + wm."""
    slice_pos: np.ndarray
    """float64 [n]: axial position drawn, as a fraction of the extent holding both tissues."""
    atrophy: np.ndarray
    """float64 [n]: atrophy drawn."""
    flipped: np.ndarray
    """bool [n]: mirrored left-right."""

    def __len__(self) -> int:
        return int(self.labels.shape[0])


# --------------------------------------------------------------------------- patient model


def _dilate(x, iteration: int):
    """One step of a disc-like grey-level dilation of ``x`` >= 0 [n, 1, S, S]: odd steps a 3x3
    cross, even steps a 3x3 square (shifted maxima; zero padding is neutral for x >= 0)."""
    import torch
    import torch.nn.functional as F

    p = F.pad(x, (1, 1, 1, 1))
    c = p[..., 1:-1, 1:-1]
    vertical = torch.maximum(torch.maximum(p[..., :-2, 1:-1], c), p[..., 2:, 1:-1])
    if iteration % 2 == 1:
        horizontal = torch.maximum(p[..., 1:-1, :-2], p[..., 1:-1, 2:])
        return torch.maximum(vertical, horizontal)
    q = F.pad(vertical, (1, 0, 0, 0))[..., :-1], F.pad(vertical, (0, 1, 0, 0))[..., 1:]
    return torch.maximum(torch.maximum(q[0], vertical), q[1])


def _labels(gm, wm):
    """``argmax(1 - gm - wm, gm, wm)`` (first class on ties) as uint8, by comparisons."""
    import torch

    bg = 1.0 - gm - wm
    lab = torch.zeros(gm.shape, dtype=torch.uint8)
    lab[(gm > bg) & (gm >= wm)] = 1
    lab[(wm > bg) & (wm > gm)] = 2
    return lab


def _atrophy(src, radius_px: np.ndarray, mu: tuple[float, float, float]):
    """Atrophied copy of ``src`` [n, 4, S, S] (csf, gm, wm, t1); see the module docstring."""
    import torch

    if not np.any(radius_px > 0):
        return src
    csf, gm, wm, t1 = src[:, 0:1], src[:, 1:2], src[:, 2:3], src[:, 3:4]
    mask = csf + gm + wm
    k_max = int(np.ceil(radius_px.max()))
    steps = [csf]
    for k in range(1, k_max + 1):
        steps.append(_dilate(steps[-1], k))
    stacked = torch.stack(steps)  # [k_max + 1, n, 1, S, S]
    lower = np.minimum(np.floor(radius_px).astype(np.int64), k_max)
    upper = np.minimum(lower + 1, k_max)
    frac = torch.as_tensor(radius_px - lower, dtype=src.dtype).view(-1, 1, 1, 1)
    idx = torch.arange(len(radius_px))
    d_lo = stacked[torch.as_tensor(lower), idx]
    d_hi = stacked[torch.as_tensor(upper), idx]
    dilated = d_lo + frac * (d_hi - d_lo)
    delta = torch.clamp(torch.minimum(dilated, mask) - csf, min=0.0)
    gm_loss = torch.minimum(gm, delta)
    wm_loss = WM_LOSS_RATE * torch.minimum(wm, delta - gm_loss)
    gain = gm_loss + wm_loss
    t1_new = t1 + gain * mu[0] - gm_loss * mu[1] - wm_loss * mu[2]
    return torch.cat([csf + gain, gm - gm_loss, wm - wm_loss, t1_new], dim=1)


def _sampling_grid(n: int, size: int, elastic: float, flips: np.ndarray, rng: np.random.Generator):
    """Per-patient sampling grid [n, S, S, 2] in grid_sample's normalised coordinates."""
    import torch
    import torch.nn.functional as F

    mm_to_norm = 2.0 / template_side_mm()
    tn = lambda shape: np.clip(rng.standard_normal(shape), -TRUNCATE_SIGMA, TRUNCATE_SIGMA)  # noqa: E731
    pose = tn((n, 4))  # rotation, log-scale, tx, ty
    ctrl = tn((n, 2, ELASTIC_GRID, ELASTIC_GRID))

    lin = (torch.arange(size, dtype=torch.float32) + 0.5) * (2.0 / size) - 1.0  # pixel centres
    gy, gx = torch.meshgrid(lin, lin, indexing="ij")
    xs, ys = gx.expand(n, size, size), gy.expand(n, size, size)
    if elastic > 0.0:
        theta = torch.as_tensor(np.deg2rad(ROTATION_DEG) * elastic * pose[:, 0], dtype=torch.float32)
        scale = torch.as_tensor(np.exp(-LOG_SCALE * elastic * pose[:, 1]), dtype=torch.float32)
        shift = torch.as_tensor(TRANSLATION_MM * mm_to_norm * elastic * pose[:, 2:], dtype=torch.float32)
        cos, sin = torch.cos(theta).view(n, 1, 1), torch.sin(theta).view(n, 1, 1)
        scale = scale.view(n, 1, 1)
        disp = torch.as_tensor(ELASTIC_MM * mm_to_norm * elastic * ctrl, dtype=torch.float32)
        disp = F.interpolate(disp, size=(size, size), mode="bicubic", align_corners=True)
        xs, ys = (
            scale * (cos * xs - sin * ys) + shift[:, 0].view(n, 1, 1) + disp[:, 0],
            scale * (sin * xs + cos * ys) + shift[:, 1].view(n, 1, 1) + disp[:, 1],
        )
    grid = torch.stack([xs, ys], dim=-1)
    # a flip mirrors the deformed image: output column j reads what column S-1-j would read
    flip = torch.as_tensor(flips).view(n, 1, 1, 1)
    return torch.where(flip, grid.flip(2), grid)


@functools.lru_cache(maxsize=4)
def _stack_tensor(size: int):
    import torch

    return torch.from_numpy(axial_stack(size).copy())


def _draw(pop: PopulationParams, n: int, size: int, rng: np.random.Generator):
    """One attempt for ``n`` patients: (csf, gm, wm, t1) [n, 4, S, S] tensor and the draws."""
    import torch
    import torch.nn.functional as F

    stack = _stack_tensor(size)
    z_max = stack.shape[0] - 1
    pos = rng.uniform(*pop.slices, size=n)
    atrophy = rng.uniform(*pop.atrophy, size=n)
    coin = rng.random(n)  # drawn either way: the other draws do not depend on pop.flip
    flips = (coin < 0.5) if pop.flip else np.zeros(n, dtype=bool)

    zf = pos * z_max
    i0 = np.clip(np.floor(zf).astype(np.int64), 0, z_max)
    i1 = np.minimum(i0 + 1, z_max)
    wz = torch.as_tensor(zf - i0, dtype=torch.float32).view(n, 1, 1, 1)
    src = stack[torch.as_tensor(i0)] * (1.0 - wz) + stack[torch.as_tensor(i1)] * wz

    mm_per_px = template_side_mm() / size
    src = _atrophy(src, atrophy * ATROPHY_RADIUS_MM / mm_per_px, load_mni().t1_means)

    grid = _sampling_grid(n, size, float(pop.elastic), flips, rng)
    out = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out, pos, atrophy, flips


def make_patients(pop: PopulationParams, n: int, size: int, rng: np.random.Generator) -> Patients:
    """``n`` phantom patients on a ``size x size`` grid, drawn from ``pop`` with ``rng``."""
    import torch

    problems = pop.check()
    if problems:
        raise ValueError("; ".join(f"{k}: {m}" for k, m in problems))
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    vol = torch.zeros((n, 4, size, size), dtype=torch.float32)
    pos = np.zeros(n)
    atr = np.zeros(n)
    flp = np.zeros(n, dtype=bool)
    todo = np.arange(n)
    with torch.no_grad():
        for _ in range(MAX_REDRAWS):
            if len(todo) == 0:
                break
            out, p, a, f = _draw(pop, len(todo), size, rng)
            vol[todo] = out
            pos[todo], atr[todo], flp[todo] = p, a, f
            gm, wm = out[:, 1], out[:, 2]
            lab = _labels(gm, wm)
            brain = ((out[:, 0] + gm + wm) > 0.5).sum(dim=(1, 2)).float()
            need = torch.clamp(MIN_CLASS_SHARE * brain, min=1.0)
            ok = ((lab == 1).sum(dim=(1, 2)) >= need) & ((lab == 2).sum(dim=(1, 2)) >= need)
            todo = todo[~ok.numpy()]
    if len(todo):
        raise ValueError(
            f"could not draw slices holding both grey and white matter for {len(todo)} "
            f"patients in {MAX_REDRAWS} attempts; widen PopulationParams.slices "
            f"(now {pop.slices}) or lower atrophy (now {pop.atrophy})"
        )

    csf, gm, wm, t1 = (vol[:, i].clamp(0.0, 1.0) for i in range(4))
    gm_wm = torch.clamp(gm + wm, max=1.0)
    tissue = torch.stack([1.0 - gm_wm, gm, wm], dim=1)
    labels = _labels(gm, wm)
    mask = torch.clamp(csf + gm + wm, max=1.0)
    return Patients(
        tissue=tissue.numpy().astype(np.float32, copy=False),
        t1=t1[:, None].numpy().astype(np.float32, copy=False),
        labels=labels.numpy(),
        mask=mask.numpy().astype(np.float32, copy=False),
        slice_pos=pos,
        atrophy=atr,
        flipped=flp,
    )


# --------------------------------------------------------------------------- entry points


def _streams(seed: int) -> tuple[np.random.Generator, np.random.Generator]:
    """Independent generators for anatomy and scanner: the same seed gives the same patients
    (and labels) under any scanner, so scanners can be compared on identical anatomy."""
    anatomy_ss, scanner_ss = np.random.SeedSequence(int(seed)).spawn(2)
    return np.random.default_rng(anatomy_ss), np.random.default_rng(scanner_ss)


def generate(
    pop: PopulationParams, scanner: ScannerParams, n: int, size: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(images float32 [n, 1, size, size] in [0, 1], labels uint8 [n, size, size])``.

    A deterministic function of its arguments; patients depend only on ``(pop, n, size, seed)``.
    """
    problems = scanner.check()
    if problems:
        raise ValueError("; ".join(f"{k}: {m}" for k, m in problems))
    rng_anat, rng_scan = _streams(seed)
    pts = make_patients(pop, n, size, rng_anat)
    images = render(pts.tissue, pts.t1, scanner, rng_scan, mask=pts.mask)
    images = acquire(images, scanner, rng_scan, mask=pts.mask > 0.5)
    return images, pts.labels


def generate_interpolated(
    pop_a: PopulationParams,
    scan_a: ScannerParams,
    pop_b: PopulationParams,
    scan_b: ScannerParams,
    t: float,
    n: int,
    size: int,
    seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`generate` ``t`` of the way from hospital state A to state B (gradual drift).

    Population and numeric scanner fields are interpolated linearly; differing contrasts are
    blended image-wise (:func:`~simlab.data.appearance.render_blend`). At ``t = 0`` and
    ``t = 1`` the result equals ``generate`` with A, respectively B, and the same seed.
    """
    pop = interpolate(pop_a, pop_b, t)
    scan = interpolate_scanner(scan_a, scan_b, t)
    problems = scan.check()
    if problems:
        raise ValueError("; ".join(f"{k}: {m}" for k, m in problems))
    rng_anat, rng_scan = _streams(seed)
    pts = make_patients(pop, n, size, rng_anat)
    if scan_a.contrast == scan_b.contrast:
        images = render(pts.tissue, pts.t1, scan, rng_scan, mask=pts.mask)
    else:
        images = render_blend(pts.tissue, pts.t1, scan_a, scan_b, t, rng_scan, mask=pts.mask)
    images = acquire(images, scan, rng_scan, mask=pts.mask > 0.5)
    return images, pts.labels

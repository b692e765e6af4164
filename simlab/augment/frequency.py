"""FedDG-style continuous frequency-space interpolation with a shared low-frequency amplitude bank.

Method (Liu et al., FedDG / ELCFS, CVPR 2021). For an image ``x`` with 2-D spectrum
``F = fft2(x) = A·e^{jP}`` (``A = |F|``, ``P = angle(F)``, per channel) and a target amplitude
``A_t`` taken from *another* hospital, the augmented image is::

    A' = [(1 − λ)·A + λ·A_t] ⊙ M + A ⊙ (1 − M)
    x' = real( ifft2( A'·e^{jP} ) )

where ``M`` is the centred low-frequency square and ``λ`` is drawn per sample. The phase ``P``
(which carries the anatomy) stays local; only the low-frequency amplitude (global intensity,
contrast, scanner "style") moves towards the other hospital's.

Window
------
The half-width is ``b = floor(min(H, W)·alpha)`` (as in the reference code; a 1e-9 slack absorbs
binary round-off such as ``100·0.29 = 28.999…``). The block is the centred ``(2b+1)×(2b+1)`` square
after ``fftshift``: rows ``H//2 − b … H//2 + b`` and columns ``W//2 − b … W//2 + b`` of
``fftshift(fft2(x))``, i.e. exactly the signed frequencies ``k_y, k_x ∈ {−b, …, b}``, which in the
unshifted spectrum are the indices ``k mod H`` and ``k mod W``. The block is therefore symmetric
under ``k → −k``; together with a target that is itself the amplitude of a real image this keeps
``A'`` Hermitian-symmetric, so ``ifft2`` is real up to round-off and taking the real part does not
perturb the phase. ``2b + 1 ≤ min(H, W)`` is required (``alpha < 0.5``). The code gathers the block
straight from the unshifted spectrum (no full ``fftshift``). Examples: ``alpha = 0.01`` gives a 3×3
block at 128² … 199², and the DC coefficient alone (1×1) below 100 pixels.

Scale: the FFT is unnormalised (``norm="backward"``, as ``np.fft.fft2`` in the reference code), so
amplitudes grow with ``H·W``; all hospitals must share one image grid, which the bank checks
through the block size only.

Reference-code mode
-------------------
The released FedDG training code calls its mutation with ``L = 0`` (only the DC coefficient) and
hard-swaps the amplitude (``λ = 1``); the continuous ``λ`` is computed but unused. With
``reference_code=True`` this module reproduces that: ``b = 0`` regardless of ``alpha`` and
``λ = 1``. The paper's version (``λ ~ U(0, 1)``, small ``alpha``) is the default.

Privacy
-------
Only :func:`make_bank_entries` output leaves a hospital: low-frequency amplitude blocks of a random
sample of at most ``bank_size`` images, float32, never images and never phases. This is *not* a
formal privacy guarantee: amplitudes are deterministic per-image statistics that carry global
intensity, contrast and scanner style, and phase-retrieval methods (Gerchberg–Saxton / Fienup with
support or non-negativity priors) can partly rebuild an image from its magnitude. Sharing only the
``(2b+1)²`` block that the augmentation uses (rather than the full spectrum, as the reference code
does) limits what is exposed; the blocks are per-image, not aggregated, and no noise is added.
:func:`bank_nbytes` counts the bytes shared.

Computation is batched ``torch.fft`` on the images' device, in float32/complex64 (float64/complex128
when the input is float64); outputs keep the input dtype.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

__all__ = [
    "FrequencyParams",
    "FrequencyDraw",
    "FrequencyAugmenter",
    "half_width",
    "low_freq_block",
    "amplitude_block",
    "make_bank_entries",
    "bank_nbytes",
    "interpolate_amplitude",
]

_ALPHA_SLACK = 1e-9


@dataclass(frozen=True)
class FrequencyParams:
    """Configuration of the frequency-space augmentation (one section of a scenario)."""

    enabled: bool = field(default=False, metadata={"help": "apply the augmentation during local training"})
    alpha: float = field(
        default=0.01,
        metadata={
            "ge": 0.0,
            "lt": 0.5,
            "why": "the (2b+1)² block, b = floor(min(H,W)*alpha), must fit in the spectrum: at 0.5 it covers it all",
            "help": "low-frequency half-width ratio: b = floor(min(H,W)*alpha), block (2b+1)^2 centred on DC",
        },
    )
    lambda_dist: Literal["uniform", "fixed"] = field(
        default="uniform", metadata={"help": "how the mixing weight lambda is drawn per sample"}
    )
    lambda_value: float = field(
        default=1.0, metadata={"ge": 0.0, "le": 1.0, "help": "lambda when lambda_dist is 'fixed'"}
    )
    lambda_low: float = field(
        default=0.0, metadata={"ge": 0.0, "le": 1.0, "help": "lower end of lambda ~ U(low, high)"}
    )
    lambda_high: float = field(
        default=1.0, metadata={"ge": 0.0, "le": 1.0, "help": "upper end of lambda ~ U(low, high)"}
    )
    prob: float = field(
        default=0.5, metadata={"ge": 0.0, "le": 1.0, "help": "share of the samples of a batch that are augmented"}
    )
    bank_size: int = field(
        default=16, metadata={"ge": 1, "le": 100_000,
                              "why": "a hospital shares at most its window's images (hospitals[].size ≤ 100,000)",
                              "help": "amplitude blocks each hospital shares (at most its image count)"}
    )
    clamp: bool = field(
        default=False, metadata={"help": "clip each augmented image to its own input [min, max] range"}
    )
    reference_code: bool = field(
        default=False,
        metadata={"help": "released-code behaviour: only the DC coefficient (b = 0), hard swap lambda = 1"},
    )
    episodic: bool = field(
        default=False, metadata={"help": "episodic meta-learning step on the augmented images (carried flag)"}
    )

    def check(self) -> list[tuple[str, str]]:
        problems: list[tuple[str, str]] = []
        if self.lambda_dist == "uniform" and self.lambda_low > self.lambda_high:
            problems.append(
                ("lambda_low", f"lambda_low ({self.lambda_low}) must not exceed lambda_high ({self.lambda_high})")
            )
        return problems

    def block_half_width(self, height: int, width: int) -> int:
        """Half-width ``b`` used for images of ``height × width`` (0 in reference-code mode)."""
        return 0 if self.reference_code else half_width(height, width, self.alpha)


# ------------------------------------------------------------------------------ pure functions
def half_width(height: int, width: int, alpha: float) -> int:
    """``b = floor(min(H, W)·alpha)``; raises when the ``(2b+1)²`` block does not fit the image."""
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    n = min(int(height), int(width))
    if n < 1:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    b = int(math.floor(n * float(alpha) + _ALPHA_SLACK))
    if 2 * b + 1 > n:
        raise ValueError(
            f"alpha={alpha} gives half-width b={b}, a {2 * b + 1}x{2 * b + 1} block that does not fit "
            f"a {height}x{width} image (need 2b+1 <= min(H, W))"
        )
    return b


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _block_index(n: int, b: int, device: torch.device) -> torch.Tensor:
    """Unshifted indices of the signed frequencies −b … b (centred order, as after fftshift)."""
    return torch.arange(-b, b + 1, device=device) % n


def _check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a [B, C, H, W] tensor, got {shape}")
    if images.is_complex() or not images.is_floating_point():
        raise ValueError(f"images must be a real floating-point tensor, got {images.dtype}")


def _gather_block(spectrum: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    h, w = spectrum.shape[-2:]
    rows = _block_index(h, b, spectrum.device)
    cols = _block_index(w, b, spectrum.device)
    block = spectrum.index_select(-2, rows).index_select(-1, cols)
    return block, rows, cols


def low_freq_block(images: torch.Tensor, alpha: float) -> torch.Tensor:
    """Centred low-frequency amplitude block ``|fftshift(fft2(x))|[c−b : c+b+1]`` per channel.

    ``images``: ``[B, C, H, W]`` real. Returns ``[B, C, 2b+1, 2b+1]`` with
    ``b = floor(min(H, W)·alpha)``, DC at the centre ``[b, b]``; float64 for float64 input,
    float32 otherwise (half precision would overflow: the DC term is the pixel sum).
    """
    _check_images(images)
    h, w = images.shape[-2:]
    return amplitude_block(images, half_width(h, w, alpha))


def amplitude_block(images: torch.Tensor, b: int) -> torch.Tensor:
    """:func:`low_freq_block` for a given half-width ``b`` (the ``(2b+1)²`` block must fit the image):
    the centred low-frequency amplitudes ``[B, C, 2b+1, 2b+1]``, DC at ``[b, b]``, of the same size as
    the blocks a bank of half-width ``b`` holds."""
    _check_images(images)
    if b < 0 or 2 * b + 1 > min(images.shape[-2:]):
        raise ValueError(f"a {2 * b + 1}x{2 * b + 1} block does not fit a {tuple(images.shape[-2:])} image")
    spectrum = torch.fft.fft2(images.to(_compute_dtype(images.dtype)))
    block, _, _ = _gather_block(spectrum, b)
    return block.abs()


def interpolate_amplitude(
    images: torch.Tensor, targets_block: torch.Tensor, lam: torch.Tensor | float
) -> torch.Tensor:
    """Mix the low-frequency amplitude of ``images`` towards ``targets_block``, keeping the phase.

    ``images``: ``[B, C, H, W]``; ``targets_block``: ``[B, C, 2b+1, 2b+1]`` (or ``C = 1``, broadcast
    over channels) in centred order as returned by :func:`low_freq_block`; ``b`` is read from its
    size. ``lam``: ``[B]`` or a scalar. In the block ``A' = (1 − λ)·A + λ·A_t``; elsewhere the
    complex spectrum is left untouched (bit-exact), and inside it the new coefficient is
    ``polar(A', angle(F))``. Returns ``real(ifft2(F'))`` in the input dtype.
    """
    _check_images(images)
    bsz, chans, h, w = images.shape
    side = targets_block.shape[-1]
    if targets_block.ndim != 4 or targets_block.shape[-2] != side or side % 2 != 1:
        raise ValueError(f"targets_block must be [B, C, 2b+1, 2b+1], got {tuple(targets_block.shape)}")
    if targets_block.shape[0] != bsz or targets_block.shape[1] not in (1, chans):
        raise ValueError(
            f"targets_block {tuple(targets_block.shape)} does not match images {tuple(images.shape)} "
            "(same batch size; same channel count or 1)"
        )
    b = (targets_block.shape[-1] - 1) // 2
    if 2 * b + 1 > min(h, w):
        raise ValueError(f"a {2 * b + 1}x{2 * b + 1} block does not fit a {h}x{w} image")
    cdtype = _compute_dtype(images.dtype)
    x = images.to(cdtype)
    target = targets_block.to(device=images.device, dtype=cdtype)
    lam_t = torch.as_tensor(lam, dtype=cdtype, device=images.device)
    if lam_t.ndim == 0:
        lam_t = lam_t.expand(bsz)
    if lam_t.shape != (bsz,):
        raise ValueError(f"lam must be a scalar or have shape [{bsz}], got {tuple(lam_t.shape)}")
    lam_t = lam_t.view(bsz, 1, 1, 1)

    spectrum = torch.fft.fft2(x)
    block, rows, cols = _gather_block(spectrum, b)
    amp = block.abs()
    mixed = (1.0 - lam_t) * amp + lam_t * target
    new_block = torch.polar(mixed, block.angle())
    spectrum[:, :, rows[:, None], cols[None, :]] = new_block
    out = torch.fft.ifft2(spectrum).real
    return out.to(images.dtype)


def _choose(n: int, k: int, rng: np.random.Generator | torch.Generator) -> torch.Tensor:
    if isinstance(rng, np.random.Generator):
        return torch.as_tensor(rng.choice(n, size=k, replace=False), dtype=torch.long)
    if isinstance(rng, torch.Generator):
        return torch.randperm(n, generator=rng, device=rng.device)[:k].cpu()
    raise TypeError(f"rng must be a numpy Generator or a torch.Generator, got {type(rng).__name__}")


def make_bank_entries(
    images: torch.Tensor,
    params: FrequencyParams,
    rng: np.random.Generator | torch.Generator,
) -> torch.Tensor:
    """Amplitude blocks that one hospital shares: the only output of a hospital to the bank.

    Picks ``k = min(bank_size, N)`` distinct images of ``images`` (``[N, C, H, W]``) uniformly at
    random without replacement (fewer entries rather than duplicates when the hospital holds fewer
    images) and returns their low-frequency amplitude blocks ``[k, C, 2b+1, 2b+1]`` as a contiguous
    float32 CPU tensor (the wire format); ``b = params.block_half_width(H, W)``. Only the chosen
    images are transformed. No image or phase is returned.
    """
    _check_images(images)
    n, _, h, w = images.shape
    if n == 0:
        raise ValueError("a hospital needs at least one image to share amplitude blocks")
    b = params.block_half_width(h, w)
    k = min(int(params.bank_size), n)
    idx = _choose(n, k, rng).to(images.device)
    with torch.no_grad():
        spectrum = torch.fft.fft2(images.index_select(0, idx).to(_compute_dtype(images.dtype)))
        block, _, _ = _gather_block(spectrum, b)
        amp = block.abs()
    return amp.to(device="cpu", dtype=torch.float32).contiguous()


def bank_nbytes(entries: torch.Tensor | Mapping[str, torch.Tensor] | Iterable[torch.Tensor]) -> int:
    """Bytes of the shared payload: ``numel · element_size`` summed over the tensor(s)."""
    if isinstance(entries, torch.Tensor):
        return int(entries.numel() * entries.element_size())
    if isinstance(entries, Mapping):
        return sum(bank_nbytes(v) for v in entries.values())
    return sum(bank_nbytes(v) for v in entries)


# ------------------------------------------------------------------------------- augmenter
@dataclass(frozen=True)
class FrequencyDraw:
    """Random choices for one batch: which samples, which bank entry, which λ.

    ``sample_idx``, ``entry_idx`` (row of the augmenter's concatenated donor bank) and ``lam`` are
    CPU tensors of equal length ``k``; ``donors`` names the hospital of each chosen entry.
    """

    batch_size: int
    sample_idx: torch.Tensor
    entry_idx: torch.Tensor
    lam: torch.Tensor
    donors: tuple[str, ...]


class FrequencyAugmenter:
    """Applies continuous frequency-space interpolation with amplitude blocks of *other* hospitals.

    ``bank`` maps hospital id → ``[n_h, C, 2b+1, 2b+1]`` blocks (:func:`make_bank_entries`). Entries
    of ``own_id`` and empty ones are ignored; with no other hospital (or ``enabled=False``) a call
    returns its input tensor unchanged (the same object).

    Per batch of ``B`` images the draws come, in this order, from ``generator`` (a CPU
    ``torch.Generator``, or an int seed for one), so the result is deterministic and independent of
    the images' device:

    1. ``k = floor(prob·B + u)``, ``u ~ U(0, 1)``: exactly ``prob·B`` when that is an integer, and
       ``E[k] = prob·B`` otherwise (stochastic rounding keeps small batches unbiased);
    2. ``k`` distinct samples, uniformly (a random permutation, sorted);
    3. per chosen sample a donor hospital, uniform over the other hospitals (donor ids sorted, so
       dict order does not matter; a hospital sharing more entries is not favoured), then an entry
       uniform within that donor;
    4. ``λ ~ U(lambda_low, lambda_high)``, or ``lambda_value`` (``fixed``), or 1 (reference code).

    The chosen samples are transformed with :func:`interpolate_amplitude` (no autograd); the others
    are copied bit-exactly. With ``clamp=True`` each transformed image is clipped to the
    ``[min, max]`` of its own input (the reference code clips to the valid range [0, 255]; a
    per-image range is the unit-free analogue). ``episodic`` is carried, not used here.
    """

    def __init__(
        self,
        params: FrequencyParams,
        bank: Mapping[str, torch.Tensor],
        own_id: str,
        generator: torch.Generator | int,
    ) -> None:
        problems = params.check()
        if problems:
            raise ValueError("; ".join(f"{k}: {m}" for k, m in problems))
        self.params = params
        self.own_id = own_id
        if isinstance(generator, int):
            generator = torch.Generator().manual_seed(generator)
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or an int seed, got {type(generator).__name__}")
        if generator.device.type != "cpu":
            raise ValueError("generator must be a CPU torch.Generator (draws are device-independent)")
        self.generator = generator

        donors = sorted(h for h, e in bank.items() if h != own_id and int(e.shape[0]) > 0)
        blocks: list[torch.Tensor] = []
        for h in donors:
            e = bank[h]
            if e.ndim != 4 or e.shape[-1] != e.shape[-2] or e.shape[-1] % 2 != 1:
                raise ValueError(f"bank entries of {h!r} must be [n, C, 2b+1, 2b+1], got {tuple(e.shape)}")
            if blocks and e.shape[1:] != blocks[0].shape[1:]:
                raise ValueError(
                    f"bank entries of {h!r} have shape {tuple(e.shape[1:])}, others {tuple(blocks[0].shape[1:])}"
                )
            blocks.append(e.detach().to("cpu"))
        self.donors: tuple[str, ...] = tuple(donors)
        self._counts = torch.tensor([b.shape[0] for b in blocks], dtype=torch.long)
        self._offsets = torch.cumsum(self._counts, 0) - self._counts
        self._entries = torch.cat(blocks) if blocks else None
        self._on_device: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    @property
    def active(self) -> bool:
        """True when a call can change images (enabled, at least one other hospital in the bank)."""
        return self.params.enabled and self._entries is not None

    @property
    def block_size(self) -> int | None:
        """Side ``2b+1`` of the donor blocks (None without donors)."""
        return None if self._entries is None else int(self._entries.shape[-1])

    def entries(self) -> torch.Tensor | None:
        """Concatenated donor blocks (rows indexed by :attr:`FrequencyDraw.entry_idx`)."""
        return self._entries

    def draw(self, batch_size: int) -> FrequencyDraw:
        """Random choices for a batch of ``batch_size`` (consumes the generator; see class doc)."""
        g = self.generator
        p = self.params
        empty = torch.zeros(0, dtype=torch.long)
        if not self.active or batch_size <= 0:
            return FrequencyDraw(batch_size, empty, empty, torch.zeros(0, dtype=torch.float64), ())
        u = float(torch.rand((), generator=g, dtype=torch.float64))
        k = min(batch_size, max(0, int(math.floor(p.prob * batch_size + u))))
        sample_idx = torch.sort(torch.randperm(batch_size, generator=g)[:k]).values
        donor = torch.randint(len(self.donors), (k,), generator=g)
        counts = self._counts[donor]
        within = torch.minimum(
            (torch.rand(k, generator=g, dtype=torch.float64) * counts).long(), counts - 1
        )
        entry_idx = self._offsets[donor] + within
        if p.reference_code:
            lam = torch.ones(k, dtype=torch.float64)
        elif p.lambda_dist == "fixed":
            lam = torch.full((k,), float(p.lambda_value), dtype=torch.float64)
        else:
            lo, hi = float(p.lambda_low), float(p.lambda_high)
            lam = lo + (hi - lo) * torch.rand(k, generator=g, dtype=torch.float64)
        names = tuple(self.donors[i] for i in donor.tolist())
        return FrequencyDraw(batch_size, sample_idx, entry_idx, lam, names)

    def _entries_on(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key = (device, dtype)
        cached = self._on_device.get(key)
        if cached is None:
            assert self._entries is not None
            cached = self._entries.to(device=device, dtype=dtype)
            self._on_device[key] = cached
        return cached

    def apply(self, images: torch.Tensor, draw: FrequencyDraw) -> torch.Tensor:
        """Transform ``images`` according to ``draw`` (see :meth:`draw`)."""
        _check_images(images)
        if draw.batch_size != images.shape[0]:
            raise ValueError(f"draw is for a batch of {draw.batch_size}, images have {images.shape[0]}")
        if draw.sample_idx.numel() == 0:
            return images
        h, w = images.shape[-2:]
        b = self.params.block_half_width(h, w)
        if 2 * b + 1 != self.block_size:
            raise ValueError(
                f"images of {h}x{w} need {2 * b + 1}x{2 * b + 1} blocks, the bank holds "
                f"{self.block_size}x{self.block_size} (hospitals must share image size and alpha)"
            )
        bank_c = self._entries.shape[1]  # type: ignore[union-attr]
        if bank_c not in (1, images.shape[1]):
            raise ValueError(f"bank blocks have {bank_c} channels, images {images.shape[1]}")
        dev = images.device
        cdtype = _compute_dtype(images.dtype)
        with torch.no_grad():
            idx = draw.sample_idx.to(dev)
            sel = images.index_select(0, idx)
            targets = self._entries_on(dev, cdtype).index_select(0, draw.entry_idx.to(dev))
            aug = interpolate_amplitude(sel, targets, draw.lam.to(device=dev, dtype=cdtype))
            if self.params.clamp:
                flat = sel.flatten(1)
                lo = flat.amin(dim=1).view(-1, 1, 1, 1)
                hi = flat.amax(dim=1).view(-1, 1, 1, 1)
                aug = torch.maximum(torch.minimum(aug, hi), lo)
            out = images.detach().clone()
            out.index_copy_(0, idx, aug.to(images.dtype))
        return out

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return images
        return self.apply(images, self.draw(images.shape[0]))

"""Feather-Light Fourier Domain Adaptation (Zakazov, Shaposhnikov, Bespalov & Dylov, DART 2022) at a
hospital: test time, no training. The target image takes the low-frequency amplitude of a *source*
image (a "style donor") inside a small radius, keeps its own phase, and the deployed model predicts
the result. The paper's transfer (its Sect. 3) is

    t_new = f_FDA(s_i, t) = F⁻¹([M_β ∘ F^A(s_i) + (1 − M_β) ∘ F^A(t), F^P(t)]),

with F^A, F^P the amplitude and phase of the 2-D spectrum and M_β the low-frequency mask, a disk
("the circular crop instead of the rectangular one", its Sect. 4.1). Multi-Source Transfer averages
the network's outputs over n_MST donors, Σ_{i=1}^{n_MST} net(f_FDA(s_i, t)) / n_MST (n_MST = 7), and
the donors are the source slices closest to the target (by SR-SIM in the paper).

Here, stated:

- *Donors come from the FedDG amplitude bank* (:mod:`simlab.augment.frequency`,
  ``augmentation.frequency``): the low-frequency amplitude blocks ``(2b+1)²`` of ``bank_size`` images
  per hospital, the only image-derived data the hospitals share. Full source images are never
  shared, so the donor's amplitude inside the disk comes from its block (the disk must fit in it:
  validation), and every hospital's blocks are candidates (the federation's hospitals are the
  source domains). Without ``augmentation.frequency.enabled`` the server still collects the bank
  for evaluation (the same blocks, nothing used in training), from the first windows before
  round 0's evaluation, refreshed as ``augmentation.frequency_refresh`` says.
- *Donor similarity* (the paper's SR-SIM needs both images; only amplitude blocks are shared): the
  cosine distance between the *shape* of the low-frequency amplitude spectra,
  ``d(s, t) = 1 − ⟨â_s, â_t⟩`` with ``â`` the block without its DC coefficient, flattened and scaled
  to unit length. A global gain ``a`` and offset ``c`` of the intensities (``a·x + c``) change only the
  DC coefficient and scale the others by ``|a|``, so ``d`` ignores them: like SR-SIM it compares what
  is imaged (extent and coarse layout of the anatomy), not the scanner's intensity style the transfer
  is meant to replace. The ``donors`` nearest blocks are used per image (the paper's 2D selection:
  our data are single slices); ties go to the earlier bank entry (hospitals in id order).
- *Radius* ``r = beta · min(H, W)`` pixels of frequency: M_β holds the signed frequencies with
  ``k_y² + k_x² ≤ r²`` (symmetric under k → −k, so the new spectrum stays Hermitian and the image real).
  The paper picks β on labelled target data or averages its grid search; it shows β = 0.03 (its
  Fig. 3), the default here, not tuned.
- *Multi-source average* of the softmax probabilities (the paper's "net" output), then argmax.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from simlab.adaptation.base import Adaptation, Adapted, Problems, as_tensor, batches, frozen_copy
from simlab.augment.frequency import amplitude_block


@dataclass(frozen=True)
class FdaParams:
    beta: float = field(default=0.03, metadata={
        "gt": 0.0, "lt": 0.5, "why": "the disk of radius beta·min(H, W) must fit in the centred spectrum: at 0.5 "
                                     "it covers all of it",
        "help": "radius of the swapped low-frequency disk as a share of the image side, "
                                      "r = beta·min(H, W) (the paper's Fig. 3: 0.03)"})
    donors: int = field(default=7, metadata={
        "ge": 1, "le": 1024, "why": "one forward pass per donor and image",
        "help": "style donors per image, n_MST (the paper: 7); their softmax outputs are averaged"})


def disk(radius: float, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Signed frequencies ``(k_y, k_x)`` with ``k_y² + k_x² ≤ radius²`` (row-major order); they must lie
    within the ``(2b+1)²`` block."""
    reach = int(np.floor(radius + 1e-9))
    if reach > b:
        raise ValueError(f"a disk of radius {radius:.3f} needs a block of half-width >= {reach}, the bank's is {b}")
    k = torch.arange(-reach, reach + 1)
    ky, kx = torch.meshgrid(k, k, indexing="ij")
    inside = (ky**2 + kx**2).double() <= radius**2 + 1e-9
    return ky[inside], kx[inside]


def swap_low_frequency(images: torch.Tensor, donor_blocks: torch.Tensor, radius: float) -> torch.Tensor:
    """``f_FDA``: inside the disk of ``radius`` the amplitude of ``images`` ``[B, C, H, W]`` becomes the
    donors' (``donor_blocks`` ``[B, C or 1, 2b+1, 2b+1]``, centred as the bank holds them), the phase
    stays the image's; outside the disk the spectrum is untouched. Returns the real image."""
    b = (donor_blocks.shape[-1] - 1) // 2
    ky, kx = disk(radius, b)
    h, w = images.shape[-2:]
    cdtype = torch.float64 if images.dtype == torch.float64 else torch.float32
    spectrum = torch.fft.fft2(images.to(cdtype))
    rows, cols = (ky % h).to(images.device), (kx % w).to(images.device)
    phase = spectrum[:, :, rows, cols].angle()
    amp = donor_blocks.to(device=images.device, dtype=cdtype)[:, :, (ky + b).to(images.device), (kx + b).to(images.device)]
    spectrum[:, :, rows, cols] = torch.polar(amp.expand_as(phase).contiguous(), phase)
    return torch.fft.ifft2(spectrum).real.to(images.dtype)


def style_free(blocks: torch.Tensor) -> torch.Tensor:
    """``[n, C, s, s]`` amplitude blocks → ``[n, D]``: every coefficient but DC, scaled to unit length."""
    c = (blocks.shape[-1] - 1) // 2
    flat = blocks.to(torch.float64).flatten(2)
    keep = torch.ones(flat.shape[-1], dtype=torch.bool)
    keep[c * blocks.shape[-1] + c] = False
    v = flat[:, :, keep].flatten(1)
    return v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)


def nearest_donors(targets: torch.Tensor, donors: torch.Tensor, k: int) -> torch.Tensor:
    """Indices ``[N, k]`` of the ``k`` donor blocks nearest each target block (cosine distance of
    :func:`style_free`; a stable sort, so ties keep bank order)."""
    dist = 1.0 - style_free(targets) @ style_free(donors).T
    return torch.sort(dist, dim=1, stable=True).indices[:, :k]


def bank_blocks(bank) -> torch.Tensor:
    """Every hospital's blocks, hospitals in id order (the row order donors are numbered by)."""
    if not bank or not any(len(v) for v in bank.values()):
        raise ValueError("fda needs the amplitude bank (augmentation.frequency), and none was given")
    return torch.cat([torch.as_tensor(np.asarray(bank[h]), dtype=torch.float32) for h in sorted(bank) if len(bank[h])])


class Fda(Adaptation):
    name = "fda"
    help = ("Feather-Light FDA (Zakazov et al. 2022): low-frequency amplitude inside radius beta from the "
            "closest style donors of the shared amplitude bank, phase kept; predictions averaged over donors")
    Params = FdaParams
    needs_bank = True

    @classmethod
    def scenario_problems(cls, scenario) -> Problems:
        freq, size, p = scenario.augmentation.frequency, scenario.data.image_size, scenario.evaluation.fda
        b, reach = freq.block_half_width(size, size), int(np.floor(p.beta * size + 1e-9))
        problems = []
        if b < max(1, reach):
            problems.append(("augmentation.frequency.alpha", (
                f"evaluation.adaptation fda swaps the amplitudes within radius beta·size = {p.beta * size:.2f} and "
                f"picks donors by the coefficients around DC, so the shared blocks need half-width >= "
                f"{max(1, reach)} (alpha >= {max(1, reach) / size:.4g} at {size} px, reference_code off); "
                f"found half-width {b}")))
        entries = sum(min(freq.bank_size, h.size) for h in scenario.hospitals)
        if p.donors > entries:
            problems.append(("evaluation.fda.donors", f"{p.donors} donors per image, but the bank holds {entries} "
                                                      f"blocks (augmentation.frequency.bank_size per hospital)"))
        return problems

    def predict(self, model, images, ctx) -> Adapted:
        p, net = self.params, frozen_copy(model, ctx.device)
        donors = bank_blocks(ctx.bank)
        x_all = as_tensor(images)
        b = (donors.shape[-1] - 1) // 2
        radius = p.beta * min(x_all.shape[-2:])
        chosen = nearest_donors(amplitude_block(x_all, b), donors, min(p.donors, len(donors)))
        preds = []
        with torch.no_grad():
            for sl in batches(len(x_all), ctx.batch_size):
                x, prob = x_all[sl].to(ctx.device), 0.0
                for j in range(chosen.shape[1]):
                    moved = swap_low_frequency(x, donors[chosen[sl, j]], radius)
                    prob = prob + torch.softmax(net(moved), dim=1)
                preds.append(prob.argmax(dim=1).cpu())
        return Adapted(torch.cat(preds).to(torch.int64), model)

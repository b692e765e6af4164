"""PLOP (Douillard et al., CVPR 2021): Local POD distillation of intermediate features and
pseudo-labels from the old model, in their domain-incremental form.

**Local POD.** For a feature map h [C, H, W] of layer l, POD (PODNet, Douillard et al. 2020) pools
it along the width and along the height, Φ(h) = [ Σ_w h[:, :, w] ‖ Σ_h h[:, h, :] ] (a C×H and a
C×W embedding). Local POD does the same on every cell of a grid at S scales, s = 0 … S−1: the map
is cut into 2^s × 2^s windows, each pooled along its width and its height, and all of it is
concatenated, Ψ(h) = [Φ(h_{0,0}^{s=0}) ‖ … ‖ Φ(h_{2^{S−1}−1, 2^{S−1}−1}^{s=S−1})], then L2-normalised.
The loss, over the L chosen layers:

    L_pod = (1/L) · Σ_l ‖ Ψ(h_l^old) − Ψ(h_l) ‖₂      (mean over the batch)

As in PLOP's released code: the activations are squared before pooling, the pooling is a mean (a
sum scaled per window, which normalisation undoes up to the window's size), and the distance is the
Euclidean norm (not squared). The layers (:func:`unet_blocks`): the output of every block of the
MONAI U-Net's encoder (one per level), of its bottom block and of every decoder block except the
last, whose output is the logits (PLOP distils the backbone's stages and the decoder's features, not
the classifier). For channels [16, 32, 64, 128] at 64 px: 32², 16², 8², 8² (bottom), 16², 32².

**Pseudo-labels** (their Eq. 5-6). PLOP labels the background pixels of the current images with the
old model's prediction where it is confident: the normalised entropy u = −(1/log C) Σ_c p_c log p_c
of the old model's softmax must be below τ_c, the median u of the pixels it predicts as c (computed
once per task over the task's data, with a floor of 0.001 as in the code), and the loss is the
cross-entropy on the accepted pixels times ν, the fraction of candidate pixels accepted:

    L_pseudo = −(ν / (W·H)) · Σ_{i accepted} log p(i, ỹ_i)

Domain-incremental form: no class is ever missing from a label map, so there are no background
pixels to relabel; what the old model can label here is the window's **unlabelled** images
(``label_fraction`` < 1). With ``pseudo_labels`` on, each step adds L_pseudo on a batch of them
(every pixel a candidate, ν per image, τ_c from the old model over this round's unlabelled images),
in :meth:`PLOP.loss_term`: the segmentation loss of train_local has no ignore index, so the pseudo-
labelled images do not go through it. Their labels are never read; :meth:`training_set` still
returns the labelled images only. With every image labelled the option does nothing; with unlabelled
images it costs one more forward and backward pass of a batch per step. PLOP's pseudo-labels are part
of the method; an unlabelled-data objective (``federation.semi_supervised``) adds its own term on top.
At a hospital without labels (``label_fraction: 0``) the POD term is taken on the objective's
unlabelled batch, the only batch a step has.

Which model is "old": the one the hospital **received this round**, as for LwF (nobody tells a
hospital when its data changed); the model at the last detected shift is not offered (it needs a
shift detector inside the method). Not here: PLOP's classifier initialisation and adaptive factor
√(|new classes| / |old classes|) (no new classes), and POD on the logits.

Defaults: λ_pod = 0.01 (``pod_lambda`` of Lifelong-nnU-Net's ``nnUNetTrainerPLOP``, also
``pod_factor`` 0.01 in PLOP's code), S = 3 (the paper's, ``scales = 3`` there), pseudo-labels on
(the paper's method). No state is kept between rounds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.layers.simplelayers import SkipConnection

from simlab.continual.method import DistilsReceivedModel
from simlab.continual.training import loss_weight

MIN_THRESHOLD = 0.001  # PLOP's floor for the per-class entropy threshold


@dataclass(frozen=True)
class PlopParams:
    pod_weight: float = loss_weight(0.01, "λ_pod: weight of the local POD distillation")
    scales: int = field(default=3, metadata={
        "ge": 1, "le": 11, "why": "at S = 11 the 2^10 × 2^10 windows of the largest image (data.image_size ≤ 1024) "
                                  "are 1 px wide",
        "help": "S: local POD at 1, 2×2, … 2^(S-1)×2^(S-1) windows"})
    pseudo_labels: bool = field(default=True, metadata={
        "help": "also train on the window's unlabelled images, labelled by the received model where confident"})


def unet_blocks(model: torch.nn.Module) -> list[str]:
    """Names of the MONAI U-Net's encoder blocks, bottom block and decoder blocks but the last."""
    seq, prefix, down, up = getattr(model, "model", None), "model", [], []
    while isinstance(seq, torch.nn.Sequential) and len(seq) == 3 and isinstance(seq[1], SkipConnection):
        down.append(f"{prefix}.0")
        if prefix != "model":
            up.insert(0, f"{prefix}.2")
        seq, prefix = seq[1].submodule, f"{prefix}.1.submodule"
    if not down:
        raise ValueError("PLOP's local POD expects a MONAI UNet (model.model = down, skip, up)")
    return down + [prefix] + up


def local_pod(h: torch.Tensor, scales: int) -> torch.Tensor:
    """Ψ(h): [B, C, H, W] → [B, D], width- and height-pooled squared activations of every window at
    grids 1, 2×2, … 2^(S−1)×2^(S−1), concatenated and L2-normalised (a map not divisible by the
    grid is cropped to the largest multiple)."""
    b, c = h.shape[:2]
    a, parts = h ** 2, []
    for s in range(scales):
        n = 2 ** s
        kh, kw = h.shape[2] // n, h.shape[3] // n
        if kh == 0 or kw == 0:
            raise ValueError(f"a {h.shape[2]}×{h.shape[3]} feature map is too small for {n}×{n} windows")
        grid = a[:, :, : n * kh, : n * kw].reshape(b, c, n, kh, n, kw)
        parts.append(grid.mean(dim=5).flatten(1))  # pooled along each window's width: one value per row
        parts.append(grid.mean(dim=3).flatten(1))  # pooled along each window's height: one per column
    return F.normalize(torch.cat(parts, dim=1), dim=1)


def pod_loss(new: list[torch.Tensor], old: list[torch.Tensor], scales: int) -> torch.Tensor:
    """(1/L) Σ_l mean over the batch of ‖Ψ(h_l^old) − Ψ(h_l)‖₂."""
    dists = [torch.linalg.vector_norm(local_pod(a, scales) - local_pod(b, scales), dim=1).mean()
             for a, b in zip(new, old)]
    return torch.stack(dists).mean()


def normalised_entropy(probs: torch.Tensor) -> torch.Tensor:
    """u = −(1/log C) Σ_c p_c log p_c per pixel: [B, C, H, W] → [B, H, W], in [0, 1]."""
    return -(probs * torch.log(probs.clamp_min(1e-12))).sum(dim=1) / np.log(probs.shape[1])


def entropy_thresholds(probs: torch.Tensor) -> torch.Tensor:
    """τ_c: the median normalised entropy of the pixels predicted as c (floor 0.001; a class
    predicted nowhere keeps the floor)."""
    u, pred = normalised_entropy(probs), probs.argmax(dim=1)
    tau = torch.full((probs.shape[1],), MIN_THRESHOLD)
    for c in range(probs.shape[1]):
        values = u[pred == c]
        if values.numel():
            tau[c] = max(float(values.median()), MIN_THRESHOLD)
    return tau


def pseudo_labels(probs: torch.Tensor, tau: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ỹ, accepted): the old model's prediction and where its entropy is below τ of its class."""
    pred = probs.argmax(dim=1)
    return pred, normalised_entropy(probs) < tau.to(probs.device)[pred]


def pseudo_label_loss(logits: torch.Tensor, target: torch.Tensor, accepted: torch.Tensor) -> torch.Tensor:
    """−(ν / (W·H)) Σ_{accepted} log p(ỹ) per image, ν = accepted fraction; mean over the batch."""
    ce = F.cross_entropy(logits, target, reduction="none") * accepted
    nu = accepted.float().flatten(1).mean(dim=1)
    return (nu * ce.flatten(1).mean(dim=1)).mean()


class _Capture:
    """Forward hooks keeping the first output of each named module since the last :meth:`clear`."""

    def __init__(self, model: torch.nn.Module, names: list[str]):
        self.names, self.out = names, {}
        modules = dict(model.named_modules())
        self.handles = [modules[n].register_forward_hook(self._hook(n)) for n in names]

    def _hook(self, name):
        def keep(module, args, output):
            self.out.setdefault(name, output)
        return keep

    def features(self) -> list[torch.Tensor]:
        return [self.out[n] for n in self.names]

    def clear(self):
        self.out = {}

    def remove(self):
        for h in self.handles:
            h.remove()


class PLOP(DistilsReceivedModel):
    name = "plop"
    help = "PLOP: local POD distillation of the received model's features (+ its pseudo-labels on unlabelled images)"
    family = "distillation"
    Params = PlopParams

    @classmethod
    def scenario_problems(cls, scenario) -> list[tuple[str, str]]:
        """The finest grid, 2^(S−1) × 2^(S−1) windows, must fit the smallest feature map local POD pools:
        the bottom block's, the image halved once per level after the first."""
        scales, side = scenario.continual.plop.scales, scenario.data.image_size // scenario.model.size_multiple
        if 2 ** (scales - 1) <= side:
            return []
        fits = side.bit_length()  # the largest S with 2^(S-1) <= side
        return [("continual.plop.scales", f"S = {scales} needs {2 ** (scales - 1)}×{2 ** (scales - 1)} windows on the "
                                          f"U-Net's bottom feature map, which is {side}×{side} px (data.image_size "
                                          f"{scenario.data.image_size} halved {len(scenario.model.channels) - 1} times); "
                                          f"at most S = {fits} here")]

    def __init__(self, params: PlopParams | None = None):
        super().__init__(params or PlopParams())
        self._new = self._old = None
        self._unlabelled: np.ndarray | None = None
        self._seed = 0
        self._pseudo: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def training_set(self, windows, t, state, seed, last_round):
        images, labels, rounds = super().training_set(windows, t, state, seed, last_round)
        if self.params.pseudo_labels:
            unlabelled = [windows(r).images[~windows(r).labeled] for r in rounds]  # images only, never labels
            self._unlabelled, self._seed = np.concatenate(unlabelled), seed
        return images, labels, rounds

    def before_training(self, model, state, cfg):
        super().before_training(model, state, cfg)
        names = unet_blocks(model)
        self._new, self._old = _Capture(model, names), _Capture(self._teacher, names)
        self._pseudo, self._batch = None, cfg.batch_size
        if self.params.pseudo_labels and self._unlabelled is not None and len(self._unlabelled):
            self._pseudo = self._label_unlabelled(torch.device(cfg.device))

    @torch.no_grad()
    def _label_unlabelled(self, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(images, ỹ, accepted) of this round's unlabelled images by the received model."""
        x = torch.from_numpy(np.ascontiguousarray(self._unlabelled)).to(device)
        probs = torch.cat([F.softmax(self._teacher(x[i:i + 16]), dim=1) for i in range(0, len(x), 16)])
        self._old.clear()
        self._gen = torch.Generator().manual_seed(self._seed)
        target, accepted = pseudo_labels(probs, entropy_thresholds(probs.cpu()))
        return x, target, accepted

    def loss_term(self, model, x, y, logits):
        terms = []
        if self.params.pod_weight > 0.0:
            new = self._new.features()
            with torch.no_grad():
                self._old.clear()
                self._teacher(x)
            terms.append(self.params.pod_weight * pod_loss(new, self._old.features(), self.params.scales))
        if self._pseudo is not None:
            images, target, accepted = self._pseudo
            idx = torch.randperm(len(images), generator=self._gen)[: self._batch].to(images.device)
            terms.append(pseudo_label_loss(model(images[idx]), target[idx], accepted[idx]))
        return sum(terms) if terms else None

    def after_step(self, model):
        self._new.clear()
        self._old.clear()

    def after_round(self, model, images, labels, rounds, state, cfg, seed):
        self._new.remove()
        self._old.remove()
        self._new = self._old = self._pseudo = self._unlabelled = None
        return super().after_round(model, images, labels, rounds, state, cfg, seed)

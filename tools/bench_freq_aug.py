#!/usr/bin/env python3
"""Cost of frequency-space augmentation inside one local training step.

Times a local training step of a small MONAI UNet (2-D, channels 16-32-64-128, strides 2-2-2,
one residual unit, BatchNorm, 1 → 3 channels; DiceCE loss; Adam) on a batch of synthetic
slices, with and without :class:`simlab.augment.frequency.FrequencyAugmenter` in front of the
forward pass. Steps of the two arms are interleaved (the order alternates each round, so drift in
clock speed or cache state hits both arms alike) after a warm-up, and the medians are compared:
``ratio = median(aug step) / median(plain step)``, target ≤ 1.10. The augmentation alone is timed
as well. Synthetic data: three "hospitals" whose smooth label maps get hospital-specific
intensities, bias and noise; the other two share their amplitude blocks with the training one.

Usage: bench_freq_aug.py [--device auto|cpu|cuda] [--size 128] [--batch 16] [--steps 20]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np
import torch


def synthetic_hospital(n: int, size: int, rng: np.random.Generator, levels, bias: float, noise: float):
    """Smooth 3-class label maps and intensity images for one hospital."""
    f = np.fft.fftfreq(size)
    lowpass = np.exp(-(f[:, None] ** 2 + f[None, :] ** 2) / (2 * 0.03**2))
    field = np.real(np.fft.ifft2(np.fft.fft2(rng.standard_normal((n, size, size))) * lowpass))
    field = (field - field.mean(axis=(1, 2), keepdims=True)) / field.std(axis=(1, 2), keepdims=True)
    labels = np.digitize(field, [-0.4, 0.6])  # 0, 1, 2
    ramp = np.linspace(-1.0, 1.0, size)[None, None, :]
    image = np.asarray(levels)[labels] * (1.0 + bias * ramp) + noise * rng.standard_normal(labels.shape)
    return (
        torch.as_tensor(image[:, None], dtype=torch.float32),
        torch.as_tensor(labels[:, None], dtype=torch.long),
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--size", type=int, default=128, help="image side in pixels")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per arm (>= 20 recommended)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per arm first")
    ap.add_argument("--alpha", type=float, default=0.01)
    ap.add_argument("--prob", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    dev = torch.device("cuda" if use_cuda else "cpu")

    from monai.losses import DiceCELoss
    from monai.networks.nets import UNet

    from simlab.augment.frequency import FrequencyAugmenter, FrequencyParams, bank_nbytes, make_bank_entries

    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    hospitals = {
        "h0": synthetic_hospital(4 * args.batch, args.size, rng, (0.0, 0.5, 1.0), 0.1, 0.05),
        "h1": synthetic_hospital(2 * args.batch, args.size, rng, (0.1, 0.9, 0.4), 0.3, 0.08),
        "h2": synthetic_hospital(2 * args.batch, args.size, rng, (0.2, 0.35, 0.6), 0.0, 0.02),
    }
    params = FrequencyParams(enabled=True, alpha=args.alpha, prob=args.prob)
    bank = {
        h: make_bank_entries(x, params, np.random.default_rng(i)) for i, (h, (x, _)) in enumerate(hospitals.items())
    }
    augmenter = FrequencyAugmenter(params, bank, "h0", torch.Generator().manual_seed(args.seed))

    x_all, y_all = (t.to(dev) for t in hospitals["h0"])
    batches = [(x_all[i : i + args.batch], y_all[i : i + args.batch]) for i in range(0, len(x_all), args.batch)]

    model = UNet(
        spatial_dims=2, in_channels=1, out_channels=3, channels=(16, 32, 64, 128), strides=(2, 2, 2),
        num_res_units=1, norm="batch",
    ).to(dev)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def step(i: int, augment: bool) -> float:
        x, y = batches[i % len(batches)]
        sync()
        t0 = time.perf_counter()
        if augment:
            x = augmenter(x)
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        sync()
        return time.perf_counter() - t0

    def aug_only(i: int) -> float:
        x, _ = batches[i % len(batches)]
        sync()
        t0 = time.perf_counter()
        augmenter(x)
        sync()
        return time.perf_counter() - t0

    for i in range(args.warmup):
        step(i, False)
        step(i, True)
        aug_only(i)
    plain, aug, alone = [], [], []
    for i in range(args.steps):
        order = (False, True) if i % 2 == 0 else (True, False)
        for a in order:
            (aug if a else plain).append(step(i, a))
        alone.append(aug_only(i))

    mp, ma, mo = statistics.median(plain), statistics.median(aug), statistics.median(alone)
    ratio = ma / mp
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    b = params.block_half_width(args.size, args.size)
    print(f"device: {dev.type} [{name}], torch {torch.__version__}")
    print(
        f"batch {args.batch} x 1 x {args.size} x {args.size}, alpha {args.alpha} (block {2 * b + 1}x{2 * b + 1}), "
        f"prob {args.prob}, {args.steps} timed steps per arm after {args.warmup} warm-up"
    )
    print(f"bank: {sum(v.shape[0] for v in bank.values())} blocks, {bank_nbytes(bank)} bytes in all")
    print(f"plain step    median {mp * 1e3:9.3f} ms")
    print(f"aug step      median {ma * 1e3:9.3f} ms")
    print(f"augment only  median {mo * 1e3:9.3f} ms")
    print(f"ratio aug/plain: {ratio:.3f} (target <= 1.10: {'met' if ratio <= 1.10 else 'NOT met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

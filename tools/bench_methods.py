#!/usr/bin/env python3
"""Cost of the distilling and regularising methods: local training wall time per round against
sequential fine-tuning, on the same data, model and seeds.

One round of :meth:`simlab.continual.method.Method.local_update` (what a hospital does with its
window, after_round included: EWC's Fisher, RWalk's normalisation) of the quickstart's U-Net
(channels 16-32-64-128, one residual unit, BatchNorm, 3 classes) on a synthetic window of 32 images
of 64 px, 8 steps of batch 16, Adam at lr 0.002 (``scenarios/quickstart.yaml``). Every method starts
each repetition from the same received model and, for the methods that keep state, from the state
they left after one untimed round on the previous window (so EWC's and RWalk's penalties are on).
The order of the methods is reversed every repetition, so drift in clock speed or cache hits all
alike; the medians are compared: ``ratio = median(method) / median(sequential)``, target ≤ 1.3 for
the distilling methods. Every image is labelled (as in the quickstart), so PLOP's pseudo-labels add
nothing here; ``--label-fraction 0.5`` measures them.

Usage: bench_methods.py [--reps 3] [--threads 1] [--label-fraction 1.0] [--methods sequential,lwf,...]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from simlab.continual.registry import ContinualSpec, make_method  # noqa: E402
from simlab.continual.training import TrainConfig  # noqa: E402
from simlab.models.unet import ModelSpec, build_model, load_numpy_state, state_to_numpy  # noqa: E402

DEFAULT = "sequential,lwf,mib,plop,ewc,rwalk"


class Window:
    """Smooth 3-class label maps and intensity images; round t shifts the contrast a little."""

    def __init__(self, t: int, n: int, size: int, label_fraction: float):
        g = np.random.default_rng(t)
        f = np.fft.fftfreq(size)
        lowpass = np.exp(-(f[:, None] ** 2 + f[None, :] ** 2) / (2 * 0.05 ** 2))
        field = np.real(np.fft.ifft2(np.fft.fft2(g.standard_normal((n, size, size))) * lowpass))
        field = (field - field.mean(axis=(1, 2), keepdims=True)) / field.std(axis=(1, 2), keepdims=True)
        self.labels = np.digitize(field, [-0.4, 0.6]).astype(np.uint8)
        levels = np.array([0.1, 0.5, 0.9]) + 0.05 * t
        self.images = (levels[self.labels] + 0.03 * g.standard_normal(self.labels.shape))[:, None].astype(np.float32)
        self.labeled = np.zeros(n, bool)
        self.labeled[: max(1, round(label_fraction * n))] = True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3, help="timed rounds per method (>= 3)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the quickstart: 1 cpu per client)")
    ap.add_argument("--label-fraction", type=float, default=1.0)
    ap.add_argument("--methods", default=DEFAULT)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = args.methods.split(",")
    cfg = TrainConfig(steps=8, batch_size=16, lr=0.002)
    windows = {t: Window(t, 32, 64, args.label_fraction) for t in (1, 2)}
    torch.manual_seed(0)
    model = build_model(ModelSpec(channels=[16, 32, 64, 128], num_res_units=1), 3)
    make_method(ContinualSpec()).local_update(model, windows.get, 1, {}, cfg, seed=1)  # a "received" model
    received = state_to_numpy(model)
    states = {}
    for name in names:  # one untimed round each: warm-up, and the state a stateful method carries
        load_numpy_state(model, received)
        states[name] = make_method(ContinualSpec(method=name)).local_update(model, windows.get, 1, {}, cfg, seed=2).state
    times: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(args.reps):
        for name in names if rep % 2 == 0 else list(reversed(names)):
            load_numpy_state(model, received)
            method = make_method(ContinualSpec(method=name))
            start = time.perf_counter()
            method.local_update(model, windows.get, 2, states[name], cfg, seed=10 + rep)
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["sequential"]) if "sequential" in times else None
    print(f"local round: 32 images of 64 px, {cfg.steps} steps of batch {cfg.batch_size}, threads={args.threads}, "
          f"label_fraction={args.label_fraction}, reps={args.reps}")
    for name in names:
        med = statistics.median(times[name])
        ratio = f"{med / base:6.2f}x" if base else "   n/a"
        print(f"{name:<11} median {med:7.3f} s  ratio to sequential {ratio}   ({', '.join(f'{t:.3f}' for t in times[name])})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Cost per test image of every registered test-time adaptation (``evaluation.adaptation``), with
simlab's core code only (no Flower, no Ray).

A scenario (default ``scenarios/newcomer_tta.yaml``) gives the model, the image size, the test set,
the evaluation batch size and each adaptation's parameters. Its first hospital trains the model
(:meth:`simlab.hospital.Hospital.train`, ``--rounds`` of its own windows, not timed) so that the
adaptations work on a model that segments, as they do in a run; every hospital shares its amplitude
blocks of round 1 (the bank ``fda`` reads). Then, for each adaptation, the first hospital's call per
test set is timed: :meth:`Adaptation.predict` on ``--domain``'s test set with the context the hospital
builds (:meth:`Hospital.adaptation_context`): the adaptation and the prediction together, not the
metrics. After one untimed warm-up per adaptation, ``--repeats`` timings each, the adaptations
interleaved (forward and reverse order in turn, so a change in the machine's load hits all alike).
Reported per adaptation: the median (and range) of ms per image (seconds / test images × 1000), and
its ratio to ``none`` (plain prediction). Timings are on this machine and load; the load average
before and after is printed.

    tools/bench_tta.py [--scenario scenarios/newcomer_tta.yaml] [--domain newcomer] [--rounds 5]
                       [--repeats 5] [--threads 1] [--json PATH]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench_probes import federation_imported, load_line  # noqa: E402
from simlab.adaptation.registry import ADAPTATIONS, make_adaptation  # noqa: E402
from simlab.hospital import Hospital  # noqa: E402
from simlab.models.unet import build_model, state_to_numpy  # noqa: E402
from simlab.scenario.schema import load_scenario  # noqa: E402
from simlab.scenario.task import task_of  # noqa: E402
from simlab.seeding import derive_seed, seed_everything  # noqa: E402



def prepare(args):
    """The base scenario with ``engine.device: cpu`` and ``cpus_per_client`` = ``--threads``, the first
    hospital, its model after ``--rounds`` local rounds, the bank, and the timed domain's test images."""
    path = Path(args.scenario)
    path = path if path.exists() else ROOT / path
    loaded = load_scenario(path, [f"engine.cpus_per_client={args.threads}", "engine.device=cpu"])
    sc = loaded.base
    if args.domain not in sc.eval_domains:
        raise SystemExit(f"--domain {args.domain!r} is not an evaluation domain of {args.scenario}")
    hospitals = [Hospital(task_of(sc, h.id)) for h in sc.hospitals]
    seed_everything(derive_seed(sc.seed, "init"))
    state = state_to_numpy(build_model(sc.model, sc.num_classes))
    first = hospitals[0]
    for t in range(1, args.rounds + 1):
        state = first.train(state, t, {}).state
    bank = {h.id: h.amplitudes(1) for h in hospitals}
    images, _ = first.test_sets([args.domain])[args.domain]
    return sc, first, state, bank, images


def measure(sc, hospital: Hospital, state, bank, images, args) -> dict[str, list[float]]:
    device = hospital.device()
    model = hospital.model(state, device)
    t = args.rounds
    runs = {name: make_adaptation(dataclasses.replace(sc.evaluation, adaptation=name)) for name in ADAPTATIONS}

    def once(name: str) -> float:
        ctx = hospital.adaptation_context(args.domain, t, bank, device)
        start = time.perf_counter()
        runs[name].predict(model, images, ctx)
        return time.perf_counter() - start

    for name in runs:  # warm-up: kernels, allocator, lazy imports, the cached window
        once(name)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(args.repeats):
        for name in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
            times[name].append(once(name))
    return times


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenario", default="scenarios/newcomer_tta.yaml", help="relative to the repository root "
                                                                             "unless it exists here")
    ap.add_argument("--domain", default="newcomer", help="the test domain whose test set is adapted")
    ap.add_argument("--rounds", type=int, default=5, help="local training rounds of the model first (not timed)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (engine.cpus_per_client)")
    ap.add_argument("--json", help="also write every timing here")
    args = ap.parse_args(argv)
    load = os.getloadavg()
    sc, hospital, state, bank, images = prepare(args)
    times = measure(sc, hospital, state, bank, images, args)
    n = len(images)
    per_image = {k: [s / n * 1e3 for s in v] for k, v in times.items()}
    med = {k: statistics.median(v) for k, v in per_image.items()}
    print(f"cpu [{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads], torch "
          f"{torch.__version__}; {args.scenario}: {sc.data.image_size}x{sc.data.image_size} px, U-Net "
          f"{list(sc.model.channels)}, test set {args.domain!r} of {n} images, evaluation batch "
          f"{sc.evaluation.batch_size}; model after {args.rounds} local rounds; {args.repeats} repeats after one "
          f"warm-up")
    print(load_line(load))
    print(f"\n{'adaptation':<16} {'median ms/image':>16} {'min':>8} {'max':>8} {'x none':>8}")
    for name, v in per_image.items():
        print(f"{name:<16} {med[name]:16.2f} {min(v):8.2f} {max(v):8.2f} {med[name] / med['none']:8.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "ms_per_image": per_image, "median": med}, indent=1))
    return 1 if federation_imported("the hospital's adaptation path") else 0


if __name__ == "__main__":
    sys.exit(main())

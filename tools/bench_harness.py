#!/usr/bin/env python3
"""Harness overhead: the same local training and evaluation work done by a bare PyTorch loop and by
simlab + Flower's simulation engine, in one run; prints the ratio (target <= 1.15 on 20 rounds).

Both sides train the same hospitals on the same cached windows with the same seeds, aggregate with
FedAvg and evaluate at the same rounds. Data generation is done once beforehand and not timed. Flower
runs one virtual hospital at a time with all cores (cpus_per_client = all) so that both sides use the
same number of threads; the difference is the harness: Ray start-up, message (de)serialisation,
scheduling and the per-message model rebuild in the ClientApp.

    tools/bench_harness.py [--rounds 20] [--size 128] [--steps 8] [--hospitals 3]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from simlab.aggregation import aggregate  # noqa: E402
from simlab.data.streams import DataFactory  # noqa: E402
from simlab.federated.federation import evaluation_rounds  # noqa: E402
from simlab.hospital import Hospital  # noqa: E402
from simlab.models.unet import build_model, state_to_numpy, trainable_keys  # noqa: E402
from simlab.runlog import RunLog  # noqa: E402
from simlab.scenario.schema import load_scenario_dict  # noqa: E402
from simlab.scenario.task import task_of  # noqa: E402
from simlab.seeding import derive_seed, seed_everything  # noqa: E402


def scenario(args, cache: str):
    cores = os.cpu_count() or 1
    raw = {
        "name": "bench-harness", "seed": 0,
        "data": {"image_size": args.size, "cache_dir": cache},
        "domains": {"A": {"scanner": {"bias_field": 0.2, "noise": 0.02}},
                    "B": {"scanner": {"contrast": "inverted", "noise": 0.03}}},
        "hospitals": [{"id": f"h{i}", "size": 32,
                       "drift": {"type": "abrupt", "domains": ["A", "B"], "at": [args.rounds // 2 + 1]}}
                      for i in range(args.hospitals)],
        "federation": {"rounds": args.rounds, "local_steps": args.steps, "batch_size": 16, "lr": 0.002},
        "evaluation": {"every": 5, "test_size": 32},
        "engine": {"cpus_per_client": cores, "device": "cpu"},
    }
    return load_scenario_dict(raw, "<bench>").base


def bare_loop(sc) -> float:
    """The same work without Flower: each hospital (:class:`simlab.hospital.Hospital`, the object the
    ClientApp calls) trains in turn, the server aggregates, every hospital evaluates every domain."""
    hospitals = [Hospital(task_of(sc, h.id)) for h in sc.hospitals]
    eval_at = set(evaluation_rounds(sc))
    start = time.perf_counter()
    seed_everything(derive_seed(sc.seed, "init"))
    model = build_model(sc.model, sc.num_classes)
    state, keys = state_to_numpy(model), trainable_keys(model)
    for h in hospitals:
        h.evaluate(state)
    for t in range(1, sc.federation.rounds + 1):
        entries = []
        for h in hospitals:
            out = h.train(state, t, {})
            entries.append((h.id, out.state, int(out.metrics["num_examples"])))
        state = aggregate(entries, sc.federation.aggregation, trainable_keys=keys, reference=state).model
        if t in eval_at:
            for h in hospitals:
                h.evaluate(state)
    return time.perf_counter() - start


def through_flower(sc, run_dir: Path) -> tuple[float, list[dict]]:
    from simlab.engine.simulation import simulate

    runlog = RunLog(run_dir, "bench")
    start = time.perf_counter()
    simulate(sc, runlog)
    total = time.perf_counter() - start
    runlog.close()
    rounds = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    return total, rounds


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--hospitals", type=int, default=3)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="simlab-bench-") as tmp:
        sc = scenario(args, str(Path(tmp) / "cache"))
        factory = DataFactory(sc.data, sc.domains, sc.seed, sc.evaluation.test_size)
        for d in sc.eval_domains:
            factory.test_set(d)
        for h in sc.hospitals:
            for t in range(1, sc.federation.rounds + 1):
                factory.window(h, t)
        bare = bare_loop(sc)
        flower, rounds = through_flower(sc, Path(tmp))
    in_rounds = sum(r["wall_time_s"] for r in rounds)
    startup = flower - in_rounds
    print(f"rounds={args.rounds} hospitals={args.hospitals} steps={args.steps} size={args.size} "
          f"threads={int(sc.engine.cpus_per_client)}")
    print(f"bare PyTorch loop          : {bare:8.1f} s")
    print(f"simlab + Flower simulation : {flower:8.1f} s")
    print(f"  inside the round loop    : {in_rounds:8.1f} s  (ratio to bare {in_rounds / bare:.3f})")
    print(f"  start-up and shut-down   : {startup:8.1f} s  (Ray, virtual SuperNodes, identification)")
    print(f"overhead ratio (simlab+Flower / bare) = {flower / bare:.3f}   (target <= 1.15)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

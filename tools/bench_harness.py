#!/usr/bin/env python3
"""Harness overhead: the same local training and evaluation work done by a bare PyTorch loop and by
simlab + Flower's simulation engine; prints the ratio of medians (target <= 1.15 on 20 rounds).

Both sides train the same hospitals on the same cached windows with the same seeds, aggregate with
FedAvg and evaluate at the same rounds, each test domain once by the hospital
:func:`simlab.federated.eval_plan.assign_evaluators` picks (what the federation does with one shared
model). Data generation is done once beforehand and not timed. Flower runs one virtual hospital at
a time with all cores (cpus_per_client = all) so that both sides use the same number of threads;
the difference is the harness: Ray start-up, message (de)serialisation, scheduling and the
per-message model rebuild in the ClientApp.

The sides alternate, bare first, ``--reps`` times (bare, simlab, bare, simlab, ...), so that a
change in the machine's speed hits both alike; medians are compared. simlab's time is split into
start-up and shut-down (Ray, virtual SuperNodes, identification) and the round loop, and the round
loop into the hospitals' own work (timed inside the Ray workers), messaging and the server's work
(``tools/bench_probes.py``), against the bare loop's training, evaluation and aggregation.

    tools/bench_harness.py [--rounds 20] [--size 128] [--steps 8] [--hospitals 3] [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_probes import TreeMemory, enable_worker_trace, message_ledger, read_trace, round_split  # noqa: E402
from simlab.aggregation import aggregate  # noqa: E402
from simlab.data.streams import DataFactory  # noqa: E402
from simlab.federated.eval_plan import assign_evaluators  # noqa: E402
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


def bare_loop(sc) -> dict[str, float]:
    """The same work without Flower: each hospital (:class:`simlab.hospital.Hospital`, the object the
    ClientApp calls) trains in turn, the server aggregates, each test domain is evaluated once by its
    evaluator. Seconds: ``total`` and its ``train``, ``eval`` and ``server`` (aggregation) parts."""
    hospitals = {h.id: Hospital(task_of(sc, h.id)) for h in sc.hospitals}
    plan = assign_evaluators(sc.eval_domains, {h.id: list(h.drift.referenced_domains()) for h in sc.hospitals})
    eval_at = set(evaluation_rounds(sc))
    parts = {"train": 0.0, "eval": 0.0, "server": 0.0}

    def evaluate(state) -> None:
        t0 = time.perf_counter()
        for h, domains in plan.items():
            hospitals[h].evaluate(state, None, domains)
        parts["eval"] += time.perf_counter() - t0

    start = time.perf_counter()
    seed_everything(derive_seed(sc.seed, "init"))
    model = build_model(sc.model, sc.num_classes)
    state, keys = state_to_numpy(model), trainable_keys(model)
    evaluate(state)
    for t in range(1, sc.federation.rounds + 1):
        entries = []
        t0 = time.perf_counter()
        for h in hospitals.values():
            out = h.train(state, t, {})
            entries.append((h.id, out.state, int(out.metrics["num_examples"])))
        t1 = time.perf_counter()
        state = aggregate(entries, sc.federation.aggregation, trainable_keys=keys, reference=state).model
        parts["train"] += t1 - t0
        parts["server"] += time.perf_counter() - t1
        if t in eval_at:
            evaluate(state)
    return {"total": time.perf_counter() - start, **parts}


def through_flower(sc, run_dir: Path) -> dict[str, float]:
    """One arm through the simulation engine: ``total``, ``loop`` (the rounds' wall time from
    rounds.jsonl), ``startup`` (the rest), the loop's split (:func:`bench_probes.round_split`) and
    the CPU seconds of the driver, the Ray workers and Ray's other processes over the whole run."""
    from simlab.engine import ray_session
    from simlab.engine.simulation import simulate

    # Each repetition is one whole `simlab run` of one arm: Ray and its actors start afresh (the actors
    # a process keeps between arms would also keep the previous run's trace directory and profiling flag).
    ray_session.shutdown()
    run_dir.mkdir(parents=True)
    trace_dir, ledger = run_dir / "trace", []
    enable_worker_trace(trace_dir)
    message_ledger(ledger)
    runlog = RunLog(run_dir, "bench")
    procs = TreeMemory(interval=1.0, pss=False)  # for the CPU seconds; cheap, it runs in the driver
    procs.start()
    start = time.perf_counter()
    simulate(sc, runlog)
    total = time.perf_counter() - start
    procs.stop.set()
    procs.join()
    runlog.close()
    rounds = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    loop = sum(r["wall_time_s"] for r in rounds)
    return {"total": total, "loop": loop, "startup": total - loop,
            **round_split(rounds, ledger, read_trace(trace_dir)),
            **{f"cpu_{k}": v for k, v in procs.cpu().items()}}


# (label, file ends with, function): what --profile prints, cumulative seconds
DRIVER_FUNCS = [
    ("Federation.train_round", "simlab/federated/federation.py", "train_round"),
    ("Federation.evaluate", "simlab/federated/federation.py", "evaluate"),
    ("  Federation._send (batch out and back)", "simlab/federated/federation.py", "_send"),
    ("    InMemoryGrid.send_and_receive", "flwr/superlink/grid/inmemory_grid.py", "send_and_receive"),
    ("      its time.sleep (pull_interval 0.1 s)", "~", "<built-in method time.sleep>"),
    ("    codec.encode (requests)", "simlab/federated/codec.py", "encode"),
    ("  codec.decode_train_reply", "simlab/federated/codec.py", "decode_train_reply"),
    ("  aggregate", "simlab/aggregation/aggregate.py", "aggregate"),
    ("Array.from_numpy_ndarray (np.save)", "flwr/app/message/array.py", "from_numpy_ndarray"),
    ("Array.numpy (np.load)", "flwr/app/message/array.py", "numpy"),
    ("vce worker threads: RayBackend.process_message", "vce/backend/raybackend.py", "process_message"),
    ("vce add_messages_to_queue (polls every 0.1 s)", "fleet/vce/vce_api.py", "add_messages_to_queue"),
    ("  its LinkState.get_message_ins", "linkstate.py", "get_message_ins"),
]
WORKER_FUNCS = [
    ("ClientAppActor.run (Ray task body)", "flwr/simulation/ray_transport/ray_actor.py", "run"),
    ("  ClientApp.__call__", "flwr/clientapp/client_app.py", "__call__"),
    ("    codec.decode_train", "simlab/federated/codec.py", "decode_train"),
    ("    codec.decode_evaluate", "simlab/federated/codec.py", "decode_evaluate"),
    ("    codec.encode (replies)", "simlab/federated/codec.py", "encode"),
    ("    Hospital.train", "simlab/hospital.py", "train"),
    ("      Hospital.model (build the U-Net, load the state)", "simlab/hospital.py", "model"),
    ("      train_local (optimiser steps)", "simlab/continual/training.py", "train_local"),
    ("    Hospital.evaluate", "simlab/hospital.py", "evaluate"),
    ("      predict", "simlab/metrics/segmentation.py", "predict"),
    ("      hd95_per_class (MONAI)", "simlab/metrics/segmentation.py", "hd95_per_class"),
    ("Array.from_numpy_ndarray (np.save)", "flwr/app/message/array.py", "from_numpy_ndarray"),
    ("Array.numpy (np.load)", "flwr/app/message/array.py", "numpy"),
    ("Ray: deserialize_objects (task arguments)", "ray/_private/serialization.py", "deserialize_objects"),
    ("Ray: serialize (task results)", "ray/_private/serialization.py", "serialize"),
]


def profile_flower(sc, run_dir: Path) -> None:
    """One more simlab run under cProfile: every thread of the driver (the ServerApp's, Flower's
    simulation threads) and the thread of the Ray worker that runs the hospitals; prints the
    cumulative seconds of the functions in :data:`DRIVER_FUNCS` and :data:`WORKER_FUNCS` and writes
    the profiles next to the run (``*.prof``, for ``python -m pstats``)."""
    import cProfile
    import pstats
    import threading

    profiles: list[tuple[str, cProfile.Profile]] = []
    run = threading.Thread.run

    def profiled(self):
        pr = cProfile.Profile()
        profiles.append((self.name, pr))
        pr.enable()
        try:
            run(self)
        finally:
            pr.disable()

    os.environ["SIMLAB_BENCH_PROFILE"] = "1"
    threading.Thread.run = profiled
    main = cProfile.Profile()
    main.enable()
    try:
        result = through_flower(sc, run_dir)
    finally:
        main.disable()
        threading.Thread.run = run
        del os.environ["SIMLAB_BENCH_PROFILE"]
    driver = pstats.Stats(main)
    for _, pr in profiles:
        driver.add(pr)
    driver.dump_stats(str(run_dir / "driver.prof"))
    workers = sorted((run_dir / "trace").glob("*.prof"))
    print(f"\nprofiled simlab run (cProfile, slower than the runs above): round loop {result['loop']:.1f} s, "
          f"total {result['total']:.1f} s; profiles in {run_dir}")
    tables = [("driver (all threads; overlapping threads add up)", driver, DRIVER_FUNCS)]
    if workers:
        tables.append(("Ray worker (the thread that runs the hospitals)", pstats.Stats(*map(str, workers)), WORKER_FUNCS))
    for title, stats, funcs in tables:
        print(f"{title}:{'calls':>{max(1, 58 - len(title))}}  cumulative s")
        for label, file, name in funcs:
            rows = [v for (f, _, n), v in stats.stats.items() if n == name and f.endswith(file.lstrip("~"))]
            calls, cum = sum(r[1] for r in rows), sum(r[3] for r in rows)
            print(f"  {label:<56} {calls:>6}  {cum:9.2f}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--hospitals", type=int, default=3)
    p.add_argument("--reps", type=int, default=3, help="bare, simlab pairs (at least 3 for a median)")
    p.add_argument("--profile", metavar="DIR", help="after the repetitions, one more simlab run under cProfile "
                                                    "(driver threads and Ray worker), its run directory and "
                                                    "profiles written to DIR (a new directory)")
    args = p.parse_args()
    load_before = os.getloadavg()
    bare, sim = [], []
    from simlab.federated.federation import Federation

    send = Federation._send
    with tempfile.TemporaryDirectory(prefix="simlab-bench-") as tmp:
        sc = scenario(args, str(Path(tmp) / "cache"))
        factory = DataFactory(sc.data, sc.domains, sc.seed, sc.evaluation.test_size)
        for d in sc.eval_domains:
            factory.test_set(d)
        for h in sc.hospitals:
            for t in range(1, sc.federation.rounds + 1):
                factory.window(h, t)
        for i in range(args.reps):
            bare.append(bare_loop(sc))
            Federation._send = send  # one ledger per run
            sim.append(through_flower(sc, Path(tmp) / f"run-{i}"))
            print(f"rep {i + 1}: bare {bare[-1]['total']:.1f} s, simlab {sim[-1]['total']:.1f} s "
                  f"(loop {sim[-1]['loop']:.1f} s)", flush=True)
        if bare:
            report(args, sc, bare, sim, load_before)
        if args.profile:
            Federation._send = send
            profile_flower(sc, Path(args.profile).resolve())
    return 0


def report(args, sc, bare: list[dict], sim: list[dict], load_before) -> None:
    """Every repetition, the medians, the ratios of medians and the round loop's split."""
    med = {side: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for side, runs in
           (("bare", bare), ("simlab", sim))}
    b, s = med["bare"], med["simlab"]
    print(f"\nrounds={args.rounds} hospitals={args.hospitals} steps={args.steps} size={args.size} "
          f"threads={int(sc.engine.cpus_per_client)} reps={args.reps} (bare, simlab alternating)")
    print("rep  bare total  simlab total  simlab loop  simlab start-up")
    for i, (rb, rs) in enumerate(zip(bare, sim), 1):
        print(f"{i:>3}  {rb['total']:10.1f}  {rs['total']:12.1f}  {rs['loop']:11.1f}  {rs['startup']:15.1f}")
    print(f"medians: bare {b['total']:.1f} s; simlab {s['total']:.1f} s = outside the rounds (start-up, "
          f"shut-down, checkpoints) {s['startup']:.1f} s + round loop {s['loop']:.1f} s")
    print(f"ratio of medians, round loop (simlab loop / bare)   = {s['loop'] / b['total']:.3f}")
    print(f"ratio of medians, whole run  (simlab total / bare)  = {s['total'] / b['total']:.3f}   (target <= 1.15)")
    print("\nround loop, medians (s)            bare   simlab   difference")
    rows = [("hospitals training", b["train"], s["hosp_train"]),
            ("hospitals evaluating", b["eval"], s["hosp_eval"]),
            ("building Hospital objects", 0.0, s["setup"]),
            ("messaging, training", 0.0, s["msg_train"]),
            ("messaging, evaluation", 0.0, s["msg_eval"]),
            ("server (aggregation; codec)", b["server"], s["server"])]
    for name, x, y in rows:
        print(f"  {name:<30} {x:7.2f}  {y:7.2f}  {y - x:+8.2f}")
    print(f"  {'total':<30} {b['total']:7.2f}  {s['loop']:7.2f}  {s['loop'] - b['total']:+8.2f}")
    n = max(1.0, s["batches"])
    print(f"messaging per message batch ({s['batches']:.0f} batches): {(s['msg_train'] + s['msg_eval']) / n:.3f} s, "
          f"of which {s['msg_head'] / n:.3f} s before the first hospital call (push, Flower's pick-up, Ray, decode) "
          f"and {s['msg_tail'] / n:.3f} s after the last (encode, Ray, Flower's pull)")
    print(f"CPU seconds over the whole simlab run (medians): driver {s['cpu_driver']:.1f}, Ray workers "
          f"{s['cpu_workers']:.1f}, Ray's other processes {s['cpu_ray_other']:.1f}")
    load_after = os.getloadavg()
    print("load average (1, 5, 15 min) before: " + ", ".join(f"{x:.2f}" for x in load_before)
          + "; after: " + ", ".join(f"{x:.2f}" for x in load_after))


if __name__ == "__main__":
    sys.exit(main())

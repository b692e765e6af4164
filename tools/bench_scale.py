#!/usr/bin/env python3
"""Scale: how round time, bytes and memory grow with the number of hospitals, for plain FedAvg
(``continual.method: sequential``) and ODEx (``continual.method: odex``).

Hospitals H in ``--hospitals`` (default 4, 16, 64), every hospital in every round and, where H is
larger, a sample of ``--sampled`` (default 8) per round (``federation.clients_per_round``). Tiny
work so that 64 hospitals finish in minutes on 2 cores: 32 px images, 8 per window, 2 local steps,
4 rounds, 8 test images per domain, evaluated every round, the default U-Net (0.83 MB). Four
scanners; every fourth hospital changes scanner abruptly in round 3, so ODEx forks.

Every configuration runs in a fresh process (clean peak memory) through the simulation engine, on
streams generated once beforehand. What it reports comes from the run directory's rounds.jsonl
(``train_s``, ``eval_s``, ``wall_time_s``, ``bytes_down``, ``bytes_up``, ``eval_bytes_down``) and
from three probes of that process (``tools/bench_probes.py``):

* a ledger of every message batch the server sends (``Federation._send``): its kind, the bytes of
  each part (model, pool members, histories) down, of models and window statistics up, and how
  long ``send_and_receive`` took;
* the hospitals' own compute, timed inside the Ray workers (``tools/worker_trace``): training and
  ODEx scoring, evaluation, building a Hospital; *messaging* is the time a batch was out with no
  hospital computing (Flower's queues and polling, Ray transport, the ClientApp's decode and
  encode), *server* the rest of the round (encoding, decoding, aggregation, the pool);
* memory: the peak RSS of the driver (the ServerApp runs in it), of each Ray worker and of Ray's
  own processes, and the peak PSS of the whole process tree, sampled from /proc every 0.2 s.

Printed: one row per configuration (means over rounds 1..T; with ``--reps N`` every configuration
runs N times, one after the other in turn, and each figure is the median over the N), the growth
factors 16/4 and 64/16, ODEx bytes / sequential bytes at each H with the messages that make the difference, and the
acceptance checks (time and bytes at most linear in the sampled hospitals, ODEx bytes <= 1.5 x
sequential at the largest H, driver memory not growing with hospitals × model).

    tools/bench_scale.py [--hospitals 4,16,64] [--sampled 8] [--rounds 4] [--arms sequential,odex] [--reps 1]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_probes import TRACE_DIR, load_line, TreeMemory, message_ledger, read_trace, round_split

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MB = 1e6


def scenario_dict(h: int, sampled: int | None, args, cache: str, arm: str) -> dict:
    def drift(i: int) -> dict:
        if i % 4 == 0:
            return {"type": "abrupt", "domains": ["old", "new"], "at": [max(2, (args.rounds + 3) // 2)]}
        return {"type": "none", "domain": "city" if i % 2 else "north"}

    return {
        "name": f"scale-{arm}-{h}", "seed": 0,
        "data": {"image_size": args.size, "cache_dir": cache},
        "domains": {"old": {"scanner": {"contrast": "inverted", "bias_field": 0.3, "noise": 0.03}},
                    "new": {"scanner": {"bias_field": 0.15, "noise": 0.02}},
                    "city": {"scanner": {"bias_field": 0.25, "noise": 0.03, "gamma": 0.8}},
                    "north": {"scanner": {"bias_field": 0.2, "noise": 0.02, "blur": 0.6}}},
        "hospitals": [{"id": f"h{i:02d}", "size": args.images, "drift": drift(i)} for i in range(h)],
        "federation": {"rounds": args.rounds, "local_steps": args.steps, "batch_size": args.images,
                       "lr": 0.005, "clients_per_round": sampled,
                       # a Ray that failed to start ends the run after these, not after 10 minutes
                       "connect_timeout_s": 120, "round_timeout_s": 300},
        "continual": {"method": arm},
        "evaluation": {"every": 1, "test_size": args.test_size},
        "engine": {"cpus_per_client": 1, "device": "cpu"},
        "output": {"checkpoint": False},
    }


# ------------------------------------------------------------------------------ one configuration (child process)
def run_child(args) -> int:
    from simlab.engine.simulation import simulate
    from simlab.models.unet import build_model, state_to_numpy
    from simlab.runlog import RunLog
    from simlab.scenario.schema import load_scenario_dict

    h, sampled, arm = args.child
    sampled = None if sampled == "all" else int(sampled)
    sc = load_scenario_dict(scenario_dict(int(h), sampled, args, args.cache, arm), "<bench-scale>").base
    ledger: list[dict] = []
    message_ledger(ledger)
    mem = TreeMemory()
    mem.sample()
    baseline = mem.driver
    mem.start()
    with tempfile.TemporaryDirectory(prefix="simlab-scale-") as tmp:
        runlog = RunLog(Path(tmp), arm)
        start = time.perf_counter()
        simulate(sc, runlog)
        total = time.perf_counter() - start
        runlog.close()
        rounds = [json.loads(x) for x in (Path(tmp) / "rounds.jsonl").read_text().splitlines()]
    mem.stop.set()
    mem.join()
    mem.sample()
    model = state_to_numpy(build_model(sc.model, sc.num_classes))
    Path(args.out).write_text(json.dumps({
        "total_s": total, "model_bytes": int(sum(v.nbytes for v in model.values())), "rounds": rounds,
        "ledger": ledger, "trace": read_trace(Path(args.trace)),
        "memory": {"driver_baseline": baseline, **mem.report()}}))
    return 0


# ------------------------------------------------------------------------------ analysis (parent)
def summarise(res: dict) -> dict:
    """Means over rounds 1..T of a configuration's round time split and bytes."""
    rounds = [r for r in res["rounds"] if r["round"] > 0]
    ledger, trace = res["ledger"], res["trace"]
    split = round_split(rounds, ledger, trace)
    n = len(rounds)
    down: dict[str, float] = {}
    up: dict[str, float] = {}
    for s in ledger:
        if s["round"] and s["round"] > 0:
            for part, v in s["down"].items():
                key = f"{s['kind']}:{part}"
                down[key] = down.get(key, 0) + v / n
            for part, v in s["up"].items():
                if v:
                    key = f"{s['kind']}:{part}"
                    up[key] = up.get(key, 0) + v / n
    return {
        "wall": statistics.fmean(r["wall_time_s"] for r in rounds),
        "train_s": statistics.fmean(r.get("train_s", 0.0) for r in rounds),
        "eval_s": statistics.fmean(r.get("eval_s", 0.0) for r in rounds),
        **{k: v / n for k, v in split.items()},
        "down": statistics.fmean(r["bytes_down"] for r in rounds),
        "up": statistics.fmean(r["bytes_up"] for r in rounds),
        "eval_down": statistics.fmean(r.get("eval_bytes_down", 0) for r in rounds),
        "pool": max((r.get("pool_size", 1) for r in rounds), default=1),
        "down_parts": down, "up_parts": up, "total_s": res["total_s"], "memory": res["memory"],
        "sent": statistics.fmean(len(r["sent"]) for r in rounds),
        "setups": sum(1 for e in trace if e["k"] == "setup"), "model_bytes": res["model_bytes"],
    }


def print_table(results: dict) -> None:
    print("\nper round (means over rounds 1..T); time in s, bytes in MB, memory peak RSS in MB")
    head = (f"{'arm':>10} {'H':>3} {'k':>3} {'round':>6} {'h.train':>7} {'h.eval':>6} {'setup':>6} {'msg.tr':>6} "
            f"{'msg.ev':>6} {'server':>6} {'down':>7} {'up':>7} {'eval.dn':>7} {'pool':>4} {'driver':>7} "
            f"{'drv+':>6} {'worker':>6} {'ray':>6} {'PSS':>6} {'total':>6}")
    print(head)
    for (arm, h, k), s in results.items():
        m = s["memory"]
        print(f"{arm:>10} {h:>3} {k:>3} {s['wall']:6.2f} {s['hosp_train']:7.2f} {s['hosp_eval']:6.2f} "
              f"{s['setup']:6.2f} {s['msg_train']:6.2f} {s['msg_eval']:6.2f} {s['server']:6.2f} "
              f"{s['down'] / MB:7.2f} {s['up'] / MB:7.2f} {s['eval_down'] / MB:7.2f} {s['pool']:>4} "
              f"{m['driver_peak'] / MB:7.0f} {(m['driver_peak'] - m['driver_baseline']) / MB:6.0f} "
              f"{m['worker_peak'] / MB:6.0f} {m['ray_other'] / MB:6.0f} {m['tree_pss'] / MB:6.0f} "
              f"{s['total_s']:6.1f}")
    print("columns: round = wall time of a round; h.train / h.eval = hospitals computing (training and ODEx "
          "scoring / evaluation); setup = building Hospital objects in the workers; msg.tr / msg.ev = batch out, "
          "no hospital computing; server = the rest of the round; down / up = bytes_down / bytes_up; driver = "
          "peak RSS of the driver, drv+ = its growth during the run; worker = largest Ray worker; ray = Ray's "
          "other processes; PSS = whole tree; total = the arm's wall time with start-up.")


def growth(results: dict, hs: list[int], args) -> list[str]:
    """Growth factors of round time and bytes between consecutive H; acceptance: <= linear in the
    sampled hospitals (factor <= ratio of sampled hospitals)."""
    lines, ok = [], True
    for arm in args.arms:
        for mode in ("all", "sampled"):
            keys = [(arm, h, h if mode == "all" else min(args.sampled, h)) for h in hs]
            keys = [k for k in keys if k in results]
            for a, b in zip(keys, keys[1:]):
                ra, rb = results[a], results[b]
                linear = b[2] / a[2]
                f_time, f_down, f_up = rb["wall"] / ra["wall"], rb["down"] / ra["down"], rb["up"] / ra["up"]
                good = max(f_time, f_down, f_up) <= linear * 1.05
                ok &= good
                lines.append(f"{arm:>10} {mode:>7} H {a[1]:>2}->{b[1]:<2} sampled {a[2]:>2}->{b[2]:<2}: "
                             f"time x{f_time:5.2f}, down x{f_down:5.2f}, up x{f_up:5.2f}  "
                             f"(linear x{linear:.2f}) {'ok' if good else 'ABOVE LINEAR'}")
    lines.append(f"acceptance, per-round time and bytes at most linear in sampled hospitals: {'PASS' if ok else 'FAIL'}")
    return lines


def odex_bytes(results: dict, hs: list[int], args) -> list[str]:
    lines = []
    for h in hs:
        for k in sorted({h, min(args.sampled, h)}, reverse=True):
            o, s = results.get(("odex", h, k)), results.get(("sequential", h, k))
            if not (o and s):
                continue
            ratio = (o["down"] + o["up"]) / (s["down"] + s["up"])
            lines.append(f"H={h:>2} sampled={k:>2}: ODEx / sequential bytes = {ratio:.3f} "
                         f"(down {o['down'] / s['down']:.3f}, up {o['up'] / s['up']:.3f}; final pool {o['pool']})")
            parts = sorted(set(o["down_parts"]) | set(s["down_parts"]))
            lines.append("      down per round, MB  " + ", ".join(
                f"{p} {o['down_parts'].get(p, 0) / MB:.2f}/{s['down_parts'].get(p, 0) / MB:.2f}" for p in parts)
                + "  (ODEx/sequential)")
            parts = sorted(set(o["up_parts"]) | set(s["up_parts"]))
            lines.append("      up per round, MB    " + ", ".join(
                f"{p} {o['up_parts'].get(p, 0) / MB:.2f}/{s['up_parts'].get(p, 0) / MB:.2f}" for p in parts))
    big = max(hs)
    o, s = results.get(("odex", big, big)), results.get(("sequential", big, big))
    if o and s:
        ratio = (o["down"] + o["up"]) / (s["down"] + s["up"])
        lines.append(f"acceptance, ODEx bytes <= 1.5 x sequential at {big} hospitals: {ratio:.3f} "
                     f"{'PASS' if ratio <= 1.5 else 'FAIL'}")
    return lines


def memory_lines(results: dict, hs: list[int], args) -> list[str]:
    """Driver peak memory against hospitals × model and pool × model; acceptance: the driver's peak
    grows by less than half a model per added hospital (else it is O(hospitals × model))."""
    lines, ok = [], True
    for arm in args.arms:
        for mode in ("all", "sampled"):
            keys = [k for k in ((arm, h, h if mode == "all" else min(args.sampled, h)) for h in hs) if k in results]
            if len(keys) < 2:
                continue
            lo, hi = results[keys[0]], results[keys[-1]]
            model = hi["model_bytes"]
            d = (hi["memory"]["driver_peak"] - lo["memory"]["driver_peak"]) / MB
            lines.append(f"{arm:>10} {mode:>7}: driver peak {lo['memory']['driver_peak'] / MB:.0f} MB at H={keys[0][1]}"
                         f" -> {hi['memory']['driver_peak'] / MB:.0f} MB at H={keys[-1][1]} ({d:+.0f} MB); "
                         f"hospitals x model would add {(keys[-1][1] - keys[0][1]) * model / MB:.0f} MB, "
                         f"sampled x model {(keys[-1][2] - keys[0][2]) * model / MB:.0f} MB, pool x model "
                         f"{hi['pool'] * model / MB:.1f} MB")
            grows = d * MB > 0.5 * (keys[-1][1] - keys[0][1]) * model
            ok &= not grows
            if grows:
                lines.append(f"{'':>19}  {d * MB / (keys[-1][1] - keys[0][1]) / model:.1f} models per added hospital: "
                             f"O(hospitals x model)")
    lines.append(f"acceptance, driver memory not O(hospitals x model): {'PASS' if ok else 'FAIL'}")
    return lines


def run_one(args, tmp: Path, arm: str, h: int, k: int) -> dict:
    """One configuration in a process of its own (tried up to three times: Ray's start can time out
    on a busy machine); its raw measurements."""
    trace, out = tmp / f"trace-{arm}-{h}-{k}", tmp / f"{arm}-{h}-{k}.json"
    env = {**os.environ, "SIMLAB_BENCH_TRACE": str(trace),
           "PYTHONPATH": os.pathsep.join([str(TRACE_DIR), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, __file__, "--child", str(h), "all" if k == h else str(k), arm,
           "--cache", str(tmp / "cache"), "--trace", str(trace), "--out", str(out), "--rounds", str(args.rounds),
           "--size", str(args.size), "--images", str(args.images), "--steps", str(args.steps),
           "--test-size", str(args.test_size)]
    for attempt in range(3):
        shutil.rmtree(trace, ignore_errors=True)
        trace.mkdir()
        if subprocess.run(cmd, env=env).returncode == 0:
            return json.loads(out.read_text())
        print(f"{arm} H={h} sampled={k}: attempt {attempt + 1} failed", flush=True)
    raise SystemExit(f"{arm} H={h} sampled={k} failed three times")


def run_configs(args, hs: list[int]) -> tuple[dict, dict]:
    """Generate the data once, then run every (arm, H, sampled) in a process of its own; the
    summaries by (arm, H, sampled) and the raw measurements by name."""
    raw: dict = {}
    with tempfile.TemporaryDirectory(prefix="simlab-bench-scale-") as tmp:
        cache = str(Path(tmp) / "cache")
        from simlab.runner import prepare_data
        from simlab.scenario.schema import load_scenario_dict

        t0 = time.perf_counter()
        prepare_data(load_scenario_dict(scenario_dict(max(hs), None, args, cache, "sequential"), "<bench-scale>"))
        print(f"data for {max(hs)} hospitals generated in {time.perf_counter() - t0:.1f} s")
        configs = [(arm, h, k) for h in hs for k in sorted({h, min(args.sampled, h)}, reverse=True)
                   for arm in args.arms]
        reps: dict[tuple, list[dict]] = {c: [] for c in configs}
        for rep in range(args.reps):  # every configuration once per repetition: load drifts hit all alike
            for arm, h, k in configs:
                t0 = time.perf_counter()
                name = f"{arm}-{h}-{k}" + (f"-rep{rep + 1}" if args.reps > 1 else "")
                raw[name] = run_one(args, Path(tmp), arm, h, k)
                reps[(arm, h, k)].append(summarise(raw[name]))
                print(f"{name}: {time.perf_counter() - t0:.1f} s", flush=True)
        results = {c: median_of(rs) for c, rs in reps.items()}
    return results, raw


def median_of(summaries: list[dict]):
    """Field by field median of a configuration's repetitions (bytes are the same in every one)."""
    first = summaries[0]
    if isinstance(first, dict):
        return {key: median_of([s[key] for s in summaries]) for key in first}
    if isinstance(first, (int, float)) and not isinstance(first, bool):
        return statistics.median(summaries)
    return first


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hospitals", default="4,16,64")
    p.add_argument("--sampled", type=int, default=8, help="hospitals per round in the sampled variant")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--images", type=int, default=8, help="images per window")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--test-size", type=int, default=8)
    p.add_argument("--arms", default="sequential,odex")
    p.add_argument("--reps", type=int, default=1, help="repetitions of every configuration; the table gives medians")
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    p.add_argument("--cache", help=argparse.SUPPRESS)
    p.add_argument("--trace", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--keep", help="write every configuration's raw measurements to this JSON file")
    args = p.parse_args()
    if args.child:
        return run_child(args)
    args.arms = args.arms.split(",")
    hs = [int(x) for x in args.hospitals.split(",")]
    load_before = os.getloadavg()
    results, raw = run_configs(args, hs)
    if args.keep:
        Path(args.keep).write_text(json.dumps(raw))
    print(f"\nscale: {args.rounds} rounds, {args.images} images of {args.size} px per window, {args.steps} steps, "
          f"test {args.test_size} per domain, evaluated every round; {os.cpu_count()} cores")
    print_table(results)
    print("\ngrowth factors")
    print("\n".join(growth(results, hs, args)))
    print("\nODEx bytes against sequential (per round, rounds 1..T)")
    print("\n".join(odex_bytes(results, hs, args)))
    print("\ndriver (server) memory")
    print("\n".join(memory_lines(results, hs, args)))
    print(load_line(load_before))
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Loopback deployment against simulation: the same scenario, per-round time.

One SuperLink (TLS, SuperNode authentication) and one SuperNode per hospital on this machine
(``tools/deploy up``'s code path), the scenario run on it (``tools/deploy run``), then the same
scenario simulated in-process (``simlab run``). Each side is repeated ``--reps`` times, alternating,
and the medians are compared: the median over rounds of ``wall_time_s`` in ``rounds.jsonl`` (a round:
the training phase, and the evaluation phase where one is due), and the time of the whole arm.

Deployment sides (``--sides``, comma-separated; each brought up once, its runs repeated):

* ``warm``: simlab's SuperNode (``--executor warm``: one long-lived ClientApp process per SuperNode)
  with the idle waits capped at ``--poll-interval`` (default 0.2 s) and the SuperNode's quick back-off
  for a message's arrays;
* ``warm-3s``: the warm worker with Flower's own SuperNode waits (3 s idle, 1 s back-off);
* ``flower``: Flower's SuperNode as it comes (a ``flwr-clientapp`` process per message, 3 s idle
  wait). Slow: about two minutes per round on 2 loaded cores.

The ServerApp's grid and the warm worker always use simlab's quick back-off
(:mod:`simlab.federated.object_pulls`). For each side the table also gives the CPU seconds per round
of each kind of process (from /proc: the SuperLink; the ServerApp with the ``flower-superexec`` that
launches it; the SuperNodes; their ClientApp workers or processes; the ``flwr`` commands this script
runs), and the CPU they burn per second when the deployment is idle (polling), over ``--idle`` seconds
before the first run.

    tools/bench_deploy.py [--hospitals 3] [--rounds 4] [--image-size 32] [--method odex] [--reps 3]
                          [--sides warm,warm-3s] [--poll-interval 0.2]

Prints a table and the ratios deployment / simulation (the acceptance: per-round time ≤ 3× simulated).
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

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_probes import load_line  # noqa: E402

SCENARIO = """\
name: bench-deploy
seed: 3
data: {{image_size: {size}, cache_dir: {cache}}}
domains:
  A: {{}}
  B: {{scanner: {{contrast: inverted, noise: 0.03}}}}
  C: {{scanner: {{gamma: 0.6, bias_field: 0.3}}}}
hospitals:
{hospitals}
model: {{channels: [8, 16, 32]}}
federation: {{rounds: {rounds}, local_steps: 2, batch_size: 4, lr: 0.005}}
continual: {{method: {method}}}
evaluation: {{every: 2, test_size: 8}}
"""


def scenario_text(n: int, rounds: int, size: int, method: str, cache: Path) -> str:
    domains = ["A", "B", "C"]
    rows = []
    for i in range(n):
        first, second = domains[i % 3], domains[(i + 1) % 3]
        drift = (f"{{type: abrupt, domains: [{first}, {second}], at: [{rounds // 2 + 1}]}}" if i % 3 == 0
                 else f"{{type: none, domain: {first}}}")
        rows.append(f"  - {{id: h{i + 1}, size: 8, drift: {drift}}}")
    return SCENARIO.format(size=size, cache=cache, hospitals="\n".join(rows), rounds=rounds, method=method)


def round_times(run_dir: Path) -> tuple[float, float]:
    """(median round wall time over rounds >= 1, the arm's total wall time)."""
    rows = [json.loads(x) for x in (run_dir / "rounds.jsonl").read_text().splitlines() if x]
    per_round = [r["wall_time_s"] for r in rows if r["round"] >= 1]
    summary = json.loads((run_dir / "summary.json").read_text())
    return statistics.median(per_round), sum(a["wall_time_s"] for a in summary["arms"].values())


def simulate(path: Path, out: Path) -> tuple[float, float]:
    from simlab.cli import main

    if main(["run", str(path), "--out", str(out), "--quiet", "--no-report"]) != 0:
        raise SystemExit("the simulated run failed")
    return round_times(out)


SIDES = {"warm": ("warm", "poll"), "warm-3s": ("warm", None), "flower": ("flower", None)}


ROLES = {"flower-superlink": "superlink", "flower-superexec": "serverapp", "flwr-serverapp": "serverapp",
         "simlab.engine.supernode": "supernode", "simlab.engine.clientapp_worker": "clientapp",
         "flwr-clientapp": "clientapp"}


def cpu_by_role(dep) -> dict[str, float]:
    """CPU seconds so far of the deployment's processes by role (a process's own time and that of its
    children it has reaped, so an exited ServerApp or ClientApp process counts with its parent), plus
    the ``flwr`` commands this process ran (``cli``)."""
    import resource

    from simlab.engine.procs import children_map, descendants

    tick = os.sysconf("SC_CLK_TCK")
    out = {"superlink": 0.0, "serverapp": 0.0, "supernode": 0.0, "clientapp": 0.0}
    children = children_map()
    for rec in dep.records:
        if not rec.alive():
            continue
        for pid in [rec.pid, *descendants(rec.pid, children)]:
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            ticks = sum(int(x) for x in fields[11:15])  # utime, stime, cutime, cstime
            names = [Path(a.decode(errors="replace")).name for a in argv[:3]] + [a.decode(errors="replace") for a in argv[:3]]
            role = next((ROLES[n] for n in names if n in ROLES), rec.role)
            out[role] = out.get(role, 0.0) + ticks / tick
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    out["cli"] = usage.ru_utime + usage.ru_stime
    return out


def _minus(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    return {k: a.get(k, 0.0) - b.get(k, 0.0) for k in a}


def deploy_side(side: str, path: Path, root: Path, hospitals: list[str], reps: int, poll: float, idle_s: float,
                on_rep) -> tuple[float, list[tuple[float, float]], dict[str, float], dict[str, float]]:
    from simlab.engine.deploy_run import bring_up, run_deployment
    from simlab.engine.deployment import Deployment
    from simlab.engine.pki import make_pki

    executor, poll_key = SIDES[side]
    pki = make_pki(root / "pki", hospitals)
    dep = Deployment(root / f"state-{side}")
    t0 = time.perf_counter()
    try:
        bring_up(dep, pki, hospitals, data_dir=root / f"sites-{side}", executor=executor,
                 poll_s=poll if poll_key else None)
        up_s = time.perf_counter() - t0
        time.sleep(10.0)  # the ClientApp workers import torch and MONAI after the SuperNodes are online
        a = cpu_by_role(dep)
        time.sleep(idle_s)
        idle = {k: v / idle_s for k, v in _minus(cpu_by_role(dep), a).items()}
        out, per_round = [], []
        for rep in range(reps):
            on_rep(rep)
            before = cpu_by_role(dep)
            run_dir, _ = run_deployment(path, dep, out=str(root / f"run-{side}-{rep}"))
            rounds = _rounds(run_dir)
            per_round.append({k: v / rounds for k, v in _minus(cpu_by_role(dep), before).items()})
            out.append(round_times(run_dir))
        cpu = {k: statistics.median(r[k] for r in per_round) for k in per_round[0]}
        return up_s, out, cpu, idle
    finally:
        dep.stop()


def _rounds(run_dir: Path) -> int:
    """Rounds of a run including round 0's evaluation (what the CPU per round is divided by)."""
    return sum(1 for x in (run_dir / "rounds.jsonl").read_text().splitlines() if x)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hospitals", type=int, default=3)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--method", default="odex")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--sides", default="warm,warm-3s")
    p.add_argument("--poll-interval", type=float, default=0.2)
    p.add_argument("--idle", type=float, default=10.0, help="seconds of idle deployment to measure polling CPU")
    args = p.parse_args()
    sides = [s for s in args.sides.split(",") if s]
    if unknown := [s for s in sides if s not in SIDES]:
        raise SystemExit(f"unknown side(s) {unknown}: choose from {', '.join(SIDES)}")
    before = os.getloadavg()
    root = Path(tempfile.mkdtemp(prefix="simlab-bench-deploy-"))
    path = root / "scenario.yaml"
    path.write_text(scenario_text(args.hospitals, args.rounds, args.image_size, args.method, root / "cache"))
    hospitals = [f"h{i + 1}" for i in range(args.hospitals)]
    sim: list[tuple[float, float]] = []
    simulate(path, root / "warm-up")  # data generated and Ray started before anything is timed
    results = {}
    for side in sides:
        # simulation alternates with the side's repetitions: one simulated run before each deployed one
        results[side] = deploy_side(side, path, root, hospitals, args.reps, args.poll_interval, args.idle,
                                    lambda rep: sim.append(simulate(path, root / f"sim-{side}-{rep}")))
    sim_round = statistics.median(r for r, _ in sim)
    sim_arm = statistics.median(a for _, a in sim)
    print(f"\n{args.hospitals} hospitals, {args.rounds} rounds, {args.image_size} px, {args.method}; "
          f"medians of {args.reps} repetitions (simulation: {len(sim)} runs, alternating)")
    print(f"{'side':10s} {'bring-up s':>10s} {'round s':>9s} {'arm s':>8s} {'round / sim':>12s} {'arm / sim':>10s}")
    print(f"{'simulated':10s} {'':>10s} {sim_round:9.2f} {sim_arm:8.1f} {1.0:12.2f} {1.0:10.2f}")
    for side, (up_s, runs, _, _) in results.items():
        rnd, arm = statistics.median(r for r, _ in runs), statistics.median(a for _, a in runs)
        print(f"{side:10s} {up_s:10.1f} {rnd:9.2f} {arm:8.1f} {rnd / sim_round:12.2f} {arm / sim_arm:10.2f}")
    roles = ["superlink", "serverapp", "supernode", "clientapp", "cli"]
    print(f"\nCPU seconds per round (round 0 included; median over repetitions) | CPU s per s when idle")
    print(f"{'side':10s} " + " ".join(f"{r:>9s}" for r in roles) + f" {'total':>7s} | "
          + " ".join(f"{r:>9s}" for r in roles[:4]))
    for side, (_, _, cpu, idle) in results.items():
        print(f"{side:10s} " + " ".join(f"{cpu.get(r, 0):9.2f}" for r in roles) + f" {sum(cpu.values()):7.2f} | "
              + " ".join(f"{idle.get(r, 0):9.3f}" for r in roles[:4]))
    print(load_line(before))
    print(f"run directories: {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""ODEx cost: wall time of the ODEx arm against the sequential arm on the same scenario, and the
share of round time spent in Mahalanobis scoring (features and scores of the window under every
history entry, at the hospitals, inside the train step; the longest per round), measured in one
run. Target: ODEx <= 1.10 x sequential.

Also printed: the same ratio over training-only rounds (rounds neither arm evaluates), with and
without ODEx's scoring, and each arm's evaluation share of its round time, estimated as the
time of its evaluated rounds minus, for each that also trains (all but round 0), the arm's mean
training-only round. The load average of the machine before and after is printed too: the
timings mean little on a busy machine.

    tools/bench_odex.py [SCENARIO.yaml] [--set key=value ...]

Both arms run through the same simulation engine on identical, pre-generated streams; the ratio
uses the time inside the round loop (Ray start-up excluded, reported separately).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench_probes import load_line  # noqa: E402 (tools/ is this script's directory)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from simlab.engine.simulation import simulate  # noqa: E402
from simlab.runlog import RunLog  # noqa: E402
from simlab.runner import prepare_data  # noqa: E402
from simlab.scenario.schema import load_scenario  # noqa: E402


def run_arm(sc, run_dir: Path, arm: str) -> tuple[float, list[dict]]:
    runlog = RunLog(run_dir, arm)
    start = time.perf_counter()
    simulate(sc, runlog)
    total = time.perf_counter() - start
    runlog.close()
    rows = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    return total, [r for r in rows if r["arm"] == arm]


def main() -> int:
    root = Path(__file__).resolve().parents[1]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("scenario", nargs="?", default=str(root / "scenarios" / "odex_abrupt.yaml"))
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--repeat", type=int, default=1,
                   help="measure both arms N times, their order alternating; prints every ratio and the median "
                        "(the details below are those of the last repeat)")
    args = p.parse_args()
    load_before = os.getloadavg()
    overrides = args.overrides + ["arms=[{name: odex, set: {continual.method: odex}}, "
                                  "{name: sequential, set: {continual.method: sequential}}]"]
    loaded = load_scenario(args.scenario, overrides)
    prepare_data(loaded)
    ratios = []
    for i in range(max(1, args.repeat)):
        arms = list(loaded.arms.items())
        with tempfile.TemporaryDirectory(prefix="simlab-bench-odex-") as tmp:
            results = {arm: run_arm(sc, Path(tmp), arm) for arm, sc in (arms if i % 2 == 0 else arms[::-1])}
        ratios.append(sum(r["wall_time_s"] for r in results["odex"][1])
                      / sum(r["wall_time_s"] for r in results["sequential"][1]))
    inner = {arm: sum(r["wall_time_s"] for r in rows) for arm, (_, rows) in results.items()}
    # scoring: at the hospitals inside the train step (score_s, the longest per round); in rounds
    # without histories (the first round; oracle / DiceEx expansion) a separate query phase (query_s)
    query = sum(r.get("score_s", r.get("query_s", 0.0)) for r in results["odex"][1])
    train_rounds = [r for r in results["odex"][1] if r["round"] > 0]
    print(f"scenario: {loaded.base.name}, {loaded.base.federation.rounds} rounds, "
          f"{len(loaded.base.hospitals)} hospitals, image {loaded.base.data.image_size}")
    for arm, (total, _) in results.items():
        print(f"{arm:>10}: {total:7.1f} s total, {inner[arm]:7.1f} s in rounds")
    print(f"final pool size: {train_rounds[-1].get('pool_size')}")
    print(f"ODEx / sequential wall time (rounds) = {inner['odex'] / inner['sequential']:.3f}   (target <= 1.10)")
    print(f"Mahalanobis scoring share of ODEx round time = {query / inner['odex']:.3f}")
    rows = {arm: {r["round"]: r for r in arm_rows} for arm, (_, arm_rows) in results.items()}
    plain = [t for t in rows["odex"] if t > 0 and t in rows["sequential"]
             and not rows["odex"][t]["evaluated"] and not rows["sequential"][t]["evaluated"]]
    if plain:
        wall = {arm: sum(rows[arm][t]["wall_time_s"] for t in plain) for arm in rows}
        q = sum(rows["odex"][t].get("score_s", rows["odex"][t].get("query_s", 0.0)) for t in plain)
        print(f"training-only rounds ({len(plain)}): ODEx / sequential = {wall['odex'] / wall['sequential']:.3f}, "
              f"without scoring = {(wall['odex'] - q) / wall['sequential']:.3f}")
        for arm, arm_rows in rows.items():
            evaluated = [t for t, r in arm_rows.items() if r["evaluated"]]  # round 0 only evaluates
            est = sum(max(0.0, arm_rows[t]["wall_time_s"] - (wall[arm] / len(plain) if t > 0 else 0.0))
                      for t in evaluated)
            print(f"{arm:>10}: evaluation ~ {est:5.1f} s = {est / inner[arm]:.3f} of its round time "
                  f"({len(evaluated)} evaluated rounds)")
    if len(ratios) > 1:
        print(f"ODEx / sequential over {len(ratios)} repeats: " + ", ".join(f"{r:.3f}" for r in ratios)
              + f"; median {float(np.median(ratios)):.3f}")
    print(load_line(load_before))
    return 0


if __name__ == "__main__":
    sys.exit(main())

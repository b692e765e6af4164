#!/usr/bin/env python3
"""ODEx cost: wall time of the ODEx arm against the sequential arm on the same scenario, and the
share of round time spent in Mahalanobis scoring (the query phase: histories out, features and
scores at every hospital, scores back), measured in one run. Target: ODEx <= 1.10 x sequential.

    tools/bench_odex.py [SCENARIO.yaml] [--set key=value ...]

Both arms run through the same simulation engine on identical, pre-generated streams; the ratio
uses the time inside the round loop (Ray start-up excluded, reported separately).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

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
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="simlab-bench-odex-") as tmp:
        overrides = args.overrides + ["arms=[{name: odex, set: {continual.method: odex}}, "
                                      "{name: sequential, set: {continual.method: sequential}}]"]
        loaded = load_scenario(args.scenario, overrides)
        prepare_data(loaded)
        results = {arm: run_arm(sc, Path(tmp), arm) for arm, sc in loaded.arms.items()}
    inner = {arm: sum(r["wall_time_s"] for r in rows) for arm, (_, rows) in results.items()}
    query = sum(r.get("query_s", 0.0) for r in results["odex"][1])
    train_rounds = [r for r in results["odex"][1] if r["round"] > 0]
    print(f"scenario: {loaded.base.name}, {loaded.base.federation.rounds} rounds, "
          f"{len(loaded.base.hospitals)} hospitals, image {loaded.base.data.image_size}")
    for arm, (total, _) in results.items():
        print(f"{arm:>10}: {total:7.1f} s total, {inner[arm]:7.1f} s in rounds")
    print(f"final pool size: {train_rounds[-1].get('pool_size')}")
    print(f"ODEx / sequential wall time (rounds) = {inner['odex'] / inner['sequential']:.3f}   (target <= 1.10)")
    print(f"Mahalanobis scoring (query phase) share of ODEx round time = {query / inner['odex']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Runs a loaded scenario: prepares the run directory and data, runs every arm, writes the results.

Run directory::

    scenario.yaml        the scenario as given, every default filled in, each arm resolved
    metrics.jsonl        one row per round × hospital × domain × metric (all arms; deterministic)
    rounds.jsonl         per-round cost: bytes down/up, wall time, replies, failures
    R/<arm>/<hospital>.csv, R/<arm>/pooled.csv    accuracy matrices (rows: after stage i; cols: stage j)
    dice_by_round/<arm>.csv                      mean Dice per evaluated round × domain
    summary.json         arms.<name>.{acc, bwt, fwt, forgetting, wall_time_s, per_hospital, ...}
    simlab.log           the log
"""

from __future__ import annotations

import csv
import json
import logging
import os
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import yaml

from simlab.data.streams import DataFactory
from simlab.metrics.results import LABELS, arm_results, dice_by_round, rows_by_arm
from simlab.runlog import RunLog
from simlab.scenario.schema import LoadedScenario, resolved_dict

log = logging.getLogger("simlab")


class RunDirError(RuntimeError):
    pass


def make_run_dir(loaded: LoadedScenario, base: Path | None = None) -> Path:
    """Create the run directory; an existing non-empty directory is refused, never overwritten."""
    sc = loaded.base
    if sc.output.dir:
        path = Path(sc.output.dir)
    else:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        path = (base or Path("runs")) / f"{sc.name}-{stamp}"
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise RunDirError(f"{path}: run directory exists and is not empty; choose another --out")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def prepare_data(loaded: LoadedScenario, tick: Callable[[], None] | None = None) -> int:
    """Generate (or find in the cache) every window and test set, once, before any arm runs."""
    sc = loaded.base
    factory = DataFactory(sc.data, sc.domains, sc.seed, sc.evaluation.test_size)
    count = 0
    for d in sc.eval_domains:
        factory.test_set(d)
        count += 1
        if tick:
            tick()
    for h in sc.hospitals:
        for t in range(1, sc.federation.rounds + 1):
            factory.window(h, t)
            count += 1
            if tick:
                tick()
    return count


def data_items(loaded: LoadedScenario) -> int:
    sc = loaded.base
    return len(sc.eval_domains) + len(sc.hospitals) * sc.federation.rounds


def _write_matrix(path: Path, R: list[list], stages: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        cols = [f"{j + 1}:{s['domain']}" for j, s in enumerate(stages)]
        w.writerow(["after_stage", *cols])
        for i, row in enumerate(R):
            w.writerow([f"{i + 1}:{stages[i]['domain']}@r{stages[i]['last_round']}",
                        *["" if v is None else f"{v:.6f}" for v in row]])


def write_results(run_dir: Path, loaded: LoadedScenario, wall: dict[str, float]) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    by_arm = rows_by_arm(rows)
    costs = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines() if line]
    summary: dict = {"scenario": loaded.base.name, "seed": loaded.base.seed, "metric_labels": LABELS,
                     "pooled_definition": "arm-level acc/bwt/fwt/forgetting use the pooled (federation-level) R; "
                                          "see per_hospital for each hospital's own R",
                     "arms": {}}
    for arm, sc in loaded.arms.items():
        res = arm_results(sc, by_arm.get(arm, []))
        pooled = res["pooled"]
        arm_costs = [c for c in costs if c["arm"] == arm]
        summary["arms"][arm] = {
            "method": sc.continual.method,
            "aggregation": sc.federation.aggregation.rule,
            "breaks_no_rehearsal": sc.continual.method == "joint",
            "acc": pooled["acc"], "bwt": pooled["bwt"], "fwt": pooled["fwt"], "forgetting": pooled["forgetting"],
            "wall_time_s": round(wall.get(arm, float("nan")), 2),
            "bytes_total": int(sum(c.get("bytes_down", 0) + c.get("bytes_up", 0) for c in arm_costs)),
            "failed_updates": int(sum(len(c.get("failed", [])) for c in arm_costs)),
            "skipped_rounds": int(sum(1 for c in arm_costs if c.get("skipped"))),
            "final_dice": res["final_dice"],
            **({"pool": res["pool"], "final_dice_oracle": res["final_dice_oracle"]} if "pool" in res else {}),
            "pooled": pooled,
            "per_hospital": res["per_hospital"],
        }
        for hid, block in [("pooled", pooled), *res["per_hospital"].items()]:
            _write_matrix(run_dir / "R" / arm / f"{hid}.csv", block["R"], block["stages"])
        rounds, M = dice_by_round(by_arm.get(arm, []), [h.id for h in sc.hospitals], sc.eval_domains)
        out = run_dir / "dice_by_round" / f"{arm}.csv"
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["round", *sc.eval_domains])
            for t, row in zip(rounds, M):
                w.writerow([t, *[f"{v:.6f}" for v in row]])
    _atomic_write(run_dir / "summary.json", json.dumps(summary, indent=2, allow_nan=False))
    return summary


def run_scenario(loaded: LoadedScenario, progress=None) -> tuple[Path, dict]:
    """Run every arm of ``loaded``; ``progress`` is an optional :class:`Progress`-like reporter."""
    from simlab.engine.simulation import simulate

    run_dir = make_run_dir(loaded)
    handler = logging.FileHandler(run_dir / "simlab.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in ("simlab", "flwr"):
        logging.getLogger(name).addHandler(handler)
    logging.getLogger("simlab").setLevel(logging.INFO)
    try:
        _atomic_write(run_dir / "scenario.yaml", yaml.safe_dump(resolved_dict(loaded), sort_keys=False))
        t0 = time.perf_counter()
        prepare_data(loaded, progress.data_tick if progress else None)
        log.info("data ready in %.1f s", time.perf_counter() - t0)
        wall: dict[str, float] = {}
        for arm, sc in loaded.arms.items():
            runlog = RunLog(run_dir, arm, on_round=(lambda t, arm=arm: progress.round_done(arm, t)) if progress else None)
            if progress:
                progress.start_arm(arm, sc.federation.rounds)
            start = time.perf_counter()
            try:
                simulate(sc, runlog)
            finally:
                runlog.close()
            wall[arm] = time.perf_counter() - start
            log.info("arm %s finished in %.1f s", arm, wall[arm])
        summary = write_results(run_dir, loaded, wall)
        return run_dir, summary
    except BaseException as exc:
        _atomic_write(run_dir / "FAILED", f"{type(exc).__name__}: {exc}\n")
        raise
    finally:
        for name in ("simlab", "flwr"):
            logging.getLogger(name).removeHandler(handler)
        handler.close()

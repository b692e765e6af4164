"""Runs a loaded scenario: prepares the run directory and data, runs every arm, writes the results.

Run directory::

    scenario.yaml        the scenario as given, every default filled in, each arm resolved
    metrics.jsonl        one row per round × hospital × domain × metric (all arms; deterministic)
    rounds.jsonl         per-round cost: bytes down/up, wall time, replies, failures
    R/<arm>/<hospital>.csv, R/<arm>/pooled.csv    accuracy matrices (rows: after stage i; cols: stage j)
    R/<arm>/<hospital>.<metric>.csv              the same for every other registered metric (e.g. hd95)
    dice_by_round/<arm>.csv                      mean Dice per evaluated round × domain
    summary.json         arms.<name>.{acc, bwt, fwt, forgetting, wall_time_s, per_hospital, metrics, ...}
    simlab.log           the log
    run.json             what the run was started with (the scenario as read, with overrides; the engine),
                         so that ``simlab run --resume RUN_DIR`` can continue it
    checkpoints/<arm>.npz  the latest checkpoint of each arm (see simlab.checkpoint)
    hospital-state/      simulation: the hospitals' saved method state, removed when an arm completes
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import yaml

from simlab.continual.registry import method_class
from simlab.checkpoint import HOSPITAL_STATE, checkpoint_path, read_meta
from simlab.data.streams import DataFactory
from simlab.results import LABELS, arm_results, dice_by_round, metric_matrices, rows_by_arm
from simlab.runlog import RunLog
from simlab.scenario.schema import LoadedScenario, load_scenario_dict, resolved_dict

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


def start_run_dir(loaded: LoadedScenario, engine: dict) -> Path:
    """A new run directory with the resolved scenario and ``run.json`` (the inputs, for resuming)."""
    run_dir = make_run_dir(loaded).resolve()
    _atomic_write(run_dir / "scenario.yaml", yaml.safe_dump(resolved_dict(loaded), sort_keys=False))
    _atomic_write(run_dir / "run.json", json.dumps({"source": loaded.source, "raw": loaded.raw, **engine}, indent=1))
    return run_dir


def resume_inputs(run_dir: str | Path) -> tuple[Path, LoadedScenario, dict]:
    """(run directory, scenario, run.json) of a run to resume; the scenario is rebuilt from run.json, so
    a scenario file edited since the start does not change the run."""
    run_dir = Path(run_dir).resolve()
    info_path = run_dir / "run.json"
    if not info_path.is_file():
        raise RunDirError(f"{run_dir}: not a run directory that can be resumed (no run.json)")
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
        raw, source = info["raw"], info["source"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise RunDirError(f"{info_path}: unreadable ({type(exc).__name__}: {exc})") from None
    return run_dir, load_scenario_dict(raw, source), info


def arm_status(run_dir: Path, arm: str, sc) -> tuple[bool, float]:
    """(whether the arm's checkpoint says it completed, server wall time recorded so far)."""
    meta = read_meta(checkpoint_path(run_dir, arm))
    if meta is None:
        return False, 0.0
    return meta.get("round") == sc.federation.rounds, float(meta.get("elapsed_s", 0.0))


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
            "breaks_no_rehearsal": method_class(sc.continual).breaks_no_rehearsal,
            "acc": pooled["acc"], "bwt": pooled["bwt"], "fwt": pooled["fwt"], "forgetting": pooled["forgetting"],
            "wall_time_s": round(wall.get(arm, float("nan")), 2),
            "bytes_total": int(sum(c.get("bytes_down", 0) + c.get("bytes_up", 0) for c in arm_costs)),
            "failed_updates": int(sum(len(c.get("failed", [])) for c in arm_costs)),
            "skipped_rounds": int(sum(1 for c in arm_costs if c.get("skipped"))),
            "final_dice": res["final_dice"],
            **({"pool": res["pool"], "final_dice_oracle": res["final_dice_oracle"]} if "pool" in res else {}),
            "pooled": pooled,
            "per_hospital": res["per_hospital"],
            "metrics": res["metrics"],
        }
        for hid, block in [("pooled", pooled), *res["per_hospital"].items()]:
            _write_matrix(run_dir / "R" / arm / f"{hid}.csv", block["R"], block["stages"])
        for name, block in metric_matrices(res):
            _write_matrix(run_dir / "R" / arm / name, block["R"], block["stages"])
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


def run_scenario(loaded: LoadedScenario, progress=None, resume_dir: Path | None = None) -> tuple[Path, dict]:
    """Run every arm of ``loaded``; ``progress`` is an optional :class:`Progress`-like reporter.
    ``resume_dir``: continue that run (completed arms are kept, the others go on from their checkpoints)."""
    from simlab.engine.simulation import simulate

    if resume_dir is None:
        run_dir = start_run_dir(loaded, {"engine": "simulation"})
    else:
        run_dir = Path(resume_dir)
        (run_dir / "FAILED").unlink(missing_ok=True)
    handler = logging.FileHandler(run_dir / "simlab.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in ("simlab", "flwr"):
        logging.getLogger(name).addHandler(handler)
    logging.getLogger("simlab").setLevel(logging.INFO)
    try:
        t0 = time.perf_counter()
        prepare_data(loaded, progress.data_tick if progress else None)
        log.info("data ready in %.1f s", time.perf_counter() - t0)
        wall: dict[str, float] = {}
        for arm, sc in loaded.arms.items():
            done, before = arm_status(run_dir, arm, sc) if resume_dir is not None else (False, 0.0)
            if progress:
                progress.start_arm(arm, sc.federation.rounds)
            if done:
                wall[arm] = before
                log.info("arm %s completed before the restart", arm)
                if progress:
                    progress.round_done(arm, sc.federation.rounds)
                continue
            runlog = RunLog(run_dir, arm, on_round=(lambda t, arm=arm: progress.round_done(arm, t)) if progress else None)
            start = time.perf_counter()
            try:
                simulate(sc, runlog, resume=resume_dir is not None)
            finally:
                runlog.close()
            wall[arm] = before + time.perf_counter() - start
            shutil.rmtree(run_dir / HOSPITAL_STATE, ignore_errors=True)
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

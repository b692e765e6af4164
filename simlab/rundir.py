"""The run directory: its layout, how it is started, resumed, filled with results and read back.

Run directory::

    scenario.yaml        the scenario as given, every default filled in, each arm resolved
    metrics.jsonl        one row per round × hospital × domain × metric (all arms; deterministic)
    rounds.jsonl         per-round cost: bytes down/up, wall time, replies, failures
    R/<arm>/<hospital>.csv, R/<arm>/pooled.csv    accuracy matrices (rows: after stage i; cols: stage j)
    dice_by_round/<arm>.csv                      mean Dice per evaluated round × domain
    summary.json         arms.<name>.{acc, bwt, fwt, forgetting, forgetting_by_domain, wall_time_s,
                         per_hospital, ...}
    simlab.log           the log
    run.json             what the run was started with (the scenario as read, with overrides; the engine),
                         so that ``simlab run --resume RUN_DIR`` can continue it
    FAILED               present only while the run has failed: the exception that ended it
    checkpoints/<arm>.npz  the latest checkpoint of each arm (see simlab.checkpoint)
    hospital-state/      simulation: the hospitals' saved method state, removed when an arm completes
    flower-<arm>.log     deployment and ``engine.launcher: flwr-run``: the Flower log of each arm's run

Both engines (simulation, :mod:`simlab.runner`, with either launcher; deployment,
:mod:`simlab.engine.deploy_run`) go through :func:`run_arms`, so they write the same files the same
way; ``metrics.jsonl`` and ``rounds.jsonl`` are appended by :class:`simlab.runlog.RunLog` inside the
ServerApp. Every other file written here is written atomically (:mod:`simlab.fileio`). Every path
written into a run directory, here and by the engines, checkpoints, run log and report, is made by
:func:`simlab.fileio.run_path`, which refuses a name that would leave the directory.
:func:`read_finished_run` and :func:`read_jsonl` read them back for ``simlab compare`` and
``simlab report``.

No Flower here, and nothing heavy at import time: the scenario schema and the metric code (which
import torch) are imported by the functions that need them, so reading a run stays fast.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from simlab.fileio import atomic_write, run_path

if TYPE_CHECKING:
    from simlab.scenario.schema import LoadedScenario, Scenario

log = logging.getLogger("simlab")

__all__ = [
    "FinishedRun",
    "RunDirError",
    "arm_status",
    "clear_failed",
    "failure",
    "fingerprinted_settings",
    "make_run_dir",
    "mark_failed",
    "read_finished_run",
    "read_jsonl",
    "read_run_info",
    "reference_label",
    "resume_inputs",
    "run_arms",
    "settings_fingerprint",
    "start_run_dir",
    "untrained_arms",
    "write_results",
    "write_run_info",
]


class RunDirError(RuntimeError):
    pass


REPLAY_LABEL = "replay (breaks no-rehearsal)"
UPPER_BOUND_LABEL = "upper bound (static, all data)"


def reference_label(arm: dict) -> str | None:
    """How every table labels an arm that is a reference, not a method (``arm``: its block of
    ``summary.json``): the static upper bound, which trains on all of the stream's data from the start
    (future rounds included; its BWT/FWT mean nothing), or replay, which revisits old windows (breaks
    the no-rehearsal rule). None for a method that keeps the rules."""
    if arm.get("uses_future_data"):
        return UPPER_BOUND_LABEL
    if arm.get("breaks_no_rehearsal"):
        return REPLAY_LABEL
    return None


# ------------------------------------------------------------------------------------ starting
SWEEP_FILE = "sweep.json"
"""In the root of ``simlab run --seeds``: the scenario, overrides and seeds; the seeds' run directories
are ``seed-<s>`` next to it."""


def expand_sweeps(paths: list[str]) -> list[str]:
    """Run directories, with a sweep root (it holds ``sweep.json``) replaced by its seeds' directories."""
    out = []
    for p in paths:
        sweep = Path(p) / SWEEP_FILE
        if sweep.is_file() and not (Path(p) / "summary.json").exists():
            try:
                seeds = json.loads(sweep.read_text(encoding="utf-8"))["seeds"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise RunDirError(f"{sweep}: unreadable ({type(exc).__name__}: {exc})") from None
            out += [str(Path(p) / f"seed-{s}") for s in seeds]
        else:
            out.append(p)
    return out


def make_run_dir(loaded: LoadedScenario, base: Path | None = None) -> Path:
    """Create the run directory; an existing non-empty directory is refused, never overwritten."""
    sc = loaded.base
    if sc.output.dir:
        path = Path(sc.output.dir)
    else:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        path = (base or Path("runs")) / f"{sc.name}-{stamp}"
    try:
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise RunDirError(f"{path}: run directory exists and is not empty; choose another --out")
        path.mkdir(parents=True, exist_ok=True)
        probe = run_path(path, "write-test")
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise RunDirError(f"{path}: cannot create the run directory (--out / output.dir): "
                          f"{exc.strerror or type(exc).__name__}"
                          + (f" ({exc.filename})" if exc.filename and str(exc.filename) != str(path) else "")) from None
    return path


def start_run_dir(loaded: LoadedScenario, engine: dict) -> Path:
    """A new run directory with the resolved scenario and ``run.json`` (the inputs, for resuming)."""
    from simlab.scenario.schema import resolved_dict

    run_dir = make_run_dir(loaded).resolve()
    atomic_write(run_path(run_dir, "scenario.yaml"), yaml.safe_dump(resolved_dict(loaded), sort_keys=False))
    write_run_info(run_dir, {"source": loaded.source, "raw": loaded.raw, **engine})
    return run_dir


def write_run_info(run_dir: Path, info: dict) -> None:
    atomic_write(run_path(run_dir, "run.json"), json.dumps(info, indent=1))


def read_run_info(run_dir: str | Path) -> dict:
    """``run.json`` of a run directory; :class:`RunDirError` when it is missing or unreadable."""
    path = Path(run_dir) / "run.json"
    if not path.is_file():
        raise RunDirError(f"{run_dir}: not a run directory that can be resumed (no run.json)")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise RunDirError(f"{path}: unreadable ({type(exc).__name__}: {exc})") from None
    if not isinstance(info, dict):
        raise RunDirError(f"{path}: unreadable (TypeError: expected a JSON object)")
    return info


# ------------------------------------------------------------------------------------ resuming
def resume_inputs(run_dir: str | Path) -> tuple[Path, LoadedScenario, dict]:
    """(run directory, scenario, run.json) of a run to resume; the scenario is rebuilt from run.json, so
    a scenario file edited since the start does not change the run."""
    from simlab.scenario.schema import load_scenario_dict

    run_dir = Path(run_dir).resolve()
    info = read_run_info(run_dir)
    try:
        raw, source = info["raw"], info["source"]
    except KeyError as exc:
        raise RunDirError(f"{run_dir / 'run.json'}: unreadable (KeyError: {exc})") from None
    return run_dir, load_scenario_dict(raw, source), info


def arm_status(run_dir: Path, arm: str, sc: Scenario) -> tuple[bool, float]:
    """(whether the arm's checkpoint says it completed, server wall time recorded so far)."""
    from simlab.checkpoint import checkpoint_path, read_meta

    meta = read_meta(checkpoint_path(run_dir, arm))
    if meta is None:
        return False, 0.0
    return meta.get("round") == sc.federation.rounds, float(meta.get("elapsed_s", 0.0))


def mark_failed(run_dir: Path, exc: BaseException) -> None:
    atomic_write(run_path(run_dir, "FAILED"), f"{type(exc).__name__}: {exc}\n")


def clear_failed(run_dir: Path) -> None:
    run_path(run_dir, "FAILED").unlink(missing_ok=True)


def failure(run_dir: Path) -> str | None:
    """What ``FAILED`` says (the exception that ended the run); None when the run has not failed."""
    path = Path(run_dir) / "FAILED"
    return path.read_text().strip() if path.is_file() else None


# ------------------------------------------------------------------------------------ the arms
def run_arms(run_dir: Path, loaded: LoadedScenario, run_arm: Callable[[str, Scenario], None], *,
             resume: bool, progress=None, prepare: Callable[[], None] | None = None) -> dict:
    """Run every arm of ``loaded`` in order with ``run_arm(name, scenario)``, then write the results;
    returns summary.json's content. The engine's part is ``run_arm``: it returns once the arm's rounds
    are all logged and raises on any failure.

    ``resume``: arms whose checkpoint says they completed are skipped (their recorded wall time kept);
    the others continue from their checkpoints, with the wall time before the restart added.
    ``prepare`` runs first (simulation: the data). ``progress`` (optional) is told where each arm
    starts (``start_arm(name, rounds)``) and about arms completed before a restart
    (``round_done(name, rounds)``). Any exception, before or during an arm or while writing the
    results, writes ``FAILED`` and is raised again.
    """
    try:
        if prepare is not None:
            prepare()
        wall: dict[str, float] = {}
        for arm, sc in loaded.arms.items():
            done, before = arm_status(run_dir, arm, sc) if resume else (False, 0.0)
            if progress:
                progress.start_arm(arm, sc.federation.rounds)
            if done:
                wall[arm] = before
                log.info("arm %s completed before the restart", arm)
                if progress:
                    progress.round_done(arm, sc.federation.rounds)
                continue
            start = time.perf_counter()
            run_arm(arm, sc)
            wall[arm] = before + time.perf_counter() - start
            log.info("arm %s finished in %.1f s", arm, wall[arm])
        return write_results(run_dir, loaded, wall)
    except BaseException as exc:
        mark_failed(run_dir, exc)
        exc.run_dir = run_dir  # for the message of a stopped run (simlab.interrupt)
        raise


# ------------------------------------------------------------------------------------ results
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
    """``summary.json``, the R matrices of every arm and hospital (and of every other registered
    metric) and ``dice_by_round``, from ``metrics.jsonl`` and ``rounds.jsonl``."""
    from simlab.results import LABELS, arm_results, dice_by_round, metric_matrices, rows_by_arm

    by_arm = rows_by_arm(read_jsonl(run_dir / "metrics.jsonl"))
    costs = read_jsonl(run_dir / "rounds.jsonl")
    summary: dict = {"scenario": loaded.base.name, "seed": loaded.base.seed, "metric_labels": LABELS,
                     "pooled_definition": "arm-level acc/bwt/fwt/gem_fwt/chaudhry_forgetting use the pooled "
                                          "(federation-level) R; forgetting is the headline: Dice lost on the "
                                          "domains that left every stream, from the last round each was trained "
                                          "on to the end (forgetting_by_domain); see per_hospital for each "
                                          "hospital's own R and forgetting",
                     "arms": {}}
    for arm, sc in loaded.arms.items():
        res = arm_results(sc, by_arm.get(arm, []))
        summary["arms"][arm] = _arm_summary(sc, res, [c for c in costs if c["arm"] == arm], wall.get(arm, float("nan")))
        for hid, block in [("pooled", res["pooled"]), *res["per_hospital"].items()]:
            _write_matrix(run_path(run_dir, "R", arm, f"{hid}.csv"), block["R"], block["stages"])
        for name, block in metric_matrices(res):
            _write_matrix(run_path(run_dir, "R", arm, name), block["R"], block["stages"])
        rounds, M = dice_by_round(by_arm.get(arm, []), [h.id for h in sc.hospitals], sc.eval_domains)
        out = run_path(run_dir, "dice_by_round", f"{arm}.csv")
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["round", *sc.eval_domains])
            for t, row in zip(rounds, M):
                w.writerow([t, *[f"{v:.6f}" for v in row]])
    atomic_write(run_path(run_dir, "summary.json"), json.dumps(summary, indent=2, allow_nan=False))
    return summary


def _arm_summary(sc, res: dict, costs: list[dict], wall: float) -> dict:
    from simlab.continual.registry import method_class

    pooled, method = res["pooled"], method_class(sc.continual)
    return {
        "method": sc.continual.method,
        "family": method.family,
        "aggregation": sc.federation.aggregation.rule,
        "server_optimizer": sc.federation.server_optimizer.name,
        "proximal_mu": sc.federation.proximal_mu,
        "semi_supervised": {"objective": sc.federation.semi_supervised.objective,
                            "weight_by": sc.federation.semi_supervised.weight_by},
        "breaks_no_rehearsal": method.breaks_no_rehearsal,
        "uses_future_data": method.uses_future_data,
        "acc": pooled["acc"], "bwt": pooled["bwt"], "fwt": pooled["fwt"], "forgetting": res["forgetting"],
        "gem_fwt": pooled["gem_fwt"], "chaudhry_forgetting": pooled["chaudhry_forgetting"],
        "forgetting_by_domain": res["forgetting_by_domain"], "forgetting_note": res["forgetting_note"],
        "wall_time_s": round(wall, 2),
        "bytes_total": int(sum(c.get("bytes_down", 0) + c.get("bytes_up", 0) for c in costs)),
        "failed_updates": int(sum(len(c.get("failed", [])) for c in costs)),
        "skipped_rounds": int(sum(1 for c in costs if c.get("skipped"))),
        "rounds": sc.federation.rounds,
        "final_dice": res["final_dice"],
        **({"pool": res["pool"], "final_dice_oracle": res["final_dice_oracle"]} if "pool" in res else {}),
        "pooled": pooled,
        "per_hospital": res["per_hospital"],
        "metrics": res["metrics"],
    }


def untrained_arms(summary: dict) -> dict[str, str]:
    """Arms of ``summary.json`` that aggregated no update in any round (every round skipped: too few
    replies, every hospital's training failed), with a line saying so. Their results describe the
    untrained model, so a run with one fails (``simlab run`` exits with status 1)."""
    out = {}
    for arm, a in summary["arms"].items():
        rounds = a.get("rounds")
        if rounds and a.get("skipped_rounds", 0) >= rounds:
            out[arm] = (f"arm {arm}: every one of its {rounds} rounds was skipped ({a.get('failed_updates', 0)} "
                        f"failed updates), so its results describe the untrained model; simlab.log says why")
    return out


# ------------------------------------------------------------------------------------ reading
def read_jsonl(path: Path, must_contain: str | None = None) -> list[dict]:
    """Rows of a JSON-lines file (none when the file does not exist); with ``must_contain`` only lines
    holding that text are parsed. A line that is not JSON is a :class:`RunDirError` naming it."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, start=1):
            if not line.strip() or (must_contain is not None and must_contain not in line):
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise RunDirError(f"{path}: line {n}: not JSON ({exc.msg})") from None
    return rows


@dataclass
class FinishedRun:
    """A finished run directory: its ``summary.json`` and resolved ``scenario.yaml`` ({} without one)."""

    dir: Path
    summary: dict
    scenario: dict

    def metrics(self, must_contain: str | None = None) -> list[dict]:
        """Rows of ``metrics.jsonl`` (see :func:`read_jsonl`)."""
        return read_jsonl(self.dir / "metrics.jsonl", must_contain)

    def costs(self) -> list[dict]:
        """Rows of ``rounds.jsonl``."""
        return read_jsonl(self.dir / "rounds.jsonl")


def read_finished_run(run_dir: str | Path) -> FinishedRun:
    """Read a run directory that has its results; :class:`RunDirError` names what is missing or
    unreadable (for a failed run, with what ``FAILED`` says)."""
    from simlab.config import ScenarioError, read_yaml

    path = Path(run_dir)
    if not path.is_dir():
        raise RunDirError(f"{path}: not a run directory")
    summary_path = path / "summary.json"
    if not summary_path.is_file():
        reason = failure(path)
        why = f"the run failed: {reason}" if reason is not None else "unfinished or not a run directory"
        raise RunDirError(f"{path}: no summary.json ({why})")
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise RunDirError(f"{summary_path}: not JSON ({exc.msg})") from None
    if not isinstance(summary, dict) or not isinstance(summary.get("arms"), dict) or not summary["arms"]:
        raise RunDirError(f"{summary_path}: no arms")
    scenario: Any = {}
    if (path / "scenario.yaml").is_file():
        try:
            scenario = read_yaml(path / "scenario.yaml")
        except ScenarioError as exc:
            raise RunDirError(str(exc)) from None
    return FinishedRun(path, summary, scenario if isinstance(scenario, dict) else {})


# ------------------------------------------------------------------------------------ fingerprint
_NOT_SETTINGS = ("seed", "output", "description")


def fingerprinted_settings(plain: dict, *, seed: bool = False) -> dict:
    """The part of a plain scenario (a resolved ``scenario.yaml``, or one arm's scenario as plain data)
    that :func:`settings_fingerprint` covers: everything but ``output`` (where results go, whether
    checkpoints are kept), ``description`` (prose), ``data.cache_dir`` (where generated data is cached;
    the data are the same), ``engine.launcher`` (how Flower was started; the metrics are the same, also
    in every resolved arm) and, unless ``seed``, ``seed``. The input is not changed."""
    dropped = [k for k in _NOT_SETTINGS if not (seed and k == "seed")]
    out = {k: v for k, v in plain.items() if k not in dropped}
    for section, key in (("data", "cache_dir"), ("engine", "launcher")):
        if isinstance(out.get(section), dict):
            out[section] = {k: v for k, v in out[section].items() if k != key}
    if isinstance(out.get("resolved_arms"), dict):
        out["resolved_arms"] = {name: _without_launcher(arm) for name, arm in out["resolved_arms"].items()}
    return out


def _without_launcher(arm):
    if isinstance(arm, dict) and isinstance(arm.get("engine"), dict):
        return {**arm, "engine": {k: v for k, v in arm["engine"].items() if k != "launcher"}}
    return arm


def settings_fingerprint(plain: dict, *, seed: bool = False) -> str:
    """Short SHA-256 (12 hex digits) of the canonical JSON (sorted keys, no spaces) of
    :func:`fingerprinted_settings`.

    Two runs with one fingerprint ran the same experiment: ``simlab compare`` groups them and treats
    them as repeats that differ only by seed, so the seed is left out by default. ``seed=True`` adds
    it, for checks that a run continues the very run it started as (a checkpoint of another seed
    must not be resumed). Every other key counts, including every arm's resolved settings in a
    ``scenario.yaml``: a changed learning rate, model or drift schedule is another fingerprint.
    """
    text = json.dumps(fingerprinted_settings(plain, seed=seed), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]

"""Runs a loaded scenario in simulation: prepares the data, runs every arm through Flower's simulation
engine (in this process, or through ``flwr run``: ``engine.launcher``), writes the results. The run
directory's layout and the arm loop shared with the deployment engine are in :mod:`simlab.rundir`."""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from simlab.checkpoint import HOSPITAL_STATE
from simlab.data.streams import DataFactory
from simlab.rundir import SWEEP_FILE, RunDirError, clear_failed, resume_inputs, run_arms, start_run_dir
from simlab.runlog import RunLog
from simlab.fileio import atomic_write, run_path
from simlab.scenario.schema import LoadedScenario, Scenario, load_scenario

log = logging.getLogger("simlab")


def prepare_data(loaded: LoadedScenario, tick: Callable[[], None] | None = None) -> int:
    """Generate (or find in the cache) every window and test set, once, before any arm runs (no window
    of a hospital that does not participate: nobody reads it)."""
    sc = loaded.base
    factory = DataFactory(sc.data, sc.domains, sc.seed, sc.evaluation.test_size)
    count = 0
    for d in sc.eval_domains:
        factory.test_set(d)
        count += 1
        if tick:
            tick()
    for h in (h for h in sc.hospitals if h.participates):
        for t in range(1, sc.federation.rounds + 1):
            factory.window(h, t)
            count += 1
            if tick:
                tick()
    return count


def data_items(loaded: LoadedScenario) -> int:
    sc = loaded.base
    return len(sc.eval_domains) + sum(h.participates for h in sc.hospitals) * sc.federation.rounds


def run_scenario(loaded: LoadedScenario, progress=None, resume_dir: Path | None = None) -> tuple[Path, dict]:
    """Run every arm of ``loaded``; ``progress`` is an optional :class:`Progress`-like reporter.
    ``resume_dir``: continue that run (completed arms are kept, the others go on from their checkpoints).

    Each arm is started the way its ``engine.launcher`` says: ``in-process`` (the default) runs the
    ServerApp in this process (:func:`simlab.engine.simulation.simulate`), ``flwr-run`` submits it with
    ``flwr run`` to a local simulation SuperLink, one for the whole run
    (:class:`simlab.engine.flwr_run.FlwrRunSimulation`); both write the same run directory."""
    if resume_dir is None:
        run_dir = start_run_dir(loaded, {"engine": "simulation"})
    else:
        run_dir = Path(resume_dir)
        clear_failed(run_dir)
    flwr_run = None
    if any(sc.engine.launcher == "flwr-run" for sc in loaded.arms.values()):
        from simlab.engine.flwr_run import FlwrRunSimulation

        flwr_run = FlwrRunSimulation()

    def prepare() -> None:
        t0 = time.perf_counter()
        prepare_data(loaded, progress.data_tick if progress else None)
        log.info("data ready in %.1f s", time.perf_counter() - t0)
        if flwr_run is not None:
            flwr_run.start()

    def run_arm(arm: str, sc: Scenario) -> None:
        on_round = (lambda t: progress.round_done(arm, t)) if progress else None
        if sc.engine.launcher == "flwr-run":
            flwr_run.run_arm(arm, sc, run_dir, resume=resume_dir is not None, on_round=on_round)
        else:
            _in_process(arm, sc, run_dir, resume=resume_dir is not None, on_round=on_round)
        shutil.rmtree(run_path(run_dir, HOSPITAL_STATE), ignore_errors=True)

    handler = logging.FileHandler(run_path(run_dir, "simlab.log"), encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in ("simlab", "flwr"):
        logging.getLogger(name).addHandler(handler)
    logging.getLogger("simlab").setLevel(logging.INFO)
    try:
        summary = run_arms(run_dir, loaded, run_arm, resume=resume_dir is not None, progress=progress,
                           prepare=prepare)
        return run_dir, summary
    finally:
        if flwr_run is not None:
            flwr_run.close()
        for name in ("simlab", "flwr"):
            logging.getLogger(name).removeHandler(handler)
        handler.close()


def _in_process(arm: str, sc: Scenario, run_dir: Path, *, resume: bool, on_round) -> None:
    from simlab.engine.simulation import simulate

    runlog = RunLog(run_dir, arm, on_round=on_round)
    try:
        simulate(sc, runlog, resume=resume)
    finally:
        runlog.close()


RunOne = Callable[[LoadedScenario, Path | None], tuple[Path, dict]]
"""run_one(loaded, resume_dir) -> (run directory, summary): :func:`run_scenario` with a progress display."""


def run_sweep(path: str, overrides: list[str], seeds: list[int], out: str | None, run_one: RunOne) -> list[Path]:
    """``simlab run --seeds``: every arm for every seed, ``ROOT/seed-<s>`` an ordinary run directory
    (within one seed every arm sees identical streams, so arms pair by seed). Seeds run one after the
    other, never in parallel, so that wall times are not distorted by runs competing for the CPU.
    Running the same command again keeps the seeds that finished and resumes one that stopped
    (``--resume`` of its directory); ``ROOT/sweep.json`` records the scenario, overrides and seeds, and
    a root holding another sweep is refused. Returns the seeds' run directories."""
    import json
    from datetime import datetime

    first = load_scenario(path, overrides, seeds[0])  # every error before anything is written
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    root = Path(out) if out else Path("runs") / f"{first.base.name}-seeds-{stamp}"
    record = {"scenario": str(path), "overrides": list(overrides), "seeds": list(seeds)}
    if (root / SWEEP_FILE).is_file():
        try:
            earlier = json.loads((root / SWEEP_FILE).read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise RunDirError(f"{root / SWEEP_FILE}: unreadable ({exc})") from None
        if earlier != record:
            raise RunDirError(f"{root}: holds a sweep of another scenario, overrides or seeds ({SWEEP_FILE}); "
                              "choose another --out")
    elif root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise RunDirError(f"{root}: exists and is not empty; choose another --out")
    root.mkdir(parents=True, exist_ok=True)
    atomic_write(run_path(root, SWEEP_FILE), json.dumps(record, indent=1))
    dirs = []
    for s in seeds:
        run_dir = run_path(root, f"seed-{s}")
        if (run_dir / "summary.json").is_file():
            log.info("seed %d: finished earlier (%s)", s, run_dir)
        elif (run_dir / "run.json").is_file():
            run_one(resume_inputs(run_dir)[1], run_dir)
        else:
            run_one(load_scenario(path, overrides, s, str(run_dir)), None)
        dirs.append(run_dir.resolve())
    return dirs

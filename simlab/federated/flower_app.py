"""The apps that ``flwr run`` starts: named by ``[tool.flwr.app.components]`` in the repository's
pyproject.toml, which makes simlab a Flower app. Two runtimes start them: a real deployment
(:mod:`simlab.engine.deploy_run`) and Flower's simulation runtime behind a local SuperLink
(``engine.launcher: flwr-run``, :mod:`simlab.engine.flwr_run`).

``server_app`` runs on the SuperLink's machine. Unlike the in-process launcher, where the runner binds
the ServerApp to a Scenario and a RunLog directly, here everything comes from the run config
(``flwr run ... --run-config``), as absolute paths on the SuperLink's machine:

    scenario            the scenario YAML, loaded and validated exactly as ``simlab run`` does; empty:
                        the scenario the run directory was started with (its ``run.json``)
    arm                 which resolved arm to run (may be empty when the scenario has a single arm)
    run-dir             the run directory; metrics.jsonl, rounds.jsonl and simlab.log are appended to
    overrides           JSON list of "dotted.key=value" strings, applied like ``simlab run --set``
                        (with a ``scenario`` file only)
    resume              true: continue the arm from its checkpoint in the run directory (after a crash)
    hospital-state-dir  where hospitals save their method state when their node config names no
                        ``state-dir`` (simulation: every hospital runs on this machine); empty: each
                        hospital's node config must name one (a deployment)

It then runs the ServerApp that :func:`simlab.federated.server_app.make_server_app` builds for that
arm, exactly as the in-process launcher does, with the grid waiting for the hospitals' replies with a
short back-off (:mod:`simlab.federated.object_pulls`). Any error (invalid scenario, a hospital that cannot
identify itself, a missing node) is raised, so Flower marks the run ``finished:failed`` and the
message is in ``flwr log``; the reason is also written to ``simlab.log`` in the run directory.

``client_app`` is :data:`simlab.federated.client_app.app`, unchanged: a deployment's SuperNode names
its hospital (and its data directory) in ``--node-config``, a simulated one is the i-th hospital by
its ``partition-id``.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from simlab.federated.client_app import app as client_app
from simlab.federated.object_pulls import quick_object_pulls
from simlab.federated.server_app import make_server_app
from simlab.fileio import run_path
from simlab.rundir import RunDirError, resume_inputs
from simlab.runlog import RunLog
from simlab.scenario.schema import LoadedScenario, Scenario, load_scenario

__all__ = ["client_app", "server_app", "scenario_from_run_config"]

log = logging.getLogger("simlab")

server_app = ServerApp()


class DeployConfigError(ValueError):
    pass


def _loaded(run_config: dict, path: str, run_dir: str) -> LoadedScenario:
    """The scenario file with the run config's overrides, or (no file) the run directory's run.json."""
    try:
        overrides = json.loads(str(run_config.get("overrides", "[]") or "[]"))
    except json.JSONDecodeError as exc:
        raise DeployConfigError(f"run config 'overrides' is not a JSON list of strings: {exc}") from None
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise DeployConfigError(f"run config 'overrides' must be a JSON list of strings, found {overrides!r}")
    if path:
        return load_scenario(path, overrides)
    if overrides:
        raise DeployConfigError("run config 'overrides' needs a 'scenario' file: the scenario of run.json "
                                "already holds the overrides the run was started with")
    try:
        return resume_inputs(run_dir)[1]
    except RunDirError as exc:
        raise DeployConfigError(f"run config 'scenario' is empty and the run directory holds no usable "
                                f"run.json ({exc}): pass --run-config 'scenario=\"/abs/path.yaml\"'") from None


def scenario_from_run_config(run_config: dict) -> tuple[Scenario, str, Path]:
    """(resolved arm, arm name, run directory) from a run config; errors say which key is wrong."""
    path = str(run_config.get("scenario", "") or "")
    run_dir = str(run_config.get("run-dir", "") or "")
    if not run_dir:
        raise DeployConfigError("run config 'run-dir' is empty: pass --run-config 'run-dir=\"/abs/run/dir\"'")
    if (path and not Path(path).is_absolute()) or not Path(run_dir).is_absolute():
        raise DeployConfigError(f"run config 'scenario' and 'run-dir' must be absolute paths on the SuperLink's "
                                f"machine, found {path!r} and {run_dir!r}")
    if not Path(run_dir).is_dir():
        raise DeployConfigError(f"run config 'run-dir' {run_dir!r} is not a directory on the SuperLink's machine")
    loaded = _loaded(run_config, path, run_dir)
    source = path or str(Path(run_dir) / "run.json")
    arm = str(run_config.get("arm", "") or "")
    if not arm:
        if len(loaded.arms) != 1:
            raise DeployConfigError(f"run config 'arm' is empty but the scenario has {len(loaded.arms)} arms "
                                    f"({', '.join(loaded.arms)})")
        arm = next(iter(loaded.arms))
    if arm not in loaded.arms:
        raise DeployConfigError(f"run config arm={arm!r} is not an arm of {source} ({', '.join(loaded.arms)})")
    return loaded.arms[arm], arm, Path(run_dir)


def hospital_state_dir(run_config: dict) -> str | None:
    """``hospital-state-dir`` of the run config (an absolute path), None when empty."""
    path = str(run_config.get("hospital-state-dir", "") or "")
    if path and not Path(path).is_absolute():
        raise DeployConfigError(f"run config 'hospital-state-dir' must be an absolute path, found {path!r}")
    return path or None


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    quick_object_pulls(sys.modules[type(grid).__module__])  # the grid waits for the hospitals' replies
    scenario, arm, run_dir = scenario_from_run_config(dict(context.run_config))
    state_dir = hospital_state_dir(dict(context.run_config))
    handler = logging.FileHandler(run_path(run_dir, "simlab.log"), encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    simlab_log = logging.getLogger("simlab")
    simlab_log.addHandler(handler)
    simlab_log.setLevel(logging.INFO)
    runlog = RunLog(run_dir, arm)
    try:
        log.info("Flower run %s: arm %s of %s", context.run_id, arm, scenario.name)
        resume = str(context.run_config.get("resume", False)).lower() == "true"
        make_server_app(scenario, runlog, resume=resume, hospital_state_dir=state_dir)(grid, context)
        log.info("Flower run %s: arm %s finished", context.run_id, arm)
    except BaseException as exc:
        log.error("Flower run %s: arm %s failed: %s: %s", context.run_id, arm, type(exc).__name__, exc)
        raise
    finally:
        runlog.close()
        simlab_log.removeHandler(handler)
        handler.close()

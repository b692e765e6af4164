"""``engine.launcher: flwr-run``: an arm submitted with ``flwr run`` to a private, local *simulation*
SuperLink, instead of started in this process (:mod:`simlab.engine.simulation`).

Both launchers run the same ServerApp and ClientApp through the same simulation runtime (virtual
SuperNodes as Ray actors, ``partition-id`` i being the i-th hospital, the client resources of the
scenario's ``engine`` section) and write the same run directory; the ``metrics.jsonl`` of the two is
byte-identical (``tests/test_flwr_run.py``). Here the path is Flower's own: simlab is submitted as a
Flower app (``[tool.flwr.app]`` of pyproject.toml, :mod:`simlab.federated.flower_app`), the run
config names the run directory, the ServerApp reads the scenario from its ``run.json``, and the
federation config sizes the federation: ``num-supernodes`` = hospitals, ``client-resources-*`` and
``init-args-*`` as the in-process launcher gives Ray.

:class:`FlwrRunSimulation` holds one SuperLink (``flower-superlink --simulation --insecure`` on a free
loopback port, runtime dependency installation off) for the arms of one run: its own ``FLWR_HOME``
in a temporary state directory (never ``~/.flwr``, never Flower's managed ``:local:`` SuperLink,
which lingers after ``flwr run`` and installs the app's dependencies per run), started in the
caller's process group and working directory (relative paths in the scenario mean what they mean
to the in-process launcher), and stopped with every process it spawned when the run ends. The
deployment machinery does the rest (:class:`simlab.engine.deployment.Deployment`): the FAB, the run
and federation configs, the status. ``flwr run`` exits 0 even when the run fails, so the status is
read with ``flwr ls``: any end other than ``finished:completed`` raises
:class:`simlab.engine.flwr_config.DeploymentError` with the end of the run's log, which is kept in
the run directory as ``flower-<arm>.log``. Progress per round is read from ``rounds.jsonl``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from simlab.checkpoint import HOSPITAL_STATE
from simlab.engine.deploy_run import default_timeout, raise_unless_completed
from simlab.engine.deployment import Deployment
from simlab.fileio import run_path
from simlab.runlog import last_round_logged
from simlab.scenario.schema import Scenario


def federation_config(scenario: Scenario) -> dict[str, int | float | str | bool]:
    """Flower's federation config for one arm: the client resources and the local Ray start the
    in-process launcher gives Ray (:func:`simlab.engine.simulation.client_resources`, ``ray_init_args``)."""
    import torch

    from simlab.engine.simulation import client_resources

    res = client_resources(scenario)
    cores = os.cpu_count() or 1
    return {"num-supernodes": len(scenario.hospitals),
            "client-resources-num-cpus": min(int(res["num_cpus"]), cores),
            "client-resources-num-gpus": float(res["num_gpus"]),
            "init-args-num-cpus": cores,
            "init-args-num-gpus": torch.cuda.device_count() if res["num_gpus"] > 0 else 0,
            "init-args-logging-level": "ERROR",
            "init-args-log-to-driver": False}


def _ray_env() -> dict[str, str | None]:
    """Ray settings of the in-process launcher, for the simulation process the SuperLink starts; Ray is
    started on this machine (no ``RAY_ADDRESS``: Flower passes CPU and GPU counts, which a cluster
    refuses)."""
    return {"RAY_DEDUP_LOGS": os.environ.get("RAY_DEDUP_LOGS", "0"),
            "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": os.environ.get("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0"),
            "RAY_ADDRESS": None}


class FlwrRunSimulation:
    """A private simulation SuperLink for the arms of one run (a context manager; :meth:`close` stops
    it and removes its state directory)."""

    def __init__(self, cwd: str | Path | None = None):
        self.state_dir = Path(tempfile.mkdtemp(prefix="simlab-flwr-run-"))
        self.dep = Deployment(self.state_dir, cwd=cwd if cwd is not None else os.getcwd(), env=_ray_env(),
                              detach=False)

    def __enter__(self) -> FlwrRunSimulation:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        """Start the SuperLink (once; :meth:`run_arm` starts it when it is not running)."""
        if not any(r.role == "superlink" and r.alive() for r in self.dep.records):
            self.dep.start_superlink(None, simulation=True)

    def close(self) -> None:
        try:
            self.dep.stop()
        finally:
            shutil.rmtree(self.state_dir, ignore_errors=True)

    def run_arm(self, arm: str, scenario: Scenario, run_dir: str | Path, *, resume: bool = False,
                on_round: Callable[[int], None] | None = None, timeout_s: float | None = None) -> None:
        """Run one arm of the run in ``run_dir`` (started with :func:`simlab.rundir.start_run_dir`, whose
        run.json the ServerApp reads) through ``flwr run``; returns once Flower reports it completed,
        raises otherwise. ``resume``: continue the arm from its checkpoint. ``on_round(t)``: called
        as rounds appear in ``rounds.jsonl``."""
        self.start()
        run_dir = Path(run_dir).resolve()
        run_config = {"arm": arm, "run-dir": str(run_dir), "resume": resume,
                      "hospital-state-dir": str(run_path(run_dir, HOSPITAL_STATE))}
        run_id = self.dep.submit(run_config, federation_config=federation_config(scenario))
        seen: list[int] = []

        def progress() -> None:
            t = last_round_logged(run_dir, arm)
            if on_round is not None and t is not None and t not in seen[-1:]:
                seen.append(t)
                on_round(t)

        log_path = run_path(run_dir, f"flower-{arm}.log")
        st = self.dep.follow(run_id, log_path, timeout_s or default_timeout(scenario), on_poll=progress)
        raise_unless_completed(arm, run_id, st, log_path)

"""Runs one arm of a scenario through Flower's simulation engine (Ray backend) on this machine.

This is the one adapter around ``flwr.simulation.run_simulation``. That Python entry point is
deprecated in Flower 1.41 in favour of ``flwr run`` against a SuperLink; it is used here on purpose:
it runs the *same* ServerApp/ClientApp objects through the same simulation engine (virtual SuperNodes
as Ray actors, client resources from the scenario), but in-process, so (1) the ServerApp reports each
round to the terminal's progress bar and the run log directly, (2) a failure in the ServerApp is
raised here as a Python exception instead of a "finished:failed" status behind an exit code of 0,
(3) no FAB is packed from the working tree (which would sweep up run directories and caches) and no
local SuperLink process and port have to be managed per run. Flower is pinned to 1.41.0, where it
is present. The same apps also run through ``flwr run`` (``engine.launcher: flwr-run``,
:mod:`simlab.engine.flwr_run`, tested to give the same ``metrics.jsonl``) and in a deployment.

Every run of one process shares one Ray start and one pool of ClientApp actors
(:mod:`simlab.engine.ray_session`). Ray is started on this machine with all its cores, or, with
``engine.ray_address`` (else the ``RAY_ADDRESS`` variable Ray itself reads), the run connects to a
Ray cluster that is already running and Flower places the virtual hospitals on all its nodes.
"""

from __future__ import annotations

import logging
import os
import warnings

import torch

from simlab.checkpoint import HOSPITAL_STATE
from simlab.engine.ray_session import shared_ray
from simlab.federated.client_app import app as client_app
from simlab.fileio import run_path
from simlab.federated.server_app import make_server_app
from simlab.runlog import RunLog
from simlab.scenario.schema import Scenario


def ray_address(scenario: Scenario) -> str | None:
    """The Ray cluster to run on: ``engine.ray_address``, else ``$RAY_ADDRESS``; None: start one here."""
    return scenario.engine.ray_address or os.environ.get("RAY_ADDRESS") or None


def ray_init_args(scenario: Scenario, resources: dict[str, float]) -> dict:
    """``ray.init`` keywords: a local Ray sized to this machine, or a connection to a running cluster
    (whose size is its own: Ray refuses CPU and GPU counts then)."""
    quiet = {"logging_level": "ERROR", "log_to_driver": False, "include_dashboard": False}
    address = ray_address(scenario)
    if address:
        return {"address": address, **quiet}
    n_gpus = torch.cuda.device_count() if resources["num_gpus"] > 0 else 0
    return {"num_cpus": os.cpu_count() or 1, "num_gpus": n_gpus, **quiet}


def client_resources(scenario: Scenario) -> dict[str, float]:
    """Resources Ray reserves per virtual hospital. On this machine the CPU share is capped at its core
    count (a larger one would fit no actor); a cluster's nodes may be larger, so it is not capped."""
    eng = scenario.engine
    gpus = eng.gpus_per_client
    use_cuda = eng.device == "cuda" or (eng.device == "auto" and torch.cuda.is_available())
    if gpus is None:
        gpus = round(1.0 / len(scenario.hospitals), 4) if use_cuda else 0.0
    if gpus > 0 and not torch.cuda.is_available():
        raise RuntimeError("engine.gpus_per_client > 0 but torch sees no CUDA device (Ray would start no client)")
    cpus = eng.cpus_per_client if ray_address(scenario) else min(eng.cpus_per_client, float(os.cpu_count() or 1))
    return {"num_cpus": cpus, "num_gpus": gpus}


class _DropDeprecationNotice(logging.Filter):
    """The deprecation notice of run_simulation is known and explained above; keep it off the terminal."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "run_simulation` function is deprecated" not in record.getMessage()


def _quiet_flower() -> None:
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")  # else SIGTERM dumps C++ stacks and aborts
    flwr_log = logging.getLogger("flwr")
    flwr_log.setLevel(logging.WARNING)
    if not any(isinstance(f, _DropDeprecationNotice) for f in flwr_log.filters):
        flwr_log.addFilter(_DropDeprecationNotice())
    warnings.filterwarnings("ignore", category=DeprecationWarning, module="flwr")
    warnings.filterwarnings("ignore", category=FutureWarning, module="ray")


def simulate(scenario: Scenario, runlog: RunLog, *, resume: bool = False) -> None:
    """Run one resolved arm; raises on any ServerApp failure. ``resume``: continue from the arm's
    checkpoint. Hospitals save their method state under ``<run dir>/hospital-state`` (each virtual
    hospital's "own disk" is this machine's)."""
    _quiet_flower()
    from flwr.simulation import run_simulation

    resources = client_resources(scenario)
    init_args = ray_init_args(scenario, resources)
    with shared_ray(init_args):
        run_simulation(
            server_app=make_server_app(scenario, runlog, resume=resume,
                                       hospital_state_dir=str(run_path(runlog.run_dir, HOSPITAL_STATE).resolve())),
            client_app=client_app,
            num_supernodes=len(scenario.hospitals),
            backend_config={"client_resources": resources, "init_args": init_args},
        )

"""A scenario on a deployment: :func:`bring_up` starts the SuperLink and one registered SuperNode per
hospital; :func:`run_deployment` runs every arm, one Flower run per arm, through the arm loop both
engines share (:func:`simlab.rundir.run_arms`), so the run directory holds exactly what ``simlab run``
writes, plus ``flower-<arm>.log`` (the ``flwr log`` of each run)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from simlab.engine.deployment import Deployment
from simlab.engine.flwr_config import COMPLETED, CONNECTION, FINISHED, DeploymentError
from simlab.engine.pki import Pki, add_node_keys
from simlab.engine.procs import free_ports
from simlab.fileio import run_path
from simlab.rundir import clear_failed, read_run_info, resume_inputs, run_arms, start_run_dir, write_run_info


SUPERLINK_DB = "superlink.db"
"""The SuperLink's state in the deployment's state directory (``flower-superlink --database``): registered
SuperNode keys, node ids and runs survive a SuperLink restart (:meth:`Deployment.restart`)."""


def bring_up(state: str | Path | Deployment, pki: Pki | None, hospitals: list[str], *, data_dir: str | Path | None = None,
             host: str = "127.0.0.1", port: int = 0, public_address: str | None = None,
             node_config: Mapping[str, Mapping[str, str | int]] | None = None,
             online_timeout: float = 60.0, executor: str = "warm", poll_s: float | None = None) -> Deployment:
    """SuperLink (TLS + node auth with a PKI) and one registered SuperNode per hospital, all online.

    Each SuperNode's node config is ``hospital-id=<id>``, ``state-dir=<state>/hospital-state/<id>``
    (where the hospital saves method state that must survive a server restart) and, with ``data_dir``,
    ``data-dir=<data_dir>/<id>`` (created); ``node_config[<id>]`` adds or replaces keys. Keys missing
    from the PKI are created. ``executor`` and ``poll_s``: how each SuperNode runs its ClientApp and how
    long it waits when idle (:meth:`Deployment.start_supernode`).
    ``state`` is a state directory or a :class:`Deployment` on one. On any failure every process started
    so far is stopped before the error is raised.
    """
    dep = state if isinstance(state, Deployment) else Deployment(state)
    if dep.running():
        raise DeploymentError(f"{dep.state_dir}: processes of this deployment are still running (tools/deploy "
                              f"status); stop them with tools/deploy down, or start what died with tools/deploy "
                              f"restart")
    dep.forget_exited()  # a new deployment: nothing of an old one is restarted, no nodes or runs kept
    for stale in dep.state_dir.glob(SUPERLINK_DB + "*"):
        stale.unlink()
    try:
        dep.start_superlink(pki, host=host, port=port, public_address=public_address,
                            database=dep.state_dir / SUPERLINK_DB)
        if pki is not None:
            add_node_keys(pki, hospitals)
            for hid in hospitals:
                dep.register(pki.node_pub(hid))
        ports = free_ports(len(hospitals))
        for hid, p in zip(hospitals, ports):
            cfg: dict[str, str | int] = {"hospital-id": hid, "state-dir": str(dep.state_dir / "hospital-state" / hid)}
            if data_dir is not None:
                d = Path(data_dir).resolve() / hid
                d.mkdir(parents=True, exist_ok=True)
                cfg["data-dir"] = str(d)
            cfg.update((node_config or {}).get(hid, {}))
            dep.start_supernode(hid, cfg, private_key=pki.node_key(hid) if pki else None, port=p,
                                executor=executor, poll_s=poll_s)
        dep.wait_online(len(hospitals), online_timeout, watch=hospitals)
        return dep
    except BaseException:
        dep.stop()
        raise


def default_timeout(scenario) -> float:
    """Longest a healthy run may take: nodes connecting (``federation.connect_timeout_s``), then every
    phase (identify, evaluation at round 0, then per round a training and an evaluation) waiting its
    full ``federation.round_timeout_s``, plus a minute."""
    fed = scenario.federation
    return fed.connect_timeout_s + fed.round_timeout_s * (2 * fed.rounds + 2) + 60.0


def _reopen(dep: Deployment, resume_dir: str | Path) -> tuple[Path, dict]:
    """(run directory, run.json) of a run to resume; Flower runs of it still marked running are stopped."""
    run_dir, _, info = resume_inputs(resume_dir)
    clear_failed(run_dir)
    for run_id in info.get("flower_runs", {}).values():
        try:
            stale = not str(dep.status(run_id).get("status", "")).startswith(FINISHED)
        except DeploymentError:  # a SuperLink restarted since does not know it
            stale = False
        if stale:
            dep.flwr("stop", str(run_id), CONNECTION, check=False)
    return run_dir, info


def run_deployment(scenario: str | Path | None, dep: Deployment, *, overrides: list[str] | None = None,
                   seed: int | None = None, out: str | None = None, app_dir: str | Path | None = None,
                   timeout_s: float | None = None, resume_dir: str | Path | None = None) -> tuple[Path, dict]:
    """Run every arm of a scenario on a running deployment (one Flower run per arm, in order) and write
    the run directory as ``simlab run`` does. Must run on the SuperLink's machine: the ServerApp writes
    into the run directory and reads the scenario file by the absolute paths given in the run config.
    The scenario and the run directory are checked here; each hospital's data is at its site, and each
    checks its own when the ServerApp identifies it (:meth:`Federation.check_inputs`), before round 0.

    ``resume_dir``: continue that run after its ServerApp died (``simlab run --resume``): the scenario
    path (``scenario`` is ignored), overrides and seed come from its run.json, completed arms are kept,
    the others continue from their checkpoints, and Flower runs of this run directory still marked
    running are stopped first.

    A run that ends other than ``finished:completed`` stops everything: ``FAILED`` is written into the
    run directory with the status details, and :class:`DeploymentError` carries the tail of its log.
    """
    from simlab.scenario.schema import load_scenario

    if resume_dir is not None:
        run_dir, info = _reopen(dep, resume_dir)
        scenario, overrides, seed = info["scenario"], info["overrides"], info["seed"]
    path = Path(scenario).resolve()
    overrides = list(overrides or [])
    loaded = load_scenario(path, overrides, seed, out)
    server_overrides = overrides + ([f"seed={seed}"] if seed is not None else [])
    if resume_dir is None:
        run_dir = start_run_dir(loaded, {"engine": "deployment", "scenario": str(path), "overrides": overrides,
                                         "seed": seed, "deployment_state": str(dep.state_dir), "flower_runs": {}})
        info = read_run_info(run_dir)

    def run_arm(arm: str, sc) -> None:
        run_id = dep.submit({"scenario": str(path), "arm": arm, "run-dir": str(run_dir),
                             "overrides": json.dumps(server_overrides), "resume": resume_dir is not None}, app_dir)
        info["flower_runs"] = {**info.get("flower_runs", {}), arm: run_id}
        write_run_info(run_dir, info)
        log_path = run_path(run_dir, f"flower-{arm}.log")
        try:  # one `flwr log --stream` for the whole run, not a `flwr ls` (2 s of CPU) every 2 s
            st = dep.follow(run_id, log_path, timeout_s or default_timeout(sc))
        finally:
            if not log_path.is_file() or not log_path.stat().st_size:
                log_path.write_text(dep.run_logs(run_id), encoding="utf-8")
        raise_unless_completed(arm, run_id, st, log_path)

    return run_dir, run_arms(run_dir, loaded, run_arm, resume=resume_dir is not None)


def raise_unless_completed(arm: str, run_id: int, st: dict, log_path: Path) -> None:
    """:class:`DeploymentError` with the status details and the end of the run's log, unless the
    Flower run ended ``finished:completed``."""
    if st.get("status") != COMPLETED:
        logs = log_path.read_text(encoding="utf-8", errors="replace") if log_path.is_file() else ""
        raise DeploymentError(f"arm {arm}: Flower run {run_id} ended {st.get('status')}: "
                              f"{st.get('status-details', '')}\n--- end of its log ---\n"
                              + "\n".join(logs.splitlines()[-30:]))

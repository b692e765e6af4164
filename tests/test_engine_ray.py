"""Ray under the simulation: the arms of a run share one Ray start and one actor pool, and a run can
use a Ray cluster that is already running (here two nodes on loopback, each started by ``ray start``
with one CPU of its own). The same two arms run in both, in opposite orders, so each arm runs once on
fresh actors and once on actors kept from the other arm: their metrics must not change."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from simlab.cli import main

TINY = """\
name: tiny-ray
seed: 4
data: {{image_size: 32, cache_dir: {cache}}}
domains:
  A: {{}}
  B: {{scanner: {{contrast: inverted, noise: 0.03}}}}
hospitals:
  - {{id: h1, size: 8, drift: {{type: abrupt, domains: [A, B], at: [2]}}}}
  - {{id: h2, size: 8, drift: {{type: none, domain: A}}}}
model: {{channels: [8, 16]}}
federation: {{rounds: 2, local_steps: 2, batch_size: 4, lr: 0.005}}
evaluation: {{every: 2, test_size: 4}}
engine: {{cpus_per_client: 1}}
arms:
{arms}
"""
ARMS = ["  - {name: fedavg}", "  - {name: ewc, set: {continual.method: ewc}}"]
RAY = str(Path(sys.executable).with_name("ray"))


def _run(tmp_path: Path, name: str, arms: list[str], *extra: str) -> dict[str, list[dict]]:
    scenario = tmp_path / f"{name}.yaml"
    scenario.write_text(TINY.format(cache=tmp_path / "cache", arms="\n".join(arms)))
    out = tmp_path / name
    assert main(["run", str(scenario), "--out", str(out), "--quiet", "--no-report", *extra]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {arm: [r for r in rows if r["arm"] == arm] for arm in ("fedavg", "ewc")}


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    """fedavg then ewc on a Ray started here; counts the actor pools Flower's engine built."""
    from flwr.simulation.ray_transport.ray_actor import BasicActorPool

    from simlab.engine import ray_session

    ray_session.shutdown()
    built = []
    original = BasicActorPool.add_actors_to_pool
    BasicActorPool.add_actors_to_pool = lambda self, n: (built.append(n), original(self, n))[1]
    try:
        rows = _run(tmp_path_factory.mktemp("local"), "local", ARMS)
    finally:
        BasicActorPool.add_actors_to_pool = original
    return rows, built


@pytest.mark.flower
def test_arms_of_a_run_share_one_ray_start_and_actor_pool(local_run):
    from simlab.engine import ray_session

    rows, built = local_run
    assert built == [2]  # one pool (2 cores / 1 CPU per hospital) for both arms
    assert ray_session._pool is not None and ray_session._pool[1].num_actors == 2  # kept for the next run
    assert all(len(r) > 20 for r in rows.values())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cluster_nodes(address: str, env: dict) -> int:
    out = subprocess.run([RAY, "status", "--address", address], capture_output=True, text=True, env=env, timeout=60)
    return len(re.findall(r"^\s*1 node_", out.stdout, flags=re.MULTILINE)) if out.returncode == 0 else 0


@pytest.mark.flower
def test_a_run_uses_a_two_node_ray_cluster_and_gives_the_same_metrics(local_run, tmp_path):
    from simlab.engine import ray_session

    port = _free_port()
    address = f"127.0.0.1:{port}"
    env = {**os.environ, "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    common = ["--block", "--num-cpus", "1", "--node-ip-address", "127.0.0.1", "--disable-usage-stats"]
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # Ray's socket paths must stay short
    logs = (tmp_path / "head.log").open("w"), (tmp_path / "node.log").open("w")
    head = subprocess.Popen([RAY, "start", "--head", "--port", str(port), "--include-dashboard", "false",
                             "--ray-client-server-port", str(_free_port()), "--temp-dir", temp, *common],
                            stdout=logs[0], stderr=subprocess.STDOUT, env=env)
    node = None
    try:
        deadline = time.monotonic() + 120
        while _cluster_nodes(address, env) < 1:
            assert head.poll() is None and time.monotonic() < deadline, (tmp_path / "head.log").read_text()
            time.sleep(1)
        node = subprocess.Popen([RAY, "start", "--address", address, *common], stdout=logs[1],
                                stderr=subprocess.STDOUT, env=env)
        while _cluster_nodes(address, env) < 2:
            assert node.poll() is None and time.monotonic() < deadline, (tmp_path / "node.log").read_text()
            time.sleep(1)
        rows = _run(tmp_path, "cluster", ARMS[::-1], "--set", f"engine.ray_address={address}")
        assert ray_session._pool is not None and ray_session._pool[1].num_actors == 2  # one on each 1-CPU node
    finally:
        ray_session.shutdown()  # this process's connection
        for proc in (node, head):
            if proc is not None:
                proc.terminate()  # `ray start --block` stops the processes it started
                proc.wait(timeout=60)
        for f in logs:
            f.close()
    assert rows == local_run[0]

"""A real Flower deployment on loopback: SuperLink with TLS and SuperNode authentication, one SuperNode
per hospital, runs submitted with `flwr run` and followed by status polling.

Unit tests (fast): the PKI (certificate chain, SANs, OpenSSH EC P-384 keys), port picking, node-config
quoting, process bookkeeping (the Flower app itself, its run config and FAB: tests/test_flwr_run.py).
Integration (marked ``flower``, one deployment shared by the tests; each SuperNode runs simlab's warm
ClientApp worker, one long-lived process for every message, with its idle waits capped at 0.2 s): the
same scenario gives the same metrics as simulation, every message of a node ran in its one worker; a 4th SuperNode with an unregistered key is refused; a
hospital with a wrong node config ends the run with a clear error instead of hanging; a hospital
failing in round 2 is recorded while the others' metrics stay complete; a ServerApp killed after round 1
is resumed from its checkpoint and ends with the metrics of an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from simlab.engine.deploy_cli import main as deploy_main
from simlab.engine.deploy_run import bring_up, run_deployment
from simlab.engine.deployment import Deployment
from simlab.engine.flwr_config import CONNECTION, DeploymentError, last_json, node_config_arg, run_config_toml
from simlab.engine.pki import Pki, add_node_keys, make_pki
from simlab.engine.procs import ProcRecord, children_map, descendants, free_ports, proc_stat, watchers_of
from simlab.runlog import SHARED

TINY = """\
name: tiny-deploy
seed: 5
data: {{image_size: 32, cache_dir: {cache}}}
domains:
  A: {{}}
  B: {{scanner: {{contrast: inverted, noise: 0.03}}}}
hospitals:
  - {{id: h1, size: 4, drift: {{type: abrupt, domains: [A, B], at: [2]}}}}
  - {{id: h2, size: 4, label_fraction: 0.5, drift: {{type: none, domain: A}}}}
  - {{id: h3, size: 4, drift: {{type: none, domain: B}}}}
model: {{channels: [8, 16, 32]}}
federation: {{rounds: 2, local_steps: 1, batch_size: 4, lr: 0.005}}
evaluation: {{every: 2, test_size: 4, at_boundaries: false}}
"""
HOSPITALS = ["h1", "h2", "h3"]
RUN_TIMEOUT = 600.0  # generous: a 2-CPU machine shared with other jobs
POLL_S = 0.2  # SuperNodes' idle waits (Flower's: 3 s)


# ------------------------------------------------------------------------------------------------ PKI
def test_pki_chain_sans_and_node_keys(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    pki = make_pki(tmp_path / "pki", ["h1", "h2"], dns_names=["fl.example.org"], ips=["10.1.2.3"])
    ca = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    srv = x509.load_pem_x509_certificate(pki.server_cert.read_bytes())
    srv.verify_directly_issued_by(ca)  # raises if the signature or issuer is wrong
    san = srv.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "fl.example.org"}
    assert {str(a) for a in san.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "10.1.2.3"}
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert srv.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert pki.nodes() == ["h1", "h2"]
    for name in ("h1", "h2"):
        key = serialization.load_ssh_private_key(pki.node_key(name).read_bytes(), None)
        pub = serialization.load_ssh_public_key(pki.node_pub(name).read_bytes())
        assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
        assert key.public_key().public_numbers() == pub.public_numbers()
        assert pki.node_key(name).stat().st_mode & 0o077 == 0  # private keys: owner only
    assert pki.ca_key.stat().st_mode & 0o077 == 0 and pki.server_key.stat().st_mode & 0o077 == 0
    # Python's own TLS stack accepts the chain for both names (what `flwr` and SuperNodes do).
    ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
    ctx.load_cert_chain(pki.server_cert, pki.server_key)


def test_pki_reuses_ca_and_keeps_node_keys(tmp_path):
    pki = make_pki(tmp_path, ["h1"])
    ca, key = pki.ca_cert.read_bytes(), pki.node_key("h1").read_bytes()
    make_pki(tmp_path, ["h1", "h2"], dns_names=["other.example"])
    assert pki.ca_cert.read_bytes() == ca and pki.node_key("h1").read_bytes() == key
    assert pki.nodes() == ["h1", "h2"]
    with pytest.raises(DeploymentError, match="letters, digits"):
        add_node_keys(pki, ["../evil"])


def test_tls_handshake_against_generated_certificate(tmp_path):
    """A TLS server using server.pem is accepted by a client trusting only ca.crt, for 127.0.0.1."""
    pki = make_pki(tmp_path)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(pki.server_cert, pki.server_key)
    client_ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve():
        conn, _ = listener.accept()
        with server_ctx.wrap_socket(conn, server_side=True) as tls:
            tls.sendall(b"ok")

    th = threading.Thread(target=serve, daemon=True)
    th.start()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with client_ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            assert tls.recv(2) == b"ok"
    th.join(5)
    listener.close()
    # A certificate from another CA is refused.
    other = make_pki(tmp_path / "other")
    bad_ctx = ssl.create_default_context(cafile=str(other.ca_cert))
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    th = threading.Thread(target=lambda: _accept_quietly(listener, server_ctx), daemon=True)
    th.start()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with pytest.raises(ssl.SSLCertVerificationError):
            bad_ctx.wrap_socket(raw, server_hostname="127.0.0.1")
    th.join(5)
    listener.close()


def _accept_quietly(listener, ctx):
    conn, _ = listener.accept()
    try:
        ctx.wrap_socket(conn, server_side=True).close()
    except (ssl.SSLError, OSError):
        conn.close()


# ----------------------------------------------------------------------------------- small helpers
def test_free_ports_are_distinct_and_bindable():
    ports = free_ports(5)
    assert len(set(ports)) == 5
    for p in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))


def test_node_config_arg_is_valid_flower_syntax():
    from flwr.common.config import parse_config_args

    text = node_config_arg({"hospital-id": "st-mary", "data-dir": "/data/st mary".replace(" ", "_"),
                              "fail-at-round": 2})
    assert parse_config_args([text]) == {"hospital-id": "st-mary", "data-dir": "/data/st_mary", "fail-at-round": 2}
    with pytest.raises(DeploymentError, match="spaces or quotes"):
        node_config_arg({"data-dir": "/with space"})


def test_run_config_file_survives_quotes_spaces_and_json(tmp_path):
    from flwr.common.config import parse_config_args

    values = {"scenario": "/data/my study/it's \"here\".yaml", "overrides": json.dumps(["seed=7", "a.b=[1, 2]"]),
              "arm": "odex", "n": 3, "flag": True}
    path = tmp_path / "rc.toml"
    path.write_text(run_config_toml(values))
    assert parse_config_args([str(path)]) == values
    with pytest.raises(DeploymentError, match="run config key"):
        run_config_toml({"bad key": 1})


def test_command_line_pki_errors_and_down(tmp_path, capsys):
    sc = tmp_path / "s.yaml"
    sc.write_text(TINY.format(cache=tmp_path / "c"))
    assert deploy_main(["pki", str(tmp_path / "pki"), "--scenario", str(sc), "--node", "extra", "--ip", "10.0.0.7"]) == 0
    assert "10.0.0.7" in capsys.readouterr().out
    assert Pki(tmp_path / "pki").nodes() == ["extra", "h1", "h2", "h3"]
    assert deploy_main(["up", str(sc), "--pki", str(tmp_path / "nopki"), "--state", str(tmp_path / "st")]) == 1
    assert "not a PKI directory" in capsys.readouterr().err
    assert deploy_main(["up", str(sc), "--pki", str(tmp_path / "pki"), "--state", str(tmp_path / "st"),
                   "--hospitals", "4"]) == 1
    assert "the scenario has 3 hospitals" in capsys.readouterr().err
    assert deploy_main(["down", "--state", str(tmp_path / "st")]) == 0
    assert "stopped 0 process(es)" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text(TINY.format(cache=tmp_path / "c").replace("rounds: 2", "rounds: two"))
    assert deploy_main(["run", str(bad), "--state", str(tmp_path / "st")]) == 2
    assert "federation.rounds" in capsys.readouterr().err


def test_last_json_picks_the_object_after_log_lines():
    assert last_json('Using SuperLink: x\n✅ done\n{"success": true, "run-id": "7"}\n') == {"success": True,
                                                                                             "run-id": "7"}
    assert last_json("no json here") is None


def test_missing_hospital_fails_after_the_connect_timeout_not_the_round_timeout():
    from simlab.federated.federation import FederationError, wait_for_nodes

    class TwoOfThree:
        def get_node_ids(self):
            return [11, 12]

    t0 = time.perf_counter()
    with pytest.raises(FederationError, match=r"only 2 of 3 hospitals connected within 0 s \(federation.connect_timeout_s\)"):
        wait_for_nodes(TwoOfThree(), 3, 0.3)
    assert time.perf_counter() - t0 < 5
    assert wait_for_nodes(TwoOfThree(), 2, 0.3) == [11, 12]


def test_stop_kills_the_whole_tree_by_pid_and_spares_recycled_pids(tmp_path):
    """A recorded process and its (detached) child are stopped; a record whose PID now belongs to
    another process (different start time) is left alone."""
    dep = Deployment(tmp_path / "state")
    script = ("import subprocess, sys, time; "
              "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], start_new_session=True); "
              "time.sleep(60)")
    rec = dep._spawn("supernode", "x", [sys.executable, "-c", script], 0)
    deadline = time.monotonic() + 10
    while not descendants(rec.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    child = descendants(rec.pid)[0]
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        fake = ProcRecord("supernode", "ghost", bystander.pid, start_ticks=1, port=0, log="", cmd=[])
        dep.records.append(fake)
        assert not fake.alive()  # same PID, other start time: not ours
        reloaded = Deployment(tmp_path / "state")  # another process picking the state up
        assert [r.name for r in reloaded.records] == ["x"] and reloaded.records[0].alive()
        dep.stop(grace=1.0)
        assert not rec.alive() and proc_stat(child) is None
        assert bystander.poll() is None  # untouched
        assert json.loads((tmp_path / "state" / "deploy.json").read_text())["processes"] == []
    finally:
        bystander.kill()
        bystander.wait()
        for pid in (rec.pid, child):
            if proc_stat(pid) is not None:
                os.kill(pid, signal.SIGKILL)


def test_stop_finds_helpers_of_a_process_that_already_exited(tmp_path):
    """Like a refused SuperNode: the recorded process exits, its helper (started with --parent-pid
    <its pid>) lives on, re-parented; stop() finds it by that argument and ends it."""
    dep = Deployment(tmp_path / "state")
    script = ("import os, subprocess, sys, time; "
              "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)', '--parent-pid', str(os.getpid())], "
              "start_new_session=True); time.sleep(0.5)")
    rec = dep._spawn("supernode", "refused", [sys.executable, "-c", script], 0)
    assert dep.wait_exit(rec, 20) == 0
    helpers = watchers_of(rec.pid, rec.start_ticks)
    try:
        assert len(helpers) == 1 and proc_stat(helpers[0]) is not None
        dep.stop(grace=1.0)
        assert proc_stat(helpers[0]) is None
    finally:
        for pid in helpers:
            if proc_stat(pid) is not None:
                os.kill(pid, signal.SIGKILL)


def test_the_supernode_waits_capped_are_still_flowers_and_only_that_module_s():
    """--poll-interval replaces ``time`` in Flower's SuperNode loop module only; the waits it shortens
    (3 s after an empty pull, 0.5 s polls for the ClientApp's reply) are still there in this Flower."""
    import inspect

    from flwr.supernode import start_client_internal as sci

    from simlab.engine.supernode import cap_idle_waits, runtime_api_address

    src = inspect.getsource(sci)
    assert src.count("time.sleep(3)") == 1 and src.count("time.sleep(0.5)") == 2
    assert {n for n in __import__("re").findall(r"\btime\.(\w+)", src)} == {"sleep"}
    original, original_pull = sci.time, sci.pull_objects
    try:
        cap_idle_waits(0.01)
        t0 = time.perf_counter()
        sci.time.sleep(3)
        assert time.perf_counter() - t0 < 1.0
        assert sci.time.monotonic is time.monotonic and time.sleep is not sci.time.sleep
    finally:
        sci.time, sci.pull_objects = original, original_pull
    assert runtime_api_address(["--superlink", "x:1", "--host", "0.0.0.0", "--port", "9100"]) == "127.0.0.1:9100"
    assert runtime_api_address(["--insecure"]) == "127.0.0.1:9094"


def test_a_refused_task_heartbeat_gives_up_that_task_only():
    """Flower's heartbeat ends the ClientApp process (SIGINT) when the SuperNode refuses it; the warm
    worker's stops beating for that task and goes on. Transient errors are retried as in Flower."""
    import httpx

    from simlab.engine.clientapp_worker import _failure, task_heartbeat

    class Client:
        def __init__(self, *answers):
            self.answers, self.calls = list(answers), 0

        def SendTaskHeartbeat(self, _request):
            self.calls += 1
            answer = self.answers.pop(0)
            if isinstance(answer, Exception):
                raise answer
            return type("Res", (), {"success": answer})()

    def status_error(code):
        request = httpx.Request("POST", "http://x")
        return httpx.HTTPStatusError("e", request=request, response=httpx.Response(code, request=request))

    ok = Client(True, True)
    beat = task_heartbeat(ok)
    assert beat() and beat() and ok.calls == 2
    for refusal in (False, status_error(401)):
        gone = Client(refusal)
        beat = task_heartbeat(gone)
        assert beat() is True and beat() is True and gone.calls == 1  # given up, no SIGINT, no more beats
    flaky = Client(httpx.ConnectError("down"), status_error(503), True)
    beat = task_heartbeat(flaky)
    assert [beat(), beat(), beat()] == [False, False, True]  # False: Flower's retry with back-off
    assert _failure(ZeroDivisionError("x"))[1] == "<class 'ZeroDivisionError'>:<'x'>"  # Flower's reason format


def test_the_waits_for_a_message_s_arrays_are_shortened_where_flower_waits_for_them():
    """The grid (ServerApp), the SuperNode loop and the ClientApp task each import one of Flower's pull
    functions by name; the quick back-off binds into exactly those, and nowhere else."""
    import functools
    import inspect

    from flwr.superlink.grid import http_grid
    from flwr.supercore.inflatable import inflatable_utils
    from flwr.supernode import start_client_internal
    from flwr.supernode.runtime import run_clientapp

    from simlab.federated.object_pulls import BACKOFF_CAP_S, INITIAL_BACKOFF_S, quick_object_pulls

    defaults = inspect.signature(inflatable_utils.pull_objects).parameters
    assert (defaults["initial_backoff"].default, defaults["backoff_cap"].default) == (1, 10)  # Flower's
    for module, name in ((http_grid, "pull_objects"), (start_client_internal, "pull_objects"),
                         (run_clientapp, "pull_and_inflate_object_from_tree")):
        original = getattr(module, name)
        try:
            assert quick_object_pulls(module) == [name]
            bound = getattr(module, name)
            assert isinstance(bound, functools.partial) and bound.func is getattr(inflatable_utils, name)
            assert bound.keywords == {"initial_backoff": INITIAL_BACKOFF_S, "backoff_cap": BACKOFF_CAP_S}
        finally:
            setattr(module, name, original)
    assert not isinstance(inflatable_utils.pull_objects, functools.partial)


# --------------------------------------------------------------------------------------- integration
def _needs_node_config_support() -> None:
    """data-dir and fail-at-round are node-config keys the ClientApp must honour."""
    from simlab.federated import client_app

    assert hasattr(client_app, "node_data_dir"), "client_app does not honour node config data-dir / fail-at-round"


def rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class ResourceMonitor:
    """Samples wall time and resident memory of a deployment's process trees in a background thread.

    Peak RSS is the largest *sum* over every live process (SuperLink, SuperNodes and all their
    descendants: superexec, ServerApp and ClientApp processes) seen at one sample; short-lived ClientApp
    processes are caught if they live longer than ``interval_s``. Records named in ``exclude`` are
    left out. Shared pages are counted once per process, so the sum is an upper bound of the memory
    the deployment needs.
    """

    def __init__(self, deployment: Deployment, interval_s: float = 0.2, exclude=()):
        self.dep = deployment
        self.exclude = set(exclude)
        self.interval = interval_s
        self.peak_rss = 0
        self.peak_procs = 0
        self.peak_by_role: dict[str, int] = {}
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="simlab-deploy-monitor")
        self.t0 = self.t1 = 0.0

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> None:
        children = children_map()
        total, count, by_role = 0, 0, {}
        for rec in self.dep.records:
            if rec.name in self.exclude or not rec.alive():
                continue
            tree = [rec.pid, *descendants(rec.pid, children)]
            rss = sum(rss_bytes(p) for p in tree)
            total += rss
            count += len(tree)
            by_role[rec.role] = by_role.get(rec.role, 0) + rss
        self.samples += 1
        if total > self.peak_rss:
            self.peak_rss, self.peak_procs = total, count
        for role, rss in by_role.items():
            self.peak_by_role[role] = max(self.peak_by_role.get(role, 0), rss)

    def __enter__(self) -> ResourceMonitor:
        self.t0 = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if not self._stop.is_set():
            self._stop.set()
            self._thread.join()
            self.t1 = time.perf_counter()

    @property
    def wall_s(self) -> float:
        return (self.t1 or time.perf_counter()) - self.t0


def _rows(run_dir: Path) -> dict[tuple, float | None]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    out = {}
    for r in rows:
        key = (r["arm"], r["round"], r["hospital"], r["domain"], r["metric"])
        assert key not in out, f"duplicate metric row {key}"
        out[key] = r["value"]
    return out


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    """SuperLink (TLS + SuperNode auth) and 3 registered SuperNodes, each with its hospital and data dir;
    plus a 4th SuperNode whose key was never registered. Everything is stopped in the finally block."""
    root = tmp_path_factory.mktemp("deploy")
    scenario = root / "tiny.yaml"
    scenario.write_text(TINY.format(cache=root / "sim-cache"))
    pki = make_pki(root / "pki", [*HOSPITALS, "intruder"])
    dep = None
    try:
        t0 = time.perf_counter()
        dep = Deployment(root / "state")
        monitor = ResourceMonitor(dep, exclude={"intruder"}).__enter__()
        bring_up(dep, pki, HOSPITALS, data_dir=root / "sites", poll_s=POLL_S)
        up_s = time.perf_counter() - t0
        intruder = dep.start_supernode("intruder", {"hospital-id": "h1"}, private_key=pki.node_key("intruder"))
        ctx = {"root": root, "scenario": scenario, "pki": pki, "dep": dep, "intruder": intruder,
               "monitor": monitor, "up_s": up_s}
        yield ctx
        dep = ctx["dep"]  # a test may have picked the deployment up again from its state directory
    finally:
        if dep is not None:
            monitor.__exit__(None, None, None)
            dep.stop()
            assert dep.running() == []


@pytest.mark.flower
def test_deployment_matches_simulation(deployment):
    from simlab.runner import run_scenario
    from simlab.scenario.schema import load_scenario

    _needs_node_config_support()
    dep, root, monitor = deployment["dep"], deployment["root"], deployment["monitor"]
    t0 = time.perf_counter()
    run_dir, summary = run_deployment(deployment["scenario"], dep, out=str(root / "run-deploy"), timeout_s=RUN_TIMEOUT)
    run_s = time.perf_counter() - t0
    monitor.__exit__(None, None, None)
    stats = {"bring_up_s": round(deployment["up_s"], 1), "run_s": round(run_s, 1),
             "wall_s": round(monitor.wall_s, 1), "peak_rss_mb": round(monitor.peak_rss / 2**20),
             "peak_rss_by_role_mb": {k: round(v / 2**20) for k, v in monitor.peak_by_role.items()},
             "peak_processes": monitor.peak_procs, "samples": monitor.samples}
    print("loopback deployment (3 SuperNodes, 2 rounds):", json.dumps(stats))
    (root / "deploy-stats.json").write_text(json.dumps(stats))
    for name in ("scenario.yaml", "metrics.jsonl", "rounds.jsonl", "summary.json", "simlab.log",
                 "R/sequential/h1.csv", "R/sequential/pooled.csv", "dice_by_round/sequential.csv",
                 "flower-sequential.log"):
        assert (run_dir / name).is_file(), name
    assert not (run_dir / "FAILED").exists()
    # each hospital generated its data in its own data dir (node config data-dir), not the scenario's cache
    for h in HOSPITALS:
        assert any((root / "sites" / h).rglob("*.npz")), h

    loaded = load_scenario(deployment["scenario"], out=str(root / "run-sim"))
    sim_dir, sim_summary = run_scenario(loaded)
    dep_rows, sim_rows = _rows(run_dir), _rows(sim_dir)
    assert dep_rows.keys() == sim_rows.keys()
    assert len(dep_rows) > 30
    assert {k[4] for k in dep_rows} >= {"dice", "dice_c1", "dice_c2", "train_loss", "agg_weight"}
    diffs = {k: abs(dep_rows[k] - sim_rows[k]) for k in dep_rows}
    assert max(diffs.values()) <= 1e-6, sorted(diffs.items(), key=lambda kv: -kv[1])[:5]
    a, b = summary["arms"]["sequential"], sim_summary["arms"]["sequential"]
    for key in ("acc", "bwt", "fwt", "forgetting"):
        assert a[key] == pytest.approx(b[key], abs=1e-6), key
    assert a["failed_updates"] == 0 and a["bytes_total"] == b["bytes_total"]

    # Every message a node received ran in its one warm worker: no ClientApp process per message.
    for h in HOSPITALS:
        log = (dep.logs / f"supernode-{h}.log").read_text(errors="replace")
        assert log.count("serving the ClientApp of the SuperNode") == 1, h
        assert "task 3 done: completed" in log, h  # identify and two rounds of training at least
        assert "Start `flwr-clientapp` process" not in log, h

    # The unregistered SuperNode was refused by the SuperLink (Flower exit code 305) and never joined.
    intruder = deployment["intruder"]
    rc = dep.wait_exit(intruder, 60)
    assert rc not in (None, 0), rc
    assert "Exit Code: 305" in Path(intruder.log).read_text()
    assert len([n for n in dep.supernodes() if n["status"] == "online"]) == 3
    dep.stop(["intruder"])  # forget it: `tools/deploy restart` starts every recorded process that died


def _serverapp_pids(dep: Deployment) -> list[int]:
    """The ServerApp processes (``flwr-serverapp``) the SuperLink started."""
    link = next(r for r in dep.records if r.role == "superlink")
    pids = []
    for pid in descendants(link.pid):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(Path(a.decode(errors="replace")).name == "flwr-serverapp" for a in argv[:2]):
            pids.append(pid)
    return pids


EWC = ["continual.method=ewc"]  # 2 rounds: interrupted after round 1, round 2 needs round 1's Fisher


@pytest.fixture(scope="module")
def ewc_reference(deployment) -> bytes:
    """metrics.jsonl of the EWC arm simulated without interruption (the first test shows a deployment
    gives a simulation's metrics): what every interrupted and resumed deployment must end with."""
    from simlab.runner import run_scenario
    from simlab.scenario.schema import load_scenario

    out = deployment["root"] / "run-ewc-sim"
    sim_dir, _ = run_scenario(load_scenario(deployment["scenario"], EWC, out=str(out)))
    return (sim_dir / "metrics.jsonl").read_bytes()


def _interrupt_after_round_1(deployment, out: Path, kill) -> None:
    """Run the EWC arm on the deployment in a thread, call ``kill()`` once round 1 is logged and check
    that the run failed with round 2 not done."""
    failure: dict = {}

    def first_attempt():
        try:
            run_deployment(deployment["scenario"], deployment["dep"], overrides=EWC, out=str(out),
                           timeout_s=RUN_TIMEOUT)
        except DeploymentError as exc:
            failure["error"] = exc

    thread = threading.Thread(target=first_attempt)
    thread.start()
    deadline = time.monotonic() + RUN_TIMEOUT
    while not any(r["round"] >= 1 for r in _cost_rows(out)):
        assert thread.is_alive() and time.monotonic() < deadline, "round 1 never came"
        time.sleep(0.1)
    kill()
    thread.join(timeout=RUN_TIMEOUT)
    assert "error" in failure and (out / "FAILED").exists()
    assert max(r["round"] for r in _cost_rows(out)) < 2


def _resume_to(out: Path, reference: bytes) -> float:
    """``simlab run --resume`` the run directory; its metrics.jsonl must equal ``reference`` byte for byte.
    Returns the seconds the resumed run took."""
    from simlab.cli import main

    t0 = time.perf_counter()
    assert main(["run", "--resume", str(out), "--quiet", "--no-report"]) == 0
    assert not (out / "FAILED").exists()
    assert (out / "metrics.jsonl").read_bytes() == reference
    assert [r["round"] for r in _cost_rows(out)] == [0, 1, 2]
    return time.perf_counter() - t0


@pytest.mark.flower
def test_killed_server_app_resumes_to_identical_metrics(deployment, ewc_reference):
    """The ServerApp process is SIGKILLed once round 1 of a 2-round EWC run is logged (each hospital keeps
    its Fisher between rounds, saved in its node's state-dir); `simlab run --resume RUN_DIR` submits a new
    Flower run that continues from the checkpoint, ending with the uninterrupted run's metrics.jsonl."""
    dep, root = deployment["dep"], deployment["root"]
    out = root / "run-killed"

    def kill_server_app():
        pids = _serverapp_pids(dep)
        assert len(pids) == 1, pids
        os.kill(pids[0], signal.SIGKILL)
        # Flower would mark the run failed after its 60 s heartbeat timeout; stop it now instead
        run_id = json.loads((out / "run.json").read_text())["flower_runs"]["ewc"]
        dep.flwr("stop", str(run_id), CONNECTION, check=False)

    _interrupt_after_round_1(deployment, out, kill_server_app)
    resume_s = _resume_to(out, ewc_reference)
    assert all(any((root / "state" / "hospital-state" / h).rglob("round-*.npz")) for h in HOSPITALS)
    print(f"loopback deployment: ServerApp killed after round 1, resumed and finished in {resume_s:.0f} s")


@pytest.mark.flower
def test_killed_superlink_restarts_with_its_nodes_and_the_run_resumes(deployment, ewc_reference):
    """The SuperLink (with its ServerApp) is SIGKILLed after round 1. `tools/deploy restart` starts it
    again on its port with its database: it still knows the registered SuperNode keys and node ids, the
    SuperNodes that kept running reconnect without being registered again, and `simlab run --resume`
    ends with the uninterrupted run's metrics.jsonl."""
    dep, root = deployment["dep"], deployment["root"]
    before = sorted(int(n["node-id"]) for n in dep.supernodes() if n["status"] == "online")
    link = next(r for r in dep.records if r.role == "superlink" and r.alive())
    out = root / "run-link-killed"

    def kill_superlink():
        for pid in [link.pid, *descendants(link.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    _interrupt_after_round_1(deployment, out, kill_superlink)
    assert deploy_main(["restart", "--state", str(dep.state_dir)]) == 0
    dep = Deployment(dep.state_dir)  # as another process would pick it up
    deployment["dep"] = dep
    assert (dep.state_dir / "superlink.db").is_file()
    dep.wait_online(3, timeout=120)
    assert sorted(int(n["node-id"]) for n in dep.supernodes() if n["status"] == "online") == before
    resume_s = _resume_to(out, ewc_reference)
    print(f"loopback deployment: SuperLink killed after round 1, restarted, resumed and finished in {resume_s:.0f} s")


def _cost_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "rounds.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x] if path.exists() else []


def _restart_h3(deployment, node_config: dict) -> None:
    dep, pki = deployment["dep"], deployment["pki"]
    dep.stop(["h3"])
    dep.start_supernode("h3", node_config, private_key=pki.node_key("h3"))
    dep.wait_online(3, timeout=60, watch=["h3"])


@pytest.mark.flower
def test_wrong_node_config_ends_the_run_with_a_clear_error(deployment):
    """h3's SuperNode claims a hospital the scenario does not have: the ServerApp's identification step
    ends the run (finished:failed) with the ClientApp's message instead of waiting for a timeout."""
    _restart_h3(deployment, {"hospital-id": "h9", "data-dir": str(deployment["root"] / "sites" / "h3")})
    out = deployment["root"] / "run-wrong-id"
    t0 = time.perf_counter()
    with pytest.raises(DeploymentError) as err:
        run_deployment(deployment["scenario"], deployment["dep"], out=str(out), timeout_s=RUN_TIMEOUT)
    # failed at identification: no round timeout (600 s) waited out, no run timeout hit
    assert time.perf_counter() - t0 < RUN_TIMEOUT
    msg = str(err.value)
    assert "finished:failed" in msg and "hospital-id='h9' is not a hospital of this scenario" in msg
    assert "hospital-id='h9'" in (out / "FAILED").read_text()
    assert "could not identify its hospital" in (out / "simlab.log").read_text()


@pytest.mark.flower
def test_a_site_that_cannot_read_its_inputs_ends_the_run_at_identification(deployment):
    """h3's data-dir exists but cannot hold its generated data (/proc): the hospital's own input check,
    right after identification, ends the run before round 0, naming the hospital, its node, the node
    config key and the folder."""
    _restart_h3(deployment, {"hospital-id": "h3", "data-dir": "/proc"})
    out = deployment["root"] / "run-bad-site"
    t0 = time.perf_counter()
    with pytest.raises(DeploymentError) as err:
        run_deployment(deployment["scenario"], deployment["dep"], out=str(out), timeout_s=RUN_TIMEOUT)
    assert time.perf_counter() - t0 < RUN_TIMEOUT and "finished:failed" in str(err.value)
    log = (out / "simlab.log").read_text()
    assert re.search(r"hospital h3 \(node \d+\): node config data-dir='/proc' \(this node's data cache\): the "
                     r"generated-data cache: .*/proc", log), log[-2000:]
    assert not (out / "rounds.jsonl").read_text().strip()  # not even round 0's evaluation ran


@pytest.mark.flower
def test_failing_hospital_is_recorded_and_others_complete(deployment):
    """h3's ClientApp raises in round 2 (node config fail-at-round=2): the run completes, h3's round-2
    update is recorded as train_failed, round 2 is aggregated from h1 and h2, every evaluation is there."""
    _needs_node_config_support()
    root = deployment["root"]
    _restart_h3(deployment, {"hospital-id": "h3", "data-dir": str(root / "sites" / "h3"), "fail-at-round": 2})
    run_dir, summary = run_deployment(deployment["scenario"], deployment["dep"], out=str(root / "run-fail"),
                                        timeout_s=RUN_TIMEOUT)
    rows = _rows(run_dir)
    failed = {(k[1], k[2]) for k in rows if k[4] == "train_failed"}
    assert failed == {(2, "h3")}
    trained = {(k[1], k[2]) for k in rows if k[4] == "train_loss"}
    assert trained == {(1, "h1"), (1, "h2"), (1, "h3"), (2, "h1"), (2, "h2")}
    weights = {k[2]: v for k, v in rows.items() if k[4] == "agg_weight" and k[1] == 2}
    assert set(weights) == {"h1", "h2"} and sum(weights.values()) == pytest.approx(1.0)
    evals = {(k[1], k[2], k[3]) for k in rows if k[4] == "dice"}
    # one shared model: each domain evaluated once per evaluated round, rows under "all" (h3 fails only
    # its training, so it still evaluates the domain it was given)
    assert evals == {(t, SHARED, d) for t in (0, 2) for d in ("A", "B")}
    costs = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    r2 = next(c for c in costs if c["round"] == 2)
    assert r2["failed"] == ["h3"] and r2["replied"] == ["h1", "h2"]
    assert summary["arms"]["sequential"]["failed_updates"] == 1
    assert "fail-at-round=2" in (run_dir / "simlab.log").read_text()

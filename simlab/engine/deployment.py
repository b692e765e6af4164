"""A real Flower deployment of a scenario on one machine: one SuperLink, one SuperNode per hospital,
TLS and node auth.

Simulation (:mod:`simlab.engine.simulation`) runs every hospital as a virtual SuperNode inside one
process. Here each hospital is a ``flower-supernode`` process (on this machine or on the hospital's
own), the server is a ``flower-superlink``, and a run is submitted with ``flwr run``: the same
ServerApp logic and the same ClientApp, now talking HTTPS.

:class:`Deployment` starts and stops the processes by PID (SuperNodes first, then the SuperLink; each
with every descendant it spawned: ``flower-superexec``, ``flwr-serverapp``, ``flwr-clientapp``; see
:mod:`simlab.engine.procs`), writes the Flower configuration (``$FLWR_HOME/config.toml``, one
connection), registers SuperNode keys, submits runs and follows them with ``flwr ls --run-id …
--format json`` until ``finished:*`` — never through ``flwr run --stream``, whose exit code is 0 even
for a failed run. Everything lives in a state directory: ``FLWR_HOME``, process records
(``deploy.json``, with each process's start time so that a recycled PID is never signalled), logs.
Bringing a deployment up and running a scenario on it is :mod:`simlab.engine.deploy_run`.

Ports are chosen at run time by binding port 0 (:func:`simlab.engine.procs.free_ports`), so
concurrent deployments on one machine (tests, several users) never collide. Runtime dependency
installation is off on both sides: every machine installs simlab beforehand, and the app submitted
(the repository's pyproject.toml, whose ``[tool.flwr.app]`` makes simlab a Flower app) carries only
that file and the README.

The same class runs a *simulation* SuperLink (``start_superlink(simulation=True)``: Flower's
simulation runtime, virtual SuperNodes, no SuperNode processes) for ``engine.launcher: flwr-run``
(:mod:`simlab.engine.flwr_run`).
"""

from __future__ import annotations

import json
import os
import shlex
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict
from pathlib import Path

from simlab.engine.flwr_config import (CONNECTION, FINISHED, DeploymentError, check_name, connection_toml, last_json,
                                       node_config_arg, run_config_toml)
from simlab.engine.pki import Pki
from simlab.engine.procs import ProcRecord, free_ports, proc_stat, terminate
from simlab.fileio import atomic_write


APP_FILES = ("pyproject.toml", "README.md")
"""What the FAB of simlab's Flower app holds (``fab-include`` in pyproject.toml adds README.md)."""


def default_app_dir() -> Path:
    """The source tree this module belongs to: its pyproject.toml declares the Flower app."""
    return Path(__file__).resolve().parents[2]


def stage_app(source: Path, dest: Path) -> Path:
    """``dest`` holding only :data:`APP_FILES` of ``source``, the files ``flwr run source`` would pack.

    ``flwr run DIR`` walks every file under DIR before ``fab-include`` narrows the FAB down (a
    checkout with its .venv: about 48,000 files, 7 s of CPU per run on a 2-core machine), and refuses
    a tree with a path deeper than 10 folders; submitting the staged folder packs the same FAB
    without either."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in APP_FILES:
        if not (source / name).is_file():
            raise DeploymentError(f"{source}: no {name} (the Flower app to submit is simlab's source tree)")
        data = (source / name).read_bytes()
        if not (dest / name).is_file() or (dest / name).read_bytes() != data:
            atomic_write(dest / name, data)
    return dest


def dial_host(host: str) -> str:
    """The address a process on this machine dials for a server bound to ``host``."""
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def supernode_command(superlink: str, port: int, node_config: Mapping[str, str | int | float | bool], *,
                      ca: str | Path | None, private_key: str | Path | None, executor: str = "warm",
                      poll_s: float | None = None) -> list[str]:
    """The command of one hospital's SuperNode: ``python -m simlab.engine.supernode`` with its options
    (``--executor``, ``--poll-interval``), then ``flower-supernode``'s (no ``ca``: insecure, loopback
    tests only)."""
    cmd = [sys.executable, "-m", "simlab.engine.supernode", "--executor", executor]
    if poll_s is not None:
        cmd += ["--poll-interval", str(poll_s)]
    cmd += ["--superlink", superlink, "--port", str(port), "--node-config", node_config_arg(node_config)]
    cmd += ["--root-certificates", str(ca)] if ca else ["--insecure"]
    if private_key is not None:
        cmd += ["--auth-supernode-private-key", str(private_key)]
    return cmd


class Deployment:
    """Processes, configuration and runs of one deployment, all under ``state_dir``::

        deploy.json   what was started (pid, start time, port, log, command) and how to reach the SuperLink
        flwr-home/    FLWR_HOME: config.toml with the connection "simlab" used by every `flwr` command
        logs/         superlink.log, supernode-<name>.log

    Another process can pick a deployment up from its state directory (``tools/deploy run/down``).
    ``cwd``: the working directory of every process started (default the state directory); ``env``:
    extra environment variables for them (None: unset it); ``detach``: start them in a session of
    their own (a deployment outlives the command that brought it up), else in the caller's process
    group, so that a signal to the group reaches them too.
    """

    def __init__(self, state_dir: str | Path, *, cwd: str | Path | None = None,
                 env: Mapping[str, str | None] | None = None, detach: bool = True):
        self.state_dir = Path(state_dir).resolve()
        self.cwd = Path(cwd).resolve() if cwd is not None else self.state_dir
        self.extra_env = dict(env or {})
        self.detach = detach
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.flwr_home = self.state_dir / "flwr-home"
        self.logs = self.state_dir / "logs"
        self.records: list[ProcRecord] = []
        self.address: str | None = None       # host:port SuperNodes and the CLI dial
        self.root_cert: str | None = None      # CA certificate (None: insecure)
        self.node_ids: dict[str, int] = {}    # key name -> node id assigned at registration
        self.popen: dict[int, subprocess.Popen] = {}
        self._load()

    # ------------------------------------------------------------------ state
    @property
    def state_file(self) -> Path:
        return self.state_dir / "deploy.json"

    def _load(self) -> None:
        if self.state_file.is_file():
            data = json.loads(self.state_file.read_text())
            self.records = [ProcRecord(**r) for r in data.get("processes", [])]
            self.address = data.get("address")
            self.root_cert = data.get("root_cert")
            self.node_ids = {k: int(v) for k, v in data.get("node_ids", {}).items()}

    def _save(self) -> None:
        data = {"address": self.address, "root_cert": self.root_cert, "connection": CONNECTION,
                "flwr_home": str(self.flwr_home), "node_ids": self.node_ids,
                "processes": [asdict(r) for r in self.records]}
        atomic_write(self.state_file, json.dumps(data, indent=2))

    @property
    def env(self) -> dict[str, str]:
        """Environment of every process started here: own FLWR_HOME, no telemetry or update check, and
        this interpreter's bin directory first on PATH (Flower starts flower-superexec, flwr-serverapp
        and flwr-clientapp by name)."""
        env = dict(os.environ)
        bindir = str(Path(sys.executable).parent)
        env.update(FLWR_HOME=str(self.flwr_home), FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1",
                   PATH=bindir + os.pathsep + env.get("PATH", ""), PYTHONUNBUFFERED="1")
        for key, value in self.extra_env.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        return env

    @staticmethod
    def tool(name: str) -> str:
        path = Path(sys.executable).parent / name
        return str(path) if path.exists() else name

    def _spawn(self, role: str, name: str, cmd: list[str], port: int) -> ProcRecord:
        self.logs.mkdir(parents=True, exist_ok=True)
        log_path = self.logs / (f"{role}.log" if role == "superlink" else f"{role}-{name}.log")
        with open(log_path, "ab") as fh:
            fh.write(f"$ {shlex.join(cmd)}\n".encode())
            fh.flush()
            proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=self.env, cwd=self.cwd, start_new_session=self.detach)
        st = proc_stat(proc.pid)
        rec = ProcRecord(role=role, name=name, pid=proc.pid, start_ticks=st[1] if st else -1, port=port,
                         log=str(log_path), cmd=cmd)
        self.popen[proc.pid] = proc
        self.records.append(rec)
        self._save()
        return rec

    def log_tail(self, rec: ProcRecord, lines: int = 20) -> str:
        try:
            return "\n".join(Path(rec.log).read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def returncode(self, rec: ProcRecord) -> int | None:
        """Exit status if this process started it and it has exited; None while it runs (or unknown)."""
        proc = self.popen.get(rec.pid)
        return None if proc is None else proc.poll()

    def wait_exit(self, rec: ProcRecord, timeout: float) -> int | None:
        proc = self.popen.get(rec.pid)
        if proc is not None:
            try:
                return proc.wait(timeout)
            except subprocess.TimeoutExpired:
                return None
        deadline = time.monotonic() + timeout
        while rec.alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        return None

    # ------------------------------------------------------------------ SuperLink
    def start_superlink(self, pki: Pki | None, *, host: str = "127.0.0.1", port: int = 0,
                        public_address: str | None = None, database: str | Path | None = None,
                        simulation: bool = False, timeout: float = 60.0) -> ProcRecord:
        """Start ``flower-superlink`` with TLS (``pki``; None = insecure, loopback tests only) and, with a
        PKI, SuperNode authentication on. ``port`` 0 picks a free one. ``public_address`` (host:port) is
        what SuperNodes and ``flwr`` dial (default: 127.0.0.1:port, or host:port for a specific host);
        it must match a subjectAltName of the server certificate. ``simulation``: Flower's simulation
        runtime (each run's federation config sizes its virtual SuperNodes). Waits until ``/health``
        answers."""
        if any(r.role == "superlink" and r.alive() for r in self.records):
            raise DeploymentError(f"{self.state_dir}: a SuperLink of this deployment is already running")
        port = port or free_ports(1, host)[0]
        cmd = [self.tool("flower-superlink"), "--host", host, "--port", str(port),
               "--disable-runtime-dependency-installation"]
        if pki is not None:
            pki.check()
            cmd += ["--ssl-ca-certfile", str(pki.ca_cert), "--ssl-certfile", str(pki.server_cert),
                    "--ssl-keyfile", str(pki.server_key), "--enable-supernode-auth"]
            self.root_cert = str(pki.ca_cert)
        else:
            cmd += ["--insecure"]
            self.root_cert = None
        if database is not None:
            cmd += ["--database", str(database)]
        if simulation:
            cmd += ["--simulation"]
        self.address = public_address or f"{dial_host(host)}:{port}"
        rec = self._spawn("superlink", "superlink", cmd, port)
        self.write_connection()
        self._wait_health(rec, f"{dial_host(host)}:{port}", timeout)
        return rec

    def restart(self, timeout: float = 60.0) -> list[ProcRecord]:
        """Start again, with its own command, port and log, every recorded process that is no longer
        running (the SuperLink first, then SuperNodes); returns the new records. After a SuperLink
        crash: with its database (``start_superlink(database=...)``; :func:`~simlab.engine.deploy_run.bring_up`
        keeps it in the state directory) the restarted SuperLink still knows the registered SuperNode
        keys and node ids, and the SuperNodes that kept running reconnect by themselves."""
        dead = sorted((r for r in self.records if not r.alive()), key=lambda r: r.role != "superlink")
        started = []
        for old in dead:
            self.records.remove(old)
            self.popen.pop(old.pid, None)
            rec = self._spawn(old.role, old.name, old.cmd, old.port)
            if rec.role == "superlink":
                host = old.cmd[old.cmd.index("--host") + 1] if "--host" in old.cmd else "127.0.0.1"
                self._wait_health(rec, f"{dial_host(host)}:{old.port}", timeout)
            started.append(rec)
        return started

    def _wait_health(self, rec: ProcRecord, address: str, timeout: float) -> None:
        scheme = "https" if self.root_cert else "http"
        ctx = ssl.create_default_context(cafile=self.root_cert) if self.root_cert else None
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if not rec.alive():
                raise DeploymentError(f"flower-superlink exited (status {self.returncode(rec)}) during start-up:\n"
                                      f"{self.log_tail(rec)}")
            try:
                with urllib.request.urlopen(f"{scheme}://{address}/health", timeout=2, context=ctx) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError, ssl.SSLError) as exc:
                last = str(exc)
            time.sleep(0.2)
        raise DeploymentError(f"SuperLink at {address} not healthy within {timeout:.0f} s ({last}):\n{self.log_tail(rec)}")

    def write_connection(self) -> Path:
        """``$FLWR_HOME/config.toml`` with one connection, ``simlab``, the default for every `flwr` call."""
        if self.address is None:
            raise DeploymentError("no SuperLink address known: start the SuperLink first")
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        path = self.flwr_home / "config.toml"
        path.write_text(connection_toml(self.address, self.root_cert))
        self._save()
        return path

    # ------------------------------------------------------------------ flwr CLI
    def flwr(self, *args: str, timeout: float = 120.0, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [self.tool("flwr"), *args]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, env=self.env, cwd=self.state_dir,
                                 timeout=timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as exc:
            raise DeploymentError(f"`{shlex.join(cmd)}` did not finish within {timeout:.0f} s") from exc
        if check and res.returncode != 0:
            raise DeploymentError(f"`{shlex.join(cmd)}` failed (exit {res.returncode}):\n{res.stdout}\n{res.stderr}")
        return res

    def flwr_json(self, *args: str, timeout: float = 120.0) -> dict:
        res = self.flwr(*args, "--format", "json", timeout=timeout, check=False)
        data = last_json(res.stdout)
        if data is None or res.returncode != 0 or data.get("success") is False:
            raise DeploymentError(f"`flwr {' '.join(args)}` failed (exit {res.returncode}): "
                                  f"{(data or {}).get('error-message') or res.stdout.strip()} {res.stderr.strip()}")
        return data

    def register(self, public_key: str | Path, name: str | None = None) -> int:
        """Register a SuperNode public key (OpenSSH EC); returns the node id the SuperLink assigned
        (remembered under ``name``, default the key file's stem, for ``status``)."""
        data = self.flwr_json("supernode", "register", str(public_key), CONNECTION)
        node_id = int(data["node-id"])
        self.node_ids[name or Path(public_key).stem] = node_id
        self._save()
        return node_id

    def supernodes(self) -> list[dict]:
        return list(self.flwr_json("supernode", "list", CONNECTION).get("nodes", []))

    # ------------------------------------------------------------------ SuperNodes
    def start_supernode(self, name: str, node_config: Mapping[str, str | int | float | bool], *,
                        private_key: str | Path | None, port: int = 0, superlink: str | None = None,
                        root_cert: str | Path | None = None, executor: str = "warm",
                        poll_s: float | None = None) -> ProcRecord:
        """Start Flower's SuperNode for one hospital (:mod:`simlab.engine.supernode`). ``node_config``
        becomes ``--node-config`` (e.g. ``{"hospital-id": "h1", "data-dir": "/data/h1"}``); ``port`` (0: a
        free one) is its own runtime API, distinct for every SuperNode on one machine. TLS uses the
        deployment's CA unless ``root_cert`` is given; ``private_key`` enables node authentication (the
        SuperLink must know its public key, otherwise the process exits with status 305). ``executor``:
        ``warm`` (one long-lived ClientApp process runs every message) or ``flower`` (a process per
        message); ``poll_s`` caps the SuperNode's idle waits (None: Flower's 3 s)."""
        superlink = superlink or self.address
        if superlink is None:
            raise DeploymentError("no SuperLink address: start the SuperLink first or pass superlink=host:port")
        port = port or free_ports(1)[0]
        ca = root_cert or self.root_cert
        cmd = supernode_command(superlink, port, node_config, ca=ca, private_key=private_key, executor=executor,
                                poll_s=poll_s)
        return self._spawn("supernode", check_name(name), cmd, port)

    def wait_online(self, n: int, timeout: float = 60.0, watch: Iterable[str] | None = None) -> list[dict]:
        """Wait until at least ``n`` SuperNodes are online; fails early if one of our SuperNodes named in
        ``watch`` (default: every one running when the wait began) exits meanwhile."""
        deadline = time.monotonic() + timeout
        online: list[dict] = []
        names = set(watch) if watch is not None else None
        watched = [r for r in self.records if r.role == "supernode" and r.alive() and (names is None or r.name in names)]
        while time.monotonic() < deadline:
            for rec in watched:
                if not rec.alive():
                    raise DeploymentError(f"SuperNode {rec.name} exited (status {self.returncode(rec)}):\n"
                                          f"{self.log_tail(rec)}")
            online = [nd for nd in self.supernodes() if str(nd.get("status", "")).lower() == "online"]
            if len(online) >= n:
                return online
            time.sleep(0.5)
        raise DeploymentError(f"only {len(online)} of {n} SuperNodes online within {timeout:.0f} s")

    # ------------------------------------------------------------------ runs
    def submit(self, run_config: Mapping[str, str | int | float | bool], app_dir: str | Path | None = None,
               federation_config: Mapping[str, str | int | float | bool] | None = None) -> int:
        """``flwr run APP simlab --run-config FILE.toml [--federation-config FILE.toml]``; returns the run id.

        ``app_dir`` None submits simlab's own app (:func:`stage_app` of the source tree); another
        folder is submitted as it is. ``federation_config``: a simulation SuperLink's federation for
        this run (``num-supernodes``, ``client-resources-num-cpus``, ...). The configs go through TOML
        files (kept under ``run-configs/`` in the state directory) rather than ``key=value``
        arguments: Flower splits those at whitespace and quotes, so values such as a JSON list of
        overrides or a path with spaces would not survive."""
        if app_dir is None:
            app = stage_app(default_app_dir(), self.state_dir / "app")
        else:
            app = Path(app_dir).resolve()
            if not (app / "pyproject.toml").is_file():
                raise DeploymentError(f"{app}: no pyproject.toml (the Flower app to submit); pass the simlab "
                                      f"source tree (tools/deploy run --app DIR)")
        folder = self.state_dir / "run-configs"
        folder.mkdir(parents=True, exist_ok=True)
        stem = f"{time.strftime('%Y%m%d-%H%M%S')}-{time.monotonic_ns()}"
        args = ["run", str(app), CONNECTION, "--run-config", str(folder / f"{stem}.toml")]
        (folder / f"{stem}.toml").write_text(run_config_toml(run_config), encoding="utf-8")
        if federation_config is not None:
            (folder / f"{stem}-federation.toml").write_text(run_config_toml(federation_config), encoding="utf-8")
            args += ["--federation-config", str(folder / f"{stem}-federation.toml")]
        data = self.flwr_json(*args)
        return int(data["run-id"])

    def status(self, run_id: int) -> dict:
        runs = self.flwr_json("ls", CONNECTION, "--run-id", str(run_id)).get("runs", [])
        if not runs:
            raise DeploymentError(f"run {run_id} unknown to the SuperLink")
        return runs[0]

    def wait(self, run_id: int, timeout: float, poll_s: float = 2.0, retries: int = 5) -> dict:
        """Poll until the run is ``finished:*``; on timeout it is stopped and an error raised. Up to
        ``retries`` status queries in a row may fail (a busy SuperLink) before the error is raised."""
        deadline = time.monotonic() + timeout
        failures = 0
        while True:
            try:
                st = self.status(run_id)
                failures = 0
            except DeploymentError:
                failures += 1
                if failures > retries:
                    raise
                time.sleep(poll_s)
                continue
            if str(st.get("status", "")).startswith(FINISHED):
                return st
            if time.monotonic() > deadline:
                self.flwr("stop", str(run_id), CONNECTION, check=False)
                raise DeploymentError(f"run {run_id} still {st.get('status')!r} after {timeout:.0f} s; stopped it")
            time.sleep(poll_s)

    def follow(self, run_id: int, log_path: str | Path, timeout: float, *, poll_s: float = 0.5,
               on_poll: Callable[[], None] | None = None) -> dict:
        """Like :meth:`wait`, but cheap to wait on: one ``flwr log RUN_ID --stream`` process writes the
        run's log to ``log_path`` as it happens and exits when the run is finished (each ``flwr``
        command costs about 2 s of CPU here, so polling ``flwr ls`` every few seconds would take most
        of a core from the run). Its exit status says nothing about the run, so the status is then
        read with :meth:`wait`. ``on_poll`` is called every ``poll_s`` meanwhile (progress)."""
        deadline = time.monotonic() + timeout
        cmd = [self.tool("flwr"), "log", str(run_id), CONNECTION, "--stream"]
        with open(log_path, "wb") as fh:
            proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=self.env, cwd=self.state_dir)
            try:
                while proc.poll() is None and time.monotonic() < deadline:
                    if on_poll is not None:
                        on_poll()
                    time.sleep(poll_s)
            finally:
                if proc.poll() is None:
                    proc.terminate()
                    try:
                        proc.wait(10)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
        if on_poll is not None:
            on_poll()
        left = deadline - time.monotonic()
        if left > 0:  # the stream ended: the run is finished, or the stream broke and polling takes over
            return self.wait(run_id, left)
        st = self.status(run_id)
        if not str(st.get("status", "")).startswith(FINISHED):
            self.flwr("stop", str(run_id), CONNECTION, check=False)
            raise DeploymentError(f"run {run_id} still {st.get('status')!r} after {timeout:.0f} s; stopped it")
        return st

    def run_logs(self, run_id: int) -> str:
        res = self.flwr("log", str(run_id), CONNECTION, "--show", check=False, timeout=60)
        return res.stdout + (res.stderr if res.returncode else "")

    # ------------------------------------------------------------------ stop
    def stop(self, names: Iterable[str] | None = None, grace: float = 10.0) -> None:
        """Stop processes of this deployment (default: all): SuperNodes first, then the SuperLink."""
        wanted = set(names) if names is not None else None
        chosen = [r for r in self.records if wanted is None or r.name in wanted]
        terminate([r for r in chosen if r.role == "supernode"], grace, self.wait_exit)
        terminate([r for r in chosen if r.role == "superlink"], grace, self.wait_exit)
        for r in chosen:
            proc = self.popen.pop(r.pid, None)
            if proc is not None:
                proc.poll()
        self.records = [r for r in self.records if r not in chosen]
        self._save()

    def forget_exited(self) -> None:
        """Drop the records of processes that are no longer running (:meth:`restart` would start them)."""
        self.records = [r for r in self.records if r.alive()]
        self._save()

    def running(self) -> list[ProcRecord]:
        return [r for r in self.records if r.alive()]

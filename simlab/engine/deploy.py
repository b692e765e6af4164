"""A real Flower deployment of a scenario: one SuperLink, one SuperNode per hospital, TLS and node auth.

Simulation (:mod:`simlab.engine.simulation`) runs every hospital as a virtual SuperNode inside one
process. Here each hospital is a ``flower-supernode`` process (on this machine or on the hospital's
own), the server is a ``flower-superlink``, and a run is submitted with ``flwr run`` — the same
ServerApp logic and the same ClientApp, now talking HTTPS. This module manages that on one machine
and collects the results into the run-directory format of ``simlab run``:

* :func:`make_pki` writes a test PKI with ``cryptography`` (a Flower dependency): a CA, a server
  certificate whose subjectAltName lists the names and IPs SuperNodes use to reach the SuperLink
  (always including ``localhost``/``127.0.0.1``: the SuperLink's own ServerApp runtime connects over
  loopback with the same certificate), and one EC P-384 key pair per SuperNode in OpenSSH format,
  the format ``flwr supernode register`` and ``flower-supernode --auth-supernode-private-key`` read.
  Key material comes from the operating system's CSPRNG on purpose: it is the one random choice in
  simlab that must not be reproducible from a seed.
* :class:`Deployment` starts and stops the processes by PID (SuperNodes first, then the SuperLink;
  each with every descendant it spawned: ``flower-superexec``, ``flwr-serverapp``,
  ``flwr-clientapp``), writes the Flower configuration (``$FLWR_HOME/config.toml``, one connection),
  registers SuperNode keys, submits runs and follows them with ``flwr ls --run-id … --format json``
  until ``finished:*`` — never through ``flwr run --stream``, whose exit code is 0 even for a failed
  run. Everything lives in a state directory: ``FLWR_HOME``, process records (``deploy.json``, with
  each process's start time so that a recycled PID is never signalled), logs.
* :func:`run_deployment` runs every arm of a scenario, one Flower run per arm, and then calls
  :func:`simlab.rundir.run_arms`, so the run directory holds exactly what ``simlab run`` writes,
  plus ``flower-<arm>.log`` (the ``flwr log`` of each run).

Ports are chosen at run time by binding port 0 (:func:`free_ports`), so concurrent deployments on
one machine (tests, several users) never collide. Runtime dependency installation is off on both
sides: every machine installs simlab beforehand, and the app submitted (deploy/app) carries only its
pyproject.toml and README.

The command line (``tools/deploy``, ``python -m simlab.engine.deploy``) is documented in
docs/deployment.md; ``--help`` lists every option.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import json
import os
import re
import shlex
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

CONNECTION = "simlab"
FINISHED = "finished"
COMPLETED = "finished:completed"
#: Exit code of a SuperNode whose key the SuperLink does not know ("Failed to activate SuperNode").
EXIT_NODE_NOT_REGISTERED = 305
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class DeploymentError(RuntimeError):
    pass


def default_app_dir() -> Path:
    """deploy/app of the source tree this module belongs to (the Flower app ``flwr run`` submits)."""
    return Path(__file__).resolve().parents[2] / "deploy" / "app"


# ---------------------------------------------------------------------------------------------- PKI
@dataclass(frozen=True)
class Pki:
    """A directory of TLS and SuperNode-authentication files::

        ca.crt              CA certificate: every SuperNode site and every `flwr` CLI user needs it
        ca.key              CA private key: stays with whoever signs server certificates
        server.pem/.key     SuperLink certificate and key: the SuperLink's machine only
        supernodes/<name>   SuperNode private key (OpenSSH, EC P-384): that hospital's machine only
        supernodes/<name>.pub  its public key: registered at the SuperLink with `flwr supernode register`
    """

    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.root / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.root / "server.key"

    def node_key(self, name: str) -> Path:
        return self.root / "supernodes" / name

    def node_pub(self, name: str) -> Path:
        return self.root / "supernodes" / f"{name}.pub"

    def nodes(self) -> list[str]:
        folder = self.root / "supernodes"
        return sorted(p.stem for p in folder.glob("*.pub")) if folder.is_dir() else []

    def check(self) -> None:
        missing = [p for p in (self.ca_cert, self.server_cert, self.server_key) if not p.is_file()]
        if missing:
            raise DeploymentError(f"{self.root}: not a PKI directory (missing {', '.join(p.name for p in missing)}); "
                                  f"create one with `tools/deploy pki {self.root}`")


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _check_name(name: str) -> str:
    if not _NAME.match(name):
        raise DeploymentError(f"{name!r}: SuperNode key names may use letters, digits, '.', '_' and '-'")
    return name


def add_node_keys(pki: Pki, names: Iterable[str], overwrite: bool = False) -> list[Path]:
    """One EC P-384 key pair per name (OpenSSH format); existing keys are kept unless ``overwrite``."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    written = []
    for name in names:
        key_path = pki.node_key(_check_name(name))
        if key_path.exists() and not overwrite:
            continue
        key = ec.generate_private_key(ec.SECP384R1())
        _write_private(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                   serialization.NoEncryption()))
        pki.node_pub(name).write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                                     serialization.PublicFormat.OpenSSH) + b"\n")
        written.append(key_path)
    return written


def make_pki(root: str | Path, nodes: Iterable[str] = (), *, dns_names: Iterable[str] = (),
             ips: Iterable[str] = (), days: int = 365, overwrite: bool = False) -> Pki:
    """Create a CA, a SuperLink certificate and SuperNode keys under ``root``.

    The server certificate's subjectAltName is ``localhost`` and ``127.0.0.1`` plus ``dns_names`` and
    ``ips``: list every name and address SuperNodes and ``flwr`` users will dial (TLS checks the name
    they dial against this list). All keys are EC P-384, signatures ECDSA-SHA384. The CA is marked
    critical ``CA:TRUE, pathlen 0``; the server certificate carries serverAuth, subject and authority
    key identifiers, so strict verifiers (OpenSSL 3, Python ≥ 3.13's X509_STRICT) accept it.
    An existing CA is reused (new server certificates are signed by it) unless ``overwrite``.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    pki = Pki(Path(root).resolve())
    pki.root.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)
    until = now + dt.timedelta(days=days)

    if pki.ca_key.is_file() and pki.ca_cert.is_file() and not overwrite:
        ca_key = serialization.load_pem_private_key(pki.ca_key.read_bytes(), None)
        ca_cert = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    else:
        ca_key = ec.generate_private_key(ec.SECP384R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "simlab deployment CA")])
        ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
                   .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now).not_valid_after(until)
                   .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                   .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                                content_commitment=False, key_encipherment=False,
                                                data_encipherment=False, key_agreement=False,
                                                encipher_only=False, decipher_only=False), critical=True)
                   .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
                   .sign(ca_key, hashes.SHA384()))
        _write_private(pki.ca_key, ca_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                        serialization.NoEncryption()))
        pki.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))

    names = list(dict.fromkeys(["localhost", *dns_names]))
    addrs = list(dict.fromkeys(["127.0.0.1", *ips]))
    san = [x509.DNSName(n) for n in names] + [x509.IPAddress(ipaddress.ip_address(a)) for a in addrs]
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[-1] if dns_names else addrs[-1])]))
            .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(until)
            .add_extension(x509.SubjectAlternativeName(san), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA384()))
    _write_private(pki.server_key, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                     serialization.NoEncryption()))
    pki.server_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    add_node_keys(pki, nodes, overwrite=overwrite)
    return pki


# ----------------------------------------------------------------------------------------- processes
def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct TCP ports that were free a moment ago (bound to port 0 together, then released)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host if host not in ("0.0.0.0", "") else "", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _proc_stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks since boot) of a live process, from /proc."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError, OSError):
        return None
    rest = text[text.rindex(")") + 2:].split()  # fields after "pid (comm)"
    if rest[0] == "Z":
        return None  # a zombie has exited; only its parent's wait() is missing
    return int(rest[1]), int(rest[19])


def _children_map() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            st = _proc_stat(int(entry.name))
            if st is not None:
                out.setdefault(st[0], []).append(int(entry.name))
    return out


def descendants(pid: int, children: Mapping[int, list[int]] | None = None) -> list[int]:
    """Every live process below ``pid`` (children first), from the parent links in /proc."""
    children = _children_map() if children is None else children
    out, todo = [], list(children.get(pid, []))
    while todo:
        p = todo.pop(0)
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def watchers_of(pid: int, since_ticks: int) -> list[int]:
    """Processes started with ``--parent-pid <pid>`` after ``since_ticks``: Flower's helpers (superexec,
    app processes) name the process they serve that way, which finds them after that process is gone
    and they were re-parented."""
    out = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            args = Path(f"/proc/{entry.name}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(a == b"--parent-pid" and b == str(pid).encode() for a, b in zip(args, args[1:])):
            st = _proc_stat(int(entry.name))
            if st is not None and st[1] >= since_ticks:
                out.append(int(entry.name))
    return out


def rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@dataclass
class ProcRecord:
    """One process this deployment started. ``start_ticks`` (from /proc) tells it from a recycled PID."""

    role: str  # "superlink" | "supernode"
    name: str
    pid: int
    start_ticks: int
    port: int
    log: str
    cmd: list[str]

    def alive(self) -> bool:
        st = _proc_stat(self.pid)
        return st is not None and st[1] == self.start_ticks


class ResourceMonitor:
    """Samples wall time and resident memory of a deployment's process trees in a background thread.

    Peak RSS is the largest *sum* over every live process (SuperLink, SuperNodes and all their
    descendants: superexec, ServerApp and ClientApp processes) seen at one sample; short-lived ClientApp
    processes are caught if they live longer than ``interval_s``. Records named in ``exclude`` are
    left out. Shared pages are counted once per
    process, so the sum is an upper bound of the memory the deployment needs.
    """

    def __init__(self, deployment: Deployment, interval_s: float = 0.2, exclude: Iterable[str] = ()):
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
        children = _children_map()
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


def _toml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def run_config_toml(values: Mapping[str, str | int | float | bool]) -> str:
    """A flat TOML document (``key = value`` lines); strings as TOML basic strings (JSON escapes)."""
    lines = []
    for k, v in values.items():
        if not re.match(r"^[A-Za-z0-9_-]+$", k):
            raise DeploymentError(f"run config key {k!r}: letters, digits, '-' and '_' only")
        if isinstance(v, bool):
            lines.append(f"{k} = {'true' if v else 'false'}")
        elif isinstance(v, (int, float)):
            lines.append(f"{k} = {v!r}")
        else:
            lines.append(f"{k} = {_toml_str(str(v))}")
    return "\n".join(lines) + "\n"


def node_config_arg(values: Mapping[str, str | int | float | bool]) -> str:
    """``--node-config`` text: ``key="string" key=3`` (values are TOML; strings must be quoted)."""
    parts = []
    for k, v in values.items():
        if isinstance(v, bool):
            parts.append(f"{k}={'true' if v else 'false'}")
        elif isinstance(v, (int, float)):
            parts.append(f"{k}={v}")
        else:
            if any(c.isspace() for c in str(v)) or '"' in str(v):
                raise DeploymentError(f"node config {k}={v!r}: values may not contain spaces or quotes")
            parts.append(f"{k}={_toml_str(str(v))}")
    return " ".join(parts)


class Deployment:
    """Processes, configuration and runs of one deployment, all under ``state_dir``::

        deploy.json   what was started (pid, start time, port, log, command) and how to reach the SuperLink
        flwr-home/    FLWR_HOME: config.toml with the connection "simlab" used by every `flwr` command
        logs/         superlink.log, supernode-<name>.log

    Another process can pick a deployment up from its state directory (``tools/deploy run/down``).
    """

    def __init__(self, state_dir: str | Path):
        self.state_dir = Path(state_dir).resolve()
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
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2))
        os.replace(tmp, self.state_file)

    @property
    def env(self) -> dict[str, str]:
        """Environment of every process started here: own FLWR_HOME, no telemetry or update check, and
        this interpreter's bin directory first on PATH (Flower starts flower-superexec, flwr-serverapp
        and flwr-clientapp by name)."""
        env = dict(os.environ)
        bindir = str(Path(sys.executable).parent)
        env.update(FLWR_HOME=str(self.flwr_home), FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1",
                   PATH=bindir + os.pathsep + env.get("PATH", ""), PYTHONUNBUFFERED="1")
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
                                    env=self.env, cwd=self.state_dir, start_new_session=True)
        st = _proc_stat(proc.pid)
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
                        timeout: float = 60.0) -> ProcRecord:
        """Start ``flower-superlink`` with TLS (``pki``; None = insecure, loopback tests only) and, with a
        PKI, SuperNode authentication on. ``port`` 0 picks a free one. ``public_address`` (host:port) is
        what SuperNodes and ``flwr`` dial (default: 127.0.0.1:port, or host:port for a specific host);
        it must match a subjectAltName of the server certificate. Waits until ``/health`` answers."""
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
        dial_host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
        self.address = public_address or f"{dial_host}:{port}"
        rec = self._spawn("superlink", "superlink", cmd, port)
        self.write_connection()
        self._wait_health(rec, f"{dial_host}:{port}", timeout)
        return rec

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
        lines = ["[superlink]", f"default = {_toml_str(CONNECTION)}", "", f"[superlink.{CONNECTION}]",
                 f"address = {_toml_str(self.address)}"]
        if self.root_cert:
            lines.append(f"root-certificates = {_toml_str(self.root_cert)}")
        else:
            lines.append("insecure = true")
        path = self.flwr_home / "config.toml"
        path.write_text("\n".join(lines) + "\n")
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
        data = _last_json(res.stdout)
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
                        root_cert: str | Path | None = None) -> ProcRecord:
        """Start ``flower-supernode`` for one hospital. ``node_config`` becomes ``--node-config`` (e.g.
        ``{"hospital-id": "h1", "data-dir": "/data/h1"}``); ``port`` (0: a free one) is its own runtime
        API, distinct for every SuperNode on one machine. TLS uses the deployment's CA unless
        ``root_cert`` is given; ``private_key`` enables node authentication (the SuperLink must know its
        public key, otherwise the process exits with status 305)."""
        superlink = superlink or self.address
        if superlink is None:
            raise DeploymentError("no SuperLink address: start the SuperLink first or pass superlink=host:port")
        port = port or free_ports(1)[0]
        cmd = [self.tool("flower-supernode"), "--superlink", superlink, "--port", str(port),
               "--node-config", node_config_arg(node_config)]
        ca = root_cert or self.root_cert
        cmd += ["--root-certificates", str(ca)] if ca else ["--insecure"]
        if private_key is not None:
            cmd += ["--auth-supernode-private-key", str(private_key)]
        return self._spawn("supernode", _check_name(name), cmd, port)

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
    def submit(self, run_config: Mapping[str, str | int | float | bool], app_dir: str | Path | None = None) -> int:
        """``flwr run APP simlab --run-config FILE.toml``; returns the run id.

        The run config goes through a TOML file (kept under ``run-configs/`` in the state directory)
        rather than ``key=value`` arguments: Flower splits those at whitespace and quotes, so values such
        as a JSON list of overrides or a path with spaces would not survive."""
        app = Path(app_dir or default_app_dir()).resolve()
        if not (app / "pyproject.toml").is_file():
            raise DeploymentError(f"{app}: no pyproject.toml (the Flower app to submit); pass the deploy/app "
                                  f"folder of the simlab source tree (tools/deploy run --app DIR)")
        folder = self.state_dir / "run-configs"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{time.strftime('%Y%m%d-%H%M%S')}-{time.monotonic_ns()}.toml"
        path.write_text(run_config_toml(run_config), encoding="utf-8")
        data = self.flwr_json("run", str(app), CONNECTION, "--run-config", str(path))
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

    def run_logs(self, run_id: int) -> str:
        res = self.flwr("log", str(run_id), CONNECTION, "--show", check=False, timeout=60)
        return res.stdout + (res.stderr if res.returncode else "")

    # ------------------------------------------------------------------ stop
    def _terminate(self, recs: list[ProcRecord], grace: float) -> None:
        children = _children_map()
        trees = {r.pid: descendants(r.pid, children) for r in recs if r.alive()}
        for r in recs:  # helpers of a process that already exited (e.g. a refused SuperNode's superexec)
            trees.setdefault(r.pid, []).extend(p for p in watchers_of(r.pid, r.start_ticks) if p not in trees[r.pid])
        stamps = {p: st[1] for ps in trees.values() for p in ps if (st := _proc_stat(p)) is not None}
        for r in recs:
            if r.alive():
                try:
                    os.kill(r.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + grace
        for r in recs:
            self.wait_exit(r, max(0.0, deadline - time.monotonic()))
            if r.alive():
                try:
                    os.kill(r.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.wait_exit(r, 5.0)
        # Children (superexec, app processes) watch their parent and leave on their own within a few
        # seconds; whatever is left is signalled, by PID, only if it is still the same process.
        left = [p for p, ticks in stamps.items() if (st := _proc_stat(p)) is not None and st[1] == ticks]
        deadline = time.monotonic() + grace
        while left and time.monotonic() < deadline:
            time.sleep(0.1)
            left = [p for p in left if (st := _proc_stat(p)) is not None and st[1] == stamps[p]]
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for p in left:
                st = _proc_stat(p)
                if st is not None and st[1] == stamps[p]:
                    try:
                        os.kill(p, sig)
                    except ProcessLookupError:
                        pass
            time.sleep(0.5 if left else 0)

    def stop(self, names: Iterable[str] | None = None, grace: float = 10.0) -> None:
        """Stop processes of this deployment (default: all): SuperNodes first, then the SuperLink."""
        wanted = set(names) if names is not None else None
        chosen = [r for r in self.records if wanted is None or r.name in wanted]
        self._terminate([r for r in chosen if r.role == "supernode"], grace)
        self._terminate([r for r in chosen if r.role == "superlink"], grace)
        for r in chosen:
            proc = self.popen.pop(r.pid, None)
            if proc is not None:
                proc.poll()
        self.records = [r for r in self.records if r not in chosen]
        self._save()

    def running(self) -> list[ProcRecord]:
        return [r for r in self.records if r.alive()]


def _last_json(text: str) -> dict | None:
    """The JSON object `flwr … --format json` prints (the last line that parses)."""
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


# ------------------------------------------------------------------------------------- orchestration
def bring_up(state: str | Path | Deployment, pki: Pki | None, hospitals: list[str], *, data_dir: str | Path | None = None,
             host: str = "127.0.0.1", port: int = 0, public_address: str | None = None,
             node_config: Mapping[str, Mapping[str, str | int]] | None = None,
             online_timeout: float = 60.0) -> Deployment:
    """SuperLink (TLS + node auth with a PKI) and one registered SuperNode per hospital, all online.

    Each SuperNode's node config is ``hospital-id=<id>``, ``state-dir=<state>/hospital-state/<id>``
    (where the hospital saves method state that must survive a server restart) and, with ``data_dir``,
    ``data-dir=<data_dir>/<id>`` (created); ``node_config[<id>]`` adds or replaces keys. Keys missing
    from the PKI are created.
    ``state`` is a state directory or a :class:`Deployment` on one. On any failure every process started
    so far is stopped before the error is raised.
    """
    dep = state if isinstance(state, Deployment) else Deployment(state)
    try:
        dep.start_superlink(pki, host=host, port=port, public_address=public_address)
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
            dep.start_supernode(hid, cfg, private_key=pki.node_key(hid) if pki else None, port=p)
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


def run_deployment(scenario: str | Path | None, dep: Deployment, *, overrides: list[str] | None = None,
                   seed: int | None = None, out: str | None = None, app_dir: str | Path | None = None,
                   timeout_s: float | None = None, resume_dir: str | Path | None = None) -> tuple[Path, dict]:
    """Run every arm of a scenario on a running deployment (one Flower run per arm, in order) and write
    the run directory as ``simlab run`` does. Must run on the SuperLink's machine: the ServerApp writes
    into the run directory and reads the scenario file by the absolute paths given in the run config.

    ``resume_dir``: continue that run after its ServerApp died (``simlab run --resume``): the scenario
    path (``scenario`` is ignored), overrides and seed come from its run.json, completed arms are kept,
    the others continue from their checkpoints, and Flower runs of this run directory still marked
    running are stopped first.

    A run that ends other than ``finished:completed`` stops everything: ``FAILED`` is written into the
    run directory with the status details, and :class:`DeploymentError` carries the tail of its log.
    """
    from simlab.rundir import clear_failed, read_run_info, resume_inputs, run_arms, start_run_dir, write_run_info
    from simlab.scenario.schema import load_scenario

    if resume_dir is not None:
        run_dir, _, info = resume_inputs(resume_dir)
        scenario, overrides, seed = info["scenario"], info["overrides"], info["seed"]
        clear_failed(run_dir)
        for run_id in info.get("flower_runs", {}).values():
            try:
                stale = not str(dep.status(run_id).get("status", "")).startswith(FINISHED)
            except DeploymentError:  # a SuperLink restarted since does not know it
                stale = False
            if stale:
                dep.flwr("stop", str(run_id), CONNECTION, check=False)
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
        try:
            st = dep.wait(run_id, timeout_s or default_timeout(sc))
        finally:
            (run_dir / f"flower-{arm}.log").write_text(dep.run_logs(run_id), encoding="utf-8")
        if st.get("status") != COMPLETED:
            logs = (run_dir / f"flower-{arm}.log").read_text(encoding="utf-8")
            raise DeploymentError(f"arm {arm}: run {run_id} ended {st.get('status')}: {st.get('status-details', '')}"
                                  f"\n--- end of its log ---\n" + "\n".join(logs.splitlines()[-30:]))

    return run_dir, run_arms(run_dir, loaded, run_arm, resume=resume_dir is not None)


# ---------------------------------------------------------------------------------------- command line
HELP = """\
Run a simlab scenario on a real Flower deployment: one SuperLink, one SuperNode per hospital,
TLS and SuperNode authentication on.

  tools/deploy pki DIR [--node NAME ...] [--dns NAME ...] [--ip ADDR ...]
  tools/deploy up SCENARIO.yaml --pki DIR --state DIR [--hospitals N] [--data-dir DIR] [--host H] [--port P]
  tools/deploy run SCENARIO.yaml --state DIR [--out RUN_DIR] [--set k=v ...] [--seed N] [--timeout S]
  tools/deploy status --state DIR          processes, SuperNodes and runs
  tools/deploy logs RUN_ID --state DIR
  tools/deploy register KEY.pub --state DIR    admit a remote hospital's SuperNode
  tools/deploy node --superlink HOST:PORT --ca ca.crt --key KEY --hospital ID [--data-dir DIR] [--state-dir DIR]
                    [--port P]
  tools/deploy down --state DIR             stop every process `up` started (SuperNodes first)

See docs/deployment.md for a walk-through on one machine and across machines.
"""


def _parser(prog: str = "tools/deploy") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    q = sub.add_parser("pki", help="create a CA, a SuperLink certificate and SuperNode keys")
    q.add_argument("dir")
    q.add_argument("--node", action="append", default=[], help="SuperNode key name (repeatable; usually a hospital id)")
    q.add_argument("--scenario", help="also create a key for every hospital of this scenario")
    q.add_argument("--dns", action="append", default=[], help="extra DNS name of the SuperLink (certificate SAN)")
    q.add_argument("--ip", action="append", default=[], help="extra IP address of the SuperLink (certificate SAN)")
    q.add_argument("--days", type=int, default=365)
    q.add_argument("--overwrite", action="store_true", help="replace an existing CA and keys")

    u = sub.add_parser("up", help="start the SuperLink and local SuperNodes for a scenario's hospitals")
    u.add_argument("scenario")
    u.add_argument("--pki", required=True, help="PKI directory (tools/deploy pki)")
    u.add_argument("--state", required=True, help="state directory of this deployment (FLWR_HOME, logs, PIDs)")
    u.add_argument("--hospitals", type=int, default=None,
                   help="start SuperNodes for the first N hospitals here (default: all; 0: none, all join remotely)")
    u.add_argument("--data-dir", default=None, help="each local SuperNode gets data-dir=<DIR>/<hospital-id>")
    u.add_argument("--host", default="127.0.0.1", help="SuperLink bind address (0.0.0.0 for other machines)")
    u.add_argument("--port", type=int, default=0, help="SuperLink port (default: a free one)")
    u.add_argument("--public-address", default=None, help="host:port SuperNodes dial (must be in the certificate)")
    u.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    r = sub.add_parser("run", help="run every arm of a scenario on the deployment and write a run directory")
    r.add_argument("scenario")
    r.add_argument("--state", required=True)
    r.add_argument("--out", default=None)
    r.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    r.add_argument("--seed", type=int, default=None)
    r.add_argument("--timeout", type=float, default=None, help="seconds per arm (default: from round_timeout_s)")
    r.add_argument("--app", default=None, help="Flower app directory (default: deploy/app)")

    s = sub.add_parser("status", help="processes, SuperNodes and runs of a deployment")
    s.add_argument("--state", required=True)

    lg = sub.add_parser("logs", help="print a run's log")
    lg.add_argument("run_id", type=int)
    lg.add_argument("--state", required=True)

    rg = sub.add_parser("register", help="register a SuperNode public key at the SuperLink")
    rg.add_argument("key")
    rg.add_argument("--state", required=True)

    n = sub.add_parser("node", help="run one hospital's SuperNode in the foreground (hospital site)")
    n.add_argument("--superlink", required=True, help="host:port of the SuperLink")
    n.add_argument("--ca", required=True, help="CA certificate (ca.crt)")
    n.add_argument("--key", required=True, help="this SuperNode's private key")
    n.add_argument("--hospital", required=True, help="hospital id in the scenario")
    n.add_argument("--data-dir", default=None, help="this hospital's data directory")
    n.add_argument("--state-dir", default=None, help="where this hospital saves method state between rounds "
                                                     "(needed by EWC and joint arms)")
    n.add_argument("--port", type=int, default=9094, help="local runtime API port (distinct per SuperNode)")

    d = sub.add_parser("down", help="stop every process of a deployment")
    d.add_argument("--state", required=True)
    return p


def main(argv: list[str] | None = None, prog: str = "tools/deploy") -> int:
    args = _parser(prog).parse_args(argv)
    if args.command is None:
        _parser(prog).print_help()
        return 2
    from simlab.config import ScenarioError

    try:
        return _dispatch(args)
    except ScenarioError as exc:
        print(f"invalid scenario\n{exc}", file=sys.stderr)
        return 2
    except DeploymentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _dispatch(args) -> int:
    from simlab.scenario.schema import load_scenario

    if args.command == "pki":
        nodes = list(args.node)
        if args.scenario:
            nodes += [h.id for h in load_scenario(args.scenario).base.hospitals]
        pki = make_pki(args.dir, nodes, dns_names=args.dns, ips=args.ip, days=args.days, overwrite=args.overwrite)
        print(f"PKI in {pki.root}: ca.crt, server.pem (SAN localhost, 127.0.0.1"
              f"{''.join(', ' + x for x in [*args.dns, *args.ip])}), SuperNode keys: {', '.join(pki.nodes()) or 'none'}")
        return 0
    if args.command == "up":
        sc = load_scenario(args.scenario, args.overrides).base
        ids = [h.id for h in sc.hospitals]
        n = len(ids) if args.hospitals is None else args.hospitals
        if not 0 <= n <= len(ids):
            raise DeploymentError(f"--hospitals {n}: the scenario has {len(ids)} hospitals")
        pki = Pki(Path(args.pki).resolve())
        pki.check()
        dep = bring_up(args.state, pki, ids[:n], data_dir=args.data_dir, host=args.host, port=args.port,
                       public_address=args.public_address)
        print(f"SuperLink at {dep.address} (TLS, SuperNode auth); {n} SuperNode(s) online: {', '.join(ids[:n])}")
        if n < len(ids):
            print(f"waiting for remote hospitals: {', '.join(ids[n:])} (register their keys with `tools/deploy register`)")
        print(f"state: {dep.state_dir}; stop with: tools/deploy down --state {args.state}")
        return 0
    dep = Deployment(args.state)
    if args.command == "run":
        run_dir, summary = run_deployment(args.scenario, dep, overrides=args.overrides, seed=args.seed, out=args.out,
                                          app_dir=args.app, timeout_s=args.timeout)
        for arm, a in summary["arms"].items():
            print(f"{arm}: ACC {a['acc']:.3f}  BWT {a['bwt'] if a['bwt'] is None else round(a['bwt'], 3)}  "
                  f"failed updates {a['failed_updates']}  wall {a['wall_time_s']:.0f} s")
        print(f"run directory: {run_dir}")
        return 0
    if args.command == "status":
        for r in dep.records:
            print(f"{r.role:9s} {r.name:12s} pid {r.pid:7d} port {r.port:5d} {'running' if r.alive() else 'exited'}")
        if any(r.role == "superlink" and r.alive() for r in dep.records):
            names = {str(v): k for k, v in dep.node_ids.items()}
            for nd in dep.supernodes():
                print(f"node {nd.get('node-id')} ({names.get(str(nd.get('node-id')), '?')}): {nd.get('status')}")
            for run in dep.flwr_json("ls", CONNECTION).get("runs", []):
                print(f"run {run['run-id']}: {run['status']}  elapsed {run['elapsed']:.0f} s  "
                      f"{run.get('status-details', '')}")
        return 0
    if args.command == "logs":
        print(dep.flwr("log", str(args.run_id), CONNECTION, "--show", timeout=60).stdout)
        return 0
    if args.command == "register":
        print(f"registered as node {dep.register(Path(args.key).resolve())}")
        return 0
    if args.command == "node":
        cfg: dict[str, str] = {"hospital-id": args.hospital}
        if args.data_dir:
            cfg["data-dir"] = str(Path(args.data_dir).resolve())
        if args.state_dir:
            cfg["state-dir"] = str(Path(args.state_dir).resolve())
        cmd = [Deployment.tool("flower-supernode"), "--superlink", args.superlink, "--port", str(args.port),
               "--root-certificates", str(Path(args.ca).resolve()), "--auth-supernode-private-key",
               str(Path(args.key).resolve()), "--node-config", node_config_arg(cfg)]
        env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1",
                   PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
        print(f"$ {shlex.join(cmd)}", flush=True)
        os.execvpe(cmd[0], cmd, env)
    if args.command == "down":
        n = len(dep.running())
        dep.stop()
        print(f"stopped {n} process(es) of {dep.state_dir}")
        return 0
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())

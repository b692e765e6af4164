"""The deployment command line: ``tools/deploy`` (``python -m simlab.engine.deploy_cli``), documented in
docs/deployment.md; ``--help`` lists every option."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

from simlab.engine.deploy_run import bring_up, run_deployment
from simlab.engine.deployment import Deployment, supernode_command
from simlab.engine.flwr_config import CONNECTION, DeploymentError
from simlab.engine.pki import Pki, make_pki

HELP = """\
Run a simlab scenario on a real Flower deployment: one SuperLink, one SuperNode per hospital,
TLS and SuperNode authentication on.

  tools/deploy pki DIR [--node NAME ...] [--dns NAME ...] [--ip ADDR ...]
  tools/deploy up SCENARIO.yaml --pki DIR --state DIR [--hospitals N] [--data-dir DIR] [--host H] [--port P]
                  [--executor warm|flower] [--poll-interval S]
  tools/deploy run SCENARIO.yaml --state DIR [--out RUN_DIR] [--set k=v ...] [--seed N] [--timeout S]
  tools/deploy status --state DIR          processes, SuperNodes and runs
  tools/deploy logs RUN_ID --state DIR
  tools/deploy register KEY.pub --state DIR    admit a remote hospital's SuperNode
  tools/deploy node --superlink HOST:PORT --ca ca.crt --key KEY --hospital ID [--data-dir DIR] [--state-dir DIR]
                    [--port P] [--executor warm|flower] [--poll-interval S]
  tools/deploy restart --state DIR          start again what died (the SuperLink first, with its database)
  tools/deploy down --state DIR             stop every process `up` started (SuperNodes first)

See docs/deployment.md for a walk-through on one machine and across machines.
"""


def _add_pki(sub) -> None:
    q = sub.add_parser("pki", help="create a CA, a SuperLink certificate and SuperNode keys")
    q.add_argument("dir")
    q.add_argument("--node", action="append", default=[], help="SuperNode key name (repeatable; usually a hospital id)")
    q.add_argument("--scenario", help="also create a key for every hospital of this scenario")
    q.add_argument("--dns", action="append", default=[], help="extra DNS name of the SuperLink (certificate SAN)")
    q.add_argument("--ip", action="append", default=[], help="extra IP address of the SuperLink (certificate SAN)")
    q.add_argument("--days", type=int, default=365)
    q.add_argument("--overwrite", action="store_true", help="replace an existing CA and keys")


def _add_up_and_run(sub) -> None:
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
    _add_node_runtime(u)

    r = sub.add_parser("run", help="run every arm of a scenario on the deployment and write a run directory")
    r.add_argument("scenario")
    r.add_argument("--state", required=True)
    r.add_argument("--out", default=None)
    r.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    r.add_argument("--seed", type=int, default=None)
    r.add_argument("--timeout", type=float, default=None, help="seconds per arm (default: from round_timeout_s)")
    r.add_argument("--app", default=None, help="Flower app directory (default: simlab's own, from its source tree)")


def _add_node_runtime(p) -> None:
    p.add_argument("--executor", choices=("warm", "flower"), default="warm",
                   help="warm: one long-lived ClientApp process per SuperNode runs every message (default); "
                        "flower: Flower's flwr-clientapp process per message")
    p.add_argument("--poll-interval", type=float, default=None, metavar="S",
                   help="cap each SuperNode's idle waits at S seconds (default: Flower's 3 s between empty pulls)")


def _add_admin(sub) -> None:
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
                                                     "(needed by EWC and replay arms)")
    n.add_argument("--port", type=int, default=9094, help="local runtime API port (distinct per SuperNode)")
    _add_node_runtime(n)

    rs = sub.add_parser("restart", help="start again every process of a deployment that died (SuperLink first)")
    rs.add_argument("--state", required=True)

    d = sub.add_parser("down", help="stop every process of a deployment")
    d.add_argument("--state", required=True)


def _parser(prog: str = "tools/deploy") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    _add_pki(sub)
    _add_up_and_run(sub)
    _add_admin(sub)
    return p


def _pki(args) -> int:
    from simlab.scenario.schema import load_scenario

    nodes = list(args.node)
    if args.scenario:
        nodes += [h.id for h in load_scenario(args.scenario).base.hospitals]
    pki = make_pki(args.dir, nodes, dns_names=args.dns, ips=args.ip, days=args.days, overwrite=args.overwrite)
    print(f"PKI in {pki.root}: ca.crt, server.pem (SAN localhost, 127.0.0.1"
          f"{''.join(', ' + x for x in [*args.dns, *args.ip])}), SuperNode keys: {', '.join(pki.nodes()) or 'none'}")
    return 0


def _up(args) -> int:
    from simlab.scenario.schema import load_scenario

    sc = load_scenario(args.scenario, args.overrides).base
    ids = [h.id for h in sc.hospitals]
    n = len(ids) if args.hospitals is None else args.hospitals
    if not 0 <= n <= len(ids):
        raise DeploymentError(f"--hospitals {n}: the scenario has {len(ids)} hospitals")
    pki = Pki(Path(args.pki).resolve())
    pki.check()
    dep = bring_up(args.state, pki, ids[:n], data_dir=args.data_dir, host=args.host, port=args.port,
                   public_address=args.public_address, executor=args.executor, poll_s=args.poll_interval)
    print(f"SuperLink at {dep.address} (TLS, SuperNode auth); {n} SuperNode(s) online: {', '.join(ids[:n])}")
    if n < len(ids):
        print(f"waiting for remote hospitals: {', '.join(ids[n:])} (register their keys with `tools/deploy register`)")
    print(f"state: {dep.state_dir}; stop with: tools/deploy down --state {args.state}")
    return 0


def _run(args) -> int:
    run_dir, summary = run_deployment(args.scenario, Deployment(args.state), overrides=args.overrides, seed=args.seed,
                                      out=args.out, app_dir=args.app, timeout_s=args.timeout)
    for arm, a in summary["arms"].items():
        print(f"{arm}: ACC {a['acc']:.3f}  BWT {a['bwt'] if a['bwt'] is None else round(a['bwt'], 3)}  "
              f"failed updates {a['failed_updates']}  wall {a['wall_time_s']:.0f} s")
    print(f"run directory: {run_dir}")
    return 0


def _status(args) -> int:
    dep = Deployment(args.state)
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


def _logs(args) -> int:
    print(Deployment(args.state).flwr("log", str(args.run_id), CONNECTION, "--show", timeout=60).stdout)
    return 0


def _register(args) -> int:
    print(f"registered as node {Deployment(args.state).register(Path(args.key).resolve())}")
    return 0


def _node(args) -> int:
    cfg: dict[str, str] = {"hospital-id": args.hospital}
    if args.data_dir:
        cfg["data-dir"] = str(Path(args.data_dir).resolve())
    if args.state_dir:
        cfg["state-dir"] = str(Path(args.state_dir).resolve())
    cmd = supernode_command(args.superlink, args.port, cfg, ca=Path(args.ca).resolve(),
                            private_key=Path(args.key).resolve(), executor=args.executor, poll_s=args.poll_interval)
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1",
               PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
    print(f"$ {shlex.join(cmd)}", flush=True)
    os.execve(cmd[0], cmd, env)
    return 1  # not reached: the SuperNode replaces this process


def _restart(args) -> int:
    dep = Deployment(args.state)
    started = dep.restart()
    print(f"started again: {', '.join(f'{r.role} {r.name}' for r in started) or 'nothing (every process runs)'}")
    return 0


def _down(args) -> int:
    dep = Deployment(args.state)
    n = len(dep.running())
    dep.stop()
    print(f"stopped {n} process(es) of {dep.state_dir}")
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "pki": _pki, "up": _up, "run": _run, "status": _status, "logs": _logs, "register": _register, "node": _node,
    "restart": _restart, "down": _down,
}


def main(argv: list[str] | None = None, prog: str = "tools/deploy") -> int:
    args = _parser(prog).parse_args(argv)
    if args.command is None:
        _parser(prog).print_help()
        return 2
    from simlab.config import ScenarioError
    from simlab.rundir import RunDirError

    try:
        return COMMANDS[args.command](args)
    except ScenarioError as exc:
        print(f"invalid scenario\n{exc}", file=sys.stderr)
        return 2
    except RunDirError as exc:  # --out that cannot be created, a run directory that cannot be resumed
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except DeploymentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

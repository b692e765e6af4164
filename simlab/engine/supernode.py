"""A hospital's SuperNode as simlab runs it: Flower's ``flower-supernode`` with a warm ClientApp worker
and (optionally) shorter idle waits. ``python -m simlab.engine.supernode [--executor warm|flower]
[--poll-interval S] FLOWER-SUPERNODE-ARGS...``; :meth:`simlab.engine.deployment.Deployment.start_supernode`
and ``tools/deploy node`` start it.

``--executor warm`` (default) starts the SuperNode with ``--isolation process`` and, as its child, one
:mod:`simlab.engine.clientapp_worker` that runs every message of this node in one long-lived process
(which exits when the SuperNode does). ``flower`` is Flower's own: a ``flwr-clientapp`` process per
message.

``--poll-interval S`` caps the SuperNode's idle waits at S seconds. Flower 1.41's SuperNode
(``flwr/supernode/start_client_internal.py``) sleeps a fixed 3 s after every pull that found no message
and polls the ClientApp's reply every 0.5 s; a round has at least two phases (train, evaluate), each
waiting on average half a poll per hospital before it starts. The cap replaces ``time`` in that module
only (no other module's waits change, e.g. retries and heartbeats) and trades it for more requests: a
SuperNode polling every S seconds sends 1/S pull requests per second to the SuperLink. The same option
shortens the back-off of that module's waits for a message's arrays
(:mod:`simlab.federated.object_pulls`). Without the option Flower's waits stay as they are. ``tests/test_deploy.py`` checks that the waits it caps are still
the ones Flower 1.41 has, so an upgrade that changes them is noticed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

CAPPED_MODULE = "flwr.supernode.start_client_internal"
"""The module whose waits ``--poll-interval`` caps."""

ISOLATION_FLAG = "--isolation"


class CappedTime:
    """The :mod:`time` module, but ``sleep`` waits at most ``cap`` seconds."""

    def __init__(self, cap: float):
        self.cap = float(cap)

    def sleep(self, seconds: float) -> None:
        time.sleep(min(float(seconds), self.cap))

    def __getattr__(self, name: str):
        return getattr(time, name)


def cap_idle_waits(cap: float) -> None:
    """Every ``time.sleep`` of Flower's SuperNode loop (:data:`CAPPED_MODULE`) waits at most ``cap`` s,
    and it waits for a message's arrays with a short back-off (:mod:`simlab.federated.object_pulls`)."""
    import importlib

    from simlab.federated.object_pulls import quick_object_pulls

    module = importlib.import_module(CAPPED_MODULE)
    module.time = CappedTime(cap)
    quick_object_pulls(module)


def runtime_api_address(flower_args: list[str]) -> str:
    """Where this SuperNode serves its runtime API (``--host``/``--port``, Flower's defaults otherwise),
    as a local worker dials it."""
    from flwr.supercore.constant import SUPERNODE_UVICORN_DEFAULT_PORT

    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=SUPERNODE_UVICORN_DEFAULT_PORT)
    args, _ = p.parse_known_args(flower_args)
    host = "127.0.0.1" if args.host in ("0.0.0.0", "::", "") else args.host
    return f"{host}:{args.port}"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m simlab.engine.supernode", add_help=False,
                                description="flower-supernode with a warm ClientApp worker; other arguments go "
                                            "to flower-supernode")
    p.add_argument("--executor", choices=("warm", "flower"), default="warm",
                   help="warm: one long-lived ClientApp process for every message (default); flower: Flower's "
                        "flwr-clientapp process per message")
    p.add_argument("--poll-interval", type=float, default=None,
                   help="cap the SuperNode's idle waits (Flower: 3 s between empty pulls) at this many seconds")
    return p


def main(argv: list[str] | None = None) -> int:
    own, flower_args = _parser().parse_known_args(sys.argv[1:] if argv is None else argv)
    if own.poll_interval is not None:
        if not 0.01 <= own.poll_interval <= 60:
            print(f"--poll-interval {own.poll_interval}: expected 0.01 to 60 seconds", file=sys.stderr)
            return 2
        cap_idle_waits(own.poll_interval)
    if own.executor == "warm":
        if ISOLATION_FLAG in flower_args:
            print(f"{ISOLATION_FLAG} is set by --executor (warm: process isolation with simlab's worker; "
                  f"flower: Flower's subprocess isolation)", file=sys.stderr)
            return 2
        flower_args = [*flower_args, ISOLATION_FLAG, "process"]
        subprocess.Popen([sys.executable, "-m", "simlab.engine.clientapp_worker", "--runtime-api-address",
                          runtime_api_address(flower_args), "--parent-pid", str(os.getpid())],
                         stdin=subprocess.DEVNULL)
    from flwr.supernode.cli.flower_supernode import flower_supernode

    sys.argv = ["flower-supernode", *flower_args]  # Flower names its process and exit event by argv[0]
    flower_supernode()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

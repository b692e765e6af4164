"""A hospital's ClientApp executor that stays warm: one process per SuperNode runs every message.

Flower 1.41 runs a deployment's ClientApp in a fresh ``flwr-clientapp`` process for every message a
SuperNode receives (``--isolation subprocess``: its ``flower-superexec`` polls the SuperNode's runtime
API and launches one process per task). For simlab that process imports torch, MONAI and simlab
(about 8 s of CPU on a 2-core machine; MONAI's ``__init__`` loads every submodule, so lazy imports
would save nothing) and rebuilds the hospital's stream, for every phase of every round. Flower's warm
executor pools exist only for Kubernetes and for agent, model and connector tasks.

This worker takes the executor's place for a SuperNode started with ``--isolation process``
(:mod:`simlab.engine.supernode` starts both): it acquires tasks from the SuperNode's runtime API as
``flower-superexec`` does, and runs each one *in this process* the way ``flwr-clientapp`` does
(:func:`flwr.supernode.runtime.run_clientapp.run_clientapp`, whose steps it reuses): task heartbeat,
pull the message, context, run and FAB; install the FAB; load the ClientApp it names; call it; push the
reply (an :class:`~flwr.app.Error` reply with Flower's error code and reason when the ClientApp raises);
push the task's final status and the node's context. What stays between messages is what a process
caches by itself: the imports, and simlab's hospitals keyed by their whole task
(:func:`simlab.federated.client_app._hospital`). Flower's own ``flwr-clientapp`` ends with
``flwr_exit``, which arms a forced ``os._exit`` and replaces signal handlers, so it cannot run twice in
one process; hence the loop below.

Each task runs in a thread of its own, and only the ClientApp call itself holds a lock, as Flower's
executor runs each task in a process of its own: a task can wait for its message forever. Flower 1.41's
SuperNode stores a message before it has pulled the message's arrays from the SuperLink, and when the
run stops meanwhile it gives up on them (its ``RunNotRunningException`` is a ``BaseException``, raised
past the handler that would delete the message), leaving a task whose message never completes; a
ClientApp process waits up to 2 hours for it. Serving tasks one after the other would block the node
behind it (seen when a ServerApp is stopped during a round). For the same reason a task whose
heartbeat the SuperNode refuses is given up alone (:func:`task_heartbeat`), where Flower's heartbeat
ends the whole process with a SIGINT. This worker asks for a task as soon as the SuperNode has one,
usually while the SuperNode is still pulling the message's arrays, so it waits for them with a short
back-off (:mod:`simlab.federated.object_pulls`).

Run by hand (the SuperNode's runtime API must be reachable; it listens on 127.0.0.1:9094 by default)::

    python -m simlab.engine.clientapp_worker --runtime-api-address 127.0.0.1:9094 [--parent-pid PID]
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from collections.abc import Callable

import httpx
from flwr.app import Message
from flwr.app.error import Error
from flwr.cli.install import install_from_fab
from flwr.clientapp.client_app import LoadClientAppError
from flwr.clientapp.utils import get_load_client_app_fn
from flwr.common.config import get_project_dir
from flwr.common.constant import ErrorCode, SubStatus
from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
from flwr.supercore.app_utils import start_parent_process_monitor
from flwr.supercore.constant import TaskType
from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest  # pylint: disable=E0611
from flwr.supercore.heartbeat import HeartbeatSender
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime import run_clientapp as flower_clientapp
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

from simlab.federated.object_pulls import quick_object_pulls

log = logging.getLogger("simlab.clientapp_worker")


def _client(address: str, component: str, token: str | None = None) -> RuntimeHttpClient:
    interceptors = [RuntimeVersionHttpInterceptor(component_name=component)]
    if token is not None:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    return RuntimeHttpClient.from_server_address(server_address=address, insecure=True, root_certificates=None,
                                                 interceptors=interceptors,
                                                 retry_invoker=make_simple_http_retry_invoker())


def task_heartbeat(client: RuntimeHttpClient, lost: threading.Event) -> Callable[[], bool]:
    """Flower's task heartbeat (``make_task_heartbeat_fn_http``) for a task that shares its process:
    where Flower ends the ClientApp process when the SuperNode no longer knows the task (its run was
    stopped, or the SuperNode restarted), this sets ``lost`` and stops beating; the worker goes on."""
    request = SendTaskHeartbeatRequest()

    def beat() -> bool:
        if lost.is_set():
            return True
        try:
            res = client.SendTaskHeartbeat(request)
        except httpx.TransportError:
            return False  # retried, as Flower does
        except httpx.HTTPStatusError as err:
            if err.response.status_code in (httpx.codes.SERVICE_UNAVAILABLE, httpx.codes.GATEWAY_TIMEOUT):
                return False
            res = None  # e.g. 401: the task's token is no longer valid
        if res is None or not res.success:
            lost.set()
            log.info("the SuperNode no longer knows this task (its run stopped?); its results will be dropped")
        return True

    return beat


def _failure(ex: Exception) -> tuple[int, str]:
    """Flower's error code and reason for an exception of the ClientApp (as ``run_clientapp`` gives)."""
    if isinstance(ex, LoadClientAppError):
        return ErrorCode.LOAD_CLIENT_APP_EXCEPTION, "An exception was raised when attempting to load `ClientApp`"
    return ErrorCode.CLIENT_APP_RAISED_EXCEPTION, str(type(ex)) + ":<'" + str(ex) + "'>"


class Worker:
    """Acquires the tasks of one SuperNode until :meth:`stop`; runs each in a thread, the ClientApp
    calls one at a time."""

    def __init__(self, runtime_api_address: str, poll_s: float = 0.1):
        self.address = runtime_api_address
        self.poll_s = poll_s
        self.tasks_run = 0
        self._stop = threading.Event()
        self._app_lock = threading.Lock()
        self._installed: set[str] = set()
        self._load = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)

    def stop(self) -> None:
        self._stop.set()

    def serve(self) -> None:
        acquirer = _client(self.address, "SuperExec")
        request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
        try:
            while not self._stop.is_set():
                res = acquirer.AcquireTask(request)
                if res.HasField("task") and res.token:
                    threading.Thread(target=self.run_task, args=(res.token,), daemon=True,
                                     name=f"task-{res.task.task_id}").start()
                else:
                    self._stop.wait(self.poll_s)
        finally:
            acquirer.close()

    def run_task(self, token: str) -> None:
        """One task, as ``flwr-clientapp --token TOKEN`` would run it (without exiting afterwards);
        every exception is reported to the SuperNode, as there."""
        client = _client(self.address, "flwr-clientapp", token)
        heartbeat = HeartbeatSender(task_heartbeat(client, threading.Event()))
        heartbeat.start()
        message = context = reply = None
        status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
        try:
            message, context, run, fab = pull_task_input(client)
            with self._app_lock:
                if fab.hash_str not in self._installed or not get_project_dir(run.fab_id, run.fab_version,
                                                                              fab.hash_str).is_dir():
                    install_from_fab(fab.content, skip_prompt=True)
                    self._installed.add(fab.hash_str)
                reply = self._load(run.fab_id, run.fab_version, fab.hash_str)(message=message, context=context)
            status, details = SubStatus.COMPLETED, ""
        except Exception as ex:  # pylint: disable=broad-exception-caught  # reported to the server, as Flower does
            log.error("ClientApp raised an exception", exc_info=ex)
            code, details = _failure(ex)
            if message is not None:
                reply = Message(Error(code=code, reason=details), reply_to=message)
        finally:
            try:
                if reply is not None and context is not None:
                    push_message(client, reply, context)
            except Exception as ex:  # pylint: disable=broad-exception-caught
                log.error("failed to push the reply", exc_info=ex)
            push_task_output(client=client, context=context, sub_status=status, details=details)
            heartbeat.stop()
            client.close()
            with self._app_lock:
                self.tasks_run += 1
                log.info("task %d done: %s%s", self.tasks_run, status, f" ({details})" if details else "")


def _stop_on(signals: tuple[int, ...], stop: Callable[[], None]) -> None:
    for sig in signals:
        signal.signal(sig, lambda *_: stop())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m simlab.engine.clientapp_worker", description=__doc__.split("\n")[0])
    p.add_argument("--runtime-api-address", default="127.0.0.1:9094", help="the SuperNode's runtime API (host:port)")
    p.add_argument("--poll-interval", type=float, default=0.1, help="seconds between task requests when idle")
    p.add_argument("--parent-pid", type=int, default=None, help="exit when this process (the SuperNode) exits")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request (ten a second when idle)
    import simlab.federated.flower_app  # noqa: F401  # the imports a message would wait for, paid now

    quick_object_pulls(flower_clientapp)
    worker = Worker(args.runtime_api_address, args.poll_interval)
    _stop_on((signal.SIGINT, signal.SIGTERM), worker.stop)
    if args.parent_pid is not None:
        start_parent_process_monitor(args.parent_pid)  # raises SIGINT here when the SuperNode is gone
    log.info("serving the ClientApp of the SuperNode at %s", args.runtime_api_address)
    worker.serve()
    log.info("stopped after %d task(s)", worker.tasks_run)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

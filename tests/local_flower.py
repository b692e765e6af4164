"""simlab's ServerApp and ClientApp run in this process, without Flower's engine: a :class:`LocalGrid`
hands every message the ServerApp pushes straight to the ClientApp of the node it is addressed to (one
Flower ``Context`` per node, kept across messages as a SuperNode keeps it) and returns the reply on
the next pull. An exception in the ClientApp becomes an error reply, as Flower's runtime makes it.

For tests that must see every file a run writes from one process (the ClientApp's hospital state
included, which Ray actors would write from other processes), and for the ClientApp's functions with
real Flower messages. No Ray, no SuperLink: these tests belong to the fast tier.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from flwr.app import Context, Error, Message, RecordDict


@contextmanager
def task_identity() -> Iterator[None]:
    """Flower's ``Message`` needs the task identity its runtime sets; here, for the duration of a block."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id = TaskIdentity.run_id = TaskIdentity.node_id = 1
    try:
        yield
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def node_context(node_id: int, node_config: dict) -> Context:
    return Context(run_id=1, node_id=node_id, node_config=dict(node_config), state=RecordDict(), run_config={})


class LocalGrid:
    """The part of Flower's ``Grid`` simlab's ServerApp uses (node ids, push, pull), with the ClientApp
    ``client_app`` answering for nodes ``1001, 1002, ...`` whose node configs are ``node_configs``."""

    def __init__(self, client_app, node_configs: list[dict]):
        self.app = client_app
        self.contexts = {1001 + i: node_context(1001 + i, cfg) for i, cfg in enumerate(node_configs)}
        self.sent: list[Message] = []
        self._replies: dict[str, Message] = {}

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            self.sent.append(msg)
            try:
                reply = self.app(msg, self.contexts[msg.metadata.dst_node_id])
            except Exception as exc:  # what Flower's runtime does with a ClientApp that raises
                reply = Message(Error(code=0, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg)
            self._replies[msg.metadata.message_id] = reply
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]


def run_locally(server_app, client_app, num_supernodes: int, backend_config: dict | None = None, **_) -> None:
    """A stand-in for ``flwr.simulation.run_simulation``: the same apps, the hospitals as virtual nodes
    with ``partition-id`` i, everything in this process."""
    grid = LocalGrid(client_app, [{"partition-id": i, "num-partitions": num_supernodes}
                                  for i in range(num_supernodes)])
    with task_identity():
        server_app(grid, node_context(0, {}))

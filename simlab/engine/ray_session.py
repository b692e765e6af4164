"""One Ray start and one pool of ClientApp actors for every arm (and seed) a process simulates.

Flower's simulation engine starts Ray when it is not running, builds a pool of ``ClientAppActor``
processes (as many as the client resources fit) and, when the run ends, kills the actors and shuts
Ray down (``RayBackend.terminate``). Each arm of a scenario is one Flower run, so a six-arm scenario
paid that start six times: about 5 s for ``ray.init`` and 6–7 s per actor to import torch, MONAI and
simlab on a 2-core machine, against 2–3 s per round for a tiny scenario. Flower 1.41 has no option to
keep either (``terminate`` shuts Ray down unconditionally), so :class:`SharedRayBackend` is Flower's
``RayBackend`` with two changes: a pool whose actors are all idle when a run ends is kept for the next
run that asks for the same client resources, and Ray keeps running. What an actor carries between runs
is only what a process caches by itself (imported modules; the ClientApp's hospitals, keyed by their
whole task): the node state (``Context``) of every run is the engine's, created per run. A pool that
ends a run with work in flight (a failed run) is killed as before.

:func:`shared_ray` installs the backend for the duration of one ``run_simulation`` call (Flower looks
the class up in its module at every run); :func:`shutdown` stops the actors and Ray, and runs at
interpreter exit. Ray is started again when a run asks for other start arguments (another GPU count,
another cluster address).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
from collections.abc import Iterator
from typing import Any

import ray
from flwr.server.superlink.fleet.vce.backend import raybackend
from flwr.simulation.ray_transport.ray_actor import BasicActorPool

from simlab import interrupt

log = logging.getLogger("simlab")

_pool: tuple[str, BasicActorPool] | None = None  # (client resources as JSON, the idle pool)
_init_args: dict[str, Any] | None = None  # what Ray was started with by this process


def _resources_key(resources: dict[str, Any]) -> str:
    return json.dumps(resources, sort_keys=True)


def _idle(pool: BasicActorPool) -> bool:
    return not pool._future_to_actor and len(pool.pool) == pool.num_actors  # noqa: SLF001 (Flower 1.41 pool)


def _alive(pool: BasicActorPool) -> bool:
    """Every actor of the pool answers (an actor that died with its run would fail the next one)."""
    try:
        ray.get([actor.__ray_ready__.remote() for actor in pool.pool], timeout=60)
        return True
    except Exception as exc:  # noqa: BLE001 (any Ray error: the pool is rebuilt)
        log.info("kept Ray actors unusable (%s): starting new ones", exc)
        return False


def _drop_pool() -> None:
    global _pool
    if _pool is not None:
        _pool[1].terminate_all_actors()
        _pool = None


class SharedRayBackend(raybackend.RayBackend):
    """Flower's Ray backend, keeping Ray and an idle actor pool for the next run (module docstring)."""

    def init_ray(self, backend_config) -> None:
        super().init_ray(backend_config)
        interrupt.reinstall()  # ray.init replaced the driver's SIGTERM handler with sys.exit

    def build(self, app_fn) -> None:
        global _pool
        key = _resources_key(self.client_resources)
        if _pool is not None and _pool[0] == key and _idle(_pool[1]) and _alive(_pool[1]):
            self.pool, self.app_fn = _pool[1], app_fn
            _pool = None
            return
        _drop_pool()  # another resource shape: its actors would hold the CPUs the new pool needs
        super().build(app_fn)

    def terminate(self) -> None:
        global _pool
        if self.pool is not None and self.pool.num_actors and _idle(self.pool):
            _drop_pool()
            _pool = (_resources_key(self.client_resources), self.pool)
        elif self.pool is not None:
            self.pool.terminate_all_actors()
        self.pool = None


def shutdown() -> None:
    """Stop the kept actors and Ray (this process's connection to it, for a cluster started elsewhere)."""
    global _init_args
    _drop_pool()
    if ray.is_initialized():
        ray.shutdown()
    _init_args = None


atexit.register(shutdown)


@contextlib.contextmanager
def shared_ray(init_args: dict[str, Any]) -> Iterator[None]:
    """Within the block, Flower's simulation engine uses :class:`SharedRayBackend`. Ray is started by
    Flower with ``init_args`` (``ray.init`` keywords) if it is not running; if it runs with other ones,
    it is stopped first."""
    global _init_args
    if ray.is_initialized() and _init_args != init_args:
        log.info("Ray restarted: the run asks for other start arguments")
        shutdown()
    _init_args = dict(init_args)
    original = raybackend.RayBackend
    raybackend.RayBackend = SharedRayBackend
    try:
        yield
    finally:
        raybackend.RayBackend = original

"""Per-call timing of a hospital's work, for the benchmarks (tools/bench_scale.py, tools/bench_harness.py).

A benchmark puts this folder on PYTHONPATH and names a directory in ``SIMLAB_BENCH_TRACE``; every
Python process started with that environment (the benchmark's own and the Ray workers that run the
virtual hospitals) then wraps, when it first imports :mod:`simlab.hospital`, the hospital's work:
``setup`` (building a :class:`Hospital`), ``train``, ``score`` (ODEx window scores), ``eval``
(:meth:`Hospital.evaluate` and :meth:`Hospital.evaluate_pool`). Each call appends one JSON row
``{"k": kind, "h": hospital, "t": round or null, "a": start, "b": end}`` (wall-clock seconds, so
that rows of different processes line up) to ``<dir>/<pid>.jsonl``. With ``SIMLAB_BENCH_PROFILE``
set as well, the thread of the first hospital call is profiled (cProfile) from then on: whatever
that process runs there afterwards (Ray's task loop, the ClientApp, the codec, the hospital),
written to ``<dir>/<pid>.prof`` after every hospital call. Without the variables nothing is
imported or changed.
"""

import os
import sys

_DIR = os.environ.get("SIMLAB_BENCH_TRACE")


class _Recorder:
    """Writes the rows; profiles the thread of the first hospital call when asked to."""

    def __init__(self, directory: str):
        import threading

        self.dir, self.lock = directory, threading.Lock()
        self.out = open(os.path.join(directory, f"{os.getpid()}.jsonl"), "a", buffering=1)
        self.profiling, self.prof, self.depth = bool(os.environ.get("SIMLAB_BENCH_PROFILE")), None, 0

    def enter(self) -> None:
        if self.profiling and self.prof is None:
            import cProfile

            self.prof = cProfile.Profile()
            self.prof.enable()
        self.depth += 1

    def leave(self, row: dict) -> None:
        import json

        self.depth -= 1
        with self.lock:
            self.out.write(json.dumps(row) + "\n")
        if self.prof is not None and self.depth == 0:
            self.prof.dump_stats(os.path.join(self.dir, f"{os.getpid()}.prof"))  # this disables it
            self.prof.enable()

    def timed(self, kind, fn, round_arg=None):
        import functools
        import time

        @functools.wraps(fn)
        def wrapper(obj, *args, **kwargs):
            self.enter()
            a = time.time()
            try:
                return fn(obj, *args, **kwargs)
            finally:
                t = args[round_arg] if round_arg is not None and len(args) > round_arg else None
                task = args[0] if args else None  # Hospital.__init__(task): the id is set once it ran
                hid = getattr(obj, "id", None) or getattr(getattr(task, "hospital", None), "id", None)
                self.leave({"k": kind, "h": hid, "t": t, "a": a, "b": time.time()})
        return wrapper

    def patch(self, module) -> None:
        cls = module.Hospital
        cls.__init__ = self.timed("setup", cls.__init__)
        cls.train = self.timed("train", cls.train, round_arg=1)
        cls.window_decision = self.timed("score", cls.window_decision, round_arg=1)
        cls.evaluate = self.timed("eval", cls.evaluate)
        cls.evaluate_pool = self.timed("eval", cls.evaluate_pool)


def _install(recorder: _Recorder) -> None:
    """Patch :mod:`simlab.hospital` right after it is first executed in this process."""
    import importlib.abc
    import importlib.util

    class Hook(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name != "simlab.hospital":
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            run = spec.loader.exec_module

            def exec_and_patch(module):
                run(module)
                recorder.patch(module)

            spec.loader.exec_module = exec_and_patch
            return spec

    sys.meta_path.insert(0, Hook())


if _DIR and os.path.isdir(_DIR):
    _install(_Recorder(_DIR))

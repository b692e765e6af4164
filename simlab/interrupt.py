"""One Ctrl-C (SIGINT) or SIGTERM stops a run cleanly, and the run can be resumed.

Python turns SIGINT into ``KeyboardInterrupt`` in the main thread only. In a simulation the main
thread runs Flower's engine while the ServerApp runs in a thread of its own that waits for replies
(non-daemon: the interpreter waits for it at exit), so a bare Ctrl-C stopped the engine and left the
process waiting on a ServerApp whose replies would never come; SIGTERM had no handler at all.
:func:`handle_signals` makes the first of either signal (1) set :data:`STOP`, which every wait of the
ServerApp checks (:func:`check`, a few times a second), and (2) raise :class:`Interrupted` in the
main thread. Nothing is cut short mid-write: the ServerApp stops only where it waits, the checkpoint
of the last completed round stays as it is on disk, the run directory gets ``FAILED`` naming the
signal, and ``simlab run --resume RUN_DIR`` continues from that round. A second signal while
stopping is Python's default (``KeyboardInterrupt`` / termination). Exit status: 128 + the signal
number (130 for SIGINT, 143 for SIGTERM), as a shell reports a process a signal ended.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator

STOP = threading.Event()
_received: list[int] = []
_active = threading.Event()  # inside handle_signals()


class Interrupted(KeyboardInterrupt):
    """The run was stopped by a signal (``signum``)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def check() -> None:
    """Raise :class:`Interrupted` if a stop was asked for (called where the ServerApp waits)."""
    if STOP.is_set():
        raise Interrupted(_received[0] if _received else signal.SIGINT)


def _handler(signum: int, _frame) -> None:
    _received.append(signum)
    STOP.set()
    signal.signal(signal.SIGINT, signal.default_int_handler)  # a second signal is not held back
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    raise Interrupted(signum)


def _install() -> None:
    signal.signal(signal.SIGINT, _handler)
    signal.signal(signal.SIGTERM, _handler)


def reinstall() -> None:
    """Take SIGINT and SIGTERM back after a library replaced the handlers (``ray.init`` sets a SIGTERM
    handler of its own in the driver); only inside :func:`handle_signals`, only in the main thread, and
    not once a signal was received (then a second one keeps Python's default)."""
    if _active.is_set() and not _received and threading.current_thread() is threading.main_thread():
        _install()


class _QuietOnceStopped(logging.Filter):
    """Drops Flower's log records once a stop was asked for: the signal also reaches the Ray workers
    (they share the terminal's process group), and Flower's engine threads then log every message they
    can no longer deliver ("The actor pool is empty", with a traceback) while the run is stopping.
    Those are consequences of the stop, not problems of the run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not STOP.is_set()


_QUIET = _QuietOnceStopped()


@contextlib.contextmanager
def handle_signals() -> Iterator[None]:
    """Within the block (in the main thread), SIGINT and SIGTERM stop the run as described above."""
    STOP.clear()
    _received.clear()
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    _install()
    _active.set()
    logging.getLogger("flwr").addFilter(_QUIET)  # kept: it drops nothing until a stop, and the engine
    # threads may still log while the process winds down after this block
    if not getattr(threading.excepthook, "_simlab", False):  # the ServerApp thread stops after the block
        hook = threading.excepthook

        def quiet(a) -> None:
            if not issubclass(a.exc_type, Interrupted):
                hook(a)
        quiet._simlab = True
        threading.excepthook = quiet
    try:
        yield
    finally:
        _active.clear()
        signal.signal(signal.SIGINT, before[0])
        signal.signal(signal.SIGTERM, before[1])

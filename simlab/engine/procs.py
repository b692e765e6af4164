"""Processes on this machine, read from /proc: free ports, parent links, helpers, and stopping a
process tree by PID without ever signalling a recycled PID (each PID is checked against the start
time recorded for it)."""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path


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


def proc_stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks since boot) of a live process, from /proc."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError, OSError):
        return None
    rest = text[text.rindex(")") + 2:].split()  # fields after "pid (comm)"
    if rest[0] == "Z":
        return None  # a zombie has exited; only its parent's wait() is missing
    return int(rest[1]), int(rest[19])


def children_map() -> dict[int, list[int]]:
    """Parent pid → the pids of its live children, for every process on the machine."""
    out: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            st = proc_stat(int(entry.name))
            if st is not None:
                out.setdefault(st[0], []).append(int(entry.name))
    return out


def descendants(pid: int, children: Mapping[int, list[int]] | None = None) -> list[int]:
    """Every live process below ``pid`` (children first), from the parent links in /proc."""
    children = children_map() if children is None else children
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
            st = proc_stat(int(entry.name))
            if st is not None and st[1] >= since_ticks:
                out.append(int(entry.name))
    return out


@dataclass
class ProcRecord:
    """One process a deployment started. ``start_ticks`` (from /proc) tells it from a recycled PID."""

    role: str  # "superlink" | "supernode"
    name: str
    pid: int
    start_ticks: int
    port: int
    log: str
    cmd: list[str]

    def alive(self) -> bool:
        st = proc_stat(self.pid)
        return st is not None and st[1] == self.start_ticks


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _unchanged(stamps: Mapping[int, int], pids: Iterable[int]) -> list[int]:
    """The pids that still belong to the process whose start time ``stamps`` recorded."""
    return [p for p in pids if (st := proc_stat(p)) is not None and st[1] == stamps[p]]


def terminate(recs: list[ProcRecord], grace: float, wait_exit: Callable[[ProcRecord, float], object]) -> None:
    """Stop ``recs`` and everything they started: SIGTERM, then SIGKILL for a record still alive after
    ``grace`` (``wait_exit(rec, seconds)`` waits for one). Descendants, and helpers of a record that
    already exited (e.g. a refused SuperNode's superexec), are noted with their start times first."""
    children = children_map()
    trees = {r.pid: descendants(r.pid, children) for r in recs if r.alive()}
    for r in recs:
        trees.setdefault(r.pid, []).extend(p for p in watchers_of(r.pid, r.start_ticks) if p not in trees[r.pid])
    stamps = {p: st[1] for ps in trees.values() for p in ps if (st := proc_stat(p)) is not None}
    for r in recs:
        if r.alive():
            _signal(r.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for r in recs:
        wait_exit(r, max(0.0, deadline - time.monotonic()))
        if r.alive():
            _signal(r.pid, signal.SIGKILL)
            wait_exit(r, 5.0)
    _stop_leftovers(stamps, grace)


def _stop_leftovers(stamps: Mapping[int, int], grace: float) -> None:
    """Children (superexec, app processes) watch their parent and leave on their own within a few
    seconds; whatever is left after ``grace`` is signalled, by PID, only if it is still the same process."""
    left = _unchanged(stamps, stamps)
    deadline = time.monotonic() + grace
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = _unchanged(stamps, left)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in _unchanged(stamps, left):
            _signal(p, sig)
        time.sleep(0.5 if left else 0)

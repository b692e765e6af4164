"""Probes the benchmarks share (tools/bench_scale.py, tools/bench_harness.py): what the server sends
and receives, what the hospitals compute, and how much memory the processes take.

* :func:`message_ledger` wraps ``Federation._send``: one row per message batch (kind, round,
  targets, the bytes of each part down and up, and the wall-clock interval of the exchange);
* :func:`enable_worker_trace` makes the Ray workers started afterwards time the hospitals' own work
  (``tools/worker_trace/sitecustomize.py``); :func:`read_trace` reads the rows back;
* :func:`round_split` puts both together: per round, hospitals computing (training and ODEx
  scoring, evaluation, building a Hospital), *messaging* (a batch out with no hospital computing:
  Flower's queues and polling, Ray transport, the ClientApp's decode and encode) and *server* (the
  rest of the round: encoding, decoding, aggregation, the pool);
* :class:`TreeMemory` samples peak RSS and PSS of this process and its descendants from /proc.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

TRACE_DIR = Path(__file__).resolve().parent / "worker_trace"


def federation_imported(what: str) -> bool:
    """Whether Flower or Ray was imported by this process; if so, says so on stderr (``what``: the code
    that was meant to run without them). Benchmarks of the hospital side fail on it."""
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("flwr", "ray"))
    if leaked:
        print(f"error: federation packages were imported by {what}: {', '.join(leaked)}", file=sys.stderr)
    return bool(leaked)


# ------------------------------------------------------------------------------ messages
def load_line(before: tuple[float, ...]) -> str:
    """The machine's load average before a benchmark and now: how much else was running."""
    fmt = lambda load: ", ".join(f"{x:.2f}" for x in load)  # noqa: E731
    return f"load average (1, 5, 15 min) before: {fmt(before)}; after: {fmt(os.getloadavg())}"


def request_parts(req) -> dict[str, int]:
    """Bytes of each part of a request: model, pool members, histories, FedDG bank."""
    from simlab.federated import codec

    out = {}
    if getattr(req, "model", None) is not None:
        out["model"] = codec.state_nbytes(req.model)
    if getattr(req, "members", None):
        out["members"] = sum(codec.state_nbytes(s) for s in req.members.values())
    if getattr(req, "histories", None):
        out["histories"] = codec.histories_nbytes(req.histories)
    if getattr(req, "bank", None) is not None:
        out["bank"] = codec.state_nbytes(req.bank)
    return out


def message_ledger(rows: list[dict]) -> None:
    """Wrap ``Federation._send`` (for this process): append one row per message batch to ``rows``.
    ``kind`` is the Flower message type, with ``.histories`` when the requests carry ODEx histories."""
    from simlab.federated import codec
    from simlab.federated.federation import Federation

    original = Federation._send

    def send(self, kind, targets, requests):
        a = time.time()
        replies = original(self, kind, targets, requests)
        b = time.time()
        down: dict[str, int] = {}
        for h in targets:
            for k, v in request_parts(requests[h]).items():
                down[k] = down.get(k, 0) + v
        up = {"model": 0, "entry": 0}
        for reply in replies.values():
            if reply.has_error():
                continue
            if "arrays" in reply.content:
                up["model"] += codec.records_nbytes({"a": reply.content["arrays"]})
            up["entry"] += codec.entry_nbytes(reply.content)
        first = requests[targets[0]] if targets else None
        label = kind + (".histories" if getattr(first, "histories", None) else "")
        rows.append({"kind": label, "round": getattr(first, "round", None), "n": len(targets), "a": a, "b": b,
                     "down": down, "up": up})
        return replies

    Federation._send = send


# ------------------------------------------------------------------------------ hospitals' work
def enable_worker_trace(directory: Path) -> None:
    """Ray workers started after this call time the hospitals' work into ``directory`` (they inherit
    the environment, and Flower passes this process's sys.path to them as PYTHONPATH)."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    os.environ["SIMLAB_BENCH_TRACE"] = str(directory)
    if str(TRACE_DIR) not in sys.path:
        sys.path.insert(0, str(TRACE_DIR))


def read_trace(directory: Path) -> list[dict]:
    rows = []
    for f in Path(directory).glob("*.jsonl"):
        rows += [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
    return rows


def busy(intervals: list[tuple[float, float]], a: float, b: float) -> float:
    """Seconds of [a, b] covered by at least one interval."""
    cut = sorted((max(x, a), min(y, b)) for x, y in intervals if y > a and x < b)
    total, end = 0.0, a
    for x, y in cut:
        if y > end:
            total += y - max(x, end)
            end = y
    return total


SPLIT = ("hosp_train", "hosp_eval", "setup", "msg_train", "msg_eval", "server", "msg_head", "msg_tail", "batches")


def round_split(rounds: list[dict], ledger: list[dict], trace: list[dict]) -> dict[str, float]:
    """Seconds, summed over ``rounds`` (rows of rounds.jsonl), of each part of :data:`SPLIT`; of the
    messaging, ``msg_head`` is the time from sending a batch to the first hospital call (pushing
    the messages, Flower's pick-up, Ray's transport, the ClientApp's decoding), ``msg_tail`` from the
    last call's end to the replies at the server (encoding, Ray, Flower's pull); the rest of the
    messaging lies between hospital calls. ``batches``: message batches sent."""
    compute = {k: [(e["a"], e["b"]) for e in trace if e["k"] in kinds]
               for k, kinds in (("train", ("train", "score")), ("eval", ("eval",)), ("setup", ("setup",)))}
    split = dict.fromkeys(SPLIT, 0.0)
    for r in rounds:
        sends = [s for s in ledger if s["round"] == r["round"]]
        for s in sends:
            phase = "eval" if s["kind"].startswith("evaluate") else "train"
            inside = [(x, y) for x, y in compute[phase] + compute["setup"] if y > s["a"] and x < s["b"]]
            work = busy(inside, s["a"], s["b"])
            split[f"hosp_{phase}"] += busy(compute[phase], s["a"], s["b"])
            split["setup"] += busy(compute["setup"], s["a"], s["b"])
            split[f"msg_{phase}"] += (s["b"] - s["a"]) - work
            split["msg_head"] += (min(x for x, _ in inside) if inside else s["b"]) - s["a"]
            split["msg_tail"] += s["b"] - max((y for _, y in inside), default=s["b"])
            split["batches"] += 1
        split["server"] += r["wall_time_s"] - sum(s["b"] - s["a"] for s in sends)
    return split


# ------------------------------------------------------------------------------ memory
def _kb(pid: int, field: str, file: str = "status") -> int:
    try:
        for line in Path(f"/proc/{pid}/{file}").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def peak_rss() -> int:
    """This process's peak RSS (VmHWM), bytes."""
    return _kb(os.getpid(), "VmHWM")


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class TreeMemory(threading.Thread):
    """Peak RSS of this process (``driver``), of each Ray worker (``worker_peak``, and their sum at
    one time, ``workers_sum``) and of Ray's other processes (``ray_other``), and the peak PSS of the
    whole tree (``tree_pss``: shared pages counted once), in bytes, sampled every ``interval`` s.
    Also the CPU seconds each group used while sampled (:meth:`cpu`; the driver's from the first
    sample on, a child's from its start). The sampling runs in this process and costs about 10 ms
    of CPU per sample with a Ray tree, more with ``pss`` (reading every process's smaps)."""

    def __init__(self, interval: float = 0.2, pss: bool = True):
        super().__init__(daemon=True)
        self.interval, self.stop, self.pss = interval, threading.Event(), pss
        self.driver = self.workers_sum = self.tree_pss = self.ray_other = 0
        self.worker_peak: dict[int, int] = {}
        self.cpu_last: dict[int, tuple[str, float]] = {}
        self.cpu_driver0 = _cpu_s(os.getpid())

    @staticmethod
    def _children() -> dict[int, list[int]]:
        kids: dict[int, list[int]] = {}
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    stat = Path(f"/proc/{d}/stat").read_text()
                except OSError:
                    continue
                kids.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(d))
        return kids

    def sample(self) -> None:
        kids, me = self._children(), os.getpid()
        tree, todo = [], list(kids.get(me, []))
        while todo:
            p = todo.pop()
            tree.append(p)
            todo.extend(kids.get(p, []))
        self.driver = max(self.driver, _kb(me, "VmRSS"))
        workers, other, pss = 0, 0, _kb(me, "Pss", "smaps_rollup") if self.pss else 0
        for p in tree:
            try:
                cmd = Path(f"/proc/{p}/cmdline").read_bytes()
            except OSError:
                continue
            rss = _kb(p, "VmRSS")
            pss += _kb(p, "Pss", "smaps_rollup") if self.pss else 0
            if cmd.startswith(b"ray::") or b"default_worker.py" in cmd:
                self.worker_peak[p] = max(self.worker_peak.get(p, 0), rss)
                workers += rss
                self.cpu_last[p] = ("workers", _cpu_s(p))
            else:
                other += rss
                self.cpu_last[p] = ("ray_other", _cpu_s(p))
        self.cpu_last[me] = ("driver", _cpu_s(me) - self.cpu_driver0)
        self.workers_sum, self.ray_other = max(self.workers_sum, workers), max(self.ray_other, other)
        self.tree_pss = max(self.tree_pss, pss)

    def run(self) -> None:
        while not self.stop.wait(self.interval):
            self.sample()

    def cpu(self) -> dict[str, float]:
        """CPU seconds by group: ``driver``, ``workers`` (Ray workers), ``ray_other``."""
        out = {"driver": 0.0, "workers": 0.0, "ray_other": 0.0}
        for group, seconds in self.cpu_last.values():
            out[group] += seconds
        return out

    def report(self) -> dict[str, int]:
        return {"driver_peak": max(self.driver, peak_rss()), "workers_sum": self.workers_sum,
                "worker_peak": max(self.worker_peak.values(), default=0), "workers": len(self.worker_peak),
                "ray_other": self.ray_other, "tree_pss": self.tree_pss}

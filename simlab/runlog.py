"""Writes a run's metric rows as they happen (no Flower here; the ServerApp calls it).

``metrics.jsonl``: one row per round × hospital × domain × metric, deterministic for a seed (no
timings). ``rounds.jsonl``: per-round cost (bytes each way, wall time, replies, failures) — the part
that legitimately differs between two runs of the same seed.

Row names that are not hospitals: :data:`SHARED` is the hospital of the evaluation rows of a model
deployed identically at every hospital (evaluated once per domain, read as every hospital's own),
:data:`SERVER` that of the server's rows (pool size), and :data:`POOLED` names the federation-level
results next to the hospitals' (``R/<arm>/pooled.csv``). A scenario may not name a hospital after
any of them (:data:`RESERVED_IDS`).
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Callable
from pathlib import Path

from simlab.fileio import run_path

SHARED = "all"
SERVER = "server"
POOLED = "pooled"
RESERVED_IDS = (SHARED, POOLED, SERVER)


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None  # JSON has no NaN; null = undefined (e.g. HD95 of a missed structure)
    return v


class RunLog:
    def __init__(self, run_dir: Path, arm: str, on_round: Callable[[int], None] | None = None):
        self.run_dir = Path(run_dir)
        self.arm = arm
        self.on_round = on_round
        self._lock = threading.Lock()
        self._metrics = open(run_path(self.run_dir, "metrics.jsonl"), "ab")
        self._rounds = open(run_path(self.run_dir, "rounds.jsonl"), "ab")

    def metric(self, round_: int, hospital: str, domain: str | None, metric: str, value: float) -> None:
        row = {"arm": self.arm, "round": round_, "hospital": hospital, "domain": domain,
               "metric": metric, "value": _clean(float(value))}
        with self._lock:
            self._metrics.write(json.dumps(row).encode() + b"\n")

    def round_cost(self, round_: int, **values) -> None:
        with self._lock:
            self._rounds.write(json.dumps({"arm": self.arm, "round": round_, **values}).encode() + b"\n")
            self._metrics.flush()
            self._rounds.flush()
        if self.on_round is not None:
            self.on_round(round_)

    def sizes(self) -> dict[str, int]:
        """Byte lengths of metrics.jsonl and rounds.jsonl, everything written so far flushed."""
        with self._lock:
            self._metrics.flush()
            self._rounds.flush()
            return {"metrics_bytes": self._metrics.tell(), "rounds_bytes": self._rounds.tell()}

    def rewind(self, metrics_bytes: int, rounds_bytes: int) -> None:
        """Cut both files back to the given lengths (resume: drop rows written after a checkpoint)."""
        with self._lock:
            for fh, n in ((self._metrics, metrics_bytes), (self._rounds, rounds_bytes)):
                fh.flush()
                if fh.tell() < n:
                    raise ValueError(f"{fh.name} is shorter ({fh.tell()} bytes) than its checkpoint says ({n}): "
                                     f"the run directory was changed after the checkpoint was written")
                fh.truncate(n)
                fh.seek(n)

    def close(self) -> None:
        self._metrics.close()
        self._rounds.close()


def last_round_logged(run_dir: Path, arm: str) -> int | None:
    """The last round of ``arm`` in ``rounds.jsonl`` (None: none yet), for following a RunLog that
    another process writes (progress of a ServerApp started by ``flwr run``). A line still being
    written is skipped; the file may have been cut back meanwhile (resume)."""
    try:
        lines = (Path(run_dir) / "rounds.jsonl").read_bytes().splitlines()
    except OSError:
        return None
    last = None
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and row.get("arm") == arm and isinstance(row.get("round"), int):
            last = row["round"]
    return last

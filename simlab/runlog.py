"""Writes a run's metric rows as they happen (no Flower here; the ServerApp calls it).

``metrics.jsonl``: one row per round × hospital × domain × metric, deterministic for a seed (no
timings). ``rounds.jsonl``: per-round cost (bytes each way, wall time, replies, failures) — the part
that legitimately differs between two runs of the same seed.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Callable
from pathlib import Path


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None  # JSON has no NaN; null = undefined (e.g. HD95 of a missed structure)
    return v


class RunLog:
    def __init__(self, run_dir: Path, arm: str, on_round: Callable[[int], None] | None = None):
        self.arm = arm
        self.on_round = on_round
        self._lock = threading.Lock()
        self._metrics = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")
        self._rounds = open(run_dir / "rounds.jsonl", "a", encoding="utf-8")
        self.eval_rows: list[dict] = []

    def metric(self, round_: int, hospital: str, domain: str | None, metric: str, value: float) -> None:
        row = {"arm": self.arm, "round": round_, "hospital": hospital, "domain": domain,
               "metric": metric, "value": _clean(float(value))}
        with self._lock:
            self._metrics.write(json.dumps(row) + "\n")
            if metric.startswith("dice"):
                self.eval_rows.append(row)

    def round_cost(self, round_: int, **values) -> None:
        with self._lock:
            self._rounds.write(json.dumps({"arm": self.arm, "round": round_, **values}) + "\n")
            self._metrics.flush()
            self._rounds.flush()
        if self.on_round is not None:
            self.on_round(round_)

    def close(self) -> None:
        self._metrics.close()
        self._rounds.close()

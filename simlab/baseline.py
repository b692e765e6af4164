"""Baselines: write the numbers of a group of runs to a file, and check runs against one.

Tolerances and direction
------------------------
A tolerance is ``abs:X`` (allowed change X) or ``rel:X`` (allowed change X·|baseline mean|; with a
baseline mean of 0 any change in the bad direction fails). With baseline mean ``m``, current mean
``c`` and allowed change ``a``:

* higher is better: regressed iff ``c < m − a``
* lower is better:  regressed iff ``c > m + a``
* either:           regressed iff ``|c − m| > a``

A change in the good direction never fails. A slack of 1e-6 (the rounding of stored baselines) is
added to ``a``. Only means are compared; the baseline's std and n are recorded so that a reviewer can
see how noisy a number was when the tolerance was chosen. Which tolerance applies: ``--tolerance``
on the command line, else the one stored in the baseline entry, else the default above.

Baseline files
--------------
Written only by :func:`write_baseline` (``simlab compare RUN... --write-baseline FILE``): YAML (with a
header comment saying how it was produced) or JSON (``.json``; the same text as a ``comment`` list).
Per arm per metric: mean, std, n, direction and the tolerance to use. A baseline arm or metric that
the runs lack, an arm the baseline lacks, or a different scenario name is an error (exit 2), never a
silent pass; a different fingerprint (settings changed) is a warning printed with the result.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Literal

import yaml

from simlab.compare import BASELINE_FORMAT, METRICS, SLACK, SPECS, CompareError, Direction, Group, Stat, Tolerance
from simlab.fileio import atomic_write

__all__ = ["CheckResult", "CheckRow", "baseline_document", "check_against_baseline", "check_table", "is_regression",
           "parse_tolerance_args", "read_baseline", "write_baseline"]


# ----------------------------------------------------------------------------------- baseline
def _round(x: float | None) -> float | None:
    return None if x is None else float(f"{x:.6f}") if abs(x) < 1e6 else round(x, 3)


def baseline_document(group: Group, tolerances: dict[str, Tolerance] | None = None) -> dict:
    """The baseline for one group: per arm per metric mean, std, n, direction and tolerance."""
    tolerances = tolerances or {}
    arms = {}
    for arm, stats in group.stats.items():
        arms[arm] = {key: {"mean": _round(s.mean), "std": _round(s.std), "n": s.n,
                           "direction": SPECS[key].direction,
                           "tolerance": str(tolerances.get(key, SPECS[key].tolerance))}
                     for key, s in stats.items()}
    seeds = sorted({s for s in group.seeds if s is not None})
    return {
        "format": BASELINE_FORMAT,
        "scenario": group.scenario,
        "scenario_fingerprint": group.fingerprint,
        "seeds": seeds,
        "runs": len(group.runs),
        "created": date.today().isoformat(),
        "arms": arms,
    }


def _header(doc: dict, path: Path, tolerances: dict[str, Tolerance]) -> list[str]:
    tol = " ".join(f"--tolerance {k}={v}" for k, v in tolerances.items())
    dirs = ", ".join(f"{m.key} {m.direction}" for m in METRICS)
    return [
        "simlab regression baseline. Written by `simlab compare --write-baseline`; do not edit by hand.",
        f"Produced on {doc['created']} from {doc['runs']} run(s) of scenario '{doc['scenario']}' "
        f"(seeds {doc['seeds']}) by:",
        f"  simlab compare RUN_DIR... --write-baseline {path.name}{' ' + tol if tol else ''}",
        f"Check a run against it:  simlab compare RUN_DIR... --baseline {path.name}",
        "Per arm and metric: mean, std (sample, 0 for n=1) and n over the runs, the better direction,",
        "and the tolerance: abs:X = allowed change X in the bad direction, rel:X = X * |mean|.",
        f"Better direction: {dirs} (a change the good way never fails).",
    ]


def write_baseline(path: str | Path, group: Group, tolerances: dict[str, Tolerance] | None = None) -> dict:
    """Write the baseline of ``group`` to ``path`` (YAML, or JSON for a ``.json`` name)."""
    path = Path(path)
    tolerances = tolerances or {}
    doc = baseline_document(group, tolerances)
    header = _header(doc, path, tolerances)
    if path.suffix.lower() == ".json":
        text = json.dumps({"comment": header, **doc}, indent=2, allow_nan=False) + "\n"
    else:
        text = "".join(f"# {line}\n" for line in header) + yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)
    atomic_write(path, text)
    return doc


def read_baseline(path: str | Path) -> dict:
    """Read and validate a baseline file; every problem names the file and the key."""
    from simlab.config import ScenarioError, parse_yaml

    path = Path(path)
    if not path.is_file():
        raise CompareError(f"{path}: baseline file not found")
    text = path.read_text(encoding="utf-8")
    try:
        doc = json.loads(text) if path.suffix.lower() == ".json" else parse_yaml(text, str(path))
    except json.JSONDecodeError as exc:
        raise CompareError(f"{path}: not JSON ({exc.msg}, line {exc.lineno})") from None
    except ScenarioError as exc:
        raise CompareError(str(exc)) from None
    if not isinstance(doc, dict):
        raise CompareError(f"{path}: expected a mapping at the top level")
    if doc.get("format") != BASELINE_FORMAT:
        why = (" (in simlab-baseline/1, fwt and forgetting were GEM's FWT and Chaudhry's forgetting; rewrite the "
               "baseline with --write-baseline)") if doc.get("format") == "simlab-baseline/1" else ""
        raise CompareError(f"{path}: format: expected {BASELINE_FORMAT!r}, found {doc.get('format')!r}{why}")
    if not isinstance(doc.get("scenario"), str):
        raise CompareError(f"{path}: scenario: expected the scenario name, found {doc.get('scenario')!r}")
    arms = doc.get("arms")
    if not isinstance(arms, dict) or not arms:
        raise CompareError(f"{path}: arms: expected a mapping of arm → metrics")
    for arm, metrics in arms.items():
        if not isinstance(metrics, dict):
            raise CompareError(f"{path}: arms.{arm}: expected a mapping of metric → entry")
        for key, entry in metrics.items():
            where = f"{path}: arms.{arm}.{key}"
            if key not in SPECS:
                raise CompareError(f"{where}: unknown metric (known: {', '.join(SPECS)})")
            if not isinstance(entry, dict) or not {"mean", "std", "n", "tolerance"} <= set(entry):
                raise CompareError(f"{where}: expected mean, std, n and tolerance")
            m = entry["mean"]
            if m is not None and (isinstance(m, bool) or not isinstance(m, (int, float)) or not math.isfinite(m)):
                raise CompareError(f"{where}.mean: expected a number or null, found {m!r}")
            Tolerance.parse(entry["tolerance"], f"{where}.tolerance")
            if entry.get("direction", SPECS[key].direction) != SPECS[key].direction:
                raise CompareError(f"{where}.direction: {key} is {SPECS[key].direction}-is-better, "
                                   f"found {entry['direction']!r}")
    return doc


# ------------------------------------------------------------------------------------ checking
def is_regression(direction: Direction, base: float, current: float, tol: Tolerance) -> bool:
    """True when ``current`` is worse than ``base`` by more than the tolerance (see module doc)."""
    a = tol.allowed(base) + SLACK
    if direction == "higher":
        return current < base - a
    if direction == "lower":
        return current > base + a
    return abs(current - base) > a


@dataclass(frozen=True)
class CheckRow:
    arm: str
    metric: str
    base: Stat
    current: Stat
    tolerance: Tolerance
    verdict: Literal["ok", "better", "regressed", "undefined"]

    def describe(self) -> str:
        spec = SPECS[self.metric]
        b, c = self.base.mean, self.current.mean
        assert b is not None and c is not None
        a = self.tolerance.allowed(b)
        rel = {"higher": f"< {b:.6g} - {a:.6g}", "lower": f"> {b:.6g} + {a:.6g}",
               "either": f"differs from {b:.6g} by more than {a:.6g}"}[spec.direction]
        return f"arm {self.arm}: {self.metric} {c:.6g} {rel} (baseline mean, tolerance {self.tolerance})"


@dataclass
class CheckResult:
    rows: list[CheckRow]
    warnings: list[str]

    @property
    def regressions(self) -> list[CheckRow]:
        return [r for r in self.rows if r.verdict == "regressed"]


def check_against_baseline(group: Group, baseline: dict, overrides: dict[str, Tolerance] | None = None,
                           source: str = "baseline") -> CheckResult:
    """Compare a group's means with a baseline document; raise :class:`CompareError` on a mismatch."""
    overrides = overrides or {}
    if baseline["scenario"] != group.scenario:
        raise CompareError(f"{source}: scenario {baseline['scenario']!r}, but the runs are of {group.scenario!r}")
    problems = []
    base_arms: dict = baseline["arms"]
    for arm in base_arms:
        if arm not in group.stats:
            problems.append(f"arm {arm!r} is in the baseline but not in the runs (runs have: {', '.join(group.stats)})")
    for arm in group.stats:
        if arm not in base_arms:
            problems.append(f"arm {arm!r} is in the runs but not in the baseline (rewrite it with --write-baseline)")
    rows: list[CheckRow] = []
    for arm, metrics in base_arms.items():
        if arm not in group.stats:
            continue
        for key, entry in metrics.items():
            if key not in group.stats[arm]:
                problems.append(f"arm {arm!r}: metric {key!r} is in the baseline but not in the runs")
                continue
            cur = group.stats[arm][key]
            base = Stat(entry["mean"], float(entry.get("std") or 0.0), int(entry.get("n") or 0))
            tol = overrides.get(key) or Tolerance.parse(entry["tolerance"], f"{source}: arms.{arm}.{key}.tolerance")
            if base.mean is None and cur.mean is None:
                rows.append(CheckRow(arm, key, base, cur, tol, "undefined"))
                continue
            if base.mean is None or cur.mean is None:
                which = "runs" if cur.mean is None else "baseline"
                problems.append(f"arm {arm!r}: metric {key!r} is undefined (null) in the {which} only")
                continue
            spec = SPECS[key]
            if is_regression(spec.direction, base.mean, cur.mean, tol):
                verdict = "regressed"
            elif spec.direction != "either" and ((cur.mean > base.mean) == (spec.direction == "higher")) \
                    and cur.mean != base.mean:
                verdict = "better"
            else:
                verdict = "ok"
            rows.append(CheckRow(arm, key, base, cur, tol, verdict))
    if problems:
        raise CompareError(f"{source}: the runs do not match the baseline:\n  " + "\n  ".join(problems))
    warnings = []
    fp = baseline.get("scenario_fingerprint")
    if fp and group.fingerprint and fp != group.fingerprint:
        warnings.append(f"the runs' settings differ from those that produced the baseline (fingerprint "
                        f"{group.fingerprint} vs {fp}): a difference may come from the settings, not the code")
    return CheckResult(rows, warnings)


def parse_tolerance_args(items: list[str]) -> dict[str, Tolerance]:
    """``["acc=abs:0.02", "wall_time_s=rel:0.5"]`` → {metric: Tolerance}; unknown metrics are errors."""
    out: dict[str, Tolerance] = {}
    for item in items:
        key, sep, spec = item.partition("=")
        key = key.strip()
        if not sep:
            raise CompareError(f"--tolerance {item!r}: expected METRIC=abs:X or METRIC=rel:X")
        if key not in SPECS:
            raise CompareError(f"--tolerance {item!r}: unknown metric {key!r} (known: {', '.join(SPECS)})")
        out[key] = Tolerance.parse(spec, f"--tolerance {key}")
    return out


def check_table(result: CheckResult, baseline_name: str):
    """The check as a rich table at most 80 columns wide (for arm names and metric keys up to 19
    characters): a bold row per arm, then one row per metric with the baseline and current means (the
    check compares means; the baseline file holds their std and n), the change, the tolerance and the
    verdict."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"against baseline {escape(baseline_name)}")
    for col in ("arm / metric", "baseline", "now", "change", "tolerance", "verdict"):
        table.add_column(col, justify="left" if col in ("arm / metric", "verdict") else "right", no_wrap=True)
    style = {"ok": "green", "better": "green", "regressed": "bold red", "undefined": "dim"}
    arm = None
    for r in result.rows:
        spec = SPECS[r.metric]
        if r.arm != arm:
            arm = r.arm
            table.add_row(f"[bold]{escape(r.arm)}[/]", "", "", "", "", "")
        change = "" if r.base.mean is None or r.current.mean is None else \
            f"{(r.current.mean - r.base.mean) / spec.scale:+.{spec.digits + 1}f}"
        table.add_row(f" {r.metric}", _mean(r.base, spec), _mean(r.current, spec), change, str(r.tolerance),
                      f"[{style[r.verdict]}]{r.verdict.upper() if r.verdict == 'regressed' else r.verdict}[/]")
    return table


def _mean(s: Stat, spec) -> str:
    return "n/a" if s.mean is None else f"{s.mean / spec.scale:.{spec.digits}f}"

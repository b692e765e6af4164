"""Compare run directories, aggregate seeds, and check runs against a committed baseline.

What is compared
----------------
Per arm, the arm-level numbers of ``summary.json`` plus one number read from ``metrics.jsonl``:

==============  ==========================================================  ==========  ===========
key             meaning                                                     better      default tol
==============  ==========================================================  ==========  ===========
acc             pooled ACC (GEM)                                            higher      abs:0.02
bwt             pooled BWT (GEM)                                            higher      abs:0.03
fwt             pooled FWT (GEM)                                            higher      abs:0.03
forgetting      pooled forgetting (Chaudhry, max-based)                     lower       abs:0.03
<name>          every registered segmentation metric other than Dice        registry    registry
                (:mod:`simlab.metrics.registry`): ``metrics.<name>.mean``
                of ``summary.json``, e.g. ``hd95`` (lower, rel:0.25)
<name>_missed   for a metric that counts missed structures, e.g.            lower       abs:0.05
                ``hd95_missed``: ``metrics.<name>.missed``
pool_size       final model-pool size K (server rows ``pool_size``; only    either      abs:0
                for arms that keep a pool)
bytes_total     bytes sent down + up over the run                           lower       rel:0.01
wall_time_s     wall time of the arm (Flower start-up included)             lower       rel:1.0
==============  ==========================================================  ==========  ===========

acc/bwt/fwt/forgetting are the headline metric's (Dice). A run without a registered metric's block
(older runs) lacks that column, and so does a group that mixes such runs with newer ones; a baseline that lacks a metric the runs have does not check
it (only the baseline's metrics are checked), so adding a metric never fails an existing baseline.

``pool_size`` has no good direction: a pool that stops growing can mean shift detection broke, one
that grows can mean false alarms, so a change either way beyond the tolerance is a regression.

Grouping
--------
Runs are grouped by scenario name *and* settings: the resolved ``scenario.yaml`` without ``seed``,
``output``, ``description`` and ``data.cache_dir`` is hashed (SHA-256 of its canonical JSON, first 12
hex digits, the *fingerprint*, :func:`simlab.rundir.settings_fingerprint`). Runs of one group differ
only by seed (or are repeats); per arm and metric the group shows mean ± std (n). ``std`` is the
sample standard deviation (ddof = 1) for n ≥ 2 and 0 for n = 1. A metric that is undefined (null,
e.g. BWT with one stage) in every run stays null; defined in some runs and null in others is an
error (the runs do not measure the same thing).

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
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any, Literal

import yaml

from simlab.fileio import atomic_write
from simlab.metrics.registry import HEADLINE, REGISTRY
from simlab.rundir import RunDirError, fingerprinted_settings, read_finished_run, settings_fingerprint

__all__ = [
    "BASELINE_FORMAT",
    "CheckResult",
    "CheckRow",
    "CompareError",
    "Group",
    "METRICS",
    "MetricSpec",
    "RunInfo",
    "Stat",
    "Tolerance",
    "baseline_document",
    "check_against_baseline",
    "group_runs",
    "is_regression",
    "load_run",
    "parse_tolerance_args",
    "read_baseline",
    "write_baseline",
]

BASELINE_FORMAT = "simlab-baseline/1"
SLACK = 1e-6
"""Added to every allowed change: stored baselines are rounded to 6 decimals."""

Direction = Literal["higher", "lower", "either"]


class CompareError(ValueError):
    """A problem with the inputs of a comparison (missing files, arms, metrics; bad baseline)."""


@dataclass(frozen=True)
class Tolerance:
    """Allowed change in the bad direction: ``abs`` (in the metric's units) or ``rel`` (× |baseline|)."""

    kind: Literal["abs", "rel"]
    value: float

    @classmethod
    def parse(cls, text: Any, where: str = "tolerance") -> Tolerance:
        s = str(text).strip()
        kind, sep, num = s.partition(":")
        if not sep or kind not in ("abs", "rel"):
            raise CompareError(f"{where}: expected 'abs:X' or 'rel:X', found {text!r}")
        try:
            value = float(num)
        except ValueError:
            raise CompareError(f"{where}: expected a number after '{kind}:', found {num!r}") from None
        if not math.isfinite(value) or value < 0:
            raise CompareError(f"{where}: expected a finite number >= 0, found {num!r}")
        return cls(kind, value)  # type: ignore[arg-type]

    def allowed(self, base: float) -> float:
        return self.value if self.kind == "abs" else self.value * abs(base)

    def __str__(self) -> str:
        return f"{self.kind}:{self.value:g}"


@dataclass(frozen=True)
class MetricSpec:
    key: str
    label: str
    direction: Direction
    tolerance: Tolerance
    scale: float = 1.0  # display only: value / scale
    digits: int = 3


MISSED_TOLERANCE = Tolerance("abs", 0.05)


def _registry_specs() -> tuple[tuple[MetricSpec, tuple[str, str]], ...]:
    """Per non-headline registered metric: its ``metrics.<name>.mean`` and, if it counts missed
    structures, ``metrics.<name>.missed``, with the path into the arm's summary block."""
    out = []
    for name, m in REGISTRY.items():
        if name == HEADLINE:
            continue
        out.append((MetricSpec(name, m.label, m.direction, Tolerance.parse(m.tolerance, f"metric {name}"),
                               digits=m.digits), (name, "mean")))
        if m.counts_missed:
            out.append((MetricSpec(m.missed_name, f"{m.label} missed", "lower", MISSED_TOLERANCE), (name, "missed")))
    return tuple(out)


REGISTRY_KEYS: dict[str, tuple[str, str]] = {spec.key: path for spec, path in _registry_specs()}
"""compare key → (metric, field) in ``summary.json``'s ``arms.<arm>.metrics``."""

METRICS: tuple[MetricSpec, ...] = (
    MetricSpec("acc", "ACC", "higher", Tolerance("abs", 0.02)),
    MetricSpec("bwt", "BWT", "higher", Tolerance("abs", 0.03)),
    MetricSpec("fwt", "FWT", "higher", Tolerance("abs", 0.03)),
    MetricSpec("forgetting", "forgetting", "lower", Tolerance("abs", 0.03)),
    *(spec for spec, _ in _registry_specs()),
    MetricSpec("pool_size", "pool K", "either", Tolerance("abs", 0.0), digits=1),
    MetricSpec("bytes_total", "MB sent", "lower", Tolerance("rel", 0.01), scale=1e6, digits=1),
    MetricSpec("wall_time_s", "wall s", "lower", Tolerance("rel", 1.0), digits=1),
)
SPECS = {m.key: m for m in METRICS}
SUMMARY_KEYS = ("acc", "bwt", "fwt", "forgetting", "bytes_total", "wall_time_s")


# ------------------------------------------------------------------------------------ reading
def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys → leaf values (lists of scalars stay leaves; lists of mappings use [i])."""
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(d, list) and any(isinstance(x, (dict, list)) for x in d):
        for i, v in enumerate(d):
            out.update(flatten(v, f"{prefix}[{i}]"))
    else:
        out[prefix] = d
    return out


@dataclass
class RunInfo:
    """The comparable facts of one run directory."""

    path: Path
    scenario: str
    seed: int | None
    fingerprint: str | None
    settings: dict[str, Any]
    arms: dict[str, dict[str, float | None]]
    meta: dict[str, dict[str, Any]]


def final_pool_sizes(rows: list[dict]) -> dict[str, float]:
    """Per arm, the ``pool_size`` value of the server at its last logged round."""
    last: dict[str, tuple[int, float]] = {}
    for r in rows:
        if r.get("metric") != "pool_size" or r.get("value") is None:
            continue
        arm, t = r["arm"], int(r["round"])
        if arm not in last or t >= last[arm][0]:
            last[arm] = (t, float(r["value"]))
    return {arm: v for arm, (_, v) in last.items()}


def load_run(run_dir: str | Path) -> RunInfo:
    """Read ``summary.json``, ``scenario.yaml`` and the pool sizes of ``metrics.jsonl``."""
    try:
        run = read_finished_run(run_dir)
        pools = final_pool_sizes(run.metrics("pool_size"))
    except RunDirError as exc:
        raise CompareError(str(exc)) from None
    path, summary, scenario = run.dir, run.summary, run.scenario
    arms: dict[str, dict[str, float | None]] = {}
    meta: dict[str, dict[str, Any]] = {}
    for name, a in summary["arms"].items():
        values: dict[str, float | None] = {}
        for key in SUMMARY_KEYS:
            if key in a:
                v = a[key]
                values[key] = None if v is None or not math.isfinite(float(v)) else float(v)
        blocks = a.get("metrics") or {}
        for key, (metric, fld) in REGISTRY_KEYS.items():
            if fld in blocks.get(metric, {}):
                v = blocks[metric][fld]
                values[key] = None if v is None or not math.isfinite(float(v)) else float(v)
        if name in pools:
            values["pool_size"] = pools[name]
        arms[name] = values
        meta[name] = {k: a.get(k) for k in ("method", "aggregation", "breaks_no_rehearsal")}
    return RunInfo(path=path, scenario=str(summary.get("scenario") or scenario.get("name") or path.name),
                   seed=summary.get("seed", scenario.get("seed")),
                   fingerprint=settings_fingerprint(scenario) if scenario else None,
                   settings=flatten(fingerprinted_settings(scenario)) if scenario else {}, arms=arms, meta=meta)


# ----------------------------------------------------------------------------------- grouping
@dataclass(frozen=True)
class Stat:
    mean: float | None
    std: float
    n: int

    @classmethod
    def of(cls, values: list[float | None], where: str) -> Stat:
        defined = [v for v in values if v is not None]
        if not defined:
            return cls(None, 0.0, 0)
        if len(defined) != len(values):
            raise CompareError(f"{where}: defined in {len(defined)} of {len(values)} runs, null in the others")
        if min(defined) == max(defined):  # identical values (a repeat on CPU): exact, no rounding residue
            return cls(defined[0], 0.0, len(defined))
        mean = math.fsum(defined) / len(defined)
        std = math.sqrt(math.fsum((v - mean) ** 2 for v in defined) / (len(defined) - 1)) if len(defined) > 1 else 0.0
        return cls(mean, std, len(defined))


@dataclass
class Group:
    """Runs of one scenario configuration (they differ only by seed)."""

    scenario: str
    fingerprint: str | None
    runs: list[RunInfo]
    stats: dict[str, dict[str, Stat]] = field(default_factory=dict)

    @property
    def seeds(self) -> list:
        return [r.seed for r in self.runs]

    @property
    def meta(self) -> dict[str, dict[str, Any]]:
        return self.runs[0].meta


def group_runs(runs: list[RunInfo]) -> list[Group]:
    """Group runs by (scenario name, fingerprint) in order of first appearance; compute per-arm stats.

    Every run of a group must have the same arms (error otherwise, naming the run), and the same
    metrics, except that a registered segmentation metric (``hd95``, ...) that some runs of the group
    lack (runs written before it was registered) is left out of that group instead of being averaged
    over the runs that have it.
    """
    groups: dict[tuple[str, str | None], Group] = {}
    for r in runs:
        groups.setdefault((r.scenario, r.fingerprint), Group(r.scenario, r.fingerprint, [])).runs.append(r)
    for g in groups.values():
        arms = list(g.runs[0].arms)
        for r in g.runs[1:]:
            if set(r.arms) != set(arms):
                raise CompareError(f"{r.path}: arms {sorted(r.arms)} differ from {g.runs[0].path}'s {sorted(arms)} "
                                   "(same scenario and settings)")
        for arm in arms:
            keys = [m.key for m in METRICS if any(m.key in r.arms[arm] for r in g.runs)]
            g.stats[arm] = {}
            for key in keys:
                missing = [str(r.path) for r in g.runs if key not in r.arms[arm]]
                if missing and key in REGISTRY_KEYS:  # runs from before the metric was registered
                    continue
                if missing:
                    raise CompareError(f"arm {arm}, metric {key}: absent from {', '.join(missing)}")
                g.stats[arm][key] = Stat.of([r.arms[arm][key] for r in g.runs], f"arm {arm}, metric {key}")
    return list(groups.values())


def settings_diff(a: RunInfo, b: RunInfo, limit: int = 8) -> list[str]:
    """Human-readable differences between two runs' settings (dotted keys)."""
    keys = sorted(set(a.settings) | set(b.settings))
    out = [f"{k}: {a.settings.get(k, '<absent>')!r} → {b.settings.get(k, '<absent>')!r}"
           for k in keys if a.settings.get(k, "<absent>") != b.settings.get(k, "<absent>")]
    return out[:limit] + ([f"… {len(out) - limit} more"] if len(out) > limit else [])


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
        raise CompareError(f"{path}: format: expected {BASELINE_FORMAT!r}, found {doc.get('format')!r}")
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


# ---------------------------------------------------------------------------------- rendering
def fmt_stat(s: Stat | None, spec: MetricSpec) -> str:
    if s is None:
        return ""
    if s.mean is None:
        return "n/a"
    text = f"{s.mean / spec.scale:.{spec.digits}f}"
    if s.n > 1:
        text += f" ± {s.std / spec.scale:.{spec.digits}f} ({s.n})"
    return text


def comparison_table(groups: list[Group]):
    """A rich Table: one row per group × arm, columns for the metrics present in any arm.

    Arms that break the no-rehearsal rule (joint, the upper bound) are marked with † and a caption.
    """
    from rich.markup import escape
    from rich.table import Table

    present = [m for m in METRICS if any(m.key in st for g in groups for st in g.stats.values())]
    multi = len(groups) > 1
    upper = any(g.meta.get(arm, {}).get("breaks_no_rehearsal") for g in groups for arm in g.stats)
    table = Table(title="runs compared: mean ± std (n runs) per arm; pooled over hospitals",
                  caption="† upper bound: revisits old windows (breaks the no-rehearsal rule on purpose)" if upper else None)
    if multi:
        table.add_column(escape("scenario [settings]"), no_wrap=True)
    table.add_column("arm", no_wrap=True)
    table.add_column("seeds", justify="right")
    for m in present:
        arrow = {"higher": " ↑", "lower": " ↓", "either": ""}[m.direction]
        table.add_column(m.label + arrow, justify="right", no_wrap=True)
    for g in groups:
        label = f"{g.scenario} [{g.fingerprint or '?'}]"
        seeds = ",".join(str(s) for s in g.seeds)
        for k, (arm, stats) in enumerate(g.stats.items()):
            name = arm + (" †" if g.meta.get(arm, {}).get("breaks_no_rehearsal") else "")
            cells = [fmt_stat(stats.get(m.key), m) for m in present]
            table.add_row(*([escape(label) if k == 0 else ""] if multi else []), escape(name), seeds, *cells,
                          end_section=multi and k == len(g.stats) - 1)
    return table


def check_table(result: CheckResult, baseline_name: str):
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"against baseline {escape(baseline_name)}")
    for col in ("arm", "metric", "baseline", "now", "change", "tolerance", "verdict"):
        table.add_column(col, justify="left" if col in ("arm", "metric", "verdict") else "right")
    style = {"ok": "green", "better": "green", "regressed": "bold red", "undefined": "dim"}
    for r in result.rows:
        spec = SPECS[r.metric]
        change = "" if r.base.mean is None or r.current.mean is None else \
            f"{(r.current.mean - r.base.mean) / spec.scale:+.{spec.digits + 1}f}"
        table.add_row(escape(r.arm), r.metric, fmt_stat(r.base, spec), fmt_stat(r.current, spec), change,
                      str(r.tolerance), f"[{style[r.verdict]}]{r.verdict.upper() if r.verdict == 'regressed' else r.verdict}[/]")
    return table

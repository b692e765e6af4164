"""Compare run directories, aggregate seeds, and check runs against a committed baseline.

What is compared
----------------
Per arm, the arm-level numbers of ``summary.json`` plus one number read from ``metrics.jsonl``:

===================  ==========================================================  ==========  ===========
key                  meaning                                                     better      default tol
===================  ==========================================================  ==========  ===========
acc                  pooled ACC (GEM)                                            higher      abs:0.02
bwt                  pooled BWT (GEM)                                            higher      abs:0.03
fwt                  pooled FWT as in the ODEx paper (mean of R[i][i]-R[i-1][i]) higher      abs:0.03
gem_fwt              pooled FWT (GEM: zero-shot minus untrained)                 higher      abs:0.03
forgetting           headline forgetting: Dice lost on the domains that left     lower       abs:0.03
                     every stream, from their last training round to the end
chaudhry_forgetting  pooled forgetting (Chaudhry, max-based)                     lower       abs:0.03
<name>               every registered segmentation metric other than Dice        registry    registry
                     (:mod:`simlab.metrics.registry`): ``metrics.<name>.mean``
                     of ``summary.json``, e.g. ``hd95`` (lower, rel:0.25)
<name>_missed        for a metric that counts missed structures, e.g.            lower       abs:0.05
                     ``hd95_missed``: ``metrics.<name>.missed``
pool_size            final model-pool size K (server rows ``pool_size``; only    either      abs:0
                     for arms that keep a pool)
bytes_total          bytes sent down + up over the run                           lower       rel:0.01
wall_time_s          wall time of the arm (Flower start-up included)             lower       rel:1.0
===================  ==========================================================  ==========  ===========

acc/bwt/fwt/gem_fwt/forgetting/chaudhry_forgetting are the headline metric's (Dice). A run without a
registered metric's block (older runs) lacks that column, and so does a group that mixes such runs with
newer ones; a baseline that lacks a metric the runs have does not check it (only the baseline's metrics
are checked), so adding a metric never fails an existing baseline. A run written before the headline
forgetting (an arm without ``forgetting_by_domain``) stored Chaudhry's forgetting as ``forgetting`` and
GEM's FWT as ``fwt``: they are read as ``chaudhry_forgetting`` and ``gem_fwt``, and the run has no
``forgetting`` or ``fwt`` (grouping it with newer runs is an error that names it).

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

Tables
------
The terminal tables (:func:`comparison_tables`, and ``simlab run``'s) put one metric per row and one
arm per column, as many arms per table as fit in :data:`TABLE_WIDTH` columns whatever the terminal
(a pipe or a file included): wider sets of arms continue in further tables.

Baselines and their checks are :mod:`simlab.baseline`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from simlab.metrics.registry import HEADLINE, REGISTRY
from simlab.rundir import (REPLAY_LABEL, UPPER_BOUND_LABEL, RunDirError, fingerprinted_settings, read_finished_run,
                           reference_label, settings_fingerprint)

__all__ = [
    "TABLE_WIDTH",
    "CompareError",
    "Group",
    "METRICS",
    "MetricSpec",
    "RunInfo",
    "Stat",
    "Tolerance",
    "comparison_tables",
    "paired_differences",
    "paired_tables",
    "group_runs",
    "load_run",
    "side_by_side",
]

BASELINE_FORMAT = "simlab-baseline/2"
"""/2: ``forgetting`` is the headline (departed domains) and ``fwt`` the ODEx paper's; in /1 they were
Chaudhry's forgetting and GEM's FWT, so a /1 file is refused rather than checked against other numbers."""
TABLE_WIDTH = 80
"""The most terminal columns a table printed by ``simlab run`` or ``simlab compare`` takes."""
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
    MetricSpec("gem_fwt", "GEM FWT", "higher", Tolerance("abs", 0.03)),
    MetricSpec("forgetting", "forgetting", "lower", Tolerance("abs", 0.03)),
    MetricSpec("chaudhry_forgetting", "Chaudhry forg.", "lower", Tolerance("abs", 0.03)),
    *(spec for spec, _ in _registry_specs()),
    MetricSpec("pool_size", "pool K", "either", Tolerance("abs", 0.0), digits=1),
    MetricSpec("bytes_total", "MB sent", "lower", Tolerance("rel", 0.01), scale=1e6, digits=1),
    MetricSpec("wall_time_s", "wall s", "lower", Tolerance("rel", 1.0), digits=1),
)
SPECS = {m.key: m for m in METRICS}
SUMMARY_KEYS = ("acc", "bwt", "fwt", "gem_fwt", "forgetting", "chaudhry_forgetting", "bytes_total", "wall_time_s")
OLD_NAMES = {"fwt": "gem_fwt", "forgetting": "chaudhry_forgetting"}
"""What ``fwt`` and ``forgetting`` meant in a summary written before the headline forgetting."""


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
        if "forgetting_by_domain" not in a:  # written before the headline forgetting
            a = {OLD_NAMES.get(k, k): v for k, v in a.items()}
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
        meta[name] = {k: a.get(k) for k in ("method", "family", "aggregation", "breaks_no_rehearsal",
                                            "uses_future_data")}
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


# ---------------------------------------------------------------------------------- rendering
def fmt_stat(s: Stat | None, spec: MetricSpec, signed: bool = False) -> str:
    """``mean ± std (n)`` (the mean alone for one run); ``signed``: with its sign (a difference)."""
    if s is None:
        return ""
    if s.mean is None:
        return "n/a"
    text = f"{s.mean / spec.scale:{'+' if signed else ''}.{spec.digits}f}"
    if s.n > 1:
        text += f" ± {s.std / spec.scale:.{spec.digits}f} ({s.n})"
    return text


def side_by_side(title: str, corner: str, labels: list[str], columns: list[tuple[str, list[str]]],
                 caption: str | None = None, width: int = TABLE_WIDTH) -> list:
    """Rich tables with one row per label (first column headed ``corner``) and one right-aligned column
    per ``(header, cells)``, as many columns per table as fit in ``width`` terminal columns; each table
    repeats the label column, a set split over several tables numbers them in the title (the same
    number of columns in each when that fits), and the caption goes under the last. A table is at
    least as wide as its title (up to ``width``). Text is taken as rich markup (escape it). A column
    too wide on its own gets a table of its own."""
    import io

    from rich.cells import cell_len
    from rich.console import Console
    from rich.measure import Measurement
    from rich.table import Table
    from rich.text import Text

    probe = Console(width=10_000, file=io.StringIO())

    def build(cols: list[tuple[str, list[str]]], head: str | None, foot: str | None) -> Table:
        wide = min(width, cell_len(Text.from_markup(head or "").plain))
        table = Table(title=head, caption=foot, min_width=wide)  # the title on one line, if it fits
        table.add_column(corner, no_wrap=True)
        for header, _ in cols:
            table.add_column(header, justify="right", overflow="fold")
        for i, label in enumerate(labels):
            table.add_row(label, *[cells[i] for _, cells in cols])
        return table

    def fits(cols: list[tuple[str, list[str]]]) -> bool:
        return Measurement.get(probe, probe.options, build(cols, None, None)).maximum <= width

    chunks: list[list[tuple[str, list[str]]]] = [[]]
    for col in columns:
        if chunks[-1] and not fits(chunks[-1] + [col]):
            chunks.append([])
        chunks[-1].append(col)
    n = len(chunks)
    per = -(-len(columns) // n)  # the same number of columns in every table, when that fits
    even = [columns[k:k + per] for k in range(0, len(columns), per)]
    if len(even) == n and all(fits(c) for c in even):
        chunks = even
    return [build(cols, title if n == 1 else f"{title} ({k + 1}/{n})", caption if k == n - 1 else None)
            for k, cols in enumerate(chunks)]


REFERENCE_MARKS = {REPLAY_LABEL: "†", UPPER_BOUND_LABEL: "‡"}
REFERENCE_CAPTIONS = {
    REPLAY_LABEL: "† replay: revisits every old window with the same steps per round (breaks no-rehearsal).",
    UPPER_BOUND_LABEL: "‡ upper bound: static, trains i.i.d. on all of the stream's data from round 1 (future "
                       "rounds included); its BWT/FWT mean nothing.",
}


def reference_mark(arm: dict) -> str:
    """`` †`` (replay) or `` ‡`` (the static upper bound) after a reference arm's name, else nothing."""
    label = reference_label(arm)
    return f" {REFERENCE_MARKS[label]}" if label else ""


def reference_caption(arms) -> str | None:
    """The caption under a table that holds reference arms (``arms``: their summary blocks)."""
    labels = {reference_label(a) for a in arms} - {None}
    return " ".join(REFERENCE_CAPTIONS[lab] for lab in REFERENCE_CAPTIONS if lab in labels) or None


def paired_differences(group: Group, baseline: str) -> dict[str, dict[str, Stat]]:
    """Per arm other than ``baseline``, per metric both have: mean ± std over the group's runs of the
    run's ``arm − baseline``. The arms of one run saw identical streams (same seed), so the pairing
    removes the spread they share; a difference is undefined (null) where either value is."""
    if baseline not in group.stats:
        raise CompareError(f"--paired {baseline}: no such arm in {group.scenario} (arms: {', '.join(group.stats)})")
    out: dict[str, dict[str, Stat]] = {}
    for arm, stats in group.stats.items():
        if arm == baseline:
            continue
        out[arm] = {}
        for key in (k for k in stats if k in group.stats[baseline]):
            diffs = [None if r.arms[arm][key] is None or r.arms[baseline][key] is None
                     else r.arms[arm][key] - r.arms[baseline][key] for r in group.runs]
            out[arm][key] = Stat.of(diffs, f"arm {arm} − {baseline}, metric {key}")
    return out


def metric_label(m: MetricSpec) -> str:
    """The metric's row label with its better direction, e.g. ``ACC ↑``."""
    return m.label + {"higher": " ↑", "lower": " ↓", "either": ""}[m.direction]


def paired_tables(groups: list[Group], baseline: str) -> list:
    """Per group, the paired differences to ``baseline`` (:func:`paired_differences`), metrics × arms."""
    from rich.markup import escape

    tables = []
    for g in groups:
        diffs = paired_differences(g, baseline)
        present = [m for m in METRICS if any(m.key in d for d in diffs.values())]
        columns = [(escape(arm), [fmt_stat(d.get(m.key), m, signed=True) for m in present])
                   for arm, d in diffs.items()]
        tables += side_by_side(escape(f"{g.scenario} [{g.fingerprint or '?'}]: arm − {baseline}, paired by seed, "
                                      "mean ± std (n)"), "metric (pooled)", [metric_label(m) for m in present], columns)
    return tables


def family_of(meta: dict) -> str:
    """The arm's method family (regularisation, distillation, expansion, rehearsal, baseline); read from
    the method registry for runs written before the summary recorded it."""
    if meta.get("family"):
        return str(meta["family"])
    from simlab.continual.registry import METHODS

    cls = METHODS.get(str(meta.get("method")))
    return cls.family if cls is not None else "?"


def comparison_tables(groups: list[Group]) -> list:
    """Per group, rich tables of metrics (rows) × arms (columns), each at most :data:`TABLE_WIDTH` wide:
    the arm's method family, then the metrics present in any of its arms, every cell ``mean ± std (n)``.

    Reference arms carry a mark († replay, ‡ the static upper bound: :func:`reference_label`) and
    the caption says what they are.
    """
    from rich.markup import escape

    tables = []
    for g in groups:
        present = [m for m in METRICS if any(m.key in st for st in g.stats.values())]
        columns = [(escape(arm + reference_mark(g.meta.get(arm, {}))),
                    [family_of(g.meta.get(arm, {}))] + [fmt_stat(stats.get(m.key), m) for m in present])
                   for arm, stats in g.stats.items()]
        labels = ["family"] + [metric_label(m) for m in present]
        seeds = ",".join(str(s) for s in g.seeds)
        tables += side_by_side(escape(f"{g.scenario} [{g.fingerprint or '?'}] seeds {seeds}: mean ± std (n runs)"),
                               "metric (pooled)", labels, columns,
                               caption=reference_caption(g.meta.get(arm, {}) for arm in g.stats))
    return tables

"""``simlab report RUN_DIR``: one self-contained HTML page (figures embedded) from a run directory.

Output: ``RUN_DIR/report/index.html`` plus the same figures as PNG files next to it (for slides).
The page embeds every figure as a base64 ``data:`` URI, so the HTML alone opens from disk, can be
mailed or archived, and never points at a file that went missing.

Reads only the run directory's files: ``summary.json`` (required), ``scenario.yaml``,
``metrics.jsonl``, ``rounds.jsonl`` (each optional; a section without its data says so). Rows that a
method may or may not log are handled when present: server ``pool_size`` rows (the pool plot;
without them the page says every arm deploys a single model), ``fork`` rows (events on that plot),
``routing_purity`` rows (their own plot), and ``train_failed`` / ``eval_failed`` /
``update_rejected`` rows (the failures table).
"""

from __future__ import annotations

import base64
import html
import math
import re
from collections import defaultdict
from datetime import datetime
from pathlib import Path
from typing import Any

from simlab.compare import final_pool_sizes
from simlab.data.drift import describe
from simlab.fileio import atomic_write, run_path
from simlab.metrics.registry import HEADLINE, REGISTRY
from simlab.report.story import what_happened
from simlab.rundir import RunDirError, read_finished_run, reference_label
from simlab.runlog import SHARED

__all__ = ["ReportError", "write_report"]

FAILURE_METRICS = ("train_failed", "eval_failed", "update_rejected")
REPORT = "report"
"""The report's folder in the run directory: ``index.html`` and the figures' PNGs."""


class ReportError(RuntimeError):
    """The run directory cannot be reported on (no summary.json, unreadable files)."""


# ---------------------------------------------------------------------------------- reading
class RunData:
    """Everything the report needs, read once from the run directory."""

    def __init__(self, run_dir: Path):
        self.dir = run_dir
        try:
            run = read_finished_run(run_dir)
            self.rows: list[dict] = run.metrics()
            self.costs: list[dict] = run.costs()
        except RunDirError as exc:
            raise ReportError(str(exc)) from None
        self.summary: dict = run.summary
        self.scenario: dict = run.scenario
        self.arms: list[str] = list(self.summary["arms"])
        fed = self.scenario.get("federation") or {}
        seen = [int(r["round"]) for r in self.rows] + [int(c["round"]) for c in self.costs]
        self.rounds: int = int(fed.get("rounds") or (max(seen) if seen else 1))
        first = self.summary["arms"][self.arms[0]]
        self.hospitals: list[str] = list(first.get("per_hospital", {}))
        self.domains: list[str] = list(first.get("final_dice", {})) or list(self.scenario.get("domains", {}))

    def arm(self, name: str) -> dict:
        return self.summary["arms"][name]

    def hospital_spec(self, hid: str) -> dict:
        return next((h for h in self.scenario.get("hospitals", []) if h.get("id") == hid), {})

    def spans(self, hid: str | None = None) -> list[tuple[int, int]]:
        """Rounds of gradual transitions (gradual / population drift), one hospital's or everyone's."""
        out = []
        for h in self.scenario.get("hospitals", []):
            d = h.get("drift") or {}
            if (hid is None or h.get("id") == hid) and d.get("type") in ("gradual", "population"):
                span = (int(d.get("start", 1)), int(d.get("end", 1)))
                if span not in out:
                    out.append(span)
        return out


# --------------------------------------------------------------------------------- HTML bits
def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _num(v: Any, signed: bool = False, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return '<span class="na">n/a</span>'
    return f"{v:+.{digits}f}" if signed and v < 0 else f"{v:.{digits}f}"


_NUMERIC = re.compile(r'^([+-]?\d[\d.,]*( \(.*\))?|<span class="na">n/a</span>)$')


def _table(head: list[str], rows: list[list[str]], row_class: list[str] | None = None) -> str:
    """Numbers (and n/a) right-aligned, text left-aligned; a column is numeric if all its cells are."""
    ncol = len(head)
    numeric = [bool(rows) and all(_NUMERIC.match(r[j]) for r in rows) for j in range(ncol)]
    th = "".join(f'<th class="{"num" if numeric[j] else "txt"}">{_e(h)}</th>' for j, h in enumerate(head))
    body = "".join(
        f'<tr class="{(row_class or [""] * len(rows))[i]}">'
        + "".join(f'<td class="{"num" if numeric[j] else "txt"}">{c}</td>' for j, c in enumerate(r)) + "</tr>"
        for i, r in enumerate(rows))
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_") or "x"


CSS = """
body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:0;color:#1b1b1b;background:#fafafa}
main{max-width:1360px;margin:0 auto;padding:20px 28px 60px}
h1{font-size:26px;margin:8px 0 4px} h2{font-size:20px;margin:34px 0 8px;border-bottom:2px solid #ddd;padding-bottom:4px}
h3{font-size:16px;margin:20px 0 6px}
.meta{color:#555;font-size:14px} nav{font-size:14px;margin:10px 0 0} nav a{margin-right:14px}
table{border-collapse:collapse;margin:8px 0 14px;font-size:14px;background:#fff}
th,td{border:1px solid #d0d0d0;padding:4px 9px} th{background:#eef1f5}
.num{text-align:right;font-variant-numeric:tabular-nums} .txt{text-align:left}
tr.reference td{background:#fff7e6}
.na{color:#999} .note{color:#444;font-size:14px;max-width:1000px}
figure{margin:10px 0 22px;background:#fff;border:1px solid #e0e0e0;padding:8px}
figure img{max-width:100%;height:auto;display:block}
figcaption{font-size:13px;color:#444;margin-top:6px}
dl{font-size:14px} dt{font-weight:600;margin-top:6px} dd{margin-left:18px}
.bad{color:#b00020;font-weight:600} .empty{color:#666;font-style:italic}
"""


class _Page:
    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.parts: list[str] = []
        self.nav: list[tuple[str, str]] = []
        self.pngs: list[Path] = []

    def section(self, anchor: str, title: str) -> None:
        self.nav.append((anchor, title))
        self.parts.append(f'<h2 id="{anchor}">{_e(title)}</h2>')

    def add(self, text: str) -> None:
        self.parts.append(text)

    def figure(self, fig, name: str, alt: str, caption: str) -> None:
        from simlab.report.plots import png_bytes

        data = png_bytes(fig)
        path = run_path(self.run_dir, REPORT, f"{name}.png")
        path.write_bytes(data)
        self.pngs.append(path)
        b64 = base64.b64encode(data).decode("ascii")
        self.parts.append(f'<figure><img src="data:image/png;base64,{b64}" alt="{_e(alt)}">'
                          f"<figcaption>{_e(caption)}</figcaption></figure>")


# ------------------------------------------------------------------------------------ sections
_ARROW = {"higher": "↑", "lower": "↓"}


def _extra_metrics(run: RunData) -> list[str]:
    """Registered metrics other than the headline with a block in some arm's summary, in registry order."""
    return [n for n in REGISTRY if n != HEADLINE and any(n in (run.arm(a).get("metrics") or {}) for a in run.arms)]


def _extra_columns(run: RunData) -> list[tuple[str, str, str, int]]:
    """(header, metric, field, digits) of the summary-table columns the registry adds."""
    cols = []
    for n in _extra_metrics(run):
        m = REGISTRY[n]
        cols.append((f"{m.label} {_ARROW[m.direction]}", n, "mean", m.digits))
        if m.counts_missed:
            cols.append((f"{m.label} missed ↓", n, "missed", 3))
    return cols


REFERENCE_NOTE = ("An arm marked <em>replay</em> trains on old windows again (the same steps per round): it breaks "
                  "the no-rehearsal rule on purpose. An arm marked <em>upper bound</em> trains i.i.d. on all of the "
                  "stream's data from the first round, future rounds included, so it never sees a drift and its "
                  "BWT/FWT mean nothing. Both are references, not competitors.")


def _summary_section(page: _Page, run: RunData) -> None:
    page.section("summary", "Summary")
    pools = final_pool_sizes([r for r in run.rows if r.get("metric") == "pool_size"])
    extra = _extra_columns(run)
    head = ["arm", "method (family)", "aggregation", "ACC ↑", "BWT ↑", "FWT ↑", "GEM FWT ↑", "forgetting ↓",
            "Chaudhry forg. ↓", *[c[0] for c in extra],
            "final pool K", "MB sent", "wall s", "failed updates", "skipped rounds"]
    rows, classes = [], []
    for name in run.arms:
        a = run.arm(name)
        blocks = a.get("metrics") or {}
        ref = reference_label(a)
        classes.append("reference" if ref else "")
        label = _e(name) + (f" <em>({_e(ref)})</em>" if ref else "")
        method = f'{a.get("method", "")} ({a["family"]})' if a.get("family") else a.get("method", "")
        rows.append([label, _e(method), _e(a.get("aggregation", "")), _num(a.get("acc")),
                     _num(a.get("bwt"), True), _num(a.get("fwt"), True), _num(a.get("gem_fwt"), True),
                     _num(a.get("forgetting"), True), _num(a.get("chaudhry_forgetting"), True),
                     *[_num(blocks.get(n, {}).get(f), digits=d) for _, n, f, d in extra],
                     _e(f"{pools[name]:g}") if name in pools else "1 (single model)",
                     _num((a.get("bytes_total") or 0) / 1e6, digits=1), _num(a.get("wall_time_s"), digits=1),
                     _e(a.get("failed_updates", 0)), _e(a.get("skipped_rounds", 0))])
    page.add(_table(head, rows, classes))
    page.add('<p class="note">ACC, BWT, FWT (the ODEx paper\'s: Dice gained on each later stage by training on '
             "it), GEM FWT and Chaudhry forgetting are computed on the <b>pooled</b> accuracy matrix (mean over "
             "hospitals; see the definitions at the end). <b>forgetting</b> is the headline: Dice lost on the "
             "domains that left every stream, from the last round each was trained on to the end (below). "
             "↑ higher is better, ↓ lower is better. "
             + "".join(f"{_e(REGISTRY[n].label)}: mean of the final row of its pooled matrix"
                       + (f", with the share of missed or false structures ({_e(REGISTRY[n].label)} missed), "
                          "which its mean leaves out" if REGISTRY[n].counts_missed else "") + ". "
                       for n in _extra_metrics(run))
             + REFERENCE_NOTE + "</p>")

    _forgetting_table(page, run)
    _per_hospital_table(page, run)

    page.add(f"<h3>Final Dice per test domain (round {run.rounds}, mean over hospitals)</h3>")
    rows = [[_e(name), *[_num(run.arm(name).get("final_dice", {}).get(d)) for d in run.domains]] for name in run.arms]
    page.add(_table(["arm", *run.domains], rows))
    for n in _extra_metrics(run):
        m = REGISTRY[n]
        unit = f", {m.unit}" if m.unit else ""
        missed = " (missed share in parentheses)" if m.counts_missed else ""
        page.add(f"<h3>Final {_e(m.label)} per test domain (round {run.rounds}, mean over hospitals{_e(unit)}, "
                 f"{_e(m.direction)} is better){_e(missed)}</h3>")
        rows = []
        for name in run.arms:
            block = (run.arm(name).get("metrics") or {}).get(n, {})
            cells = []
            for d in run.domains:
                cell = _num(block.get("final", {}).get(d), digits=m.digits)
                if m.counts_missed and block.get("final_missed", {}).get(d) is not None:
                    cell += f" ({block['final_missed'][d]:.0%})"
                cells.append(cell)
            rows.append([_e(name), *cells])
        page.add(_table(["arm", *run.domains], rows))


def _per_hospital_table(page: _Page, run: RunData) -> None:
    page.add("<h3>Per hospital (each hospital's own accuracy matrix and departed domains)</h3>")
    rows = []
    for name in run.arms:
        for hid, block in run.arm(name).get("per_hospital", {}).items():
            stages = " → ".join(s["domain"] for s in block.get("stages", []))
            rows.append([_e(name), _e(hid), _e(stages), *[_num(block.get(k), k != "acc") for k in
                                                          ("acc", "bwt", "fwt", "forgetting", "chaudhry_forgetting")]])
    page.add(_table(["arm", "hospital", "stages (true domains)", "ACC ↑", "BWT ↑", "FWT ↑", "forgetting ↓",
                     "Chaudhry forg. ↓"], rows))
    page.add('<p class="note">A hospital with one stage has no BWT/FWT/Chaudhry forgetting (n/a); its forgetting '
             "is n/a when no domain left its stream.</p>")


def _forgetting_table(page: _Page, run: RunData) -> None:
    """The headline forgetting per departed domain (``forgetting_by_domain``), signed, or why it is n/a."""
    page.add("<h3>Forgetting per domain that left every stream (Dice, mean over hospitals)</h3>")
    rows, notes = [], []
    for name in run.arms:
        a = run.arm(name)
        for d, f in (a.get("forgetting_by_domain") or {}).items():
            rows.append([_e(name), _e(d), _e(f.get("last_trained_round")), _num(f.get("then")), _num(f.get("final")),
                         _num(f.get("forgetting"), True)])
        if a.get("forgetting_note"):
            notes.append(f"{_e(name)}: {_e(a['forgetting_note'])}")
    if rows:
        page.add(_table(["arm", "domain", "last trained round", "Dice then", "Dice at the end", "lost (signed)"], rows))
    page.add('<p class="note">The headline forgetting is the mean of the losses, each clipped at 0, so a gain on '
             "one domain does not hide a loss on another. " + "; ".join(notes) + "</p>")


def _scenario_section(page: _Page, run: RunData) -> None:
    page.section("scenario", "Scenario")
    sc = run.scenario
    if not sc:
        page.add('<p class="empty">scenario.yaml is missing from the run directory.</p>')
        return
    rows = []
    for h in sc.get("hospitals", []):
        rows.append([_e(h.get("id")), _e(h.get("size")), _e(h.get("label_fraction")),
                     _e(describe(h.get("drift") or {}))])
    head = ["hospital", "images per round", "labelled share", "drift (true domains; the methods are not told)"]
    page.add(_table(head, rows))
    fed = sc.get("federation") or {}
    model = sc.get("model") or {}
    ev = sc.get("evaluation") or {}
    items = [("rounds", fed.get("rounds")), ("local steps", fed.get("local_steps")), ("lr", fed.get("lr")),
             ("batch size", fed.get("batch_size")), ("U-Net channels", model.get("channels")),
             ("image size", (sc.get("data") or {}).get("image_size")), ("evaluate every", ev.get("every")),
             ("test images per domain", ev.get("test_size"))]
    page.add('<p class="note">' + "; ".join(f"{_e(k)}: <b>{_e(v)}</b>" for k, v in items if v is not None)
             + ". Arms run on identical streams; each arm's own settings are in scenario.yaml under resolved_arms.</p>")


def _matrix_section(page: _Page, run: RunData) -> None:
    from simlab.report.plots import r_matrix_figure

    page.section("matrices", "Accuracy matrices R")
    page.add('<p class="note">Row i: the deployed model after the last round of stage i; column j: Dice on stage '
             "j's domain test set. The top row is the untrained model (round 0), which GEM FWT compares against; "
             "FWT compares each later diagonal cell with the zero-shot cell above it. Below the diagonal: memory "
             "of earlier domains (backward transfer); above: zero-shot on later ones. For gradual drift a stage "
             "starts where its transition starts.</p>")
    panels = [(f"arm {name}", run.arm(name)["pooled"]) for name in run.arms
              if run.arm(name).get("pooled", {}).get("stages")]
    if panels:
        fig = r_matrix_figure(panels, "Pooled accuracy matrix (federation level: mean over hospitals), one panel per arm")
        page.figure(fig, "R_pooled", "pooled accuracy matrix heatmaps",
                    "Pooled R per arm: stages are the named domains in order of their first contribution to a "
                    "window of any stream.")
    for hid in run.hospitals:
        panels = [(f"arm {name}", run.arm(name)["per_hospital"][hid]) for name in run.arms
                  if hid in run.arm(name).get("per_hospital", {})]
        if not panels:
            continue
        fig = r_matrix_figure(panels, f"Hospital {hid}: its own accuracy matrix, one panel per arm")
        page.figure(fig, f"R_{_slug(hid)}", f"accuracy matrix of hospital {hid}",
                    f"Hospital {hid}: stages are the true domains of its own stream (a gradual one from the start "
                    "of its transition).")


def _dice_section(page: _Page, run: RunData) -> None:
    from simlab.report.plots import dice_figure

    page.section("dice", "Dice over rounds")
    dice = [r for r in run.rows if r.get("metric") == "dice" and r.get("value") is not None]
    if not dice:
        page.add('<p class="empty">No Dice rows in metrics.jsonl.</p>')
        return
    per: dict[tuple[str, str, str], list[tuple[int, float]]] = defaultdict(list)
    fed: dict[tuple[str, str, int], list[float]] = defaultdict(list)
    for r in dice:
        per[(r["arm"], r["hospital"], r["domain"])].append((int(r["round"]), float(r["value"])))
        fed[(r["arm"], r["domain"], int(r["round"]))].append(float(r["value"]))
    panels = []
    first = run.arm(run.arms[0])
    fed_series: dict[tuple[str, str], list[tuple[int, float]]] = defaultdict(list)
    for (arm, dom, t), vals in sorted(fed.items(), key=lambda kv: kv[0][2]):
        fed_series[(arm, dom)].append((t, sum(vals) / len(vals)))
    def order(key: tuple[str, str]) -> tuple[int, int]:
        arm, dom = key
        return (run.arms.index(arm) if arm in run.arms else len(run.arms),
                run.domains.index(dom) if dom in run.domains else len(run.domains))

    panels.append({"title": "federation: mean over hospitals, every test domain",
                   "series": {k: fed_series[k] for k in sorted(fed_series, key=order)},
                   "stages": first.get("pooled", {}).get("stages", []), "spans": run.spans()})
    for hid in run.hospitals:
        stages = first["per_hospital"][hid].get("stages", [])
        doms = list(dict.fromkeys(s["domain"] for s in stages))
        # a hospital without rows of its own deploys the model evaluated once for all (rows under SHARED)
        series = {(arm, d): sorted(per.get((arm, hid, d)) or per.get((arm, SHARED, d), [])) for arm in run.arms
                  for d in doms}
        panels.append({"title": f"hospital {hid}: Dice on the domains of its own stream", "series": series,
                       "stages": stages, "spans": run.spans(hid)})
    fig = dice_figure(panels, run.arms, run.domains, run.rounds)
    page.figure(fig, "dice_over_rounds", "Dice over rounds per hospital",
                "Dashed vertical lines: where a new domain's stage starts, at a gradual transition its start (the "
                "new domain is named along the line; the domains present from round 1 are named in each panel's "
                "title); shaded: a gradual transition, "
                "from its start round (old domain) to its end round (new domain). Points: evaluated rounds.")


def _pool_section(page: _Page, run: RunData) -> None:
    from simlab.report.plots import pool_figure, routing_figure

    page.section("pool", "Model pool")
    pool: dict[str, list[tuple[int, float]]] = defaultdict(list)
    forks: dict[str, list[tuple[int, str, float]]] = defaultdict(list)
    purity: dict[tuple[str, str, int], list[float]] = defaultdict(list)
    for r in run.rows:
        m = r.get("metric")
        if m == "pool_size" and r.get("value") is not None:
            pool[r["arm"]].append((int(r["round"]), float(r["value"])))
        elif m == "fork":
            forks[r["arm"]].append((int(r["round"]), str(r.get("hospital")), float(r.get("value") or 0)))
        elif m == "routing_purity" and r.get("value") is not None:
            purity[(r["arm"], str(r.get("domain")), int(r["round"]))].append(float(r["value"]))
    if not pool and not forks:
        methods = ", ".join(sorted({str(run.arm(a).get("method")) for a in run.arms}))
        page.add(f'<p class="empty">Single model: no arm keeps a model pool (methods: {_e(methods)}); every arm '
                 "deploys one global model throughout.</p>")
    else:
        fig = pool_figure(pool, forks, [a for a in run.arms if a in pool or a in forks], run.rounds)
        n_forks = {a: len(v) for a, v in forks.items()}
        page.figure(fig, "pool_size", "model pool size over rounds",
                    "Pool size K after each round; triangles: a hospital forked a new member (label: hospital → "
                    f"new member index). Forks per arm: {n_forks or 'none'}.")
    if purity:
        series: dict[tuple[str, str], list[tuple[int, float]]] = defaultdict(list)
        for (arm, dom, t), vals in sorted(purity.items(), key=lambda kv: kv[0][2]):
            series[(arm, dom)].append((t, sum(vals) / len(vals)))
        arms = [a for a in run.arms if any(k[0] == a for k in series)]
        page.figure(routing_figure(series, arms, run.domains, run.rounds), "routing_purity",
                    "routing purity per domain", "Routing purity per test domain (mean over the rows logged per round).")


def _cost_section(page: _Page, run: RunData) -> None:
    from simlab.report.plots import cost_figure

    page.section("cost", "Cost: bytes and wall time")
    if not run.costs:
        page.add('<p class="empty">rounds.jsonl is missing or empty.</p>')
        return
    costs: dict[str, list[dict]] = defaultdict(list)
    for c in run.costs:
        costs[c["arm"]].append(c)
    page.figure(cost_figure(costs, run.arms, run.rounds), "cost_per_round", "bytes and wall time per round",
                "Round 0 evaluates the untrained model (no training traffic). Arms that send the same bytes "
                "draw coinciding lines (the last arm's on top).")


def _failure_section(page: _Page, run: RunData) -> None:
    page.section("failures", "Failures and rejected updates")
    events: dict[tuple[str, str, str], list[int]] = defaultdict(list)
    for r in run.rows:
        if r.get("metric") in FAILURE_METRICS:
            events[(r["arm"], str(r.get("hospital")), r["metric"])].append(int(r["round"]))
    skipped = [(c["arm"], c["round"]) for c in run.costs if c.get("skipped")]
    if not events and not skipped:
        page.add('<p class="empty">None: every sampled hospital replied, trained and evaluated in every round.</p>')
        return
    rows = [[_e(a), _e(h), f'<span class="bad">{_e(m)}</span>', _e(len(ts)), _e(", ".join(map(str, sorted(ts))))]
            for (a, h, m), ts in sorted(events.items())]
    page.add(_table(["arm", "hospital", "event", "count", "rounds"], rows))
    if skipped:
        by_arm: dict[str, list[int]] = defaultdict(list)
        for a, t in skipped:
            by_arm[a].append(t)
        page.add('<p class="note bad">Skipped rounds (too few replies, model unchanged): '
                 + "; ".join(f"{_e(a)}: {_e(', '.join(map(str, ts)))}" for a, ts in by_arm.items()) + "</p>")


def _definitions_section(page: _Page, run: RunData) -> None:
    page.section("definitions", "Metric definitions")
    labels = run.summary.get("metric_labels", {})
    items = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in labels.items())
    page.add(f"<dl>{items}</dl>")
    if run.summary.get("pooled_definition"):
        page.add(f'<p class="note">{_e(run.summary["pooled_definition"])}.</p>')


# ---------------------------------------------------------------------------------------- entry
def write_report(run_dir: Path) -> Path:
    """Write ``run_dir/report/index.html`` (figures embedded) and the PNGs beside it; return the HTML path."""
    run_dir = Path(run_dir)
    run = RunData(run_dir)
    run_path(run_dir, REPORT).mkdir(exist_ok=True)
    page = _Page(run_dir)
    _summary_section(page, run)
    _scenario_section(page, run)
    _matrix_section(page, run)
    _dice_section(page, run)
    _pool_section(page, run)
    _cost_section(page, run)
    _failure_section(page, run)
    _definitions_section(page, run)

    name = run.summary.get("scenario", run_dir.name)
    arms = ", ".join(run.arms)
    nav = "".join(f'<a href="#{a}">{_e(t)}</a>' for a, t in page.nav)
    head = (f"<h1>simlab report: {_e(name)}</h1>"
            f'<p class="meta">run directory <b>{_e(run_dir.name)}</b> · seed {_e(run.summary.get("seed"))} · '
            f"{_e(run.rounds)} rounds · {_e(len(run.hospitals))} hospitals · arms: {_e(arms)} · report written "
            f"{_e(datetime.now().strftime('%Y-%m-%d %H:%M'))}</p>"
            f'<p class="story"><b>What happened.</b> {_e(what_happened(run.summary, run.scenario))}</p><nav>{nav}</nav>')
    doc = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
           f'<meta name="viewport" content="width=device-width, initial-scale=1">'
           f"<title>simlab report: {_e(name)}</title><style>{CSS}</style></head>"
           f"<body><main>{head}{''.join(page.parts)}</main></body></html>\n")
    out = run_path(run_dir, REPORT, "index.html")
    atomic_write(out, doc)
    return out

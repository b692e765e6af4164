"""The ``compare`` and ``report`` subcommands, added to simlab's argument parser by the CLI.

``add_subcommands(sub)`` registers both parsers; ``dispatch(args)`` runs the command when
``args.command`` is one of them and returns its exit status, else ``None``. Exit status: 0 fine,
1 a regression against the baseline, 2 an input problem (missing or unfinished run directory,
malformed baseline, runs and baseline that do not match, bad ``--tolerance``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["add_subcommands", "dispatch", "run_compare", "run_report"]

COMMANDS = ("compare", "report")

COMPARE_HELP = """\
Compare run directories: tables of metrics x arms, at most 80 columns wide (ACC, BWT, FWT as in the
ODEx paper, GEM FWT, forgetting, Chaudhry forgetting of Dice; every other registered segmentation
metric, e.g. HD95 and its missed share; final pool size when an arm keeps a pool, MB sent, wall time).
Runs of the same scenario and settings that differ only by seed are grouped per arm and shown as
mean ± std (n).

With --baseline FILE the runs are checked against a baseline written earlier by --write-baseline:
each metric has a tolerance, absolute (abs:X) or relative to the baseline mean (rel:X), and a better
direction (higher for acc, bwt, fwt, gem_fwt; lower for forgetting, chaudhry_forgetting, hd95,
hd95_missed, bytes_total, wall_time_s; pool_size either way). A change in the good direction never fails. Exit status 1 names every regressed arm and
metric; 2 means the inputs do not match (a baseline arm or metric the runs lack, an arm the baseline
lacks, another scenario).

examples:
  simlab compare runs/qs-seed0 runs/qs-seed1 runs/qs-seed2
  simlab compare runs/quickstart-seeds --paired sequential     (a `simlab run --seeds` root)
  simlab compare runs/qs-seed* --write-baseline baselines/quickstart.yaml --tolerance wall_time_s=rel:2
  simlab compare runs/new --baseline baselines/quickstart.yaml --tolerance acc=abs:0.01
"""

REPORT_HELP = """\
Write RUN_DIR/report/index.html: summary tables, accuracy-matrix heatmaps (pooled and per hospital),
Dice over rounds with domain boundaries, model pool size and forks (when a method keeps a pool),
bytes and wall time per round, failures. Figures are embedded, so the page opens from disk alone;
the same figures are written as PNG files next to it.
"""


def add_subcommands(sub: argparse._SubParsersAction) -> None:
    """Add the ``compare`` and ``report`` parsers to simlab's subparsers."""
    comp = sub.add_parser("compare", help="compare runs (mean ± std over seeds) and check them against a baseline",
                          description=COMPARE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    comp.add_argument("runs", nargs="+", metavar="RUN_DIR",
                      help="run directories (each with summary.json), or the root of a `simlab run --seeds` sweep")
    comp.add_argument("--paired", metavar="ARM", default=None,
                      help="also print every arm's paired difference to ARM (same seed, identical streams): "
                           "mean ± std over seeds")
    group = comp.add_mutually_exclusive_group()
    group.add_argument("--baseline", metavar="FILE", default=None,
                       help="check the runs against this baseline (YAML or JSON); exit 1 on a regression")
    group.add_argument("--write-baseline", metavar="FILE", default=None,
                       help="write the runs' means, std, n and tolerances as a baseline (.json: JSON, else YAML)")
    comp.add_argument("--tolerance", action="append", default=[], metavar="METRIC=SPEC",
                      help="tolerance for a metric, abs:X or rel:X, e.g. acc=abs:0.02 or wall_time_s=rel:0.5 "
                           "(repeatable; overrides the baseline's and the defaults)")
    rep = sub.add_parser("report", help="write an HTML report (with figures) into RUN_DIR/report/",
                         description=REPORT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    rep.add_argument("run_dir", metavar="RUN_DIR", help="a finished run directory")


def text_console(stderr: bool = False):
    """A rich Console for the command line; when the output is not a terminal (a pipe, a CI log) and
    ``$COLUMNS`` does not say otherwise, it is 220 columns wide, so that a message naming a long path
    stays on one line instead of rich's 80 columns. The tables are built to fit 80 columns either way."""
    import os

    from rich.console import Console

    c = Console(stderr=stderr)
    return c if c.is_terminal or "COLUMNS" in os.environ else Console(stderr=stderr, width=220)


def run_compare(runs: list[str], baseline: str | None = None, write_baseline: str | None = None,
                tolerances: list[str] | None = None, console=None, err=None, paired: str | None = None) -> int:
    """``simlab compare``: print the table (and with ``paired`` the paired differences to that arm);
    write or check a baseline. Returns the exit status."""

    from simlab.baseline import check_against_baseline, check_table, parse_tolerance_args, read_baseline
    from simlab.baseline import write_baseline as write
    from simlab.compare import CompareError, group_runs, load_run, paired_tables
    from simlab.rundir import RunDirError, expand_sweeps

    console = console or text_console()
    err = err or text_console(stderr=True)
    try:
        tol = parse_tolerance_args(tolerances or [])
        infos = [load_run(r) for r in expand_sweeps(runs)]
        groups = group_runs(infos)
        diffs = paired_tables(groups, paired) if paired else []
    except (CompareError, RunDirError) as exc:
        err.print(f"error: {exc}", highlight=False, markup=False)
        return 2
    _print_groups(console, groups)
    for table in diffs:
        console.print(table)
    if write_baseline or baseline:
        if len(groups) != 1:
            names = ", ".join(f"{g.scenario} [{g.fingerprint}]" for g in groups)
            err.print(f"error: a baseline describes one scenario configuration; the runs span {len(groups)}: {names}",
                      highlight=False, markup=False)
            return 2
    if write_baseline:
        try:
            write(write_baseline, groups[0], tol)
        except (OSError, ValueError) as exc:
            err.print(f"error: {write_baseline}: {exc}", highlight=False, markup=False)
            return 2
        console.print(f"baseline written: {write_baseline} ({len(groups[0].runs)} run(s), arms: "
                      f"{', '.join(groups[0].stats)})", highlight=False, markup=False)
        return 0
    if baseline:
        try:
            doc = read_baseline(baseline)
            result = check_against_baseline(groups[0], doc, tol, source=str(baseline))
        except CompareError as exc:
            err.print(f"error: {exc}", highlight=False, markup=False)
            return 2
        console.print(check_table(result, Path(baseline).name))
        for w in result.warnings:
            console.print(f"warning: {w}", highlight=False, markup=False)
        if result.regressions:
            console.print(f"REGRESSION against {baseline}: {len(result.regressions)} metric(s) got worse beyond "
                          "tolerance:", highlight=False, markup=False)
            for r in result.regressions:
                console.print(f"  REGRESSED {r.describe()}", highlight=False, markup=False)
            return 1
        better = sum(r.verdict == "better" for r in result.rows)
        console.print(f"no regression against {baseline}: {len(result.rows)} checks within tolerance "
                      f"({better} better)", highlight=False, markup=False)
    return 0


def _print_groups(console, groups) -> None:
    """The comparison tables, then how each group's settings differ from the first group of its scenario."""
    from simlab.compare import comparison_tables, settings_diff

    for table in comparison_tables(groups):
        console.print(table)
    ref = groups[0].runs[0]
    for g in groups[1:]:
        if g.scenario == groups[0].scenario:
            console.print(f"{g.scenario} [{g.fingerprint}] differs from [{groups[0].fingerprint}] in: "
                          + "; ".join(settings_diff(ref, g.runs[0])), highlight=False, markup=False)


def run_report(run_dir: str, console=None, err=None) -> int:
    """``simlab report``: write the HTML report and print its path. Returns the exit status."""
    from simlab.report.html import ReportError, write_report

    console = console or text_console()
    err = err or text_console(stderr=True)
    try:
        out = write_report(Path(run_dir))
    except (ReportError, OSError) as exc:
        err.print(f"error: {exc}", highlight=False, markup=False)
        return 2
    console.print(f"report: {out}", highlight=False, markup=False)
    return 0


def dispatch(args: argparse.Namespace) -> int | None:
    """Run ``compare`` or ``report`` and return the exit status; ``None`` for any other command."""
    command = getattr(args, "command", None)
    if command == "compare":
        return run_compare(args.runs, args.baseline, args.write_baseline, args.tolerance, paired=args.paired)
    if command == "report":
        return run_report(args.run_dir)
    return None

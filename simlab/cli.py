"""simlab command line: run and validate scenarios."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = """\
simlab: federated, continual medical image segmentation across drifting hospitals.

A scenario YAML names domains (scanner appearance + patient population), hospitals with their
drift schedules, the model, federation, continual method and evaluation. `simlab run` streams
every hospital's data round by round through Flower's simulation engine, evaluates the deployed
model on every domain's held-out test set, and writes a run directory with metrics.jsonl,
accuracy matrices (R/), summary.json (ACC, BWT, FWT, forgetting per arm and hospital) and a log.

examples:
  simlab run scenarios/quickstart.yaml
  simlab run scenarios/quickstart.yaml --seed 3 --out runs/qs-seed3
  simlab run scenarios/quickstart.yaml --set federation.rounds=10 --set data.image_size=64
  simlab run --resume runs/qs-seed3          (continue a run that stopped, from its checkpoints)
  simlab run scenarios/quickstart.yaml --seeds 0,1,2 --paired sequential --out runs/qs
                                             (every arm for every seed; mean ± std and paired differences)
  simlab validate scenarios/quickstart.yaml
  simlab report runs/quickstart-20261123-101500
  simlab compare runs/a runs/b --baseline tests/regression/baselines/forgetting.yaml

exit status: 0 done; 1 the run failed (also when an arm skipped every round, so that it never
aggregated an update); 2 bad input (scenario, options, data folders, run directory or cache
folder; the message names the file, key or variable); 130 / 143 stopped by SIGINT / SIGTERM.
"""


def _add_scenario_args(p: argparse.ArgumentParser, optional: bool = False) -> None:
    p.add_argument("scenario", nargs="?" if optional else None, help="scenario YAML file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a value by its dotted key, e.g. federation.lr=0.01 (repeatable; "
                        "VALUE is YAML, so lists like [1,2] work)")
    p.add_argument("--seed", type=int, default=None, help="override the scenario seed")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="simlab", description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    run = sub.add_parser("run", help="run a scenario (every arm) and write a run directory",
                         description="Run every arm of a scenario on identical hospital streams through Flower's "
                                     "simulation engine; print a results table and the run directory.")
    _add_scenario_args(run, optional=True)
    run.add_argument("--out", default=None, help="run directory (default runs/<name>-<time>; must be new or empty)")
    run.add_argument("--resume", metavar="RUN_DIR", default=None,
                     help="continue a run that stopped (crash, kill, lost machine) from its last checkpoints, with "
                          "the scenario it started with; takes no scenario, --set, --seed or --out")
    run.add_argument("--seeds", default=None, metavar="LIST",
                     help="run every arm for each seed, e.g. 0,1,2 or 0-4: OUT/seed-<s> are run directories, and "
                          "one table of mean ± std over seeds ends the run (`simlab compare OUT` prints it again); "
                          "the same command again keeps finished seeds and resumes a stopped one")
    run.add_argument("--paired", metavar="ARM", default=None,
                     help="with --seeds: also every arm's paired difference to ARM (same seed, identical streams)")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.add_argument("--no-report", action="store_true", help="do not write the HTML report at the end")
    val = sub.add_parser("validate", help="check a scenario file and print it resolved",
                         description="Validate a scenario: every error names the file, the dotted key, what was "
                                     "expected and what was found. Prints the resolved arms on success.")
    _add_scenario_args(val)
    from simlab.report.commands import add_subcommands

    add_subcommands(sub)
    return parser


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:+.3f}" if v < 0 else f"{v:.3f}"


NOTES = ("ACC, BWT: GEM (Lopez-Paz & Ranzato 2017). FWT: the ODEx paper's (González et al.",
         "2022), Dice gained on each later stage by training on it. forgetting: Dice lost",
         "on the domains that left every stream, since their last training round",
         "(forgetting_by_domain); worst hospital: the same over the domains that left its",
         "own stream. Variants such as GEM FWT and Chaudhry forgetting: summary.json.")
"""The lines under the results table, each under 80 columns."""


def _worst_hospital(a: dict) -> str:
    """The hospital with the largest own forgetting (the domains that left its stream), e.g. ``st-mary 0.310``."""
    per = {h: v["forgetting"] for h, v in a["per_hospital"].items() if v.get("forgetting") is not None}
    if not per:
        return "n/a"
    worst = max(per, key=per.__getitem__)
    return f"{worst} {_fmt(per[worst])}"


def print_summary(console, summary: dict, run_dir: Path) -> None:
    """The results table (metrics × arms, at most 80 columns: :func:`simlab.compare.side_by_side`)."""
    from rich.markup import escape

    from simlab.compare import reference_caption, reference_mark, side_by_side

    rows = [("family", lambda a: a.get("family", "")), ("ACC ↑", lambda a: _fmt(a["acc"])), ("BWT ↑", lambda a: _fmt(a["bwt"])),
            ("FWT ↑", lambda a: _fmt(a["fwt"])), ("forgetting ↓", lambda a: _fmt(a["forgetting"])),
            ("worst hospital forg. ↓", _worst_hospital),
            ("pool K", lambda a: str(a["pool"]["pool_size_final"]) if "pool" in a else "1"),
            ("MB sent", lambda a: f"{a['bytes_total'] / 1e6:.1f}"), ("wall s", lambda a: f"{a['wall_time_s']:.0f}")]
    arms = summary["arms"]
    columns = [(escape(name + reference_mark(a)), [cell(a) for _, cell in rows]) for name, a in arms.items()]
    for table in side_by_side(escape(f"{summary['scenario']} (seed {summary['seed']}): pooled over hospitals"),
                              "metric", [label for label, _ in rows], columns,
                              caption=reference_caption(arms.values())):
        console.print(table)
    for line in NOTES:
        console.print(line, highlight=False)
    from simlab.config import read_yaml
    from simlab.report.story import what_happened

    if (run_dir / "scenario.yaml").is_file():  # every run directory has it; a bare summary has no story
        console.print(what_happened(summary, read_yaml(run_dir / "scenario.yaml")), highlight=False, markup=False)
    console.print(f"run directory: [bold]{run_dir}[/bold]")


class Progress:
    """Terminal progress: data preparation, then rounds of each arm."""

    def __init__(self, console, enabled: bool):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeElapsedColumn

        self.enabled = enabled
        self.bar = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), console=console, disable=not enabled)
        self.data_task = None
        self.arm_tasks: dict[str, int] = {}

    def __enter__(self):
        self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        return self.bar.__exit__(*exc)

    def start_data(self, total: int) -> None:
        self.data_task = self.bar.add_task("data (generate or load cached)", total=total)

    def data_tick(self) -> None:
        self.bar.advance(self.data_task)

    def start_arm(self, arm: str, rounds: int) -> None:
        self.arm_tasks[arm] = self.bar.add_task(f"arm {arm}: rounds", total=rounds)

    def round_done(self, arm: str, t: int) -> None:
        self.bar.update(self.arm_tasks[arm], completed=t)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    from simlab.report.commands import dispatch, text_console

    rc = dispatch(args)
    if rc is not None:
        return rc
    from simlab.checkpoint import CheckpointError
    from simlab.data.nifti import NiftiDataError
    from simlab.engine.flwr_config import DeploymentError
    from simlab.rundir import RunDirError
    from simlab.config import ScenarioError
    from simlab.interrupt import Interrupted, handle_signals

    console, err = text_console(), text_console(stderr=True)
    problem = _argument_problem(args)
    if problem:
        err.print(f"error: {problem}")
        return 2
    try:
        with handle_signals():
            return _run_command(args, console, err)
    except Interrupted as exc:
        where = getattr(exc, "run_dir", None)
        if where is None:
            err.print(f"{exc}", highlight=False, markup=False)
        else:
            again = ("run the same command again" if getattr(args, "seeds", None) is not None
                     else f"simlab run --resume {where}")
            err.print(f"{exc}: {where} is marked FAILED at its last completed round; to continue: {again}",
                      highlight=False, markup=False)
        return exc.exit_code
    except ScenarioError as exc:
        err.print("[red]invalid scenario[/red]")
        err.print(str(exc), highlight=False, markup=False)
        return 2
    except (NiftiDataError, RunDirError, CheckpointError) as exc:
        err.print(f"error: {exc}", highlight=False, markup=False)
        return 2
    except DeploymentError as exc:  # a Flower run (engine.launcher: flwr-run) that did not complete
        err.print(f"error: {exc}", highlight=False, markup=False)
        return 1


def _run_command(args, console, err) -> int:
    """``simlab run`` / ``simlab validate`` once the arguments are known to fit together."""
    from simlab.runner import data_items, run_scenario
    from simlab.scenario.inputs import check_inputs
    from simlab.scenario.schema import load_scenario

    resume, seeds = getattr(args, "resume", None), getattr(args, "seeds", None)
    if resume is not None:
        return _resume(resume, args, console, err)
    if seeds is not None:
        return _sweep(parse_seeds(seeds), args, console, err)
    loaded = load_scenario(args.scenario, args.overrides, args.seed, getattr(args, "out", None))
    check_inputs(loaded)
    if args.command == "validate":
        arms = ", ".join(f"{n} ({s.continual.method}, {s.federation.aggregation.rule})" for n, s in loaded.arms.items())
        sc = loaded.base
        console.print(f"{args.scenario}: valid. {len(sc.hospitals)} hospitals, {len(sc.domains)} domains, "
                      f"{sc.federation.rounds} rounds; arms: {arms}")
        return 0
    with Progress(console, enabled=not args.quiet) as progress:
        progress.start_data(data_items(loaded))
        run_dir, summary = run_scenario(loaded, progress)
    return _finish(console, summary, run_dir, args)


def _argument_problem(args) -> str | None:
    """What is wrong with a combination of ``simlab run`` options, or None."""
    resume, seeds = getattr(args, "resume", None), getattr(args, "seeds", None)
    if args.command == "run" and (resume is None) == (args.scenario is None):
        return "simlab run takes a scenario file, or --resume RUN_DIR (not both)"
    if seeds is not None and (resume is not None or args.seed is not None):
        return ("--seeds runs a list of seeds; it takes no --seed or --resume (run the same --seeds command "
                "again to resume)")
    if getattr(args, "paired", None) and seeds is None:
        return "--paired needs --seeds (for runs already made: simlab compare RUN_DIR ... --paired ARM)"
    if resume is not None and (args.overrides or args.seed is not None or args.out):
        return "--resume continues a run with the scenario it started with; --set, --seed and --out cannot change it"
    return None


def parse_seeds(text: str) -> list[int]:
    """``0,1,2`` or ``0-4`` (inclusive) or a mix, e.g. ``0-2,7``; distinct, in the order given."""
    from simlab.rundir import RunDirError

    seeds: list[int] = []
    try:
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            seeds += list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
    except ValueError:
        raise RunDirError(f"--seeds {text!r}: expected integers like 0,1,2 or 0-4") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise RunDirError(f"--seeds {text!r}: expected distinct seeds, at least one")
    return seeds


def _sweep(seeds: list[int], args, console, err) -> int:
    """``simlab run --seeds``: each seed's run (:func:`simlab.runner.run_sweep`), then one comparison."""
    from simlab.report.commands import run_compare
    from simlab.runner import data_items, run_scenario, run_sweep
    from simlab.scenario.inputs import check_inputs

    summaries = []

    def run_one(loaded, resume_dir):
        check_inputs(loaded)
        console.print(f"seed {loaded.base.seed}: {loaded.base.output.dir}", highlight=False)
        with Progress(console, enabled=not args.quiet) as progress:
            progress.start_data(data_items(loaded))
            run_dir, summary = run_scenario(loaded, progress, resume_dir=resume_dir)
        summaries.append(summary)
        if not args.no_report:
            from simlab.report import write_report

            write_report(run_dir)
        return run_dir, summary

    dirs = run_sweep(args.scenario, args.overrides, seeds, args.out, run_one)
    rc = run_compare([str(d) for d in dirs], console=console, err=err, paired=args.paired)
    console.print(f"sweep directory: [bold]{dirs[0].parent}[/bold] (simlab compare {dirs[0].parent} prints "
                  "these tables again)")
    return max([rc, *(_untrained_status(console, s, f"seed {s['seed']}: ") for s in summaries)])


def _finish(console, summary: dict, run_dir: Path, args) -> int:
    """The table, the report; exit status 1 when an arm aggregated no update in any round."""
    print_summary(console, summary, run_dir)
    if not args.no_report:
        from simlab.report import write_report

        console.print(f"report: [bold]{write_report(run_dir)}[/bold]")
    return _untrained_status(console, summary)


def _untrained_status(console, summary: dict, prefix: str = "") -> int:
    """1, each named, when an arm of ``summary`` skipped every round; else 0."""
    from simlab.rundir import untrained_arms

    lines = untrained_arms(summary)
    for line in lines.values():
        console.print(f"[red]FAILED[/red] {prefix}{line}", highlight=False)
    return 1 if lines else 0


def _resume(run_dir: str, args, console, err) -> int:
    """``simlab run --resume``: the engine the run started on (run.json) continues it."""
    from simlab.rundir import resume_inputs
    from simlab.runner import data_items, run_scenario

    from simlab.scenario.inputs import check_inputs

    path, loaded, info = resume_inputs(run_dir)
    if info.get("engine") != "deployment":  # a deployment's data is at the hospitals, who check it themselves
        check_inputs(loaded)
    console.print(f"resuming {path} ({info.get('engine', 'simulation')})")
    if info.get("engine") == "deployment":
        from simlab.engine.deploy_run import run_deployment
        from simlab.engine.deployment import Deployment
        from simlab.engine.flwr_config import DeploymentError

        try:
            run_dir_, summary = run_deployment(None, Deployment(info["deployment_state"]), resume_dir=path)
        except DeploymentError as exc:
            err.print(f"error: {exc}", highlight=False, markup=False)
            return 1
        return _finish(console, summary, run_dir_, args)
    with Progress(console, enabled=not args.quiet) as progress:
        progress.start_data(data_items(loaded))
        run_dir_, summary = run_scenario(loaded, progress, resume_dir=path)
    return _finish(console, summary, run_dir_, args)


def entry() -> None:
    """The ``simlab`` command: :func:`main`, then the process ends as soon as everything is written.
    After ``ray.shutdown`` a Ray driver still spends about 5 s in the interpreter's teardown (C++
    destructors of Ray's core worker; measured on 2 cores), after every run and after a Ctrl-C alike;
    by then every file simlab writes is closed, so Ray is stopped, the streams and log handlers are
    flushed, and the process exits without the teardown. In-process callers of :func:`main` (tests)
    are not affected."""
    import logging
    import os

    rc = main()
    if "simlab.engine.ray_session" in sys.modules:
        sys.modules["simlab.engine.ray_session"].shutdown()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


if __name__ == "__main__":
    entry()

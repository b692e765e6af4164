#!/usr/bin/env python3
"""Per-domain tables over seeds: final Dice per test domain, domain groups, aggregation weights and
differences to a reference sweep, mean ± std.

The seeds run through ``simlab run SCENARIO --seeds ... --out ROOT`` (``ROOT/seed-<s>``, resumable);
for the headline metrics (ACC, BWT, FWT, forgetting, pool size, bytes, wall time) with mean ± std
and paired differences to an arm, that command, or ``simlab compare ROOT --paired ARM``, is enough.
This script adds what they do not show:

    experiment.py SCENARIO --root DIR [--seeds 0,1,2] [--set KEY=VALUE ...] [--no-run]
                  [--group NAME=dom1,dom2 ...] [--baseline ARM] [--reference DIR] [--weights]
                  [--json FILE]


Columns, per arm, each ``mean ± std`` over the seeds (sample standard deviation, ddof = 1; a single
seed prints the mean alone):

* one column per evaluated domain: ``final_dice`` from ``summary.json`` (the deployed model at the
  last round, on that domain's test set, averaged over hospitals);
* ``--group NAME=d1,d2``: the mean of those domains' final Dice, computed per seed first;
* ``ACC``: the pooled ACC; ``MB``: bytes sent down + up; ``bank kB``: bytes of amplitude blocks
  shared (``bytes_bank`` summed over ``rounds.jsonl``); ``wall s``: the arm's wall time;
  ``s/round``: the median training time of a round (``train_s``; in runs that predate it, the wall
  time of the rounds without evaluation), less sensitive to a momentary load than the total;
  ``eval s``: the median evaluation time of an evaluated round (``eval_s``; NaN before it existed).

``--baseline ARM``: a table of the per-seed paired difference ``arm − ARM`` of every Dice column
(arms run on identical streams, so pairing by seed removes the seed-to-seed spread they share).
``--reference DIR`` (a root of the same layout, e.g. the same scenario without a broken hospital):
a second table with the per-seed paired difference ``this − reference`` of every Dice column, for
the arms and seeds present in both. ``--weights``: the aggregation weight each hospital received
(``agg_weight`` rows of ``metrics.jsonl``), averaged over rounds, then mean ± std over seeds.
``--json FILE`` writes every per-seed value and aggregate.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path


def run_seeds(scenario: str, root: Path, seeds: list[int], overrides: list[str]) -> None:
    """``simlab run SCENARIO --seeds ... --out ROOT``: finished seeds are kept, a stopped one resumed."""
    cmd = [sys.executable, "-c", "import sys; from simlab.cli import main; sys.exit(main())",
           "run", scenario, "--seeds", ",".join(str(s) for s in seeds), "--out", str(root), "--quiet", "--no-report"]
    for o in overrides:
        cmd += ["--set", o]
    print(" ".join(cmd[3:]), file=sys.stderr, flush=True)
    if subprocess.run(cmd).returncode != 0:
        raise SystemExit(f"the sweep failed (see {root})")


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def seed_values(run_dir: Path, groups: dict[str, list[str]]) -> dict[str, dict[str, float]]:
    """arm → column → value for one run directory."""
    summary = json.loads((run_dir / "summary.json").read_text())
    rounds = _jsonl(run_dir / "rounds.jsonl")
    out: dict[str, dict[str, float]] = {}
    for arm, a in summary["arms"].items():
        fd = {d: (math.nan if v is None else float(v)) for d, v in a["final_dice"].items()}
        row = dict(fd)
        for name, doms in groups.items():
            missing = [d for d in doms if d not in fd]
            if missing:
                raise SystemExit(f"--group {name}: unknown domain(s) {missing} (evaluated: {list(fd)})")
            row[name] = sum(fd[d] for d in doms) / len(doms)
        mine = [r for r in rounds if r["arm"] == arm and r["round"] > 0]
        train = ([r["train_s"] for r in mine if "train_s" in r]
                 or [r["wall_time_s"] for r in mine if not r.get("evaluated")])
        evals = [r["eval_s"] for r in rounds if r["arm"] == arm and "eval_s" in r]
        row["ACC"] = math.nan if a["acc"] is None else float(a["acc"])
        row["MB"] = a["bytes_total"] / 1e6
        row["bank kB"] = sum(r.get("bytes_bank", 0) for r in mine) / 1e3
        row["wall s"] = float(a["wall_time_s"])
        row["s/round"] = statistics.median(train) if train else math.nan
        row["eval s"] = statistics.median(evals) if evals else math.nan
        out[arm] = row
    return out


def mean_weights(run_dir: Path) -> dict[str, dict[str, float]]:
    """arm → hospital → mean agg_weight over the rounds."""
    acc: dict[tuple[str, str], list[float]] = {}
    for r in _jsonl(run_dir / "metrics.jsonl"):
        if r["metric"] == "agg_weight" and r["value"] is not None:
            acc.setdefault((r["arm"], r["hospital"]), []).append(float(r["value"]))
    out: dict[str, dict[str, float]] = {}
    for (arm, h), v in acc.items():
        out.setdefault(arm, {})[h] = sum(v) / len(v)
    return out


def mean_std(values: list[float]) -> tuple[float, float]:
    v = [x for x in values if not math.isnan(x)]
    if not v:
        return math.nan, math.nan
    return statistics.fmean(v), (statistics.stdev(v) if len(v) > 1 else math.nan)


def fmt(values: list[float], digits: int) -> str:
    m, s = mean_std(values)
    if math.isnan(m):
        return "n/a"
    return f"{m:.{digits}f}" if math.isnan(s) else f"{m:.{digits}f} ± {s:.{digits}f}"


def table(per_seed: dict[int, dict[str, dict[str, float]]], columns: list[str] | None = None,
          title: str = "") -> tuple[str, dict]:
    """A markdown table (arms × columns, mean ± std over seeds) and its numbers."""
    arms = list(dict.fromkeys(arm for v in per_seed.values() for arm in v))
    cols = columns or list(dict.fromkeys(c for v in per_seed.values() for a in v.values() for c in a))
    agg: dict = {}
    lines = [f"{title} ({len(per_seed)} seeds: {', '.join(map(str, sorted(per_seed)))})" if title else "",
             "| arm | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for arm in arms:
        cells = []
        for c in cols:
            vals = [per_seed[s][arm][c] for s in sorted(per_seed) if arm in per_seed[s] and c in per_seed[s][arm]]
            digits = 1 if c in ("MB", "bank kB", "wall s") else 2 if c == "s/round" else 3
            cells.append(fmt(vals, digits))
            agg.setdefault(arm, {})[c] = dict(zip(("mean", "std"), mean_std(vals)), values=vals)
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(line for line in lines if line), agg


def collect(root: Path, seeds: list[int], groups: dict[str, list[str]]) -> dict[int, dict]:
    return {s: seed_values(root / f"seed-{s}", groups) for s in seeds if (root / f"seed-{s}" / "summary.json").exists()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("scenario")
    ap.add_argument("--root", required=True, help="one run directory per seed goes under it (seed-<s>)")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--no-run", action="store_true", help="only aggregate existing run directories")
    ap.add_argument("--group", action="append", default=[], metavar="NAME=d1,d2",
                    help="an extra column: mean final Dice over these domains")
    ap.add_argument("--baseline", default=None, help="arm to subtract: paired differences arm − baseline")
    ap.add_argument("--reference", default=None, help="root of reference runs: paired differences this − reference")
    ap.add_argument("--weights", action="store_true", help="mean aggregation weight per hospital")
    ap.add_argument("--json", default=None, help="write all numbers to this file")
    args = ap.parse_args(argv)

    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    groups = {}
    for g in args.group:
        name, _, doms = g.partition("=")
        groups[name.strip()] = [d.strip() for d in doms.split(",") if d.strip()]
    root = Path(args.root)
    if not args.no_run:
        root.mkdir(parents=True, exist_ok=True)
        run_seeds(args.scenario, root, seeds, args.overrides)
    per_seed = collect(root, seeds, groups)
    if not per_seed:
        raise SystemExit(f"no finished runs under {root}")
    text, agg = table(per_seed, title=f"{args.scenario}: final Dice and cost")
    print(text)
    report: dict = {"per_seed": per_seed, "aggregate": agg}
    dice_cols = [c for c in next(iter(next(iter(per_seed.values())).values()))
                 if c not in ("ACC", "MB", "bank kB", "wall s", "s/round", "eval s")]
    if args.baseline:
        if any(args.baseline not in v for v in per_seed.values()):
            raise SystemExit(f"--baseline {args.baseline}: no such arm in every run")
        diff = {s: {arm: {c: v[arm][c] - v[args.baseline][c] for c in dice_cols} for arm in v if arm != args.baseline}
                for s, v in per_seed.items()}
        text, agg = table(diff, dice_cols, title=f"paired difference: arm − {args.baseline}")
        print("\n" + text)
        report["baseline_difference"] = {"per_seed": diff, "aggregate": agg}
    if args.reference:
        ref = collect(Path(args.reference), seeds, groups)
        diff = {s: {arm: {c: per_seed[s][arm][c] - ref[s][arm][c] for c in dice_cols}
                    for arm in per_seed[s] if arm in ref[s]} for s in per_seed if s in ref}
        text, agg = table(diff, dice_cols, title=f"paired difference: {root} − {args.reference}")
        print("\n" + text)
        report["difference"] = {"per_seed": diff, "aggregate": agg}
    if args.weights:
        w = {s: mean_weights(root / f"seed-{s}") for s in per_seed}
        if any(w.values()):
            text, agg = table(w, title="mean aggregation weight per hospital (over rounds)")
            print("\n" + text)
            report["weights"] = {"per_seed": w, "aggregate": agg}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())

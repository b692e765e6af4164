"""Regenerate the committed baselines of the regression suite (run from the repository root).

    .venv/bin/python tests/regression/make_baselines.py [SCENARIO_NAME ...]

Runs each scenario under ``tests/regression/scenarios/`` once (fixed seed, CPU) into a temporary
directory and writes ``tests/regression/baselines/<name>.yaml`` through ``simlab compare
--write-baseline`` with the tolerances below, so a baseline is never written by hand. Review the diff
of the baseline files before committing them: every changed number is a changed result.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent

TOLERANCES = [
    # Dice-based metrics: CPU runs of one seed are bit-identical with the same torch build; the
    # margin absorbs another CPU's or torch build's floating-point differences over 8 rounds.
    "acc=abs:0.03",
    "bwt=abs:0.04",
    "fwt=abs:0.04",
    "gem_fwt=abs:0.04",
    "forgetting=abs:0.04",
    "chaudhry_forgetting=abs:0.04",
    # bytes are exact for a given model and message format; 1 % leaves room for metadata only
    "bytes_total=rel:0.01",
    # wall time depends on the machine and its load (Flower/Ray start-up dominates): only a
    # slow-down beyond 5x the recorded time fails
    "wall_time_s=rel:4",
    "pool_size=abs:0",
]


def main(names: list[str]) -> int:
    from simlab.cli import main as simlab_main
    from simlab.report.commands import run_compare

    scenarios = sorted((HERE / "scenarios").glob("*.yaml"))
    if names:
        scenarios = [s for s in scenarios if s.stem in names]
    with tempfile.TemporaryDirectory(prefix="simlab-regression-") as tmp:
        for sc in scenarios:
            run_dir = Path(tmp) / sc.stem
            rc = simlab_main(["run", str(sc), "--out", str(run_dir), "--quiet", "--set", f"data.cache_dir={tmp}/cache"])
            if rc != 0:
                return rc
            rc = run_compare([str(run_dir)], write_baseline=str(HERE / "baselines" / f"{sc.stem}.yaml"),
                             tolerances=TOLERANCES)
            if rc != 0:
                return rc
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

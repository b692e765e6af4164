"""What a scenario reads and writes outside itself, checked before a run starts and by ``simlab
validate``: the NIfTI datasets (folder, ``dataset.json``, case list; no volume is read) and the data
cache folder (``data.cache_dir``, else ``$SIMLAB_CACHE``, else ``~/.cache/simlab``). The run directory
is checked where it is created (:func:`simlab.rundir.make_run_dir`). Nothing is written."""

from __future__ import annotations

import os

from simlab.config import ScenarioError
from simlab.data.cache import cache_dir_problem, default_cache_dir
from simlab.scenario.schema import LoadedScenario, Scenario


def input_problems(sc: Scenario) -> list[tuple[str, str]]:
    """(key, message) pairs for every input of ``sc`` that cannot be read or written."""
    p: list[tuple[str, str]] = []
    if sc.data.source == "nifti":
        for name, ds in sc.data.datasets.items():
            p += [(f"data.datasets.{name}.{key}", msg) for key, msg in ds.file_problems()]
    if sc.data.cache_dir:
        where, root = "data.cache_dir", sc.data.cache_dir
    else:
        env = os.environ.get("SIMLAB_CACHE")
        where = ("data.cache_dir (unset, so $SIMLAB_CACHE)" if env else
                 "data.cache_dir (unset, so ~/.cache/simlab; set it or $SIMLAB_CACHE)")
        root = default_cache_dir()
    why = cache_dir_problem(root)
    if why:
        p.append((where, f"the generated-data cache: {why}"))
    return p


def check_inputs(loaded: LoadedScenario) -> None:
    """Raise :class:`ScenarioError` naming the file and key of every input problem of ``loaded``."""
    problems = input_problems(loaded.base)
    if problems:
        raise ScenarioError(loaded.source, problems)

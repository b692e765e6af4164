"""What a scenario reads and writes outside itself, checked before a run starts and by ``simlab
validate``: the NIfTI datasets (folder, ``dataset.json``, case list; no volume is read) and the data
cache folder (``data.cache_dir``, else ``$SIMLAB_CACHE``, else ``~/.cache/simlab``). The run directory
is checked where it is created (:func:`simlab.rundir.make_run_dir`). Nothing is written.

Who checks what. In simulation every hospital's data is on this machine, so ``simlab run`` checks
all of it before it starts (:func:`check_inputs`). In a deployment the data lives at the hospitals'
sites: the server checks the scenario and the run directory only, and each hospital checks what it
will read itself (:func:`site_input_problems`: the datasets of the domains its stream draws on and it
evaluates, its data cache), when the server identifies it, before round 0.
"""

from __future__ import annotations

import os

from simlab.config import ScenarioError
from simlab.data.cache import cache_dir_problem, default_cache_dir
from simlab.data.specs import DataSpec
from simlab.scenario.schema import LoadedScenario, Scenario
from simlab.scenario.task import HospitalTask


def data_problems(data: DataSpec, datasets: list[str] | None = None,
                  cache_key: str | None = None) -> list[tuple[str, str]]:
    """(key, message) pairs for the NIfTI ``datasets`` of ``data`` (None: every one) that cannot be
    listed, and for its data cache when it cannot be written. ``cache_key`` names where the cache folder
    came from when not from the scenario (a hospital's node config)."""
    p: list[tuple[str, str]] = []
    if data.source == "nifti":
        for name, ds in data.datasets.items():
            if datasets is None or name in datasets:
                p += [(f"data.datasets.{name}.{key}", msg) for key, msg in ds.file_problems()]
    if data.cache_dir:
        where, root = cache_key or "data.cache_dir", data.cache_dir
    else:
        env = os.environ.get("SIMLAB_CACHE")
        where = ("data.cache_dir (unset, so $SIMLAB_CACHE)" if env else
                 "data.cache_dir (unset, so ~/.cache/simlab; set it or $SIMLAB_CACHE)")
        root = default_cache_dir()
    why = cache_dir_problem(root)
    if why:
        p.append((where, f"the generated-data cache: {why}"))
    return p


def input_problems(sc: Scenario) -> list[tuple[str, str]]:
    """(key, message) pairs for every input of ``sc`` that cannot be read or written."""
    return data_problems(sc.data)


def site_input_problems(task: HospitalTask, domains: list[str], cache_key: str | None = None) -> list[tuple[str, str]]:
    """What one hospital checks about its own inputs (its task as its node resolves it, with the node's
    data directory): the NIfTI datasets of ``domains`` (the domains it will read: its stream's and
    those it evaluates) and its data cache; (key, message) pairs, each message naming the file."""
    used = sorted({task.domains[d].dataset for d in domains if d in task.domains and task.domains[d].dataset})
    return data_problems(task.data, used, cache_key)


def check_inputs(loaded: LoadedScenario) -> None:
    """Raise :class:`ScenarioError` naming the file and key of every input problem of ``loaded``."""
    problems = input_problems(loaded.base)
    if problems:
        raise ScenarioError(loaded.source, problems)

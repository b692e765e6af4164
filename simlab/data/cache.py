"""On-disk cache of generated arrays, keyed by the content of what produced them.

Data generation is seeded, so a window is a pure function of (generator settings, seed): its SHA-256
names an ``.npz`` file. Writes are atomic (:mod:`simlab.fileio`), so concurrent virtual hospitals
never read a half-written file.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from simlab.fileio import atomic_writer

CACHE_VERSION = 1


def default_cache_dir() -> Path:
    env = os.environ.get("SIMLAB_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "simlab"


def cache_dir_problem(root: str | Path) -> str | None:
    """Why generated data cannot be cached under ``root`` (None when it can): the nearest folder that
    exists must be a folder this process can create entries in. Probed with a temporary folder that
    is removed again, so nothing is left behind."""
    import tempfile

    path = Path(root).expanduser()
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is not a folder, so {path} cannot be created"
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".simlab-probe-", dir=probe))
    except OSError as exc:
        return f"cannot create {path} ({exc.strerror or type(exc).__name__} in {probe})"
    return None


class ArrayCache:
    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root else default_cache_dir()

    def key(self, spec: dict) -> str:
        text = json.dumps({"v": CACHE_VERSION, **spec}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.npz"

    def get_or_make(self, spec: dict, make: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        path = self.path(self.key(spec))
        if path.is_file():
            try:
                with np.load(path) as z:
                    return {k: z[k] for k in z.files}
            except (OSError, ValueError):
                path.unlink(missing_ok=True)  # a damaged entry is regenerated
        arrays = make()
        with atomic_writer(path) as fh:
            np.savez(fh, **arrays)
        return arrays

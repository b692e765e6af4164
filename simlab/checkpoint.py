"""Checkpoints: what a run needs to continue after a crash (no Flower here).

Two kinds of state survive a crash, each where it lives:

- **Server** (:func:`save_checkpoint` / :func:`load_checkpoint`): after every round the ServerApp
  writes ``<run>/checkpoints/<arm>.npz``: the global model or the ODEx pool, the FedDG amplitude
  bank, which round each hospital last trained in, the wall time so far, and the byte lengths of
  ``metrics.jsonl`` and ``rounds.jsonl`` at that moment. Resuming cuts both files back to those
  lengths (rows of the round that was under way when the server died are dropped) and continues
  with the next round, so the final files have no gap and no duplicated row. Nothing random is
  carried: every seed is derived from (scenario seed, purpose, hospital, round).
- **Hospital** (:class:`HospitalStateStore`): methods that carry state from round to round at the
  hospital (EWC's Fisher and anchor, replay's list of seen rounds) save it on the hospital's own disk
  after each round they train; it never travels to the server. After a restart the server tells
  each hospital which round's state continues the run (the last round the server received its
  update for), and the hospital loads it.

Files are written atomically (:mod:`simlab.fileio`), so a crash leaves the previous checkpoint whole.
Arrays are stored with ``allow_pickle=False``; metadata is JSON inside the same file.
"""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path

import numpy as np

from simlab.fileio import atomic_writer, run_path

VERSION = 1
HOSPITAL_STATE = "hospital-state"  # simulation: the hospitals' saved state inside the run directory
_META = "__meta__"


class CheckpointError(RuntimeError):
    pass


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with atomic_writer(path, fsync=True) as fh:
        np.savez(fh, **arrays)


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(exc).__name__}: {exc})") from None


def save_checkpoint(path: str | Path, meta: dict, arrays: dict[str, np.ndarray]) -> None:
    """Atomically write ``arrays`` and the JSON-serialisable ``meta`` to ``path`` (.npz)."""
    if _META in arrays:
        raise ValueError(f"array name {_META!r} is reserved")
    blob = json.dumps({"version": VERSION, **meta}, sort_keys=True, allow_nan=False).encode("utf-8")
    _write_npz(Path(path), {**arrays, _META: np.frombuffer(blob, dtype=np.uint8)})


def load_checkpoint(path: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
    path = Path(path)
    arrays = _read_npz(path)
    if _META not in arrays:
        raise CheckpointError(f"{path}: not a simlab checkpoint (no metadata)")
    meta = json.loads(bytes(arrays.pop(_META)).decode("utf-8"))
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint version {meta.get('version')!r}, this simlab reads {VERSION}")
    return meta, arrays


def checkpoint_path(run_dir: str | Path, arm: str) -> Path:
    """The latest checkpoint of one arm of a run."""
    return run_path(run_dir, "checkpoints", f"{arm}.npz")


def read_meta(path: str | Path) -> dict | None:
    """A checkpoint's metadata without its arrays; None when there is no checkpoint."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            return json.loads(bytes(z[_META]).decode("utf-8"))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(exc).__name__}: {exc})") from None


def nest(arrays: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    """The arrays under ``prefix/`` with the prefix removed (the inverse of ``{f"{prefix}/{k}": v}``)."""
    p = prefix + "/"
    return {k[len(p):]: v for k, v in arrays.items() if k.startswith(p)}


def flat(prefix: str, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {f"{prefix}/{k}": np.asarray(v) for k, v in arrays.items()}


class HospitalStateStore:
    """One hospital's saved method state: ``<root>/<run key>/<hospital>/round-<t>.npz`` (paths by
    :func:`simlab.fileio.run_path`, so a run key or hospital id that is not a safe single name is refused)."""

    _NAME = re.compile(r"round-(\d+)\.npz")

    def __init__(self, root: str | Path, run_key: str, hospital: str):
        self.root, self.parts = Path(root), (run_key, hospital)
        self.dir = run_path(self.root, *self.parts)

    def path(self, t: int) -> Path:
        return run_path(self.root, *self.parts, f"round-{t}.npz")

    def rounds(self) -> list[int]:
        if not self.dir.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.dir.iterdir() if (m := self._NAME.fullmatch(p.name)))

    def save(self, t: int, state: dict[str, np.ndarray]) -> None:
        _write_npz(self.path(t), state)

    def load(self, t: int) -> dict[str, np.ndarray]:
        path = self.path(t)
        if not path.is_file():
            raise CheckpointError(f"{path}: this hospital's state after round {t} is missing, so the run cannot "
                                  f"continue where it stopped (saved rounds: {self.rounds() or 'none'})")
        return _read_npz(path)

    def prune(self, keep_from: int) -> None:
        """Delete states of rounds before ``keep_from`` (a resume never needs them)."""
        for t in self.rounds():
            if t < keep_from:
                self.path(t).unlink(missing_ok=True)

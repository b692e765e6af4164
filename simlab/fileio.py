"""Atomic file writes: a reader sees the old file or the whole new one, never a part.

The data goes to a temporary file in the target's directory (so the final rename stays on one file
system), which :func:`os.replace` then puts in the target's place. If the writer raises, the
temporary file is removed and the target is left as it was. Temporary names carry the process id
and a random part, so concurrent writers of one target (virtual hospitals filling one data cache)
never share one. A crash between write and rename can leave a ``<name>.<pid>-<hex>.tmp`` file
behind; it is never read.

Every path a run writes into its run directory (or a hospital into its state directory) is made by
:func:`run_path`, the one guard against names that would leave it: arm names, hospital ids and metric
names become file names there, and validation holding them to a safe pattern is the first line, this
the second (a bug, or a hostile name that got past validation, is refused before anything is written).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

__all__ = ["MAX_NAME_BYTES", "UnsafePathError", "atomic_write", "atomic_writer", "name_problem", "run_path"]

MAX_NAME_BYTES = 255
"""Longest file name (bytes) of the usual file systems (NAME_MAX of ext4, XFS, APFS, NTFS in UTF-16 units)."""


class UnsafePathError(ValueError):
    """A path to write is not made of safe single names, or resolves outside the directory it belongs to."""


def name_problem(part: object) -> str | None:
    """Why ``part`` is not a safe single file name, or None. Safe: text, not empty, not starting with
    ``.`` (``.``, ``..`` and hidden names), no ``/`` or ``\\``, no control character (NUL, newline, …),
    at most :data:`MAX_NAME_BYTES` bytes."""
    if not isinstance(part, str):
        return f"is not text ({type(part).__name__})"
    if not part:
        return "is empty"
    if part.startswith("."):
        return "starts with '.' (the folder itself, its parent, or a hidden name)"
    if "/" in part or "\\" in part:
        return "holds a path separator"
    if any(ord(c) < 32 or ord(c) == 127 for c in part):
        return "holds a control character"
    try:
        size = len(os.fsencode(part))
    except UnicodeEncodeError:
        return "cannot be encoded as a file name"
    if size > MAX_NAME_BYTES:
        return f"is {size} bytes long (file names take at most {MAX_NAME_BYTES})"
    return None


def run_path(run_dir: str | Path, *parts: str) -> Path:
    """``run_dir / part / ...``: the path of something a run writes, only if every part is a safe single
    name (:func:`name_problem`) and the path, with every symbolic link followed, stays inside
    ``run_dir`` (resolved the same way). :class:`UnsafePathError` names the part otherwise.

    Every writer of a run directory builds its paths here (``tests/test_paths.py`` records the calls
    during a run and checks that every file the run leaves was made through it)."""
    root = Path(run_dir)
    if not parts:
        raise UnsafePathError(f"{root}: no name given for a path inside it")
    shown = "/".join(repr(p) for p in parts)
    for part in parts:
        why = name_problem(part)
        if why is not None:
            raise UnsafePathError(f"{root}: refusing to write {shown}: {part!r} {why} (a bug, or a name that "
                                  f"validation should have refused)")
    path = root.joinpath(*parts)
    base, resolved = root.resolve(), path.resolve()
    if resolved == base or not resolved.is_relative_to(base):
        raise UnsafePathError(f"{root}: refusing to write {shown}: it resolves to {resolved}, outside {base} "
                              f"(a symbolic link inside it points elsewhere)")
    return path


@contextmanager
def atomic_writer(path: str | Path, *, mode: int = 0o666, fsync: bool = False) -> Iterator[BinaryIO]:
    """A binary file handle whose content replaces ``path`` when the block ends without an exception.

    For writers that want a file object (``np.savez(fh, ...)``). The parent directory is created.
    ``mode`` is the permission of a new file before the umask (``0o600``: owner only). ``fsync``:
    force the data to disk before the rename, so a power cut leaves the old or the new file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: str | Path, data: str | bytes, *, mode: int = 0o666, fsync: bool = False) -> None:
    """Write ``data`` (text is encoded as UTF-8, newlines as given) to ``path`` atomically."""
    with atomic_writer(path, mode=mode, fsync=fsync) as fh:
        fh.write(data.encode("utf-8") if isinstance(data, str) else data)

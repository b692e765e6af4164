"""Atomic file writes: a reader sees the old file or the whole new one, never a part.

The data goes to a temporary file in the target's directory (so the final rename stays on one file
system), which :func:`os.replace` then puts in the target's place. If the writer raises, the
temporary file is removed and the target is left as it was. Temporary names carry the process id
and a random part, so concurrent writers of one target (virtual hospitals filling one data cache)
never share one. A crash between write and rename can leave a ``<name>.<pid>-<hex>.tmp`` file
behind; it is never read.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_write", "atomic_writer"]


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

"""SHA-256 of an open file, read in large pieces (``--verify`` on both ends of a pull)."""

from __future__ import annotations

import hashlib
import os

CHUNK = 4 << 20


def sha256_fd(fd: int, size: int | None = None) -> str:
    """The SHA-256 of the first *size* bytes of *fd* (all of it when None), by ``pread``.

    Blocking: callers run it in a worker thread."""
    h = hashlib.sha256()
    off = 0
    while size is None or off < size:
        want = CHUNK if size is None else min(CHUNK, size - off)
        data = os.pread(fd, want, off)
        if not data:
            break
        h.update(data)
        off += len(data)
    return h.hexdigest()

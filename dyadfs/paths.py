"""Paths relative to the managed directory: the bytes of the file system, joined with ``/``.

``.`` is the managed directory itself. dyadfs keeps its own state in :data:`HIDDEN` at the top of
the backing directory; it is never shown through the mount.
"""

from __future__ import annotations

HIDDEN = b".dyadfs"
TMP_DIR = HIDDEN + b"/tmp"


def show(rel: bytes) -> str:
    """A path for a log line: any bytes, printable."""
    return rel.decode("utf-8", "backslashreplace")


def join(rel: bytes, name: bytes) -> bytes:
    return name if rel == b"." else rel + b"/" + name


def parent_of(rel: bytes) -> bytes:
    """The directory holding *rel* (``.`` for a top-level name)."""
    return rel.rpartition(b"/")[0] or b"."

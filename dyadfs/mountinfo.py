"""``/proc/self/mountinfo``, read without touching any mount (a dead daemon's mount would hang
or fail a ``stat``)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

_ESCAPE = re.compile(rb"\\([0-7]{3})")


@dataclass(frozen=True)
class Entry:
    device: str  # "major:minor"
    point: bytes  # the mount point, unescaped
    fstype: bytes


def _unescape(field: bytes) -> bytes:
    """The kernel writes space, tab, newline and backslash as octal escapes (``\\040``...)."""
    return _ESCAPE.sub(lambda m: bytes([int(m.group(1), 8)]), field)


def entries() -> list[Entry]:
    out = []
    try:
        with open("/proc/self/mountinfo", "rb") as f:
            for line in f:
                fields = line.split()
                try:
                    sep = fields.index(b"-")
                    out.append(Entry(fields[2].decode(), _unescape(fields[4]), fields[sep + 1]))
                except (ValueError, IndexError):
                    continue
    except OSError:
        pass
    return out


def fuse_device(path: Path) -> str | None:
    """The device ("major:minor") of the FUSE file system mounted at *path*, if any (the last
    one: mounts stack)."""
    target = os.fsencode(str(path))
    found = None
    for e in entries():
        if e.point == target and e.fstype.startswith(b"fuse"):
            found = e.device
    return found


def fuse_mounted(path: Path) -> bool:
    """Whether a FUSE file system is mounted at *path*."""
    return fuse_device(path) is not None

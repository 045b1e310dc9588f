"""What the process behind a LOOKUP means to do with the name.

The kernel sends LOOKUP before OPEN, CREATE, MKDIR, STAT... without saying which. dyadfs must
answer a lookup of an unpublished name at once, yet let a reader's open wait for it; so it reads
the blocked caller's system call from ``/proc/<tid>/syscall`` (the tid comes with every FUSE
request) and, for the path, ``/proc/<tid>/mem`` at the argument's address.

Fallback, when either is unreadable (another user's process without ptrace rights, a foreign
architecture): :data:`Intent.UNKNOWN`, which the file system treats like a stat: ENOENT at once.
Producers are then never blocked; consumers see a missing file instead of a wait, and a warning
is logged once.
"""

from __future__ import annotations

import enum
import os
import platform
import time
from dataclasses import dataclass

O_CREAT = os.O_CREAT
O_DIRECTORY = os.O_DIRECTORY
O_PATH = os.O_PATH


class Intent(enum.Enum):
    READ = "read"        # open() without O_CREAT: may wait
    CREATE = "create"    # open(O_CREAT), creat, mkdir, rename target, link, symlink, mknod
    STAT = "stat"        # stat family, access
    OTHER = "other"      # anything else (chdir, execve, xattrs, ...)
    UNKNOWN = "unknown"  # could not tell


@dataclass(frozen=True)
class Call:
    """The caller's system call, as far as it matters here."""

    intent: Intent
    path: bytes | None = None       # the path argument, when it could be read
    flags: int = 0


# syscall number -> (intent, index of the path argument or None, index of the flags argument)
_X86_64: dict[int, tuple[Intent, int | None, int | None]] = {
    2: (Intent.READ, 0, 1),       # open
    257: (Intent.READ, 1, 2),     # openat
    437: (Intent.READ, 1, None),  # openat2 (flags inside struct open_how)
    85: (Intent.CREATE, 0, None),  # creat
    83: (Intent.CREATE, 0, None),  # mkdir
    258: (Intent.CREATE, 1, None),  # mkdirat
    82: (Intent.CREATE, None, None),  # rename
    264: (Intent.CREATE, None, None),  # renameat
    316: (Intent.CREATE, None, None),  # renameat2
    86: (Intent.CREATE, None, None),  # link
    265: (Intent.CREATE, None, None),  # linkat
    88: (Intent.CREATE, None, None),  # symlink
    266: (Intent.CREATE, None, None),  # symlinkat
    133: (Intent.CREATE, None, None),  # mknod
    259: (Intent.CREATE, None, None),  # mknodat
    4: (Intent.STAT, 0, None),    # stat
    6: (Intent.STAT, 0, None),    # lstat
    262: (Intent.STAT, 1, None),  # newfstatat
    332: (Intent.STAT, 1, None),  # statx
    21: (Intent.STAT, 0, None),   # access
    269: (Intent.STAT, 1, None),  # faccessat
    439: (Intent.STAT, 1, None),  # faccessat2
}
_AARCH64: dict[int, tuple[Intent, int | None, int | None]] = {
    56: (Intent.READ, 1, 2),      # openat
    437: (Intent.READ, 1, None),  # openat2
    34: (Intent.CREATE, 1, None),  # mkdirat
    38: (Intent.CREATE, None, None),  # renameat
    276: (Intent.CREATE, None, None),  # renameat2
    37: (Intent.CREATE, None, None),  # linkat
    36: (Intent.CREATE, None, None),  # symlinkat
    33: (Intent.CREATE, None, None),  # mknodat
    79: (Intent.STAT, 1, None),   # newfstatat
    291: (Intent.STAT, 1, None),  # statx
    48: (Intent.STAT, 1, None),   # faccessat
    439: (Intent.STAT, 1, None),  # faccessat2
}
_TABLES = {"x86_64": _X86_64, "aarch64": _AARCH64}
_TABLE = _TABLES.get(platform.machine())
_OPENAT2 = 437
_MAX_PATH = 4096


#: how often, and how long apart (growing), to look again at a caller that /proc shows running
RUNNING_RETRIES = 10
RUNNING_PAUSE = 0.0001


def caller(tid: int) -> Call:
    """The system call thread *tid* is blocked in. Never raises."""
    if _TABLE is None or tid <= 0:
        return Call(Intent.UNKNOWN)
    for attempt in range(RUNNING_RETRIES):
        try:
            with open(f"/proc/{tid}/syscall", "rb") as f:
                fields = f.read().split()
        except OSError:
            return Call(Intent.UNKNOWN)
        if not fields or fields[0] != b"running":
            break
        # The request can reach us before its caller has gone to sleep waiting for the answer
        # (seen on 2 busy cores): /proc says "running" for that moment. Look again, briefly.
        time.sleep(RUNNING_PAUSE * (attempt + 1))
    if not fields or fields[0] in (b"running", b"-1"):
        return Call(Intent.UNKNOWN)
    try:
        nr = int(fields[0])
        args = [int(a, 16) for a in fields[1:7]]
    except ValueError:
        return Call(Intent.UNKNOWN)
    entry = _TABLE.get(nr)
    if entry is None:
        return Call(Intent.OTHER)
    intent, path_arg, flags_arg = entry
    path = _read_string(tid, args[path_arg]) if path_arg is not None else None
    flags = 0
    if flags_arg is not None:
        flags = args[flags_arg]
    elif nr == _OPENAT2:
        raw = _read_mem(tid, args[2], 8)
        if raw is None:
            return Call(Intent.UNKNOWN, path)
        flags = int.from_bytes(raw, "little")
    if intent is Intent.READ and flags & O_CREAT:
        intent = Intent.CREATE
    elif intent is Intent.READ and flags & (O_PATH | O_DIRECTORY):
        # Probes, not reads: cp opens its destination O_PATH|O_DIRECTORY to ask "is it a
        # directory?", and must hear ENOENT at once.
        intent = Intent.STAT
    return Call(intent, path, flags)


def _read_mem(tid: int, addr: int, size: int) -> bytes | None:
    try:
        fd = os.open(f"/proc/{tid}/mem", os.O_RDONLY)
    except OSError:
        return None
    try:
        return os.pread(fd, size, addr)
    except OSError:
        return None
    finally:
        os.close(fd)


def _read_string(tid: int, addr: int) -> bytes | None:
    """A NUL-terminated string of the caller's memory, read in page-bounded pieces."""
    out = b""
    while len(out) < _MAX_PATH:
        chunk = 4096 - ((addr + len(out)) % 4096)
        data = _read_mem(tid, addr + len(out), chunk)
        if not data:
            return None
        end = data.find(b"\0")
        if end >= 0:
            return out + data[:end]
        out += data
    return None


def _components(path: bytes) -> list[bytes]:
    parts = [p for p in path.split(b"/") if p and p != b"."]
    if path.endswith(b"/") and parts:
        parts.append(b"")  # a trailing slash asks for a directory
    return parts


def _find(name: bytes, rel: bytes, parts: list[bytes]) -> int | None:
    """Where *name* (at *rel*, relative to the mount) ends in the caller's path *parts*: the
    tail of our relative path is matched against prefixes of the caller's path, which may be
    absolute, or relative to a cwd inside or outside the mount."""
    ours = [p for p in rel.split(b"/") if p]
    for end in range(len(parts), 0, -1):
        if parts[end - 1] != name:
            continue
        k = min(end, len(ours))
        if parts[end - k:end] == ours[len(ours) - k:]:
            return end
    return None


def rest_of(name: bytes, rel: bytes, path: bytes | None) -> bytes | None:
    """The components of the caller's *path* after *name* (at *rel*), joined with ``/``: what it
    means to reach through *name* (``b""`` when *name* is the final component; None when
    *name* is not in the path, or the path is unknown)."""
    if path is None:
        return None
    parts = [p for p in path.split(b"/") if p and p != b"."]
    end = _find(name, rel, parts)
    return None if end is None else b"/".join(parts[end:])


def role_of(name: bytes, rel: bytes, path: bytes | None) -> str:
    """Whether *name* (at *rel*, relative to the mount) is the final component of the caller's
    *path* (``"final"``), an intermediate directory of it (``"dir"``), or not in it at all
    (``"none"``). With no path, assume the final component.
    """
    if path is None:
        return "final"
    parts = _components(path)
    end = _find(name, rel, parts)
    if end is None:
        return "none"
    return "final" if end == len(parts) else "dir"

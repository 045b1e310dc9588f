"""KVS keys and values: dyadfs' own schema, and DYAD's key for a file.

dyadfs' schema (version 1), per namespace; paths are relative to the managed directory, in the
file system's bytes decoded with ``surrogateescape`` (so any name round-trips):

``files/<path>``   a file record, JSON::

    {"schema": 1, "state": "complete" | "writing", "size": int, "version": int,
     "mtime_ns": int, "mode": int, "owner": "<mount id>", "sha256": str | null}

``mounts/<mount id>``  the node registry, JSON::

    {"schema": 1, "host": str, "pid": int, "dir": str, "transport": str,
     "address": str | null, "started": float, "rank": int | null, "tcp": str | null}

``meta/secret``  the namespace's secret for fetch requests (hex), created with the namespace.

``version`` identifies one publication of one path: consumers compare it for equality only.
A rewrite gets a new one. DYAD's own key (:func:`dyad_key`) is written beside ours on Flux.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Any

import mmh3

from .errors import KVSError

SCHEMA = 1
FILES = "files/"
MOUNTS = "mounts/"
SECRET = "meta/secret"

_DYAD_SEEDS = (104677, 104681, 104683, 104693, 104701, 104707, 104711, 104717, 104723, 104729)


def dyad_key(upath: str, depth: int = 3, bins: int = 1024) -> str:
    """DYAD's KVS key for *upath* (the path relative to the managed directory).

    The algorithm (dyad-reference.md): pad to 128 bytes with ``@``, hash with MurmurHash3 x64/128
    at a seed that grows per level, fold the four 32-bit words with XOR, take it modulo *bins*.
    """
    raw = os.fsencode(upath)
    padded = raw + b"@" * (128 - len(raw)) if len(raw) < 128 else raw
    seed = 57
    parts = []
    for level in range(depth):
        seed += _DYAD_SEEDS[level % 10]
        h = mmh3.hash128(padded, seed, x64arch=True, signed=False)
        lo, hi = h & 0xFFFFFFFFFFFFFFFF, h >> 64
        word = (lo & 0xFFFFFFFF) ^ (lo >> 32) ^ (hi & 0xFFFFFFFF) ^ (hi >> 32)
        parts.append(f"{word % bins:x}.")
    return "".join(parts) + upath


def file_key(path: str) -> str:
    return FILES + path


def mount_key(mount_id: str) -> str:
    return MOUNTS + mount_id


@dataclass(frozen=True)
class FileRecord:
    """One publication of a file."""

    state: str
    size: int
    version: int
    mtime_ns: int
    mode: int
    owner: str
    sha256: str | None = None

    @property
    def complete(self) -> bool:
        return self.state == "complete"

    def encode(self) -> bytes:
        # By hand, not dataclasses.asdict (a deep copy): this runs in every publication.
        return json.dumps({"schema": SCHEMA, "state": self.state, "size": self.size,
                           "version": self.version, "mtime_ns": self.mtime_ns,
                           "mode": self.mode, "owner": self.owner, "sha256": self.sha256},
                          separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes, where: str) -> FileRecord:
        data = _load(raw, where)
        try:
            rec = cls(state=str(data["state"]), size=int(data["size"]),
                      version=int(data["version"]), mtime_ns=int(data["mtime_ns"]),
                      mode=int(data["mode"]), owner=str(data["owner"]),
                      sha256=None if data.get("sha256") is None else str(data["sha256"]))
        except (KeyError, TypeError, ValueError) as e:
            raise KVSError(f"malformed file record at {where!r}: {e!r}") from None
        if rec.state not in ("complete", "writing") or rec.size < 0:
            raise KVSError(f"malformed file record at {where!r}: state {rec.state!r}")
        return rec


@dataclass(frozen=True)
class MountRecord:
    """A mount in the node registry: where to fetch the files it owns."""

    host: str
    pid: int
    dir: str
    transport: str
    address: str | None
    started: float
    rank: int | None = None
    tcp: str | None = None  # every mount also serves plain TCP here

    def encode(self) -> bytes:
        return json.dumps({"schema": SCHEMA, **asdict(self)}, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes, where: str) -> MountRecord:
        data = _load(raw, where)
        try:
            return cls(host=str(data["host"]), pid=int(data["pid"]), dir=str(data["dir"]),
                       transport=str(data["transport"]),
                       address=None if data.get("address") is None else str(data["address"]),
                       started=float(data["started"]),
                       rank=None if data.get("rank") is None else int(data["rank"]),
                       tcp=None if data.get("tcp") is None else str(data["tcp"]))
        except (KeyError, TypeError, ValueError) as e:
            raise KVSError(f"malformed mount record at {where!r}: {e!r}") from None


def _load(raw: bytes, where: str) -> dict[str, Any]:
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise KVSError(f"malformed value at {where!r}: not JSON") from None
    if not isinstance(data, dict):
        raise KVSError(f"malformed value at {where!r}: not an object")
    if data.get("schema") != SCHEMA:
        raise KVSError(f"value at {where!r} has schema {data.get('schema')!r}; "
                       f"this dyadfs reads schema {SCHEMA}")
    return data

"""KVS keys and values: dyadfs' own schema, and DYAD's key for a file.

dyadfs' keys, per namespace. Paths are relative to the managed directory, in the file system's
bytes decoded with ``surrogateescape`` (so any name round-trips). These are the keys of the KVS
interface (:class:`dyadfs.kvs.KVS`); each backend stores them its own way (below).

``files/<path>``   the record of a published name (record schema 2), JSON::

    {"schema": 2, "kind": "file" | "dir" | "symlink", "state": "complete" | "writing",
     "size": int >= 0, "version": int, "mtime_ns": int, "mode": int (permission bits),
     "owner": "<mount id>", "sha256": str | null, "target": str | null}

  ``kind`` says what the producer made: a regular file (pulled by consumers), a directory (so
  that empty ones reach consumers too) or a symbolic link whose ``target`` (the link's bytes,
  ``surrogateescape``) is in the record itself: nothing is pulled for it. ``size`` is the file's
  size, the target's length for a symlink, 0 for a directory. Only files are ever ``"writing"``
  (shared storage, while a producer writes). Schema 1 records (no ``kind``, no ``target``) are
  still read, as files.

``mounts/<mount id>``  the node registry (schema 1): every running mount, shared storage included
(there its TCP server only tells others it is alive, see :mod:`dyadfs.owners`), JSON::

    {"schema": 1, "host": str, "pid": int, "dir": str, "transport": str,
     "address": str | null, "started": float, "rank": int | null, "tcp": str | null}

``meta/secret``  the namespace's secret for fetch requests (hex), written once by the first
mount (:meth:`KVS.put_if_absent`, atomic on both backends).

``version`` identifies one publication of one path: consumers compare it for equality only.
A rewrite gets a new one. DYAD's own key (:func:`dyad_key`) is written beside a file's record
on Flux (files only: DYAD knows no directories or links).

The directory index. Each backend also indexes the ``files/`` keys by directory, in the same
atomic commit as the records it describes, so that listing a directory costs what that
directory holds and "is this a directory?" is one point read, whatever the size of the
namespace:

- a record ``files/D/N`` is the entry ``N`` of directory ``D`` (``""``: the top);
- every directory above a record is an entry of its own parent too: an *implicit* directory
  (``None`` in a listing) unless it has a record of its own;
- an implicit directory stays when what is below it goes, as an emptied directory stays on the
  producer, until the directory itself is *dropped* (``drop=`` of :meth:`KVS.commit`: the
  producer removed or renamed it), which takes it and everything indexed below it out;
- mount records, the secret and the change feed are not in the index.

The embedded KVS keeps the index in a table (:mod:`dyadfs.kvs.local`, database schema 3); the
Flux KVS as a tree of directory nodes plus one append log per directory
(:mod:`dyadfs.kvs.flux`, which also spreads records over hashed bins).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import mmh3

from .errors import KVSError

SCHEMA = 2  # file records; schema 1 ones are read too
READS = (1, 2)
MOUNT_SCHEMA = 1
FILES = "files/"
MOUNTS = "mounts/"
SECRET = "meta/secret"
KINDS = ("file", "dir", "symlink")
STATES = ("complete", "writing")

_JSON = json.JSONDecoder()
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


@dataclass(frozen=True)
class DyadOwner:
    """A file C DYAD published: DYAD's key holds only its producer's broker rank (no size, no
    version, no owner mount)."""

    rank: int


def dyad_owner(raw: bytes, where: str) -> DyadOwner:
    """The rank in the value of DYAD's key (a JSON integer); KVSError if it is not one."""
    try:
        rank = _JSON.decode(raw.decode())
    except (ValueError, UnicodeDecodeError):
        rank = None
    if type(rank) is not int or rank < 0:
        raise KVSError(f"DYAD's key {where!r} does not hold a broker rank: {_show(raw)}")
    return DyadOwner(rank)


def file_key(path: str) -> str:
    return FILES + path


def mount_key(mount_id: str) -> str:
    return MOUNTS + mount_id


def _is_int(v: Any) -> bool:
    return type(v) is int  # not bool, not float: the schema says integer


@dataclass(frozen=True)
class FileRecord:
    """One publication of a name: a file, a directory or a symbolic link."""

    state: str
    size: int
    version: int
    mtime_ns: int
    mode: int
    owner: str
    sha256: str | None = None
    kind: str = "file"
    target: str | None = None  # a symlink's target

    @property
    def complete(self) -> bool:
        return self.state == "complete"

    def encode(self) -> bytes:
        # By hand, not dataclasses.asdict (a deep copy): this runs in every publication.
        return json.dumps({"schema": SCHEMA, "kind": self.kind, "state": self.state,
                           "size": self.size, "version": self.version,
                           "mtime_ns": self.mtime_ns, "mode": self.mode, "owner": self.owner,
                           "sha256": self.sha256, "target": self.target},
                          separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes, where: str) -> FileRecord:
        """The record in *raw*; a KVSError naming the first bad field and its value if it is
        not a valid one (a reader must fail clearly, never take it for "not published")."""
        d = _load(raw, where, "file record", READS)
        # One test of every field first (a listing decodes thousands); which field is wrong
        # is worked out only when one is.
        g = d.get
        kind = "file" if d["schema"] == 1 else g("kind")
        state, size, version, mtime_ns = g("state"), g("size"), g("version"), g("mtime_ns")
        mode, owner, sha256, target = g("mode"), g("owner"), g("sha256"), g("target")
        if (kind in KINDS and state in STATES and type(size) is int and size >= 0
                and type(version) is int and type(mtime_ns) is int and type(mode) is int
                and 0 <= mode <= 0o7777 and type(owner) is str and owner
                and (sha256 is None or type(sha256) is str)
                and (type(target) is str if kind == "symlink" else True)
                and (state == "complete" or kind == "file")):
            return cls(state=state, size=size, version=version, mtime_ns=mtime_ns, mode=mode,
                       owner=owner, sha256=sha256, kind=kind,
                       target=target if kind == "symlink" else None)
        raise _bad_record(d, where)


def _bad_record(d: dict[str, Any], where: str) -> KVSError:
    """The error for a record that failed decode's test: its first bad field, and value."""
    checks: list[tuple[str, Callable[[Any], bool], str]] = [
        ("kind", lambda v: v in KINDS, " or ".join(map(repr, KINDS))),
        ("state", lambda v: v in STATES, " or ".join(map(repr, STATES))),
        ("size", lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
        ("version", _is_int, "an integer"),
        ("mtime_ns", _is_int, "an integer"),
        ("mode", lambda v: _is_int(v) and 0 <= v <= 0o7777, "permission bits, 0 to 0o7777"),
        ("owner", lambda v: isinstance(v, str) and v != "", "a mount id"),
        ("sha256", lambda v: v is None or isinstance(v, str), "a hex digest or null"),
    ]
    if d["schema"] == 1:
        checks = checks[1:]
    elif d.get("kind") == "symlink":
        checks.append(("target", lambda v: isinstance(v, str), "the link's target"))
    for name, ok, expected in checks:
        if name not in d and name != "sha256":
            return KVSError(f"malformed file record at {where!r}: field {name!r} is missing")
        if not ok(d.get(name)):
            return KVSError(f"malformed file record at {where!r}: field {name!r} is "
                            f"{_show(d.get(name))} (expected {expected})")
    return KVSError(f"malformed file record at {where!r}: field 'state' is "
                    f"{_show(d.get('state'))} for a {d.get('kind')} (only files are written)")


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
    local: str | None = None  # transport/local.py's socket, reachable from host_id only
    host_id: str | None = None

    def encode(self) -> bytes:
        return json.dumps({"schema": MOUNT_SCHEMA, **asdict(self)},
                          separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes, where: str) -> MountRecord:
        data = _load(raw, where, "mount record", (MOUNT_SCHEMA,))
        try:
            return cls(host=str(data["host"]), pid=int(data["pid"]), dir=str(data["dir"]),
                       transport=str(data["transport"]),
                       address=_opt_str(data, "address"),
                       started=float(data["started"]),
                       rank=None if data.get("rank") is None else int(data["rank"]),
                       tcp=_opt_str(data, "tcp"), local=_opt_str(data, "local"),
                       host_id=_opt_str(data, "host_id"))
        except (KeyError, TypeError, ValueError) as e:
            raise KVSError(f"malformed mount record at {where!r}: {e!r}") from None


def _opt_str(data: dict[str, Any], name: str) -> str | None:
    return None if data.get(name) is None else str(data[name])


def _show(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _load(raw: bytes, where: str, what: str, schemas: tuple[int, ...]) -> dict[str, Any]:
    try:
        data = _JSON.decode(raw.decode())  # json.loads, without its per-call set-up
    except (ValueError, UnicodeDecodeError):
        raise KVSError(f"malformed {what} at {where!r}: not JSON: {_show(raw)}") from None
    if not isinstance(data, dict):
        raise KVSError(f"malformed {what} at {where!r}: not a JSON object: {_show(data)}")
    if data.get("schema") not in schemas:
        raise KVSError(f"{what} at {where!r} has field 'schema' {_show(data.get('schema'))}; "
                       f"this dyadfs reads schema {' or '.join(map(str, schemas))}")
    return data

"""The Flux KVS of the enclosing Flux instance, through flux-python.

flux-python must match the installed flux-core (``pip install flux-python==<flux version>``), so
it is imported here only, lazily, and a missing or broken one is a one-line error.

Key layout (layout 2). Flux splits keys at ``.``; every path component is hex-encoded, so any
name fits:

- a record ``files/<path>`` is ``dyadfs.files.<b1>.<b2>.<hex path>``, where ``b1.b2`` are two
  hashed bins (64 x 64) of the whole path. Why bins and not one Flux directory per directory
  (layout 1): Flux rewrites and hashes a directory object whole at every commit that touches
  it, so each publication in a 10,000-entry directory rewrote ~1 MB; a bin holds a few hundred
  records even with a million published. And a record never shares its key with a directory,
  so a directory can have a record (kind ``dir``) of its own.
- ``mounts/<id>``, ``meta/<name>``: ``dyadfs.mounts.<hex id>``, ``dyadfs.meta.<hex name>``.
- DYAD's own keys (``12d.d1.20d.<path>``) as they are, so that C DYAD and ``flux kvs get`` see
  them.

The directory index (:mod:`dyadfs.keys`), two structures per directory D:

1. The node tree: ``node(D)`` is ``dyadfs.dirs.<hex c1>.<hex c2>...`` (the top:
   ``dyadfs.dirs``). A commit that puts a record in D also puts ``node(D).p`` (empty): Flux
   makes the missing directories on the way, so node(D) and every node above it exist, and the
   implicit subdirectories of D are the hex-named entries of node(D), one READDIR. ``is_dir`` is
   one lookup of node(D); dropping D is one unlink of node(D), which takes everything below it
   out of the listings at once. Removing a record leaves the tree alone (an emptied directory
   stays, as it does on the producer).
2. The listing log: ``L(D)`` is ``dyadfs.logs.<b1>.<b2>._<hex D>``, holding generations
   ``g0``, ``g1``, ... The newest has ``log``, one JSON line ``[name, record or null]``
   appended (``FLUX_KVS_APPEND``) by each commit that puts or removes a record in D, in the same
   transaction as the record, and from ``g1`` on ``base``, a JSON object name -> record folding
   everything before it. A listing reads node(D) and L(D) (two READDIRs, sent together), then
   ``base`` and ``log`` of the live generation by lookups at that generation's treeobj from the
   READDIR (one snapshot, sent together): four RPCs in two round trips, whatever D holds.
   Records' values are what the KVS was given (bytes, JSON-escaped); the catalog decodes them.
   L(D) is never removed (a dropped D keeps its generations: see below why they must stay).

Compaction. A log grows by a line per publication in D, and Flux keeps an appended value as one
content blob per append (the directory holding it grows by a blobref each time), so a log is
folded now and then into a new generation. Flux has no compare-and-swap, but a transaction fails
as a whole when one of its operations fails, and two operations fail on what a key is:

- an append to a key that is a directory fails (EISDIR), to a symlink EOPNOTSUPP; an append to an
  absent key followed by its unlink changes nothing. So ``[append K "", unlink K]`` asserts "K
  does not exist" (as a directory or link) inside any transaction;
- a write through a symlink into another namespace fails (EINVAL).

Every writer's transaction for D carries ``[append L(D).g<k+1> "", unlink it]`` beside its
append to ``g<k>.log``, with k its cached newest generation: it fails once ``g<k+1>`` exists, and
the writer reads L(D) for the newest one and commits again. Compaction of ``g<k>``:

- C1 ``[assert g<k+1> does not exist, mkdir g<k+1>]``: one compactor wins; from then on no
  writer can append to ``g<k>``: it is frozen.
- read ``g<k>`` (base and log), fold it; C2 ``[write through g<k> (fails if retired), put
  g<k+1>.base = the fold, replace g<k> by a symlink into another namespace]``. The retired
  marker is what makes a second C2 fail, and what keeps the "next exists" guard true for a
  writer that still believes in ``g<k-1>``: markers stay (tens of bytes per compaction).

Between C1 and C2 (or for good, if the compactor died between them) a reader finds two live
generations and replays both, oldest first (a base replaces what came before it, log lines
apply in order); the next compaction finishes the pending C2, which anyone may do: it is
idempotent, since ``g<k>`` is frozen. (A mount that knew a namespace before it was removed and
made again may also leave a live generation with no successor, which the next compaction freezes
with a retired marker and folds in.) A writer compacts after ``COMPACT_EVERY`` of its own appends
to a directory (more in a large directory: see :meth:`FluxKVS._finish`), a reader when the log
it read is longer than the entries it holds; in the background (the KVS's ``run`` task) when
there is one.

The change feed (:meth:`FluxKVS.follow`, for ``--prefetch``): every commit that changes ``files/``
keys also appends them, one JSON string per line, to ``dyadfs.feed`` (``FLUX_KVS_APPEND``, in the
same transaction); a follower watches it with ``FLUX_KVS_WATCH_APPEND``: the first answer is the
whole feed, each later one only what was appended.

``put_if_absent`` (the namespace's secret): ``[assert dyadfs.once.<hex key> does not exist, put
dyadfs.once.<hex key>.w, put the value]``: of mounts started together on every broker, exactly
one transaction succeeds; the others fail (EISDIR) and read the value it wrote (a waiting lookup:
another broker may see that commit a moment later).

Threads: Flux handles are not thread-safe, so each worker thread that touches Flux owns its own
handle (thread-local). Blocking calls run in trio worker threads; a waiting lookup is a Flux KVS
watch (``FLUX_KVS_WATCH | FLUX_KVS_WAITCREATE``) waited on in half-second slices, so that a
cancelled or timed-out wait ends its thread promptly and cancels the watch.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import trio

from ..errors import ConfigError, KVSError
from ..keys import FILES
from . import KVS, Predicate, timeout_error

if TYPE_CHECKING:
    from ..config import Config

try:
    import flux
    import flux.constants
    import flux.kvs
    from flux.kvs import RAW
    from flux.kvs import ffi as _ffi
except (ImportError, OSError) as e:  # OSError: libflux-core.so missing or mismatched
    raise ConfigError(f"--kvs flux: the flux Python module cannot be loaded ({e}); install "
                      "flux-core and the matching flux-python (pip install "
                      "'flux-python==<flux version>')") from None

log = logging.getLogger(__name__)

_OURS = ("files/", "mounts/", "meta/")
_ROOT = "dyadfs"
FEED = "dyadfs.feed"
SLICE = 0.5
BINS = 64
COMPACT_EVERY = 256  # own appends to a directory's log between compactions (at least)
COMPACT_MIN = 256  # a reader compacts a log of more lines than this and than live entries
SECRET_WAIT = 30.0  # how long a put_if_absent that lost waits to see the winner's value
_RETIRED_NS = "dyadfs-retired"  # never created: writes through a retired marker fail
_APPEND = flux.constants.FLUX_KVS_APPEND
_READDIR = flux.constants.FLUX_KVS_READDIR
_TREEOBJ = flux.constants.FLUX_KVS_TREEOBJ
_GUARD_FAILED = (errno.EISDIR, errno.EOPNOTSUPP)
_ABSENT = (errno.ENOENT, errno.EISDIR, errno.ENOTDIR)
#: lookups again of a key whose content this broker could not load yet (~1 s in all)
_LOAD_RETRIES = 8
#: listings read again from a newer root when a leaf could not be loaded at the first one
_LISTING_ATTEMPTS = 30  # ~2.6 s in all
_MAX_ATTEMPTS = 8
_JSON = json.JSONDecoder()


def _bins(raw: bytes) -> str:
    h = hashlib.blake2b(raw, digest_size=2).digest()
    return f"{h[0] % BINS:02x}.{h[1] % BINS:02x}"


def flux_key(key: str) -> str:
    """dyadfs' key -> a Flux key (DYAD's keys pass unchanged)."""
    if key.startswith(FILES):
        raw = os.fsencode(key[len(FILES):])
        return f"{_ROOT}.files.{_bins(raw)}.{raw.hex()}"
    if not key.startswith(_OURS):
        return key
    kind, _, rest = key.partition("/")
    parts = [os.fsencode(p).hex() for p in rest.split("/")]
    return ".".join([_ROOT, kind, *parts])


def our_key(fkey: str) -> str:
    parts = fkey.split(".")
    if parts[1] == "files":
        return FILES + os.fsdecode(bytes.fromhex(parts[-1]))
    return parts[1] + "/" + "/".join(os.fsdecode(bytes.fromhex(p)) for p in parts[2:])


def _node(path: str) -> str:
    """node(D): the Flux directory whose existence makes *path* a directory in the index."""
    parts = [os.fsencode(p).hex() for p in path.split("/")] if path else []
    return ".".join([_ROOT, "dirs", *parts])


def _log_dir(path: str) -> str:
    """L(D): the generations of *path*'s listing log."""
    raw = os.fsencode(path)
    return f"{_ROOT}.logs.{_bins(raw)}._{raw.hex()}"


def _once(key: str) -> str:
    return f"{_ROOT}.once.{os.fsencode(key).hex()}"


def _is_hex(name: str) -> bool:
    try:
        bytes.fromhex(name)
    except ValueError:
        return False
    return name != ""


def _line(name: str, value: bytes | None) -> str:
    text = None if value is None else value.decode("utf-8", "surrogateescape")
    return json.dumps([name, text], separators=(",", ":")) + "\n"


def _fold(gens: Sequence[tuple[bytes | None, bytes | None]]) -> tuple[dict[str, str], int]:
    """Replay generations, oldest first, each a (base, log): a base is a whole snapshot (it
    replaces what came before), a log's lines apply in order. (name -> record text, lines)."""
    state: dict[str, str] = {}
    lines = 0
    for base, data in gens:
        if base:
            try:
                loaded = _JSON.decode(base.decode("utf-8", "replace"))
            except ValueError:
                loaded = None
            if isinstance(loaded, dict):
                state = {k: v for k, v in loaded.items() if isinstance(v, str)}
            else:
                log.warning("Flux KVS: a listing base is not a JSON object; ignored")
        # lines are ASCII (json.dumps escapes the rest): one decode, then str lines
        for line in (data or b"").decode("utf-8", "replace").split("\n"):
            if not line:
                continue
            lines += 1
            try:
                name, text = _JSON.decode(line)
            except (ValueError, TypeError):
                log.warning("Flux KVS: a listing line is not [name, record]: %.60r", line)
                continue
            if not isinstance(name, str):
                continue
            if text is None:
                state.pop(name, None)
            elif isinstance(text, str):
                state[name] = text
    return state, lines


def _gens(logdir: dict[str, Any] | None) -> tuple[dict[int, dict[str, Any]], set[int]]:
    """(live generations -> their treeobj, every generation number, retired ones too)."""
    live: dict[int, dict[str, Any]] = {}
    every: set[int] = set()
    for name, ent in ((logdir or {}).get("data") or {}).items():
        if not (name.startswith("g") and name[1:].isdigit()):
            continue
        k = int(name[1:])
        every.add(k)
        if isinstance(ent, dict) and ent.get("type") in ("dir", "dirref"):
            live[k] = ent
    return live, every


class _Gen:
    """What a mount knows of a directory's log: its newest generation, its own appends since
    the last compaction it saw, and after how many it compacts."""

    __slots__ = ("k", "appends", "every")

    def __init__(self, k: int = 0) -> None:
        self.k = k
        self.appends = 0
        self.every = COMPACT_EVERY


class FluxKVS(KVS):
    name = "flux"

    def __init__(self, uri: str | None = None) -> None:
        self._uri = uri
        self._local = threading.local()
        self._waiters = trio.CapacityLimiter(512)
        # Waits on DYAD's keys (--dyad-compat: beside the wait on a dyadfs record, for the same
        # open) take threads of their own, so they never halve how many opens can wait.
        self._dyad_waiters = trio.CapacityLimiter(512)
        self._gen: dict[tuple[str, str], _Gen] = {}
        self._gen_lock = threading.Lock()
        self._nursery: trio.Nursery | None = None
        self._compacting: set[tuple[str, str]] = set()
        self.rpcs = 0  # RPCs sent by this object (a test counts them)
        self.load_retries = 0  # lookups that found a key only when asked again
        self.listing_retries = 0  # listings read again (a leaf could not be loaded)
        try:
            self.rank = int(self._handle().attr_get("rank"))
        except OSError as e:
            raise KVSError(f"cannot connect to Flux ({e.strerror or e}); is FLUX_URI set?") \
                from None

    @classmethod
    def from_config(cls, config: Config) -> FluxKVS:
        return cls()

    def _handle(self) -> Any:
        h = getattr(self._local, "h", None)
        if h is None:
            h = flux.Flux() if self._uri is None else flux.Flux(self._uri)
            self._local.h = h
        return h

    async def _run(self, fn: Any, *args: Any, abandon: bool = False) -> Any:
        def guarded() -> Any:
            try:
                return fn(*args)
            except OSError as e:
                raise KVSError(f"Flux KVS: {e.strerror or e}", e.errno or errno.EIO) from None
        if abandon:  # a long wait: cancellable, the thread ends at its next slice
            return await trio.to_thread.run_sync(guarded, abandon_on_cancel=True,
                                                 limiter=self._waiters)
        return await trio.to_thread.run_sync(guarded)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Compactions of listing logs run here, off the path of the request that asked."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None

    # -- low level (worker threads) ----------------------------------------------------------
    def _send(self, ns: str | None, key: str, flags: int = 0, at: str | None = None) -> Any:
        self.rpcs += 1
        if at is not None:
            return RAW.flux_kvs_lookupat(self._handle(), flags, key, at)
        return RAW.flux_kvs_lookup(self._handle(), ns, flags, key)

    @staticmethod
    def _take(fut: Any) -> bytes | None:
        """The value a lookup future brings, None if there is none."""
        try:
            return _raw_value(fut)
        except OSError as e:
            if e.errno in _ABSENT:
                return None
            raise
        finally:
            RAW.flux_future_destroy(fut)

    @staticmethod
    def _take_treeobj(fut: Any) -> dict[str, Any] | None:
        """The treeobj a READDIR or TREEOBJ lookup brings, None if the key is absent."""
        try:
            p = _ffi.new("const char *[1]")
            RAW.flux_kvs_lookup_get_treeobj(fut, p)
            obj = json.loads(_ffi.string(p[0]))
            return obj if isinstance(obj, dict) else None
        except OSError as e:
            if e.errno in _ABSENT:
                return None
            raise
        finally:
            RAW.flux_future_destroy(fut)

    def _lookup(self, ns: str, fkey: str) -> bytes | None:
        return self._confirmed(ns, fkey, None, self._take(self._send(ns, fkey)))

    def _confirmed(self, ns: str | None, key: str, at: str | None,
                   value: bytes | None) -> bytes | None:
        """*value*, a lookup's answer for *key*; if None, confirmed absent.

        On a broker of rank > 0, a lookup sometimes answers "no such key" for a key that is
        there: the broker could not load the value's content blob (flux-core 0.88 logs
        ``content_load_completion: content_load_get: No such file or directory``; seen on rank
        1 while both brokers commit to one directory's log, in most runs of the compaction race
        test; cause inside flux-core not found). A TREEOBJ lookup of the key needs its
        directories only, not the value: if it finds the key, the value is looked up again
        (~0.2 s at most; at a snapshot not at all: asking again at the same snapshot never
        helped, a newer root does, see :meth:`_listing`), then this is an error, never
        "absent" (a published file shown as unpublished, a listing that lost its log)."""
        if value is not None or self._take_treeobj(self._send(ns, key, _TREEOBJ, at)) is None:
            return value
        delay = 0.001
        # At a snapshot (*at*), asking again never helped here (0 of ~60): the caller reads
        # from a newer root instead (see _listing)
        for _ in range(0 if at is not None else _LOAD_RETRIES):
            time.sleep(delay)
            delay = min(2 * delay, 0.05)
            value = self._take(self._send(ns, key, 0, at))
            if value is not None:
                self.load_retries += 1
                return value
        raise KVSError(f"Flux KVS: {key!r} is there but its content could not be loaded "
                       f"(flux-core's content store on this broker); try again")

    def _commit(self, ns: str, ops: Sequence[tuple[Any, ...]]) -> None:
        """One transaction of (op, key, ...) tuples: put, append, unlink, mkdir, symlink,
        absent (the guard "key does not exist")."""
        txn = flux.kvs.KVSTxn(self._handle(), namespace=ns)
        t = txn.txn
        for op in ops:
            what, key = op[0], op[1]
            if what == "put":
                RAW.flux_kvs_txn_put_raw(t, 0, key, op[2], len(op[2]))
            elif what == "append":
                RAW.flux_kvs_txn_put_raw(t, _APPEND, key, op[2], len(op[2]))
            elif what == "unlink":
                RAW.flux_kvs_txn_unlink(t, 0, key)
            elif what == "mkdir":
                RAW.flux_kvs_txn_mkdir(t, 0, key)
            elif what == "symlink":
                RAW.flux_kvs_txn_symlink(t, 0, key, op[2], op[3])
            elif what == "absent":
                RAW.flux_kvs_txn_put_raw(t, _APPEND, key, b"", 0)
                RAW.flux_kvs_txn_unlink(t, 0, key)
            else:  # pragma: no cover - a typo here is a bug
                raise AssertionError(what)
        self.rpcs += 1
        txn.commit()

    # -- namespaces ------------------------------------------------------------------------
    def _namespace_list(self) -> list[str]:
        # namespace RPCs are served by rank 0's KVS module only (elsewhere: ENOTSUP)
        rsp = self._handle().rpc("kvs.namespace-list", nodeid=0).get()
        return [n["namespace"] for n in rsp["namespaces"]]

    async def ensure_namespace(self, ns: str, create: bool = True) -> None:
        def do() -> None:
            h = self._handle()
            if ns in self._namespace_list():
                return
            if not create:
                raise KVSError(f"Flux KVS namespace {ns!r} does not exist")
            try:
                flux.kvs.namespace_create(h, ns)  # (the library sends it to rank 0)
            except OSError as e:
                if e.errno == errno.EEXIST:
                    return
                raise KVSError(f"cannot create Flux KVS namespace {ns!r}: "
                               f"{e.strerror or e} (create it with flux kvs namespace create "
                               f"{ns}, as the instance owner)") from None
        await self._run(do)

    async def remove_namespace(self, ns: str) -> None:
        def do() -> None:
            try:
                flux.kvs.namespace_remove(self._handle(), ns)
            except OSError as e:
                if e.errno != errno.ENOENT:
                    raise
            with self._gen_lock:  # a namespace made again starts its logs at g0
                for k in [k for k in self._gen if k[0] == ns]:
                    del self._gen[k]
        await self._run(do)

    async def namespaces(self) -> list[str]:
        result: list[str] = await self._run(self._namespace_list)
        return result

    # -- keys ------------------------------------------------------------------------------
    async def get(self, ns: str, key: str) -> bytes | None:
        value: bytes | None = await self._run(self._lookup, ns, flux_key(key))
        return value

    def _gen_of(self, ns: str, path: str) -> _Gen:
        with self._gen_lock:
            gen = self._gen.get((ns, path))
            if gen is None:
                if len(self._gen) >= 65536:  # a bound; a forgotten one is read again
                    self._gen.clear()
                gen = self._gen[(ns, path)] = _Gen()
            return gen

    def _refresh(self, ns: str, path: str) -> None:
        """Learn the newest generation of *path*'s log (after a guard failed)."""
        live, every = _gens(self._take_treeobj(self._send(ns, _log_dir(path), _READDIR)))
        gen = self._gen_of(ns, path)
        gen.k = max(live) if live else max(every, default=-1) + 1
        gen.appends = 0

    async def commit(self, ns: str, puts: Mapping[str, bytes | None],
                     drop: Sequence[str] = ()) -> None:
        records = [(flux_key(k), v) for k, v in puts.items()]
        lines: dict[str, list[str]] = {}
        present: set[str] = set()
        for k, v in puts.items():
            if k.startswith(FILES):
                d, _, name = k[len(FILES):].rpartition("/")
                lines.setdefault(d, []).append(_line(name, v))
                if v is not None:
                    present.add(d)
        feed = "".join(json.dumps(k) + "\n" for k in puts if k.startswith(FILES)).encode()

        def do() -> list[str]:
            for attempt in range(_MAX_ATTEMPTS):
                ops: list[tuple[Any, ...]] = [("unlink", _node(d)) for d in drop if d]
                gens = {d: self._gen_of(ns, d) for d in lines}
                for d, text in lines.items():
                    k = gens[d].k
                    ops.append(("absent", f"{_log_dir(d)}.g{k + 1}"))  # k is still the newest
                    ops.append(("append", f"{_log_dir(d)}.g{k}.log", "".join(text).encode()))
                for fkey, value in records:
                    ops.append(("unlink", fkey) if value is None else ("put", fkey, value))
                ops.extend(("put", f"{_node(d)}.p", b"") for d in sorted(present))
                if feed:
                    ops.append(("append", FEED, feed))
                try:
                    self._commit(ns, ops)
                except OSError as e:
                    if e.errno not in _GUARD_FAILED or not lines or attempt == _MAX_ATTEMPTS - 1:
                        raise
                    for d in lines:  # a log was compacted meanwhile: find its newest generation
                        self._refresh(ns, d)
                    continue
                due = []
                for d, gen in gens.items():
                    gen.appends += 1
                    if gen.appends >= gen.every:
                        gen.appends = 0
                        due.append(d)
                return due
            raise AssertionError("unreachable")

        due: list[str] = await self._run(do)
        for d in due:
            await self._compact_soon(ns, d)

    async def put_if_absent(self, ns: str, key: str, value: bytes) -> bytes:
        fkey, once = flux_key(key), _once(key)

        def do() -> bytes:
            current = self._lookup(ns, fkey)
            if current is not None:
                return current
            try:
                self._commit(ns, [("absent", once), ("put", f"{once}.w", b""),
                                  ("put", fkey, value)])
                return value
            except OSError as e:
                if e.errno not in _GUARD_FAILED:
                    raise
            # another caller's transaction won; this broker may see it a moment later
            fut = self._send(ns, fkey, flux.constants.FLUX_KVS_WAITCREATE)
            try:
                RAW.flux_future_wait_for(fut, SECRET_WAIT)
            except OSError as e:
                _cancel_lookup(fut)
                raise KVSError(f"Flux KVS: {key!r} was written by another mount but cannot "
                               f"be read ({e.strerror or e})") from None
            stored = self._take(fut)
            if stored is None:
                raise KVSError(f"Flux KVS: {key!r} was written by another mount and removed")
            return stored
        result: bytes = await self._run(do)
        return result

    async def list_prefix(self, ns: str, prefix: str) -> dict[str, bytes]:
        """Every key starting with *prefix*. A ``files/`` prefix is a path: that key and
        everything below it (through the index), or ``files/`` for all."""
        if not prefix.startswith(_OURS):
            raise KVSError(f"Flux KVS: cannot list {prefix!r}")

        def walk(fdir: str, out: dict[str, bytes]) -> None:
            try:
                d = flux.kvs.KVSDir(self._handle(), fdir, namespace=ns)
                files, dirs = d.list_all()
            except OSError as e:
                if e.errno in (errno.ENOENT, errno.ENOTDIR):
                    return
                raise
            for name in files:
                value = self._lookup(ns, f"{fdir}.{name}")
                if value is not None:
                    out[our_key(f"{fdir}.{name}")] = value
            for name in dirs:
                walk(f"{fdir}.{name}", out)

        def files(path: str, out: dict[str, bytes]) -> None:
            todo = [path]
            while todo:
                d = todo.pop()
                state, subdirs, _ = self._listing(ns, d)
                for name, text in state.items():
                    out[FILES + (f"{d}/{name}" if d else name)] = \
                        text.encode("utf-8", "surrogateescape")
                todo.extend(f"{d}/{name}" if d else name for name in subdirs)

        def do() -> dict[str, bytes]:
            out: dict[str, bytes] = {}
            if prefix.startswith(FILES):
                path = prefix[len(FILES):]
                if path and not path.endswith("/"):
                    value = self._lookup(ns, flux_key(prefix))
                    if value is not None:
                        out[prefix] = value
                files(path.rstrip("/"), out)
            elif prefix.endswith("/"):
                base = prefix[:-1]
                walk(flux_key(base) if "/" in base else f"{_ROOT}.{base}", out)
            else:
                value = self._lookup(ns, flux_key(prefix))
                if value is not None:
                    out[prefix] = value
                walk(flux_key(prefix), out)
            return out

        result: dict[str, bytes] = await self._run(do)
        return result

    # -- the directory index ---------------------------------------------------------------
    def _listing(self, ns: str, path: str) -> tuple[dict[str, str], list[str], int]:
        """(records of *path*'s entries, its implicit subdirectories, lines of log read)."""
        delay = 0.002
        for attempt in range(_LISTING_ATTEMPTS):
            try:
                return self._listing_once(ns, path)
            except KVSError:  # a leaf this broker could not load: read again, from a newer root
                if attempt == _LISTING_ATTEMPTS - 1:
                    raise
                self.listing_retries += 1
                time.sleep(delay)  # worker thread; the load fails for some ms
                delay = min(2 * delay, 0.1)
        raise AssertionError("unreachable")

    def _listing_once(self, ns: str, path: str) -> tuple[dict[str, str], list[str], int]:
        node_f = self._send(ns, _node(path), _READDIR)
        logs_f = self._send(ns, _log_dir(path), _READDIR)
        node = self._take_treeobj(node_f)
        logdir = self._take_treeobj(logs_f)
        if node is None:
            return {}, [], 0  # not a directory (any more)
        subdirs = [os.fsdecode(bytes.fromhex(name)) for name, ent in node.get("data", {}).items()
                   if _is_hex(name) and isinstance(ent, dict)
                   and ent.get("type") in ("dir", "dirref")]
        live, _ = _gens(logdir)
        # Normally one live generation; two between a compaction's commits (the older one is
        # read whole, then the newer one's log). All of them, oldest first, in any case.
        where = [(k, leaf) for k in sorted(live) for leaf in ("base", "log")]
        futs = [self._send_at(ns, path, k, live[k], leaf) for k, leaf in where]
        values = [self._take(f) for f in futs]
        for i, (k, leaf) in enumerate(where):
            if values[i] is None and (k, leaf) != (0, "base"):  # g0 never has a base
                # usually absent (a generation's log before its first append): make sure
                if live[k].get("type") == "dirref":
                    values[i] = self._confirmed(None, leaf, json.dumps(live[k]), None)
                else:
                    values[i] = self._confirmed(ns, f"{_log_dir(path)}.g{k}.{leaf}", None, None)
        state, lines = _fold(list(zip(values[::2], values[1::2], strict=True)))
        return state, subdirs, lines

    def _send_at(self, ns: str, path: str, k: int, treeobj: dict[str, Any], leaf: str) -> Any:
        """A lookup of *leaf* in generation *k*, at the snapshot READDIR gave (a dirref)."""
        if treeobj.get("type") == "dirref":
            return self._send(None, leaf, 0, at=json.dumps(treeobj))
        return self._send(ns, f"{_log_dir(path)}.g{k}.{leaf}")

    async def children(self, ns: str, path: str) -> dict[str, bytes | None]:
        state, subdirs, lines = await self._run(self._listing, ns, path)
        out: dict[str, bytes | None] = {name: None for name in subdirs}
        out.update((name, text.encode("utf-8", "surrogateescape")) for name, text in state.items())
        if lines > max(COMPACT_MIN, len(state)):
            await self._compact_soon(ns, path)
        return out

    async def is_dir(self, ns: str, path: str) -> bool:
        if not path:
            return True

        def do() -> bool:
            obj = self._take_treeobj(self._send(ns, _node(path), _TREEOBJ))
            return obj is not None and obj.get("type") in ("dir", "dirref")
        result: bool = await self._run(do)
        return result

    # -- compaction ------------------------------------------------------------------------
    async def _compact_soon(self, ns: str, path: str) -> None:
        """Compact *path*'s log in the background, or now if there is no background."""
        if (ns, path) in self._compacting:
            return
        if self._nursery is not None:
            self._compacting.add((ns, path))
            self._nursery.start_soon(self._compact_task, ns, path)
        else:
            await self._compact_task(ns, path, register=False)

    async def _compact_task(self, ns: str, path: str, register: bool = True) -> None:
        try:
            await self._run(self._compact, ns, path)
        except KVSError as e:  # nothing changed: the next trigger tries again
            log.warning("Flux KVS: compacting the listing of %r in %s failed: %s", path, ns, e)
        finally:
            if register:
                self._compacting.discard((ns, path))

    def _compact(self, ns: str, path: str) -> None:
        ldir = _log_dir(path)
        live, every = _gens(self._take_treeobj(self._send(ns, ldir, _READDIR)))
        if not live:
            return
        top = max(live)
        if len(live) == 1:
            # C1: the next generation exists; writers move to it; top is frozen
            ops: list[tuple[Any, ...]] = [("absent", f"{ldir}.g{top + 1}"),
                                          ("mkdir", f"{ldir}.g{top + 1}")]
            olds, new = [top], top + 1
        else:
            # someone's C1 without its C2 yet (or it died): finish it. Any older generation
            # without a successor (written by a mount that knew the namespace before it was
            # made again) is frozen first, with a retired marker as its successor.
            olds, new = sorted(live)[:-1], top
            ops = [op for j in olds if j + 1 not in every
                   for op in (("absent", f"{ldir}.g{j + 1}"),
                              ("symlink", f"{ldir}.g{j + 1}", _RETIRED_NS, "."))]
        if ops:
            try:
                self._commit(ns, ops)
            except OSError as e:
                if e.errno in _GUARD_FAILED:
                    return  # another compactor won
                raise
        self._finish(ns, path, olds, new)

    def _finish(self, ns: str, path: str, olds: list[int], new: int) -> None:
        """C2: fold the frozen generations *olds* into the base of *new* and retire them."""
        ldir = _log_dir(path)
        values: list[bytes | None] = []
        for k in olds:
            try:
                tree = self._take_treeobj(self._send(ns, f"{ldir}.g{k}", _READDIR))
            except OSError:
                return  # retired meanwhile (its marker leads out of the namespace)
            if tree is None:
                return
            leaves = (tree.get("data") or {}).keys()
            for leaf in ("base", "log"):
                if leaf not in leaves:
                    values.append(None)
                    continue
                try:
                    key = f"{ldir}.g{k}.{leaf}"
                    value = self._confirmed(ns, key, None, self._take(self._send(ns, key)))
                except OSError:
                    return  # retired meanwhile
                if value is None:
                    # Listed, yet a lookup says it is not there: this broker could not load the
                    # value's content yet (flux-core logs "content_load_get: No such file or
                    # directory" on a non-zero rank). Folding without it would retire lines
                    # with their generation; the next compaction tries again.
                    log.info("Flux KVS: generation %d of the listing of %r could not be read "
                             "whole; compaction postponed", k, path)
                    return
                values.append(value)
        state, _ = _fold(list(zip(values[::2], values[1::2], strict=True)))
        ops: list[tuple[Any, ...]] = [("absent", f"{ldir}.g{k}.z") for k in olds]  # retired?
        ops.append(("put", f"{ldir}.g{new}.base",
                    json.dumps(state, separators=(",", ":")).encode()))
        for k in olds:
            ops += [("unlink", f"{ldir}.g{k}"), ("symlink", f"{ldir}.g{k}", _RETIRED_NS, ".")]
        try:
            self._commit(ns, ops)
        except OSError as e:
            if e.errno == errno.EINVAL:
                return  # another one finished it
            raise
        gen = self._gen_of(ns, path)
        with self._gen_lock:
            gen.k = max(gen.k, new)
            # Between compactions each commit rewrites the generation's blobrefs (~50 B per
            # append so far); a compaction rewrites the base (~250 B per entry). With E appends
            # between compactions and L entries, a publication costs about 25 E + 250 L / E
            # bytes: least at E = sqrt(10 L).
            gen.every = max(COMPACT_EVERY, math.isqrt(10 * len(state)))

    # -- the change feed -------------------------------------------------------------------
    async def follow(self, ns: str, on_change: Callable[[list[str] | None], None]) -> None:
        stop = threading.Event()

        def deliver(keys: list[str]) -> None:
            if not stop.is_set():
                on_change(keys)

        def watch() -> None:
            flags = (flux.constants.FLUX_KVS_WATCH | flux.constants.FLUX_KVS_WAITCREATE
                     | flux.constants.FLUX_KVS_WATCH_APPEND)
            fut = flux.kvs.KVSWatchFuture(RAW.flux_kvs_lookup(self._handle(), ns, flags, FEED))
            try:
                while _next_response(fut, stop):
                    data = _raw_value(fut.pimpl)
                    fut.reset()
                    keys = list(dict.fromkeys(_feed_lines(data)))
                    if keys:
                        trio.from_thread.run_sync(deliver, keys)
            finally:
                _cancel_watch(fut)

        try:
            await self._run(watch, abandon=True)
        finally:
            stop.set()

    # -- waiting ---------------------------------------------------------------------------
    async def wait_until(self, ns: str, key: str, pred: Predicate,
                         timeout: float | None) -> bytes | None:
        fkey = flux_key(key)
        stop = threading.Event()
        deadline = math.inf if timeout is None else trio.current_time() + timeout
        found: list[bytes | None] = []

        def watch() -> bool:
            """Block in slices until pred holds (True), or stop is set (False)."""
            h = self._handle()
            while not stop.is_set():
                current = self._lookup(ns, fkey)  # a watch never reports "absent" first
                if pred(current):
                    found.append(current)
                    return True
                fut = flux.kvs.kvs_watch_async(h, fkey, namespace=ns, waitcreate=True)
                try:
                    while _next_response(fut, stop):
                        try:
                            value: bytes | None = _raw_value(fut.pimpl)
                        except OSError as e:
                            if e.errno not in (errno.ENOENT, errno.ENODATA):
                                raise
                            value = None  # removed: the watch ends; start a new one
                        if pred(value):
                            found.append(value)
                            return True
                        if value is None:
                            break
                        fut.reset()
                finally:
                    _cancel_watch(fut)
            return False

        try:
            with trio.move_on_at(deadline):
                limiter = self._waiters if fkey.startswith(_ROOT) else self._dyad_waiters
                if await trio.to_thread.run_sync(watch, abandon_on_cancel=True,
                                                 limiter=limiter):
                    return found[0]
        finally:
            stop.set()
        raise timeout_error(ns, key, timeout)


def _next_response(fut: Any, stop: threading.Event) -> bool:
    """Wait for a watch's next response in SLICEs (so that *stop* is seen promptly): True when
    one came, False once *stop* is set."""
    while not stop.is_set():
        try:
            fut.wait_for(SLICE)
        except OSError as e:
            if e.errno == errno.ETIMEDOUT:
                continue
            raise
        return True
    return False


def _cancel_watch(fut: Any) -> None:
    try:
        fut.cancel(stop=True)
    except OSError:
        pass


def _cancel_lookup(fut: Any) -> None:
    """Drop a waiting lookup that is still pending (the broker forgets it too)."""
    try:
        RAW.flux_kvs_lookup_cancel(fut)
    except OSError:
        pass
    RAW.flux_future_destroy(fut)


def _feed_lines(data: bytes) -> list[str]:
    out = []
    for line in data.splitlines():
        try:
            key = json.loads(line)
        except ValueError:
            continue  # a torn or foreign line: the keys it named are found by other means
        if isinstance(key, str) and key.startswith(FILES):
            out.append(key)
    return out


def _raw_value(fut: Any) -> bytes:
    datap = _ffi.new("const void *[1]")
    lenp = _ffi.new("size_t *")
    RAW.flux_kvs_lookup_get_raw(fut, datap, lenp)
    if datap[0] == _ffi.NULL:
        return b""
    return bytes(_ffi.buffer(datap[0], lenp[0]))

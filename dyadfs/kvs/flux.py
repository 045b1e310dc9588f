"""The Flux KVS of the enclosing Flux instance, through flux-python.

flux-python must match the installed flux-core (``pip install flux-python==<flux version>``), so
it is imported here only, lazily, and a missing or broken one is a one-line error.

Key layout: Flux splits keys at ``.``, so dyadfs' keys (``files/<path>``, ``mounts/<id>``,
``meta/secret``) become ``dyadfs.<kind>.<hex of each path component>...``: a file's directory is a
Flux directory, and listing a directory is one READDIR. DYAD's own keys (``12d.d1.20d.<path>``)
are written as they are, so that C DYAD and ``flux kvs get`` see them.

The change feed (:meth:`FluxKVS.follow`, for ``--prefetch``): every commit that changes ``files/``
keys also appends them, one JSON string per line, to ``dyadfs.feed`` (``FLUX_KVS_APPEND``, in the
same transaction); a follower watches it with ``FLUX_KVS_WATCH_APPEND``: the first answer is the
whole feed, each later one only what was appended.

Threads: Flux handles are not thread-safe, so each worker thread that touches Flux owns its own
handle (thread-local). Blocking calls run in trio worker threads; a waiting lookup is a Flux KVS
watch (``FLUX_KVS_WATCH | FLUX_KVS_WAITCREATE``) waited on in half-second slices, so that a
cancelled or timed-out wait ends its thread promptly and cancels the watch.
"""

from __future__ import annotations

import errno
import json
import math
import os
import threading
from collections.abc import Callable, Mapping
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

_OURS = ("files/", "mounts/", "meta/")
_ROOT = "dyadfs"
FEED = "dyadfs.feed"
SLICE = 0.5


def flux_key(key: str) -> str:
    """dyadfs' key -> a Flux key (DYAD's keys pass unchanged)."""
    if not key.startswith(_OURS):
        return key
    kind, _, rest = key.partition("/")
    parts = [os.fsencode(p).hex() for p in rest.split("/")]
    return ".".join([_ROOT, kind, *parts])


def our_key(fkey: str) -> str:
    parts = fkey.split(".")
    return parts[1] + "/" + "/".join(os.fsdecode(bytes.fromhex(p)) for p in parts[2:])


class FluxKVS(KVS):
    name = "flux"

    def __init__(self, uri: str | None = None) -> None:
        self._uri = uri
        self._local = threading.local()
        self._waiters = trio.CapacityLimiter(512)
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
        await self._run(do)

    async def namespaces(self) -> list[str]:
        result: list[str] = await self._run(self._namespace_list)
        return result

    # -- keys ------------------------------------------------------------------------------
    def _lookup(self, ns: str, fkey: str) -> bytes | None:
        fut = RAW.flux_kvs_lookup(self._handle(), ns, 0, fkey)
        try:
            return _raw_value(fut)
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.EISDIR, errno.ENOTDIR):
                return None
            raise
        finally:
            RAW.flux_future_destroy(fut)

    async def get(self, ns: str, key: str) -> bytes | None:
        value: bytes | None = await self._run(self._lookup, ns, flux_key(key))
        return value

    async def commit(self, ns: str, puts: Mapping[str, bytes | None]) -> None:
        items = [(flux_key(k), v) for k, v in puts.items()]
        feed = "".join(json.dumps(k) + "\n" for k in puts if k.startswith(FILES)).encode()

        def do() -> None:
            txn = flux.kvs.KVSTxn(self._handle(), namespace=ns)
            for fkey, value in items:
                if value is None:
                    txn.unlink(fkey)
                else:
                    txn.put(fkey, value, raw=True)
            if feed:
                RAW.flux_kvs_txn_put_raw(txn.txn, flux.constants.FLUX_KVS_APPEND, FEED, feed,
                                         len(feed))
            txn.commit()
        await self._run(do)

    async def put_if_absent(self, ns: str, key: str, value: bytes) -> bytes:
        # Flux has no compare-and-swap; the one caller (the namespace's secret) tolerates the
        # race: two first mounts may both write, and both read back the value that won.
        current = await self.get(ns, key)
        if current is not None:
            return current
        await self.commit(ns, {key: value})
        stored = await self.get(ns, key)
        assert stored is not None
        return stored

    async def list_prefix(self, ns: str, prefix: str) -> dict[str, bytes]:
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

        def do() -> dict[str, bytes]:
            out: dict[str, bytes] = {}
            if prefix.endswith("/"):
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
                if await trio.to_thread.run_sync(watch, abandon_on_cancel=True,
                                                 limiter=self._waiters):
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

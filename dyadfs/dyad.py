"""C DYAD interoperability: DYAD's ``dyad.fetch`` service, in DYAD's Flux RPC data transport
layer (DTL), both ways (``--dyad-compat``, Flux only).

DYAD's protocol, as its sources have it (``src/dyad/client/dyad_client.c`` dyad_get_data,
``src/dyad/dtl/flux_dtl.c``, ``src/dyad/service/flux_module/dyad.c`` dyad_fetch_request_cb):

- a producer's close commits DYAD's key for the file (:func:`dyadfs.keys.dyad_key`); its value is
  the producer's broker rank, a JSON integer. Nothing else: no size, no version;
- a consumer sends a *streaming* request (``FLUX_RPC_STREAMING``) to topic ``dyad.fetch`` on
  ``nodeid`` = that rank, payload ``{"upath": "<path relative to the producer's managed
  dir>"}``;
- the service (DYAD's broker module, or a dyadfs mount) answers with the file's bytes in one raw
  response, then ends the stream with an ENODATA error response. Any other error response is a
  failure; a non-streaming request gets EPROTO. DYAD's C client reads exactly one data response
  and then wants ENODATA ("the module sent too many responses" otherwise), so a dyadfs service
  sends a whole file in one response; the dyadfs client accepts any number of them.
- DYAD's module refuses a 0-byte file (an error response; measured: see the README), so an
  empty answer is never taken for an empty file here.

The client (:class:`DyadClient`) runs each fetch in a worker thread with a Flux handle of its
own (handles are not thread-safe); the service (:class:`DyadService`) owns one handle in one
thread that runs its Flux reactor: requests go from it to trio, where the mount checks them and
reads the file off the trio thread, and the answers come back to it through a pipe it watches.
Only this module and :mod:`dyadfs.kvs.flux` import flux, lazily.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import queue
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from .backing import fallocate
from .errors import ConfigError, DyadfsError, FetchError

try:
    import flux
    import flux.constants
    from flux.core.inner import ffi as _ffi
    from flux.core.inner import raw as _raw
except (ImportError, OSError) as e:  # OSError: libflux-core.so missing or mismatched
    raise ConfigError(f"--dyad-compat: the flux Python module cannot be loaded ({e}); install "
                      "the flux-python that matches flux-core, or mount with --dyad-compat off") \
        from None

log = logging.getLogger(__name__)

SERVICE = "dyad"
TOPIC = "dyad.fetch"
SLICE = 0.5  # a waiting fetch looks at its stop flag this often (seconds)


class DyadClient:
    """Fetches files that C DYAD published, from the ``dyad.fetch`` service of their rank."""

    def __init__(self, uri: str | None = None) -> None:
        self._uri = uri
        self._local = threading.local()
        self._limiter = trio.CapacityLimiter(64)

    def _handle(self) -> Any:
        h = getattr(self._local, "h", None)
        if h is None:
            h = flux.Flux() if self._uri is None else flux.Flux(self._uri)
            self._local.h = h
        return h

    async def fetch(self, rank: int, upath: str, fd: int, silence: float) -> int:
        """Write the bytes of *upath* served by *rank* to *fd* from offset 0; returns how many
        came. FetchError (with the service's errno, ETIMEDOUT after *silence* seconds without
        an answer) on failure. Cancellable: the thread drops the request at its next slice."""
        stop = threading.Event()
        try:
            n: int = await trio.to_thread.run_sync(
                self._fetch, rank, upath, fd, silence, stop, abandon_on_cancel=True,
                limiter=self._limiter)
            return n
        finally:
            stop.set()

    def _fetch(self, rank: int, upath: str, fd: int, silence: float,
               stop: threading.Event) -> int:
        where = f"dyad.fetch of {upath!r} from rank {rank}"
        payload = json.dumps({"upath": upath}).encode()
        try:
            fut = _raw.flux_rpc(self._handle(), TOPIC, payload, rank,
                                flux.constants.FLUX_RPC_STREAMING)
        except OSError as e:
            raise FetchError(f"{where}: {e.strerror or e}", e.errno or errno.EIO) from None
        total = 0
        data = _ffi.new("const void *[1]")
        size = _ffi.new("size_t *")
        try:
            while True:
                _wait(fut, silence, stop, where)
                try:
                    _raw.flux_rpc_get_raw(fut, data, size)
                except OSError as e:
                    if e.errno == errno.ENODATA:
                        return total  # the end of the stream
                    raise FetchError(f"{where}: {e.strerror or os.strerror(e.errno or 0)}",
                                     e.errno or errno.EIO) from None
                n = size[0]
                if n:
                    fallocate(fd, total + n)  # ENOSPC here, before the bytes are written
                    view = _ffi.buffer(data[0], n)
                    done = 0
                    while done < n:
                        done += os.pwrite(fd, view[done:], total + done)
                    total += n
                _raw.flux_future_reset(fut)
        finally:
            _raw.flux_future_destroy(fut)


def _wait(fut: Any, silence: float, stop: threading.Event, where: str) -> None:
    waited = 0.0
    while True:
        if stop.is_set():
            raise FetchError(f"{where}: cancelled", errno.EINTR)
        try:
            _raw.flux_future_wait_for(fut, SLICE)
            return
        except OSError as e:
            if e.errno != errno.ETIMEDOUT:
                raise
        waited += SLICE
        if waited >= silence:
            raise FetchError(f"{where}: no answer in {silence} s", errno.ETIMEDOUT)


#: what the service asks the mount for a request: the whole file at a upath, or FetchError
Resolver = Callable[[str], Awaitable[bytes]]


class DyadService:
    """``dyad.fetch`` on this mount's broker, for the files this mount published: what lets a
    C DYAD consumer read them without DYAD's broker module. If the module is loaded, the
    service is its (registration fails with EEXIST): this one then stays out of the way."""

    def __init__(self, resolve: Resolver, uri: str | None = None) -> None:
        self._resolve = resolve
        self._uri = uri
        self._out: queue.SimpleQueue[tuple[int, bytes | int] | None] = queue.SimpleQueue()
        self._wake_w = -1
        self._thread: threading.Thread | None = None
        self.registered = False
        self.served = 0
        self.refused = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) \
            -> None:
        token = trio.lowlevel.current_trio_token()
        ready = trio.Event()
        outcome: list[int] = []
        async with trio.open_nursery() as nursery:
            def started(err: int) -> None:
                outcome.append(err)
                ready.set()

            def request(rid: int, upath: str) -> None:
                nursery.start_soon(self._answer, rid, upath)

            # The wake-up pipe is the trio side's: only it writes (and closes) the write end, so
            # a byte never goes to a descriptor number the reactor thread closed and reused.
            rfd, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            self._thread = threading.Thread(target=self._reactor, name="dyad.fetch",
                                            args=(token, rfd, started, request), daemon=True)
            self._thread.start()
            try:
                await ready.wait()
                err = outcome[0]
                if err == errno.EEXIST:
                    log.info("dyad.fetch is served on this broker already (DYAD's broker "
                             "module, or another dyadfs mount): C DYAD consumers ask it; this "
                             "mount keeps working beside it")
                    task_status.started()
                    return
                if err:
                    log.warning("cannot serve DYAD's dyad.fetch on this broker (%s): C DYAD "
                                "consumers cannot read this mount's files", os.strerror(err))
                    task_status.started()
                    return
                self.registered = True
                log.info("serving DYAD's dyad.fetch (Flux RPC DTL) on this broker")
                task_status.started()
                await trio.sleep_forever()
            finally:
                self._post(None)
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(self._thread.join, 10.0)
                wfd, self._wake_w = self._wake_w, -1
                os.close(wfd)
                if not self._thread.is_alive():  # else it may still poll it: leave it open
                    os.close(rfd)

    def _stopped(self) -> None:
        self.registered = False

    # -- the trio side -----------------------------------------------------------------------
    async def _answer(self, rid: int, upath: str) -> None:
        try:
            data = await self._resolve(upath)
        except DyadfsError as e:
            self.refused += 1
            log.warning("refused dyad.fetch of %r: %s", upath, e)
            self._post((rid, e.errno or errno.EIO))
            return
        except Exception:  # a bug: the requester still gets an answer, the mount goes on
            self.refused += 1
            log.exception("unexpected error serving dyad.fetch of %r", upath)
            self._post((rid, errno.EIO))
            return
        self.served += 1
        self._post((rid, data))
        self._post((rid, errno.ENODATA))

    def _post(self, item: tuple[int, bytes | int] | None) -> None:
        self._out.put(item)
        if self._wake_w >= 0:
            try:
                os.write(self._wake_w, b"x")
            except OSError:
                pass  # the pipe is full: the reactor wakes anyway

    # -- the reactor thread (the only user of its Flux handle) ------------------------------
    def _reactor(self, token: trio.lowlevel.TrioToken, rfd: int,
                 started: Callable[[int], None], request: Callable[[int, str], None]) -> None:
        def tell(fn: Callable[..., None], *args: Any) -> bool:
            try:
                trio.from_thread.run_sync(fn, *args, trio_token=token)
                return True
            except trio.RunFinishedError:
                return False

        try:
            h = flux.Flux() if self._uri is None else flux.Flux(self._uri)
            h.service_register(SERVICE).get()
        except Exception as e:  # the mount waits for this answer: it must come
            tell(started, getattr(e, "errno", None) or errno.EIO)
            return
        pending: dict[int, Any] = {}  # request id -> its message (only this thread holds it)
        next_id = [0]

        def respond(msg: Any, answer: bytes | int) -> None:
            try:
                if isinstance(answer, bytes):
                    _raw.flux_respond_raw(h.handle, msg.handle, _ffi.from_buffer(answer),
                                          len(answer))
                else:
                    _raw.flux_respond_error(h.handle, msg.handle, answer, _ffi.NULL)
            except OSError as e:
                log.warning("dyad.fetch: cannot respond (%s)", e.strerror or e)

        def on_request(handle: Any, watcher: Any, msg: Any, arg: Any) -> None:
            try:
                if not _raw.flux_msg_is_streaming(msg.handle):
                    log.warning("refused dyad.fetch: not a streaming request (EPROTO)")
                    respond(msg, errno.EPROTO)
                    return
                try:
                    upath = _upath(msg.payload_str)
                except OSError:  # not a string payload
                    upath = None
                if upath is None:
                    log.warning("refused dyad.fetch: the payload is not {\"upath\": str} "
                                "(EPROTO)")
                    respond(msg, errno.EPROTO)
                    return
                next_id[0] += 1
                pending[next_id[0]] = msg
                if not tell(request, next_id[0], upath):
                    pending.pop(next_id[0])
                    respond(msg, errno.ENOSYS)
            except Exception:  # never out of a Flux callback: it would stop the reactor
                log.exception("unexpected error taking a dyad.fetch request")
                respond(msg, errno.EIO)

        def on_wake(handle: Any, watcher: Any, fd: int, revents: int, arg: Any) -> None:
            try:
                while os.read(rfd, 4096):
                    pass
            except OSError:  # BlockingIOError: drained
                pass
            while True:
                try:
                    item = self._out.get_nowait()
                except queue.Empty:
                    return
                if item is None:
                    h.reactor_stop()
                    return
                rid, answer = item
                msg = pending.get(rid)
                if msg is None:
                    continue
                respond(msg, answer)
                if isinstance(answer, int):
                    del pending[rid]  # an error response ends the stream (ENODATA too)

        watchers: list[Any] = []
        try:
            watchers.append(h.msg_watcher_create(on_request, flux.constants.FLUX_MSGTYPE_REQUEST,
                                                 TOPIC))
            watchers.append(h.fd_watcher_create(rfd, on_wake, events=flux.constants.FLUX_POLLIN))
            for w in watchers:
                w.start()
            if not tell(started, 0):
                return
            h.reactor_run()
        except Exception:
            log.exception("the dyad.fetch service stopped")
            tell(started, errno.EIO)  # if it had not started yet, the mount goes on without
            tell(self._stopped)
        finally:
            for msg in pending.values():
                respond(msg, errno.ENOSYS)  # the mount is going: no answer will come
            pending.clear()
            for w in watchers:
                w.stop()
            try:
                h.service_unregister(SERVICE).get()
            except OSError:
                pass


def _upath(payload: str | None) -> str | None:
    try:
        obj = json.loads(payload or "")
    except ValueError:
        return None
    upath = obj.get("upath") if isinstance(obj, dict) else None
    return upath if isinstance(upath, str) else None

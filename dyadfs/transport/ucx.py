"""UCX through UCXX: shared memory, TCP or RDMA, chosen by UCX.

UCXX is asyncio-based and the file system runs on trio, so UCX lives in one dedicated thread with
its own asyncio loop; trio talks to it through futures and the trio token.

Idle cost decides the shape (measured on this kind of machine, see design.md and the notes):
UCXX in ``blocking`` progress mode costs nothing measurable with only a listener, but a whole
core while any receive is pending, and ``thread`` mode costs about 2% of a core always. A mount
sits beside a simulation for hours, so dyadfs never leaves a receive pending for long: one
endpoint per fetch, closed when the fetch ends, and a serving endpoint whose peer says nothing
for MESSAGE_TIMEOUT is closed. An idle mount then has a listener and nothing else.

One fetch on an endpoint: the client sends the request; the owner answers with a header, the
bytes in ``CHUNK``-sized messages, and a trailer; the client acknowledges with one byte, so the
owner never closes under a message in flight. Messages are framed as UCXX's ``send_obj`` frames
them (an 8-byte length, then the bytes), but a length over MAX_MESSAGE is refused before
anything is allocated for it.

The owner never maps the file it sends: a producer that truncates it meanwhile would turn the
next read of the map into a SIGBUS that kills the daemon. It reads each chunk with ``pread`` (in
a worker thread) into one of a few reused buffers, asks ``Served.changed``, and sends it; a short
read or a change ends that transfer. The receiver writes with ``pwrite`` from a few reused
buffers, or, when the caller preallocated the file, straight into a shared map of it.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import ctypes
import errno
import functools
import logging
import mmap
import os
import socket
import struct
import threading
from collections.abc import Awaitable
from typing import Any, TypeVar

import numpy as np
import trio

# UCXX sets a variable this UCX does not know, and UCX warns on stderr for every process.
os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
import ucxx  # noqa: E402

from ..errors import DyadfsError, FetchError
from . import Handler, Transport
from .protocol import (
    MAX_MESSAGE,
    Request,
    Served,
    Sink,
    header,
    parse_header,
    parse_trailer,
    trailer,
)
from .tcp import MAX_CONNECTIONS, MESSAGE_TIMEOUT, LogLimit, pwrite_all, split_address

log = logging.getLogger(__name__)

#: bytes per UCX message of file data (both sides must agree)
CHUNK = 4 * 1024 * 1024
#: messages in flight per fetch, each way: the network never waits for the disk, nor a reader of
#: a file being pulled for a whole large message
WINDOW = 4
#: CHUNK-sized buffers the server reads files into, shared by all its transfers (and as many
#: for receiving): two transfers at full window, 32 MiB each way at most
BUFFERS = 2 * WINDOW
#: worker threads reading and writing files (pread, pwrite, hashing) at once
DISK_THREADS = 4
MADV_POPULATE_WRITE = 23  # Linux 5.14; older kernels answer EINVAL and fault pages one by one
T = TypeVar("T")


def _rearming_fd_callback(self: Any) -> None:
    """UCXX's BlockingMode callback, fixed to re-arm the worker.

    Upstream (ucxx 0.52), ``_progress_with_timeout`` cancels the task that re-arms the worker and
    nothing starts it again; from then on the worker's epoll descriptor stays readable and
    asyncio calls this callback in a hot loop: a whole core, forever, after the first transfer
    (measured here: 62-99% of a core, 87,000 calls a second). Starting the arm task again when
    it is gone brings an idle mount back to about 0.05% of a core.
    """
    self.worker.progress()
    task = getattr(self, "arm_task", None)
    if task is None or task.done():
        self.arm_task = self.event_loop.create_task(self._arm_worker())


def _patch_blocking_progress() -> None:
    from ucxx._lib_async import continuous_ucx_progress as progress

    mode = getattr(progress, "BlockingMode", None)
    if mode is None or not hasattr(mode, "_arm_worker"):
        log.warning("this UCXX has no BlockingMode._arm_worker: an idle UCX mount may use CPU")
        return
    mode._fd_reader_callback = _rearming_fd_callback


class _PeerHandshake(logging.Filter):
    """UCXX logs a peer that fails the connection handshake (junk, a reset, silence) with a
    whole traceback in the message (``listener.py``, ``_log_exception``). That is the peer's
    fault, not ours: one line, the exception, instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) == 2 and \
                args[0] == "Unexpected error in listener handler coroutine":
            last = str(args[1]).strip().splitlines()[-1:] or ["?"]
            record.msg, record.args = "a UCX peer failed the connection handshake: %s", \
                (last[0],)
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


class _Loop:
    """The UCX thread: an asyncio loop that owns UCXX."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.thread = threading.Thread(target=self._main, name="dyadfs-ucx", daemon=True)
        self.thread.start()
        self._ready.wait(60)
        if self._error is not None:
            raise FetchError(f"UCX could not start: {self._error}")

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._init())
        except BaseException as e:  # reported to the constructor
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        self.loop.run_forever()

    async def _init(self) -> None:
        _patch_blocking_progress()
        logging.getLogger("ucx").addFilter(_PeerHandshake())
        ucxx.init(progress_mode="blocking", enable_python_future=False)

    def submit(self, coro: Awaitable[T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)  # type: ignore[arg-type]

    def stop(self) -> None:
        async def shutdown() -> None:
            try:
                ucxx.stop_notifier_thread()
            except Exception:  # noqa: BLE001 - best effort at exit
                pass
        try:
            self.submit(shutdown()).result(10)
        except Exception:  # noqa: BLE001
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


async def _wait(fut: concurrent.futures.Future[T]) -> T:
    """Await a future of the UCX thread from trio (cancelling it if we are cancelled)."""
    token = trio.lowlevel.current_trio_token()
    done = trio.Event()
    fut.add_done_callback(lambda _: token.run_sync_soon(done.set))
    try:
        await done.wait()
    except BaseException:
        fut.cancel()
        raise
    return fut.result()


class _Buffers:
    """Up to *limit* CHUNK-sized buffers, made when first needed and reused (UCX thread only).

    A buffer UCX may still read or write (its message was given up, not completed) is
    :meth:`lost`: never handed out again, so that no other transfer's bytes can land in it or
    leave from it; a new one takes its place.
    """

    def __init__(self, limit: int) -> None:
        self._slots = asyncio.Semaphore(limit)
        self._free: list[np.ndarray[Any, Any]] = []

    async def get(self) -> np.ndarray[Any, Any]:
        await self._slots.acquire()
        return self._free.pop() if self._free else np.empty(CHUNK, dtype=np.uint8)

    def put(self, buf: np.ndarray[Any, Any]) -> None:
        self._free.append(buf)
        self._slots.release()

    def lost(self, buf: np.ndarray[Any, Any]) -> None:
        self._slots.release()


async def _recv_msg(ep: Any) -> bytes:
    """One message framed as ``send_obj`` frames it, refusing a length over MAX_MESSAGE
    before allocating anything (UCXX's ``recv_obj`` allocates whatever the peer announces)."""
    length = np.zeros(1, dtype=np.uint64)
    await ep.recv(length)
    n = int(length[0])
    if n > MAX_MESSAGE:
        raise FetchError(f"UCX message of {n} bytes is too long", errno.EPROTO)
    buf = np.empty(n, dtype=np.uint8)
    if n:
        await ep.recv(buf)  # a longer message than announced fails as truncated
    return buf.tobytes()


# -- where connections came in -----------------------------------------------------------------
# UCXX (0.52) cannot listen on one address: ``create_listener`` and the ListenerBuilder under it
# take a port only, and its C++ Listener fills the address with ``sockaddr_set(..., NULL,
# port)``, which is INADDR_ANY; no UCX variable names a listening address either (UCX_NET_DEVICES
# restricts the data lanes, not the connection manager's listening socket). The best available
# restriction: ask UCP which local address each accepted endpoint's connection arrived at
# (``ucp_ep_query``, UCP_EP_ATTR_FIELD_LOCAL_SOCKADDR, UCX >= 1.13) and close the ones that did
# not come to --listen's, before they can send a request. The port still answers UCX's handshake
# on every interface.
_EP_ATTR_FIELD_LOCAL_SOCKADDR = 1 << 1
_EP_ATTR_LOCAL_SOCKADDR = 8 + 32  # after uint64_t field_mask and char name[UCP_ENTITY_NAME_MAX]


@functools.cache
def _libucp() -> Any:
    """The libucp UCXX uses, by its path in this process (another copy would not know our
    endpoints); None if it cannot be found."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "/libucp.so" in line}
        path = next(iter(paths))
        lib = ctypes.CDLL(path)
        lib.ucp_ep_query.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        lib.ucp_ep_query.restype = ctypes.c_int
    except (OSError, StopIteration, AttributeError) as e:
        log.warning("cannot query UCX endpoints (%s): the UCX port serves every interface", e)
        return None
    return lib


def _local_address(ep: Any) -> str | None:
    """The local IP address *ep*'s connection arrived at; None if UCX cannot tell."""
    lib = _libucp()
    if lib is None:
        return None
    attr = ctypes.create_string_buffer(512)  # larger than ucp_ep_attr_t
    struct.pack_into("=Q", attr, 0, _EP_ATTR_FIELD_LOCAL_SOCKADDR)
    if lib.ucp_ep_query(ctypes.c_void_p(ep.ucp_endpoint), attr) != 0:
        return None
    raw = attr.raw[_EP_ATTR_LOCAL_SOCKADDR:_EP_ATTR_LOCAL_SOCKADDR + 28]
    (family,) = struct.unpack_from("=H", raw)
    if family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, raw[4:8])
    if family == socket.AF_INET6:
        return socket.inet_ntop(socket.AF_INET6, raw[8:24])
    return None


class _Stopped(Exception):
    """A transfer ended early on the serving side; the endpoint is closed (the bytes the
    header announced cannot come)."""


#: UCX transports that move nothing between hosts faster than a TCP socket: shared memory and
#: copies within a host, accelerator memory, and TCP itself. Anything else (rc, dc, ud: verbs
#: on InfiniBand or RoCE) is an RDMA network transport.
NOT_RDMA = frozenset({"tcp", "self", "sysv", "posix", "cma", "knem", "xpmem", "sm", "shm",
                      "cuda_copy", "cuda_ipc", "rocm_copy", "rocm_ipc", "gdr_copy", "ze_copy",
                      "ze_ipc"})


class UCXTransport(Transport):
    name = "ucx"
    #: set by start: UCX has an RDMA network transport here (else pulls take the TCP path)
    network_rdma = False

    def __init__(self, *, message_timeout: float = MESSAGE_TIMEOUT,
                 max_connections: int = MAX_CONNECTIONS) -> None:
        self.message_timeout = message_timeout
        self.max_connections = max_connections
        self._ucx = _Loop()
        self._listener: Any = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._handler: Handler | None = None
        self._hosts: set[str] | None = None  # None: any local address
        self._active: set[Any] = set()  # endpoints being served
        self._send_buffers = _Buffers(BUFFERS)
        self._recv_buffers = _Buffers(BUFFERS)
        self._disk = concurrent.futures.ThreadPoolExecutor(DISK_THREADS, "dyadfs-ucx-disk")
        self._refused = LogLimit(log)
        self._dropped = LogLimit(log)

    async def start(self, nursery: trio.Nursery, handler: Handler, host: str) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._handler = handler
        if host not in ("", "0.0.0.0", "::"):
            infos = await trio.socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
            self._hosts = {str(info[4][0]) for info in infos}

        async def listen() -> int:
            self._listener = ucxx.create_listener(self._serve)
            return int(self._listener.port)

        port = await _wait(self._ucx.submit(listen()))
        self.address = f"{host}:{port}"

        async def transports() -> set[str]:
            return set(ucxx.get_active_transports())
        tls = await _wait(self._ucx.submit(transports()))
        self.network_rdma = bool(tls - NOT_RDMA)
        log.info("UCX transports: %s; %s", ", ".join(sorted(tls)),
                 "files of --ucx-threshold and more move over UCX" if self.network_rdma else
                 "no RDMA network transport, so UCX between hosts runs over TCP sockets, "
                 "slower than dyadfs's own TCP path: every pull takes the TCP path")

    # -- serving (runs in the UCX thread) ------------------------------------------------------
    async def _serve(self, ep: Any) -> None:
        if len(self._active) >= self.max_connections:
            self._refused(logging.WARNING, "UCX: %d connections at once (the limit): closed a "
                          "new one", len(self._active))
            await self._close(ep)
            return
        if self._hosts is not None:
            local = _local_address(ep)
            if local is not None and local not in self._hosts:
                self._refused(logging.INFO, "UCX: closed a connection to %s (serving on %s "
                              "only)", local, ", ".join(sorted(self._hosts)))
                await self._close(ep)
                return
        self._active.add(ep)
        try:
            await self._serve_one(ep)
        except _Stopped as e:
            log.info("UCX: %s", e)
        except (DyadfsError, OSError, TimeoutError, ucxx.exceptions.UCXError,
                trio.RunFinishedError) as e:  # the last: the mount is ending
            self._dropped(logging.INFO, "UCX: dropped a connection: %s",
                          str(e) or type(e).__name__)
        except Exception:
            log.exception("UCX: unexpected error serving a connection")
        finally:
            self._active.discard(ep)
            await self._close(ep)

    async def _serve_one(self, ep: Any) -> None:
        timeout = self.message_timeout
        raw = await asyncio.wait_for(_recv_msg(ep), timeout)
        try:
            req = Request.decode(raw)
        except FetchError as e:
            self._refused(logging.WARNING, "refused fetch from a UCX peer: %s", e)
            await asyncio.wait_for(ep.send_obj(header(err=errno.EINVAL, message=str(e))), timeout)
            return
        assert self._handler is not None and self._token is not None
        handler, token = self._handler, self._token
        served = await asyncio.get_running_loop().run_in_executor(
            None, lambda: trio.from_thread.run(handler, req, trio_token=token))
        try:
            await self._answer(ep, req, served, token)
        finally:
            served.close()

    async def _answer(self, ep: Any, req: Request, served: Served,
                      token: trio.lowlevel.TrioToken) -> None:
        timeout = self.message_timeout
        loop = asyncio.get_running_loop()
        if served.err is not None:
            await asyncio.wait_for(ep.send_obj(header(err=served.err, message=served.message)),
                                   timeout)
            await asyncio.wait_for(ep.recv(np.empty(1, dtype=np.uint8)), timeout)
            return
        await asyncio.wait_for(ep.send_obj(header(served.size)), timeout)
        why = await self._send_file(ep, req, served, token)
        if why is None:
            why = served.check_unchanged()
        sha = None
        if why is None and served.verify:
            sha = await loop.run_in_executor(self._disk, served.digest)
        if why is None:  # once more at the end
            why = await loop.run_in_executor(
                self._disk, lambda: trio.from_thread.run_sync(served.changed, trio_token=token))
        if why is not None:
            log.info("aborted sending %r: %s", req.path, why)
        await asyncio.wait_for(ep.send_obj(trailer(why is None, sha, why or "")), timeout)
        await asyncio.wait_for(ep.recv(np.empty(1, dtype=np.uint8)), timeout)  # all arrived

    async def _send_file(self, ep: Any, req: Request, served: Served,
                         token: trio.lowlevel.TrioToken) -> str | None:
        """The bytes, CHUNK by CHUNK: pread (worker thread), changed(), send, WINDOW messages in
        flight. Returns why the file changed if it did after the last chunk was read; raises
        _Stopped if it did before (or shrank)."""
        loop = asyncio.get_running_loop()
        size = served.size
        sending: collections.deque[tuple[asyncio.Future[Any], np.ndarray[Any, Any]]] = \
            collections.deque()

        def read(buf: np.ndarray[Any, Any], off: int, n: int) -> tuple[int, str | None]:
            view = buf.data[:n]
            got = 0
            while got < n:
                k = os.preadv(served.fd, [view[got:]], off + got)
                if k == 0:
                    return got, "the file shrank while it was sent"
                got += k
            return got, trio.from_thread.run_sync(served.changed, trio_token=token)

        async def oldest_sent() -> None:
            fut, buf = sending[0]
            await asyncio.wait_for(fut, self.message_timeout)  # a stalled peer: given up
            sending.popleft()
            self._send_buffers.put(buf)

        try:
            why: str | None = None
            for off in range(0, size, CHUNK):
                if len(sending) >= WINDOW:
                    await oldest_sent()
                buf = await self._send_buffers.get()
                try:
                    n = min(CHUNK, size - off)
                    got, why = await loop.run_in_executor(self._disk, read, buf, off, n)
                except BaseException:
                    self._send_buffers.put(buf)
                    raise
                if why is not None and (got < n or off + n < size):
                    self._send_buffers.put(buf)
                    raise _Stopped(f"stopped sending {req.path!r} after {off} of {size} "
                                   f"bytes: {why}")
                sending.append((asyncio.ensure_future(ep.send(buf[:n])), buf))
            while sending:
                await oldest_sent()
            return why
        finally:
            for fut, buf in sending:  # given up: UCX may still read these
                fut.cancel()
                self._send_buffers.lost(buf)

    @staticmethod
    async def _close(ep: Any) -> None:
        try:
            await ep.close()
        except Exception:  # noqa: BLE001
            pass

    # -- fetching ----------------------------------------------------------------------------
    async def fetch(self, address: str, request: Request, sink: Sink) -> None:
        token = trio.lowlevel.current_trio_token()
        await _wait(self._ucx.submit(self._fetch(address, request, sink, token)))

    async def _fetch(self, address: str, request: Request, sink: Sink,
                     token: trio.lowlevel.TrioToken) -> None:
        host, port = split_address(address)
        try:
            ep = await ucxx.create_endpoint(host, port)
        except Exception as e:  # noqa: BLE001
            raise FetchError(f"cannot reach {address} over UCX: {e}", errno.EHOSTUNREACH) \
                from None
        try:
            await ep.send_obj(request.encode())
            size = parse_header(await _recv_msg(ep))
            trio.from_thread.run_sync(sink.on_size, size, trio_token=token)
            if size:
                await self._receive(ep, size, sink, token)
            sha = parse_trailer(await _recv_msg(ep))
            sink.sha256 = sha
            await ep.send(np.ones(1, dtype=np.uint8))
        except FetchError:
            raise
        except Exception as e:  # noqa: BLE001
            raise FetchError(f"UCX transfer from {address} failed: {e}", errno.EIO) from None
        finally:
            await self._close(ep)

    async def _receive(self, ep: Any, size: int, sink: Sink,
                       token: trio.lowlevel.TrioToken) -> None:
        """WINDOW messages posted at once. Into a shared map of the destination when the caller
        preallocated it (no copy); else into reused buffers, each written with pwrite in a
        worker thread once complete (a full disk is then an ENOSPC, not a SIGBUS). A raw
        transfer (fd -1) receives into the buffers and drops the bytes."""
        loop = asyncio.get_running_loop()
        mapped: np.ndarray[Any, Any] | None = None
        if sink.fd >= 0 and sink.preallocated:
            mm = mmap.mmap(sink.fd, size)
            with contextlib.suppress(OSError):
                mm.madvise(MADV_POPULATE_WRITE)  # one call instead of a fault per page
            # The map goes with the last view of it (UCXX may hold one a little longer).
            mapped = np.frombuffer(mm, dtype=np.uint8)
        posted: collections.deque[tuple[asyncio.Future[Any], np.ndarray[Any, Any], int]] = \
            collections.deque()
        offsets = iter(range(0, size, CHUNK))
        try:
            while True:
                while len(posted) < WINDOW:
                    off = next(offsets, None)
                    if off is None:
                        break
                    n = min(CHUNK, size - off)
                    buf = mapped[off:off + n] if mapped is not None \
                        else await self._recv_buffers.get()
                    posted.append((asyncio.ensure_future(ep.recv(buf[:n])), buf, off))
                if not posted:
                    return
                fut, buf, off = posted[0]
                await fut
                posted.popleft()
                end = min(size, off + CHUNK)
                if mapped is None:
                    try:
                        if sink.fd >= 0:
                            await loop.run_in_executor(self._disk, pwrite_all, sink.fd,
                                                       buf[:end - off].data, off)
                    finally:
                        self._recv_buffers.put(buf)
                token.run_sync_soon(sink.on_progress, end)
        finally:
            for fut, buf, _ in posted:  # given up: UCX may still write into these
                fut.cancel()
                if mapped is None:
                    self._recv_buffers.lost(buf)

    async def aclose(self) -> None:
        async def close() -> None:
            # The endpoints first (their handlers end at once), then the listener once its
            # handlers are gone: UCXX warns on stderr (the log) about a listener that goes
            # with handlers alive. _wait_for_active_clients is UCXX's own (0.52), private.
            for ep in list(self._active):
                with contextlib.suppress(Exception):
                    ep.abort()
            wait = getattr(self._listener, "_wait_for_active_clients", None)
            if wait is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(wait(), 2)
            if self._listener is not None:
                self._listener.close()
                self._listener = None
        try:
            await _wait(self._ucx.submit(close()))
        finally:
            self._disk.shutdown(wait=False, cancel_futures=True)
            await trio.to_thread.run_sync(self._ucx.stop)

"""Plain TCP on trio sockets: the fallback transport, and the baseline in ``dyadfs bench``.

The serving side sends file bytes with ``sendfile`` (no copy through Python), CHUNK bytes at a
time so that ``Served.changed`` is asked between two of them; a file that shrinks makes
``sendfile`` return short, which ends that transfer (the connection is closed: the bytes the
header announced can no longer come). The fetching side receives a small file on the trio
thread (a frame must not pay for a thread hop) and a large one in a worker thread with
``splice`` (socket -> pipe -> file: no copy through Python, and a full disk is an ENOSPC, never
the SIGBUS a shared map of a sparse file gives). Connections are kept and reused per owner, so
a stream of small frames pays for one connection, not one per frame.

A peer is whoever reaches the port: every connection is served in a task of the server's own
nursery that catches everything, so a peer that sends junk, resets, stalls or floods costs its
own connection and never the mount (see :func:`serve_listener`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import math
import mmap
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import trio

from ..errors import ConfigError, DyadfsError, FetchError
from . import Handler, Transport
from .protocol import (
    CHUNK,
    MAX_MESSAGE,
    Request,
    Served,
    Sink,
    header,
    parse_header,
    parse_trailer,
    trailer,
    write_error,
)

log = logging.getLogger(__name__)
T = TypeVar("T")
_LEN = struct.Struct("!I")
#: files from this size on are sent and received in a worker thread
THREAD_MIN = 1 << 20
#: the receiving thread reports progress (and looks for a cancellation) this often
PROGRESS_STEP = 1 << 20
#: a worker thread waiting on a socket looks whether it was given up on this often (s)
SLICE = 0.5
#: a kept connection without a request for this long is closed (s)
IDLE_TIMEOUT = 300.0
#: once a message has begun, all of it must arrive within this; and a send that moves no byte
#: for this long is given up (s): a peer sending one byte a minute is dropped, not kept
MESSAGE_TIMEOUT = 30.0
#: connections served at once; beyond that, a new one is closed as soon as it is accepted
MAX_CONNECTIONS = 1024
#: accept() failing for lack of resources (EMFILE...) is retried after this, doubling up to 1 s
ACCEPT_BACKOFF = 0.05
#: worker threads reading files for the server (sendfile, hashing) at once
DISK_THREADS = 8
#: the pipe between socket and file when receiving with splice (1 MiB is the default maximum
#: an unprivileged process may ask for; measured here: 3.0-3.6 GB/s on loopback into ext4,
#: against 2.2-2.9 for recv_into + pwrite and 0.4-1.5 for recv_into a shared map)
PIPE_SIZE = 1 << 20
F_SETPIPE_SZ = 1031

#: accept() errors that mean "out of something, try again later"
_NO_RESOURCES = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
#: accept() errors that are one peer's (accept(2): "treat them like EAGAIN by retrying")
_PEER_GONE = {errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.EINTR, errno.ENETDOWN,
              errno.ENOPROTOOPT, errno.EHOSTDOWN, errno.ENONET, errno.EHOSTUNREACH,
              errno.EOPNOTSUPP, errno.ENETUNREACH}


class LogLimit:
    """At most *burst* lines per *every* seconds for one kind of event, then one line saying
    how many were left out: a flood of bad peers must not fill the disk with the log."""

    def __init__(self, logger: logging.Logger, every: float = 10.0, burst: int = 20) -> None:
        self.log = logger
        self.every = every
        self.burst = burst
        self._start = -math.inf
        self._count = 0
        self._dropped = 0
        self._last = ""

    def __call__(self, level: int, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._start >= self.every:
            if self._dropped:
                self.log.log(level, "%d more lines like %r in %.0f s", self._dropped,
                             self._last, now - self._start)
            self._start, self._count, self._dropped = now, 0, 0
        self._count += 1
        if self._count <= self.burst:
            self.log.log(level, msg, *args)
        else:
            self._dropped += 1
            self._last = msg


def _peer(addr: Any) -> str:
    if isinstance(addr, tuple) and len(addr) >= 2:
        return f"{addr[0]}:{addr[1]}"
    return "a local peer"


async def serve_listener(listener: trio.socket.SocketType,
                         handle: Callable[[trio.socket.SocketType, str], Awaitable[None]], *,
                         what: str, max_connections: int = MAX_CONNECTIONS) -> None:
    """Accept connections on *listener* until it is closed or we are cancelled, serving each
    with ``handle(conn, peer)`` in a task of this function's own nursery.

    Nothing a peer does ends this function: an error of one connection (a reset, junk, a
    timeout) is one line at info and costs that connection; an unexpected exception is a bug,
    logged with its traceback, and costs that connection too. accept() running out of
    descriptors or memory backs off and tries again. Beyond *max_connections* at once, new
    connections are closed at once.
    """
    active = 0
    backoff = ACCEPT_BACKOFF
    drops, refusals = LogLimit(log), LogLimit(log)

    async def one(conn: trio.socket.SocketType, peer: str) -> None:
        nonlocal active
        try:
            with conn:
                await handle(conn, peer)
        except (OSError, DyadfsError, trio.TooSlowError, trio.BrokenResourceError,
                trio.ClosedResourceError) as e:
            drops(logging.INFO, "%s: dropped the connection of %s: %s", what, peer,
                  str(e) or type(e).__name__)
        except Exception:
            log.exception("%s: unexpected error serving %s", what, peer)
        finally:
            active -= 1

    async with trio.open_nursery() as nursery:
        while True:
            try:
                conn, addr = await listener.accept()
            except trio.ClosedResourceError:
                return  # closed by aclose()
            except OSError as e:
                if listener.fileno() < 0 or e.errno == errno.EBADF:
                    return
                if e.errno in _PEER_GONE:
                    continue
                # Out of descriptors or memory (or something unknown): trying again at once
                # frees nothing, and a loop of failures would take the trio thread.
                refusals(logging.WARNING, "%s: accept failed: %s; retrying in %.2f s", what,
                         e.strerror or e, backoff)
                await trio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
                continue
            backoff = ACCEPT_BACKOFF
            peer = _peer(addr)
            if active >= max_connections:
                conn.close()
                refusals(logging.WARNING, "%s: %d connections at once (the limit): closed "
                         "the one of %s", what, active, peer)
                continue
            active += 1
            nursery.start_soon(one, conn, peer)


# -- messages ---------------------------------------------------------------------------------
async def _recv_exactly(sock: trio.socket.SocketType, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = await sock.recv_into(view[got:])
        if k == 0:
            raise FetchError("connection closed mid-message", errno.ECONNRESET)
        got += k
    return bytes(buf)


def _length(raw: bytes) -> int:
    (n,) = _LEN.unpack(raw)
    if n > MAX_MESSAGE:
        raise FetchError(f"message of {n} bytes is too long", errno.EPROTO)
    return int(n)


async def recv_message(sock: trio.socket.SocketType) -> bytes:
    return await _recv_exactly(sock, _length(await _recv_exactly(sock, _LEN.size)))


async def _next_message(sock: trio.socket.SocketType, idle: float,
                        per_message: float) -> bytes | None:
    """The next message of a kept connection; None if the peer closed it or sent nothing for
    *idle* seconds. Once its first byte came, all of it must come within *per_message*."""
    head = bytearray(_LEN.size)
    got = 0
    with trio.move_on_after(idle):
        got = await sock.recv_into(head)
    if not got:
        return None
    with trio.fail_after(per_message):
        while got < len(head):
            k = await sock.recv_into(memoryview(head)[got:])
            if k == 0:
                raise FetchError("connection closed mid-message", errno.ECONNRESET)
            got += k
        return await _recv_exactly(sock, _length(bytes(head)))


async def ask(connect: Callable[[bool], Awaitable[tuple[trio.socket.SocketType, bool]]],
              request: Request) -> tuple[trio.socket.SocketType, bytes]:
    """Send *request* on a kept connection (``connect(True)``, which says whether it was
    kept) or a new one, and return the socket and the answer's header. A kept connection the
    owner closed meanwhile gets one fresh try (``connect(False)``)."""
    sock, pooled = await connect(True)
    try:
        await send_message(sock, request.encode())
        return sock, await recv_message(sock)
    except (OSError, FetchError):
        sock.close()
        if not pooled:
            raise
    except BaseException:
        sock.close()
        raise
    sock, _ = await connect(False)
    try:
        await send_message(sock, request.encode())
        return sock, await recv_message(sock)
    except BaseException:
        sock.close()
        raise


async def send_message(sock: trio.socket.SocketType, data: bytes) -> None:
    await _send_all(sock, _LEN.pack(len(data)) + data)


async def _send_all(sock: trio.socket.SocketType, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = await sock.send(view)
        view = view[n:]


# -- worker threads on sockets ----------------------------------------------------------------
def _wait_fd(fd: int, events: int, stop: threading.Event, stall: float) -> None:
    """Until *fd* is ready for *events*; FetchError after *stall* seconds without, or when
    the trio side gave up on this thread."""
    poller = select.poll()
    poller.register(fd, events)
    deadline = time.monotonic() + stall
    while not poller.poll(SLICE * 1000):
        if stop.is_set():
            raise FetchError("given up", errno.ECANCELED)
        if time.monotonic() > deadline:
            raise FetchError(f"the peer moved no byte for {stall:.0f} s", errno.ETIMEDOUT)


async def _in_thread(work: Callable[[threading.Event, list[int]], T], fds: list[int],
                     limiter: trio.CapacityLimiter | None = None) -> T:
    """``work(stop, dups)`` in a worker thread, on duplicates of *fds* that it owns.

    A cancel abandons the thread (it notices *stop* within SLICE); its own duplicates keep it
    from ever touching a descriptor number the trio side closed and something else reused.
    """
    stop = threading.Event()
    lock = threading.Lock()
    state = {"started": False, "abandoned": False}
    dups = [os.dup(fd) if fd >= 0 else -1 for fd in fds]

    def close() -> None:
        for fd in dups:
            if fd >= 0:
                os.close(fd)

    def run() -> T:
        with lock:
            if state["abandoned"]:
                raise FetchError("given up", errno.ECANCELED)
            state["started"] = True
        try:
            return work(stop, dups)
        finally:
            close()

    try:
        return await trio.to_thread.run_sync(run, abandon_on_cancel=True, limiter=limiter)
    finally:
        stop.set()
        with lock:
            state["abandoned"] = True
            if not state["started"]:
                close()


# -- serving ----------------------------------------------------------------------------------
async def _sendfile_here(sock: trio.socket.SocketType, fd: int, off: int, n: int,
                         stall: float) -> int:
    """Send up to *n* bytes of *fd* from *off* on the trio thread; fewer if the file ended."""
    sent = 0
    while sent < n:
        try:
            k = os.sendfile(sock.fileno(), fd, off + sent, n - sent)
        except BlockingIOError:
            with trio.fail_after(stall):
                await trio.lowlevel.wait_writable(sock)
            continue
        if k == 0:
            break
        sent += k
    return sent


def _sendfile_blocking(stop: threading.Event, fds: list[int], off: int, n: int,
                       stall: float) -> int:
    sock_fd, fd = fds
    sent = 0
    while sent < n and not stop.is_set():
        try:
            k = os.sendfile(sock_fd, fd, off + sent, n - sent)
        except BlockingIOError:
            _wait_fd(sock_fd, select.POLLOUT, stop, stall)
            continue
        if k == 0:
            break
        sent += k
    return sent


class TCPTransport(Transport):
    name = "tcp"

    def __init__(self, *, idle_timeout: float = IDLE_TIMEOUT,
                 message_timeout: float = MESSAGE_TIMEOUT,
                 max_connections: int = MAX_CONNECTIONS) -> None:
        self.idle_timeout = idle_timeout
        self.message_timeout = message_timeout
        self.max_connections = max_connections
        self._idle: dict[str, list[trio.socket.SocketType]] = {}
        self._listeners: list[trio.socket.SocketType] = []
        self._disk: trio.CapacityLimiter | None = None
        self._scope = trio.CancelScope()
        self._refused = LogLimit(log)

    async def start(self, nursery: trio.Nursery, handler: Handler, host: str) -> None:
        # One thread pool for the server's file reads and hashing: a burst of fetches of large
        # files must not take every worker thread of the process.
        self._disk = trio.CapacityLimiter(DISK_THREADS)
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            # On the address others reach us at (--listen), not on every interface.
            await sock.bind((host, 0))
            sock.listen(128)
        except OSError as e:
            sock.close()
            raise ConfigError(f"--listen {host}: cannot serve there: {e.strerror or e}") \
                from None
        self._listeners.append(sock)
        self.address = f"{host}:{sock.getsockname()[1]}"

        async def serve(conn: trio.socket.SocketType, peer: str) -> None:
            await self._serve(conn, peer, handler)

        async def run() -> None:
            with self._scope:  # aclose() ends the server and every connection of it
                await serve_listener(sock, serve, what="tcp server",
                                     max_connections=self.max_connections)

        nursery.start_soon(run)

    async def _serve(self, conn: trio.socket.SocketType, peer: str, handler: Handler) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while True:
            raw = await _next_message(conn, self.idle_timeout, self.message_timeout)
            if raw is None:
                return
            try:
                req = Request.decode(raw)
            except FetchError as e:
                self._refused(logging.WARNING, "refused fetch from %s: %s", peer, e)
                with trio.fail_after(self.message_timeout):
                    await send_message(conn, header(err=errno.EINVAL, message=str(e)))
                return
            served = await handler(req)
            try:
                if not await self._answer(conn, req, served):
                    return
            finally:
                served.close()

    async def _answer(self, conn: trio.socket.SocketType, req: Request, served: Served) -> bool:
        """Header, bytes, trailer; False if the connection cannot carry another request."""
        if served.err is not None:
            with trio.fail_after(self.message_timeout):
                await send_message(conn, header(err=served.err, message=served.message))
            return True
        with trio.fail_after(self.message_timeout):
            await send_message(conn, header(served.size))
        off = 0
        why: str | None = None
        while off < served.size and why is None:
            n = min(CHUNK, served.size - off)
            sent = await self._sendfile(conn, served.fd, off, n)
            off += sent
            if sent < n:
                why = "the file shrank while it was sent"
                break
            why = served.changed()
        if why is not None and off < served.size:
            # The header announced served.size bytes: the stream cannot carry a trailer now.
            log.info("stopped sending %r after %d of %d bytes: %s", req.path, off,
                     served.size, why)
            return False
        why = why or served.check_unchanged()
        sha = None
        if why is None and served.verify:
            sha = await trio.to_thread.run_sync(served.digest, limiter=self._disk)
        why = why or served.changed()
        if why is not None:
            log.info("aborted sending %r: %s", req.path, why)
        with trio.fail_after(self.message_timeout):
            await send_message(conn, trailer(why is None, sha, why or ""))
        return True

    async def _sendfile(self, conn: trio.socket.SocketType, fd: int, off: int, n: int) -> int:
        """Up to *n* bytes of *fd* from *off*; fewer if the file ended. A large piece goes from
        a worker thread: sendfile reads the file, and a cold page cache must not stall the trio
        loop (the FUSE requests of this mount)."""
        if n < THREAD_MIN:
            return await _sendfile_here(conn, fd, off, n, self.message_timeout)
        stall = self.message_timeout
        return await _in_thread(
            lambda stop, fds: _sendfile_blocking(stop, fds, off, n, stall),
            [conn.fileno(), fd], self._disk)

    # -- fetching ----------------------------------------------------------------------------
    async def fetch(self, address: str, request: Request, sink: Sink) -> None:
        sock, raw = await ask(lambda reuse: self._connect(address, reuse), request)
        try:
            size = parse_header(raw)
            sink.on_size(size)
            if size >= THREAD_MIN:
                await _receive_in_thread(sock, size, sink, address)
            else:
                await _receive(sock, size, sink, address)
            sink.sha256 = parse_trailer(await recv_message(sock))
        except BaseException:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # a receiving thread stops at once
            sock.close()
            raise
        self._idle.setdefault(address, []).append(sock)

    async def _connect(self, address: str,
                       reuse: bool = True) -> tuple[trio.socket.SocketType, bool]:
        pool = self._idle.get(address)
        if reuse and pool:
            return pool.pop(), True
        host, port = split_address(address)
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            await sock.connect((host, port))
        except BaseException:
            sock.close()
            raise
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock, False

    async def aclose(self) -> None:
        self._scope.cancel()
        for socks in self._idle.values():
            for s in socks:
                s.close()
        self._idle.clear()
        for s in self._listeners:
            s.close()
        self._listeners.clear()


def _short(address: str, off: int, size: int) -> FetchError:
    return FetchError(f"connection to {address} closed after {off} of {size} bytes",
                      errno.ECONNRESET)


def pwrite_all(fd: int, view: memoryview, off: int) -> None:
    done = 0
    try:
        while done < len(view):
            done += os.pwrite(fd, view[done:], off + done)
    except OSError as e:
        raise write_error(e) from None


async def _receive(sock: trio.socket.SocketType, size: int, sink: Sink, address: str) -> None:
    buf = bytearray(min(CHUNK, max(size, 1)))
    view = memoryview(buf)
    off = 0
    while off < size:
        n = await sock.recv_into(view[:min(len(buf), size - off)])
        if n == 0:
            raise _short(address, off, size)
        if sink.fd >= 0:  # fd -1: a raw transfer, discarded
            pwrite_all(sink.fd, view[:n], off)
        off += n
        sink.on_progress(off)


async def _receive_in_thread(sock: trio.socket.SocketType, size: int, sink: Sink,
                             address: str) -> None:
    token = trio.lowlevel.current_trio_token()

    def receive(stop: threading.Event, fds: list[int]) -> None:
        sock_fd, dst = fds
        reported = 0

        def progress(off: int) -> None:
            nonlocal reported
            if off - reported >= PROGRESS_STEP or off == size:
                reported = off
                token.run_sync_soon(sink.on_progress, off)

        if dst >= 0:
            _splice_into(sock_fd, dst, size, stop, progress, address)
            return
        # A raw transfer: into memory, discarded.
        buf = mmap.mmap(-1, min(size, CHUNK))
        view = memoryview(buf)
        off = 0
        try:
            while off < size:
                n = _recv_into(sock_fd, view[:min(len(buf), size - off)], stop)
                if n == 0:
                    raise _short(address, off, size)
                off += n
                progress(off)
        finally:
            view.release()
            buf.close()

    await _in_thread(receive, [sock.fileno(), sink.fd])


def _recv_into(sock_fd: int, view: memoryview, stop: threading.Event) -> int:
    while True:
        try:
            return os.readv(sock_fd, [view])
        except BlockingIOError:
            _wait_fd(sock_fd, select.POLLIN, stop, math.inf)


def _splice_into(sock_fd: int, dst: int, size: int, stop: threading.Event,
                 progress: Callable[[int], None], address: str) -> None:
    """*size* bytes from the socket into *dst* from offset 0, through a pipe (splice), or with
    recv + pwrite where the destination's file system cannot splice."""
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        with contextlib.suppress(OSError):  # a smaller pipe is slower, not wrong
            fcntl.fcntl(w, F_SETPIPE_SZ, PIPE_SIZE)
        off = 0
        while off < size:
            try:
                n = os.splice(sock_fd, w, min(PIPE_SIZE, size - off))
            except BlockingIOError:
                _wait_fd(sock_fd, select.POLLIN, stop, math.inf)
                continue
            if n == 0:
                raise _short(address, off, size)
            done = 0
            while done < n:
                try:
                    done += os.splice(r, dst, n - done, offset_dst=off + done)
                except OSError as e:
                    if e.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                        raise write_error(e) from None
                    # No splice into this file system: the rest with recv + pwrite.
                    _copy_rest(r, sock_fd, dst, off + done, n - done, size, stop, progress,
                               address)
                    return
            off += n
            progress(off)
    finally:
        os.close(r)
        os.close(w)


def _copy_rest(pipe: int, sock_fd: int, dst: int, off: int, in_pipe: int, size: int,
               stop: threading.Event, progress: Callable[[int], None], address: str) -> None:
    buf = bytearray(PIPE_SIZE)
    view = memoryview(buf)
    while in_pipe:
        n = os.readv(pipe, [view[:in_pipe]])
        pwrite_all(dst, view[:n], off)
        off += n
        in_pipe -= n
    progress(off)
    while off < size:
        n = _recv_into(sock_fd, view[:min(len(buf), size - off)], stop)
        if n == 0:
            raise _short(address, off, size)
        pwrite_all(dst, view[:n], off)
        off += n
        progress(off)


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)

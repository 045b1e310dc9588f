"""Plain TCP on trio sockets: the fallback transport, and the baseline in ``dyadfs bench``.

The serving side sends file bytes with ``sendfile`` (no copy through Python). The fetching side
receives a small file on the trio thread (a frame must not pay for a thread hop) and a large one
in a worker thread, straight into a shared map of the destination file (no copy through a
buffer, and the trio thread stays free for the readers of the file being pulled). Connections
are kept and reused per owner, so a stream of small frames pays for one connection, not one per
frame.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
import socket
import struct
import threading

import trio

from ..errors import FetchError
from . import Handler, Transport
from .protocol import (
    CHUNK,
    MAX_MESSAGE,
    Request,
    Sink,
    header,
    parse_header,
    parse_trailer,
    trailer,
)

log = logging.getLogger(__name__)
_LEN = struct.Struct("!I")
#: files from this size on are received in a worker thread
THREAD_MIN = 1 << 20
#: the receiving thread reports progress (and looks for a cancellation) this often
PROGRESS_STEP = 1 << 20
SLICE = 0.5


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


async def recv_message(sock: trio.socket.SocketType) -> bytes:
    (n,) = _LEN.unpack(await _recv_exactly(sock, _LEN.size))
    if n > MAX_MESSAGE:
        raise FetchError(f"message of {n} bytes is too long", errno.EPROTO)
    return await _recv_exactly(sock, n)


async def send_message(sock: trio.socket.SocketType, data: bytes) -> None:
    await _send_all(sock, _LEN.pack(len(data)) + data)


async def _send_all(sock: trio.socket.SocketType, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = await sock.send(view)
        view = view[n:]


async def _sendfile(sock: trio.socket.SocketType, fd: int, size: int) -> None:
    off = 0
    while off < size:
        try:
            n = os.sendfile(sock.fileno(), fd, off, min(size - off, 1 << 30))
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)
            continue
        if n == 0:
            raise FetchError("the file shrank while it was sent", errno.EIO)
        off += n


def _short(address: str, off: int, size: int) -> FetchError:
    return FetchError(f"connection to {address} closed after {off} of {size} bytes",
                      errno.ECONNRESET)


async def _receive(sock: trio.socket.SocketType, size: int, sink: Sink, address: str) -> None:
    buf = bytearray(min(CHUNK, max(size, 1)))
    view = memoryview(buf)
    off = 0
    while off < size:
        n = await sock.recv_into(view[:min(len(buf), size - off)])
        if n == 0:
            raise _short(address, off, size)
        done = 0 if sink.fd >= 0 else n  # fd -1: a raw transfer, discarded
        while done < n:
            done += os.pwrite(sink.fd, view[done:n], off + done)
        off += n
        sink.on_progress(off)


async def _receive_in_thread(sock: trio.socket.SocketType, size: int, sink: Sink,
                             address: str) -> None:
    token = trio.lowlevel.current_trio_token()
    stop = threading.Event()

    def receive() -> None:
        # A dup in timeout mode: Python polls it in SLICEs, and the trio socket's flags stay.
        dup = socket.socket(fileno=os.dup(sock.fileno()))
        dup.settimeout(SLICE)
        try:
            if sink.fd >= 0:
                mm = mmap.mmap(sink.fd, size)
                view = memoryview(mm)
            else:  # a raw transfer: into memory, discarded
                mm = mmap.mmap(-1, min(size, CHUNK))
                view = memoryview(mm)
            span = len(mm)
            off = reported = 0
            try:
                while off < size and not stop.is_set():
                    lo = off % span
                    try:
                        n = dup.recv_into(view[lo:lo + min(span - lo, size - off)])
                    except TimeoutError:
                        continue
                    if n == 0:
                        raise _short(address, off, size)
                    off += n
                    if off - reported >= PROGRESS_STEP or off == size:
                        reported = off
                        token.run_sync_soon(sink.on_progress, off)
            finally:
                view.release()
                mm.close()
        finally:
            dup.close()

    try:
        await trio.to_thread.run_sync(receive, abandon_on_cancel=True)
    finally:
        stop.set()


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


class TCPTransport(Transport):
    name = "tcp"

    def __init__(self) -> None:
        self._idle: dict[str, list[trio.socket.SocketType]] = {}
        self._listeners: list[trio.socket.SocketType] = []
        self._nursery: trio.Nursery | None = None

    async def start(self, nursery: trio.Nursery, handler: Handler, host: str) -> None:
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        await sock.bind(("0.0.0.0", 0))
        sock.listen(128)
        self._listeners.append(sock)
        self.address = f"{host}:{sock.getsockname()[1]}"
        self._nursery = nursery
        nursery.start_soon(self._accept, sock, handler)

    async def _accept(self, sock: trio.socket.SocketType, handler: Handler) -> None:
        assert self._nursery is not None
        while True:
            conn, _ = await sock.accept()
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._nursery.start_soon(self._serve, conn, handler)

    async def _serve(self, conn: trio.socket.SocketType, handler: Handler) -> None:
        with conn:
            while True:
                try:
                    raw = await recv_message(conn)
                except (FetchError, OSError):
                    return  # the peer closed or sent junk: drop the connection
                try:
                    req = Request.decode(raw)
                except FetchError as e:
                    log.warning("refused fetch: %s", e)
                    await send_message(conn, header(err=errno.EINVAL, message=str(e)))
                    return
                served = await handler(req)
                try:
                    if served.err is not None:
                        await send_message(conn, header(err=served.err, message=served.message))
                        continue
                    await send_message(conn, header(served.size))
                    await _sendfile(conn, served.fd, served.size)
                    why = served.check_unchanged()
                    sha = await trio.to_thread.run_sync(served.digest) if served.verify else None
                    await send_message(conn, trailer(why is None, sha, why or ""))
                except (OSError, FetchError) as e:
                    log.info("sending %r failed: %s", req.path, e)
                    return
                finally:
                    served.close()

    async def fetch(self, address: str, request: Request, sink: Sink) -> None:
        sock, pooled = await self._connect(address)
        try:
            try:
                await send_message(sock, request.encode())
                raw = await recv_message(sock)
            except (OSError, FetchError):
                if not pooled:
                    raise
                sock.close()  # the owner closed the kept connection: one fresh try
                sock, pooled = await self._connect(address, reuse=False)
                await send_message(sock, request.encode())
                raw = await recv_message(sock)
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
        for socks in self._idle.values():
            for s in socks:
                s.close()
        self._idle.clear()
        for s in self._listeners:
            s.close()
        self._listeners.clear()

"""Pulls between two mounts of one host: the owner hands over an open descriptor, the
consumer copies in the kernel (``copy_file_range``). No byte crosses a socket.

Co-scheduled simulation and analysis on one node is common in in-situ workflows, and two mounts
of one machine are what a single-node test or bench runs. Over TCP or UCX such a pull moves
every byte through a socket (a copy into the kernel and one out); here the consumer's kernel
copies the page-cache pages of the owner's file into its own file, once.

The protocol is the fetch protocol (protocol.py) over a Unix socket in the abstract namespace
(so it is private to the network namespace, like a loopback port): the request; the header
(size, or an errno); then one byte carrying the open file (SCM_RIGHTS). The owner never lets go
of its say on the bytes: after copying each CHUNK but the last the consumer asks ``?`` and the
owner answers with ``Served.changed`` (the file still holds the published version, or why not),
so a chunk is vouched for only after it was copied; ``.`` ends the transfer with the trailer,
which vouches for the last chunk (and carries the SHA-256 when asked). The descriptor the
consumer got is read-only and closed when the pull ends.

A peer is whoever reaches the socket: the same secret and path checks as TCP apply (the
handler is the mount's FileServer), and every connection is served in a task that cannot end
the mount (tcp.serve_listener).
"""

from __future__ import annotations

import array
import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import os
import secrets
import socket

import trio

from ..errors import FetchError
from . import Handler, Transport
from .protocol import (
    CHUNK,
    Request,
    Served,
    Sink,
    header,
    is_inline,
    parse_header,
    parse_trailer,
    trailer,
    write_error,
)
from .tcp import (
    _LEN,
    IDLE_TIMEOUT,
    MESSAGE_TIMEOUT,
    LogLimit,
    _next_message,
    _recv_exactly,
    _send_all,
    ask,
    pwrite_all,
    recv_message,
    send_message,
    serve_listener,
)

log = logging.getLogger(__name__)

#: copies of at least this much go to a worker thread (a cold page cache must not stall the
#: trio loop); smaller ones, frames, are copied on the trio thread
THREAD_MIN = 1 << 20
#: a file of at most this many bytes (a frame) comes in the answer itself: the owner reads it,
#: checks it is unchanged, and sends header, bytes and trailer at once. One round trip instead
#: of two (the descriptor, then the trailer that vouches for the copy) and no descriptor
#: passed; the copy through the socket costs less than the round trip at this size.
INLINE_MAX = 64 * 1024
_ASK, _END = b"?", b"."


def host_id() -> str:
    """What two mounts share when this transport can join them: one kernel (its boot) and one
    network namespace (the abstract socket's scope)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        net = os.stat("/proc/self/ns/net").st_ino
    except OSError:
        return ""
    return f"{boot}/{net}"


def copy_range(src: int, dst: int, off: int, n: int) -> int:
    """Copy [off, off+n) of *src* to the same offsets of *dst*; returns the bytes copied,
    fewer if *src* ended."""
    done = 0
    while done < n:
        try:
            k = os.copy_file_range(src, dst, n - done, off + done, off + done)
        except OSError as e:
            if e.errno in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                k = _pread_pwrite(src, dst, off + done, n - done)
            else:
                raise write_error(e) from None
        if k == 0:
            break
        done += k
    return done


def _pread_pwrite(src: int, dst: int, off: int, n: int) -> int:
    data = os.pread(src, min(n, CHUNK), off)
    try:
        return os.pwrite(dst, data, off)
    except OSError as e:
        raise write_error(e) from None


class LocalTransport(Transport):
    name = "local"

    def __init__(self, *, idle_timeout: float = IDLE_TIMEOUT,
                 message_timeout: float = MESSAGE_TIMEOUT) -> None:
        self.idle_timeout = idle_timeout
        self.message_timeout = message_timeout
        self._idle: dict[str, list[trio.socket.SocketType]] = {}
        self._listener: trio.socket.SocketType | None = None
        self._scope = trio.CancelScope()
        self._copies = trio.CapacityLimiter(4)
        self._refused = LogLimit(log)
        #: addresses nobody listens on from here (another network namespace, a dead owner)
        self.unreachable: set[str] = set()

    async def start(self, nursery: trio.Nursery, handler: Handler, host: str) -> None:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        name = f"dyadfs-{os.getpid()}-{secrets.token_hex(8)}"
        try:
            await sock.bind("\0" + name)
            sock.listen(128)
        except OSError:
            sock.close()
            raise
        self._listener = sock
        self.address = "@" + name

        async def serve(conn: trio.socket.SocketType, peer: str) -> None:
            await self._serve(conn, peer, handler)

        async def run() -> None:
            with self._scope:
                await serve_listener(sock, serve, what="local server")

        nursery.start_soon(run)

    # -- serving -----------------------------------------------------------------------------
    async def _serve(self, conn: trio.socket.SocketType, peer: str, handler: Handler) -> None:
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
                if served.err is None and 0 <= served.size <= min(req.inline, INLINE_MAX):
                    await self._answer_inline(conn, served)
                elif not await self._answer(conn, served):
                    return
            finally:
                served.close()

    async def _answer_inline(self, conn: trio.socket.SocketType, served: Served) -> None:
        """A small file in the answer itself: header, bytes, trailer, sent together. The owner
        vouches for the bytes as for a last chunk: read, then checked unchanged."""
        data = os.pread(served.fd, served.size, 0)
        why = served.check_unchanged() or served.changed()
        if why is None and len(data) != served.size:
            why = "the file changed while it was sent"
        data = data.ljust(served.size, b"\0")[:served.size]  # the size the header announced
        sha = hashlib.sha256(data).hexdigest() if served.verify and why is None else None
        msg = header(served.size, inline=True)
        end = trailer(why is None, sha, why or "")
        with trio.fail_after(self.message_timeout):
            await _send_all(conn, _LEN.pack(len(msg)) + msg + data + _LEN.pack(len(end)) + end)

    async def _answer(self, conn: trio.socket.SocketType, served: Served) -> bool:
        with trio.fail_after(self.message_timeout):
            if served.err is not None:
                await send_message(conn, header(err=served.err, message=served.message))
                return True
            await send_message(conn, header(served.size))
            fds = array.array("i", [served.fd])
            await conn.sendmsg([b"F"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
        while True:
            # The consumer copies at its pace; a silent one is dropped like an idle connection.
            with trio.fail_after(self.idle_timeout):
                ask = await recv_message(conn)
            if ask == _ASK:
                why = served.changed()
                with trio.fail_after(self.message_timeout):
                    await send_message(conn, json.dumps({"ok": why is None,
                                                         "error": why or ""}).encode())
            elif ask == _END:
                why = served.check_unchanged()
                sha = None
                if why is None and served.verify:
                    sha = await trio.to_thread.run_sync(served.digest, limiter=self._copies)
                why = why or served.changed()
                with trio.fail_after(self.message_timeout):
                    await send_message(conn, trailer(why is None, sha, why or ""))
                return True
            else:
                raise FetchError(f"unexpected message {ask[:16]!r}", errno.EPROTO)

    # -- fetching ----------------------------------------------------------------------------
    async def fetch(self, address: str, request: Request, sink: Sink) -> None:
        if not request.raw:
            request = dataclasses.replace(request, inline=INLINE_MAX)
        sock, raw = await ask(lambda reuse: self._connect(address, reuse), request)
        try:
            size = parse_header(raw)
            if is_inline(raw):
                if size > INLINE_MAX:
                    raise FetchError(f"{address}: {size} bytes announced inline", errno.EPROTO)
                await self._receive_inline(sock, size, sink)
                self._idle.setdefault(address, []).append(sock)
                return
            src = await self._receive_fd(sock)
            try:
                sink.on_size(size)
                await self._copy(sock, src, size, sink, address)
            finally:
                os.close(src)
            await send_message(sock, _END)
            sink.sha256 = parse_trailer(await recv_message(sock))
        except BaseException:
            sock.close()
            raise
        self._idle.setdefault(address, []).append(sock)

    async def _receive_inline(self, sock: trio.socket.SocketType, size: int,
                              sink: Sink) -> None:
        with trio.fail_after(self.message_timeout):
            data = await _recv_exactly(sock, size)
            end = await recv_message(sock)
        sink.sha256 = parse_trailer(end)  # vouched, or FetchError: nothing is written
        sink.on_size(size)
        if sink.fd >= 0:
            pwrite_all(sink.fd, memoryview(data), 0)
        sink.on_progress(size)

    async def _receive_fd(self, sock: trio.socket.SocketType) -> int:
        with trio.fail_after(self.message_timeout):
            data, ancdata, flags, _ = await sock.recvmsg(
                1, socket.CMSG_SPACE(array.array("i").itemsize))
        fds: list[int] = []
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                got = array.array("i")
                got.frombytes(payload[:len(payload) - len(payload) % got.itemsize])
                fds.extend(got)
        if data != b"F" or len(fds) != 1 or flags & socket.MSG_CTRUNC:
            for fd in fds:
                os.close(fd)
            raise FetchError("the owner sent no file", errno.EPROTO)
        return fds[0]

    async def _copy(self, sock: trio.socket.SocketType, src: int, size: int, sink: Sink,
                    address: str) -> None:
        if sink.fd >= 0:
            await self._copy_into(sock, src, size, sink, sink.fd, address)
            return
        # A raw transfer (dyadfs bench): the kernel's copy into memory of our own.
        dst = os.memfd_create("dyadfs-raw")
        try:
            await self._copy_into(sock, src, size, sink, dst, address)
        finally:
            os.close(dst)

    async def _copy_into(self, sock: trio.socket.SocketType, src: int, size: int, sink: Sink,
                         dst: int, address: str) -> None:
        off = 0
        while off < size:
            n = min(CHUNK, size - off)
            if n >= THREAD_MIN:
                got = await trio.to_thread.run_sync(copy_range, src, dst, off, n,
                                                    limiter=self._copies)
            else:
                got = copy_range(src, dst, off, n)
            if got < n:
                raise FetchError(f"{address}: the file ended after {off + got} of {size} "
                                 "bytes", errno.ESTALE)
            if off + n < size:
                # Vouched only now: the owner says the file still held the version after the
                # copy. (The last chunk is vouched by the trailer: one round trip less, which
                # is all of a frame's.)
                await send_message(sock, _ASK)
                answer = json.loads(await recv_message(sock))
                if not answer.get("ok"):
                    raise FetchError(f"{address}: the owner aborted the transfer: "
                                     f"{answer.get('error', '')}", errno.ESTALE)
            off += n
            sink.on_progress(off)

    async def _connect(self, address: str,
                       reuse: bool = True) -> tuple[trio.socket.SocketType, bool]:
        pool = self._idle.get(address)
        if reuse and pool:
            return pool.pop(), True
        if not address.startswith("@"):
            raise FetchError(f"not a local address: {address!r}", errno.EINVAL)
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await sock.connect("\0" + address[1:])
        except BaseException as e:
            sock.close()
            if isinstance(e, OSError) and e.errno in (errno.ECONNREFUSED, errno.ENOENT):
                self.unreachable.add(address)
            raise
        return sock, False

    async def aclose(self) -> None:
        self._scope.cancel()
        for socks in self._idle.values():
            for s in socks:
                s.close()
        self._idle.clear()
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.close()
            self._listener = None

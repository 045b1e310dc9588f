"""UCX through UCXX: shared memory, TCP or RDMA, chosen by UCX.

UCXX is asyncio-based and the file system runs on trio, so UCX lives in one dedicated thread with
its own asyncio loop; trio talks to it through futures and the trio token.

Idle cost decides the shape (measured on this kind of machine, see design.md and the notes):
UCXX in ``blocking`` progress mode costs nothing measurable with only a listener, but a whole
core while any receive is pending, and ``thread`` mode costs about 2% of a core always. A mount
sits beside a simulation for hours, so dyadfs never leaves a receive pending: one endpoint per
fetch, closed when the fetch ends. An idle mount then has a listener and nothing else.

One fetch on an endpoint: the client sends the request (``send_obj``); the owner answers with a
header, the bytes in ``CHUNK``-sized messages (sent from an ``mmap`` of the file: no copy), and a
trailer; the client acknowledges with one byte, so the owner never closes under a message in
flight.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import errno
import logging
import mmap
import os
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import numpy as np
import trio

# UCXX sets a variable this UCX does not know, and UCX warns on stderr for every process.
os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
import ucxx  # noqa: E402

from ..errors import FetchError
from . import Handler, Transport
from .protocol import Request, Served, Sink, header, parse_header, parse_trailer, trailer
from .tcp import split_address

log = logging.getLogger(__name__)

#: bytes per UCX message of file data (both sides must agree)
CHUNK = 4 * 1024 * 1024
#: messages in flight per fetch, each way: the network never waits for the disk, nor a reader of
#: a file being pulled for a whole large message
WINDOW = 4
MADV_POPULATE_WRITE = 23  # Linux 5.14; older kernels answer EINVAL and fault pages one by one


async def _windowed(count: int, start: Callable[[int], Awaitable[Any]],
                    done: Callable[[int], None] = lambda i: None) -> None:
    """Run ``start(i)`` for i in range(count), at most WINDOW at a time; ``done(i)`` in order."""
    running: collections.deque[asyncio.Future[Any]] = collections.deque()
    try:
        for i in range(count):
            if len(running) >= WINDOW:
                await running.popleft()
                done(i - WINDOW)
            running.append(asyncio.ensure_future(start(i)))
        for j in range(count - len(running), count):
            await running.popleft()
            done(j)
    finally:
        for fut in running:
            fut.cancel()
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


class UCXTransport(Transport):
    name = "ucx"

    def __init__(self) -> None:
        self._ucx = _Loop()
        self._listener: Any = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._handler: Handler | None = None

    async def start(self, nursery: trio.Nursery, handler: Handler, host: str) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._handler = handler

        async def listen() -> int:
            self._listener = ucxx.create_listener(self._serve)
            return int(self._listener.port)

        port = await _wait(self._ucx.submit(listen()))
        self.address = f"{host}:{port}"

    # -- serving (runs in the UCX thread) ------------------------------------------------------
    async def _serve(self, ep: Any) -> None:
        served: Served | None = None
        try:
            raw = bytes(await ep.recv_obj())
            try:
                req = Request.decode(raw)
            except FetchError as e:
                log.warning("refused fetch: %s", e)
                await ep.send_obj(header(err=errno.EINVAL, message=str(e)))
                return
            assert self._handler is not None and self._token is not None
            handler, token = self._handler, self._token
            served = await asyncio.get_running_loop().run_in_executor(
                None, lambda: trio.from_thread.run(handler, req, trio_token=token))
            if served.err is not None:
                await ep.send_obj(header(err=served.err, message=served.message))
                await ep.recv(np.empty(1, dtype=np.uint8))
                return
            await ep.send_obj(header(served.size))
            if served.size:
                # Not closed explicitly: UCXX may hold views of it a little longer; the map
                # goes when the last view does.
                mm = mmap.mmap(served.fd, served.size, prot=mmap.PROT_READ)
                data = np.frombuffer(mm, dtype=np.uint8)
                await _windowed(-(-served.size // CHUNK),
                                lambda i: ep.send(data[i * CHUNK:(i + 1) * CHUNK]))
                del data, mm
            why = served.check_unchanged()
            sha = served.digest() if served.verify else None
            await ep.send_obj(trailer(why is None, sha, why or ""))
            await ep.recv(np.empty(1, dtype=np.uint8))  # the client has everything
        except Exception as e:  # noqa: BLE001 - a broken peer must not disturb the mount
            log.info("UCX serve failed: %s", e)
        finally:
            if served is not None:
                served.close()
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
            size = parse_header(bytes(await ep.recv_obj()))
            trio.from_thread.run_sync(sink.on_size, size, trio_token=token)
            if size:
                await self._receive(ep, size, sink, token)
            sha = parse_trailer(bytes(await ep.recv_obj()))
            sink.sha256 = sha
            await ep.send(np.ones(1, dtype=np.uint8))
        except FetchError:
            raise
        except Exception as e:  # noqa: BLE001
            raise FetchError(f"UCX transfer from {address} failed: {e}", errno.EIO) from None
        finally:
            try:
                await ep.close()
            except Exception:  # noqa: BLE001
                pass

    @staticmethod
    async def _receive(ep: Any, size: int, sink: Sink, token: trio.lowlevel.TrioToken) -> None:
        """The bytes land straight in the destination file's pages (a shared map of it, sized
        by on_size): no copy through a buffer. fd -1 (a raw transfer) receives into memory."""
        if sink.fd >= 0:
            mm = mmap.mmap(sink.fd, size)
            with contextlib.suppress(OSError):
                mm.madvise(MADV_POPULATE_WRITE)  # one call instead of a fault per page
        else:
            mm = mmap.mmap(-1, min(size, WINDOW * CHUNK))
        data = np.frombuffer(mm, dtype=np.uint8)
        span = len(mm)

        def chunk(i: int) -> Any:
            lo = (i * CHUNK) % span
            return ep.recv(data[lo:lo + min(CHUNK, size - i * CHUNK)])

        # The map goes with the last view of it (UCXX may hold one a little longer).
        await _windowed(-(-size // CHUNK), chunk, lambda i: token.run_sync_soon(
            sink.on_progress, min(size, (i + 1) * CHUNK)))

    async def aclose(self) -> None:
        async def close() -> None:
            if self._listener is not None:
                self._listener.close()
                self._listener = None
        try:
            await _wait(self._ucx.submit(close()))
        finally:
            await trio.to_thread.run_sync(self._ucx.stop)


"""The transports against bad peers, changing files and full disks.

TCP runs in this process: a real TCPTransport on 127.0.0.1 serving a temporary directory through
a small fake handler (``Files``). UCX runs in child processes: UCXX allows one context per
process, and a SIGBUS (a map of a file that shrank, or of a full disk) must kill a child, not
pytest. A UCX peer that misbehaves is a raw UCXX client in a child of its own
(:func:`ucx_peer`).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import resource
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import pytest
import trio
import trio.testing

from dyadfs.errors import ConfigError, FetchError
from dyadfs.transport import Transport, default_host
from dyadfs.transport.local import LocalTransport
from dyadfs.transport.protocol import (
    CHUNK,
    Request,
    Served,
    Sink,
    parse_header,
    unchanged,
)
from dyadfs.transport.tcp import TCPTransport, split_address

ROOT = Path(__file__).resolve().parent.parent
BIG = 16 << 20
try:
    import ucxx  # noqa: F401
    HAVE_UCX = True
except ImportError:
    HAVE_UCX = False
needs_ucx = pytest.mark.skipif(not HAVE_UCX, reason="needs UCXX (pip install 'dyadfs[ucx]')")


# -- a file server to serve, and fetching from it -------------------------------------------
@dataclass
class RecordingServed(Served):
    digest_threads: ClassVar[list[str]] = []

    def digest(self) -> str | None:
        RecordingServed.digest_threads.append(threading.current_thread().name)
        return super().digest()


class Files:
    """What a mount's FileServer does, minus the KVS: serves the files of *root* by name."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.changed: Callable[[], str | None] = unchanged
        self.served = 0

    async def handle(self, req: Request) -> Served:
        name = req.path.decode(errors="replace")
        if name == "handler-bug":
            raise RuntimeError("a bug in the handler")
        try:
            fd = os.open(self.root / name, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError as e:
            return Served(err=e.errno, message=e.strerror or "")
        st = os.fstat(fd)
        served = RecordingServed(fd=fd, size=st.st_size, verify=req.verify, _st=st)
        served.changed = self.changed
        self.served += 1
        return served


def make_files(root: Path) -> Path:
    root.mkdir(exist_ok=True)
    (root / "small").write_bytes(os.urandom(5757))
    (root / "two").write_bytes(os.urandom(2 << 20))
    (root / "big").write_bytes(os.urandom(BIG))
    (root / "huge").write_bytes(os.urandom(64 << 20))
    (root / "empty").write_bytes(b"")
    return root


@pytest.fixture
def files_dir(tmp_path: Path) -> Path:
    return make_files(tmp_path / "files")


async def fetch(t: Transport, address: str, name: str, dest: Path | None, *,
                verify: bool = False, preallocated: bool = False,
                progress: Callable[[int], None] | None = None) -> bytes:
    """Fetch *name* into *dest* (None: a raw sink) and return what arrived."""
    fd = -1 if dest is None else os.open(dest, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)

    def sized(n: int) -> None:
        if fd >= 0 and preallocated and n:
            os.posix_fallocate(fd, 0, n)  # the caller's part of preallocated=True
        elif fd >= 0:
            os.ftruncate(fd, n)

    try:
        sink = Sink(fd, sized, progress or (lambda n: None), preallocated=preallocated)
        await t.fetch(address, Request("ns", "secret", name.encode(), 1, verify=verify), sink)
    finally:
        if fd >= 0:
            os.close(fd)
    return b"" if dest is None else await trio.Path(dest).read_bytes()


def serve_tcp(root: Path, body: Callable[[TCPTransport, Files], Awaitable[None]], *,
              clock: trio.abc.Clock | None = None, deadline: float = 60, **kw: Any) -> None:
    """Run *body* against a TCPTransport serving *root* on 127.0.0.1."""
    async def main() -> None:
        t = TCPTransport(**kw)
        files = Files(root)
        async with trio.open_nursery() as n:
            await t.start(n, files.handle, "127.0.0.1")
            try:
                with trio.fail_after(deadline):
                    await body(t, files)
            finally:
                await t.aclose()
                n.cancel_scope.cancel()
    trio.run(main, clock=clock)


def no_errors_logged(caplog: pytest.LogCaptureFixture) -> None:
    bad = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not bad, [r.getMessage() for r in bad]


# -- 1. a bad peer costs its own connection, never the server --------------------------------
def test_reset_after_a_bad_request_costs_only_that_connection(
        files_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)

    async def body(t: TCPTransport, files: Files) -> None:
        host, port = split_address(t.address)
        # A plain socket: junk, then a reset (SO_LINGER 0), with no checkpoint between, so
        # that the server's error answer meets the reset.
        s = socket.create_connection((host, port))
        await trio.testing.wait_all_tasks_blocked()  # accepted, waiting for the request
        s.sendall(struct.pack("!I", 8) + b"not json")
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
        await trio.testing.wait_all_tasks_blocked()
        assert await fetch(t, t.address, "small", files.root.parent / "out") == \
            (files.root / "small").read_bytes()

    serve_tcp(files_dir, body)
    assert "refused fetch" in caplog.text
    no_errors_logged(caplog)


def test_accept_out_of_descriptors_backs_off_and_serves_again(
        files_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)

    async def body(t: TCPTransport, files: Files) -> None:
        failed = trio.Event()

        class Watch(logging.Handler):  # the server logs on the trio thread
            def emit(self, record: logging.LogRecord) -> None:
                if "Too many open files" in record.getMessage():
                    failed.set()

        watch = Watch()
        logging.getLogger("dyadfs").addHandler(watch)
        host, port = split_address(t.address)
        client = trio.socket.socket()
        lowest = os.open(os.devnull, os.O_RDONLY)
        os.close(lowest)
        # No descriptor left before the connection comes, so that its accept() must fail.
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowest, hard))
        try:
            await client.connect((host, port))  # needs no descriptor: already made
            with trio.fail_after(10):
                await failed.wait()
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            logging.getLogger("dyadfs").removeHandler(watch)
        with client:
            await client.send(struct.pack("!I", 2) + b"{}")  # served once accepted again
            with trio.fail_after(10):
                head = await client.recv(4096)
        assert b'"ok": false' in head
        assert await fetch(t, t.address, "small", files.root.parent / "out") == \
            (files.root / "small").read_bytes()

    serve_tcp(files_dir, body)
    no_errors_logged(caplog)


async def _closed_at(sock: trio.socket.SocketType, drip: float | None) -> float:
    """When the server closes *sock* (virtual time); sends a byte every *drip* seconds."""
    while True:
        if drip is not None:
            try:
                await sock.send(b"\0")
            except OSError:
                return trio.current_time()
        with trio.move_on_after(drip if drip is not None else 10_000):
            try:
                if await sock.recv(1) == b"":
                    return trio.current_time()
            except OSError:
                return trio.current_time()
        if trio.current_time() > 5_000:
            raise AssertionError("never closed")


def test_idle_and_slow_loris_connections_are_dropped(files_dir: Path) -> None:
    # Virtual time (autojump): the 300 s and 30 s below take no real time.
    async def body(t: TCPTransport, files: Files) -> None:
        host, port = split_address(t.address)
        idle, loris = trio.socket.socket(), trio.socket.socket()
        await idle.connect((host, port))
        await loris.connect((host, port))
        t0 = trio.current_time()
        results: dict[str, float] = {}

        async def watch(name: str, sock: trio.socket.SocketType, drip: float | None) -> None:
            with sock:
                results[name] = await _closed_at(sock, drip) - t0

        async with trio.open_nursery() as n:
            n.start_soon(watch, "idle", idle, None)
            n.start_soon(watch, "loris", loris, 20.0)  # one byte every 20 s
        assert 299 <= results["idle"] <= 301, results
        assert 29 <= results["loris"] <= 31, results  # 30 s after its first byte
        assert await fetch(t, t.address, "small", files.root.parent / "out") == \
            (files.root / "small").read_bytes()

    serve_tcp(files_dir, body, clock=trio.testing.MockClock(autojump_threshold=0),
              deadline=10_000, idle_timeout=300, message_timeout=30)


def test_connections_beyond_the_cap_are_closed_at_once(files_dir: Path) -> None:
    async def body(t: TCPTransport, files: Files) -> None:
        host, port = split_address(t.address)
        socks = [trio.socket.socket() for _ in range(3)]
        for s in socks:
            await s.connect((host, port))
        with trio.fail_after(5):
            assert await socks[2].recv(1) == b""  # the third: closed at once
        socks[0].close()  # frees a place
        await trio.testing.wait_all_tasks_blocked()
        assert await fetch(t, t.address, "small", files.root.parent / "out") == \
            (files.root / "small").read_bytes()
        for s in socks:
            s.close()

    serve_tcp(files_dir, body, max_connections=2)


def test_a_handler_bug_costs_only_its_connection(files_dir: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    async def body(t: TCPTransport, files: Files) -> None:
        with pytest.raises(FetchError):
            await fetch(t, t.address, "handler-bug", files.root.parent / "out")
        assert await fetch(t, t.address, "small", files.root.parent / "out") == \
            (files.root / "small").read_bytes()

    serve_tcp(files_dir, body)
    # A bug, not a peer's fault: logged with its traceback.
    assert any(r.exc_info and "unexpected error" in r.getMessage() for r in caplog.records)


# -- 2. the server listens on --listen's address only -----------------------------------------
def test_tcp_serves_on_its_listen_address_only(files_dir: Path) -> None:
    async def body(t: TCPTransport, files: Files) -> None:
        host, port = split_address(t.address)
        assert host == "127.0.0.1"
        with pytest.raises(ConnectionRefusedError):
            await fetch(t, f"127.0.0.2:{port}", "small", None)
        assert await fetch(t, t.address, "small", files.root.parent / "out") == \
            (files.root / "small").read_bytes()
        async with trio.open_nursery() as n:  # an address not on this host: one line
            with pytest.raises(ConfigError, match="--listen 198.51.100.7: cannot serve there"):
                await TCPTransport().start(n, files.handle, "198.51.100.7")

    serve_tcp(files_dir, body)


# -- 4, 6. changing files: truncation, the changed() hook --------------------------------------
def test_tcp_file_truncated_while_sent_aborts_that_transfer_only(files_dir: Path) -> None:
    async def body(t: TCPTransport, files: Files) -> None:
        calls = 0

        def truncate_once() -> str | None:
            nonlocal calls
            calls += 1
            if calls == 1:
                os.truncate(files.root / "big", 0)  # a producer rewriting it with O_TRUNC
            return None

        files.changed = truncate_once
        with pytest.raises(FetchError, match="closed after"):
            await fetch(t, t.address, "big", files.root.parent / "out")
        files.changed = unchanged
        assert await fetch(t, t.address, "two", files.root.parent / "out") == \
            (files.root / "two").read_bytes()

    serve_tcp(files_dir, body)


class Changes:
    """A changed() that says "rewritten" at its *at*-th call (None: never), and records how many
    bytes the client had received at each call."""

    def __init__(self, at: int | None) -> None:
        self.at = at
        self.calls = 0
        self.received = 0
        self.seen: list[int] = []

    def __call__(self) -> str | None:
        self.calls += 1
        self.seen.append(self.received)
        return "rewritten by its producer" if self.calls == self.at else None

    def progress(self, n: int) -> None:
        self.received = n


async def _changed_cases(t: Transport, files: Files, out: Path,
                         checks: int = 0) -> dict[str, Any]:
    """*checks*: as in :func:`_check_changed`."""
    result: dict[str, Any] = {}
    chunks = BIG // CHUNK
    for case, at in (("mid", 2), ("end", checks or chunks + 1), ("never", None)):
        ch = Changes(at)
        files.changed = ch
        try:
            data = await fetch(t, t.address, "big", out, progress=ch.progress)
            result[case] = {"ok": data == (files.root / "big").read_bytes()}
        except FetchError as e:
            result[case] = {"error": str(e)}
        result[case].update(calls=ch.calls, seen=ch.seen, received=ch.received)
    ch = Changes(None)
    files.changed = ch
    assert await fetch(t, t.address, "empty", out) == b""
    result["empty_calls"] = ch.calls
    files.changed = unchanged
    result["after"] = await fetch(t, t.address, "small", out) == \
        (files.root / "small").read_bytes()
    return result


def _check_changed(result: dict[str, Any], sent_before_check: int, checks: int = 0) -> None:
    """*checks*: how many times the owner is asked in all (default: after each chunk and at
    the end)."""
    chunks = BIG // CHUNK
    assert "error" in result["mid"], result  # stopped at once, at the second check
    assert result["mid"]["calls"] == 2
    assert result["mid"]["received"] <= 2 * CHUNK
    assert "rewritten by its producer" in result["end"]["error"]  # the trailer says why
    assert result["never"]["ok"] and result["never"]["calls"] == (checks or chunks + 1)
    # the k-th check comes before the k+1-th chunk is sent
    for k, seen in enumerate(result["never"]["seen"][:chunks], start=1):
        assert seen <= (k - 1 + sent_before_check) * CHUNK, result["never"]["seen"]
    assert result["empty_calls"] == 1 and result["after"]


def test_tcp_changed_hook_aborts_the_transfer(files_dir: Path) -> None:
    async def body(t: TCPTransport, files: Files) -> None:
        result = await _changed_cases(t, files, files.root.parent / "out")
        _check_changed(result, sent_before_check=1)  # sendfile a chunk, then check

    serve_tcp(files_dir, body)


# -- 6. protocol compatibility; 7. hashing off the loop ---------------------------------------
def test_protocol_constructors_stay_compatible_and_junk_is_refused() -> None:
    st = os.stat("/")
    served = Served(fd=-1, size=0, _st=st)
    assert served.changed() is None and served.err is None
    sink = Sink(-1, lambda n: None, lambda n: None)
    assert sink.preallocated is False
    assert Sink(3, lambda n: None, lambda n: None, preallocated=True).preallocated
    assert Request("ns", "s", b"p", 1) == Request.decode(Request("ns", "s", b"p", 1).encode())
    for raw in (b'{"op": "fetch", "ns": "a", "secret": "b", "path": "", "version": 1e999}',
                b'{"op": "fetch", "ns": "a", "secret": "b", "path": "", "version": NaN}',
                b"[]", b"\xff\xfe", b'{"op": "fetch", "path": 5}'):
        with pytest.raises(FetchError):
            Request.decode(raw)
    for raw in (b'{"ok": true, "size": 1e999}', b'{"ok": true, "size": -1}', b"[1]"):
        with pytest.raises(FetchError):
            parse_header(raw)


def test_tcp_hashes_in_a_worker_thread(files_dir: Path) -> None:
    RecordingServed.digest_threads.clear()

    async def body(t: TCPTransport, files: Files) -> None:
        assert await fetch(t, t.address, "two", files.root.parent / "out", verify=True) == \
            (files.root / "two").read_bytes()

    serve_tcp(files_dir, body)
    assert RecordingServed.digest_threads
    assert threading.main_thread().name not in RecordingServed.digest_threads


# -- child processes -----------------------------------------------------------------------
def run_child(func: str, *args: Any, timeout: float = 120) -> Any:
    """``func(*args)`` of this module in a fresh process; its JSON result."""
    code = ("import json, sys; import tests.test_transport as t; "
            f"print('RESULT ' + json.dumps(t.{func}(*json.loads(sys.argv[1]))), flush=True)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [*filter(None, [os.environ.get("PYTHONPATH")]), str(ROOT)])}
    r = subprocess.run([sys.executable, "-c", code, json.dumps(args)], capture_output=True,
                       text=True, timeout=timeout, env=env, cwd=ROOT)
    if r.returncode < 0:
        raise AssertionError(f"the child died of {signal.Signals(-r.returncode).name}:\n"
                             f"{r.stderr[-3000:]}")
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    assert r.returncode == 0 and lines, f"child failed ({r.returncode}):\n{r.stderr[-3000:]}"
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


def _transport(name: str, **kw: Any) -> Transport:
    if name == "tcp":
        return TCPTransport(**kw)
    if name == "local":
        return LocalTransport(**kw)
    from dyadfs.transport.ucx import UCXTransport
    return UCXTransport(**kw)


def in_child(name: str, root: str, body: Callable[[Transport, Files], Awaitable[Any]],
             host: str = "127.0.0.1", **kw: Any) -> Any:
    """Run *body* against transport *name* serving *root* (in a child process's trio)."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)

    async def main() -> Any:
        t = _transport(name, **kw)
        files = Files(Path(root))
        async with trio.open_nursery() as n:
            await t.start(n, files.handle, host)
            try:
                with trio.fail_after(90):
                    return await body(t, files)
            finally:
                await t.aclose()
                n.cancel_scope.cancel()
    return trio.run(main)


# -- 6. a full disk: ENOSPC, never SIGBUS -------------------------------------------------
@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    d = tmp_path / "small"
    d.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(d)], check=True)
    try:
        yield d
    finally:
        if subprocess.run(["umount", str(d)]).returncode != 0:
            subprocess.run(["umount", "-l", str(d)])


def child_full_disk(name: str, root: str, small: str) -> dict[str, Any]:
    async def body(t: Transport, files: Files) -> dict[str, Any]:
        out, result = Path(small), {}
        t0 = time.monotonic()
        try:
            await fetch(t, t.address, "big", out / "big")
            result["plain"] = "no error"
        except FetchError as e:
            result["plain"], result["message"] = e.errno, str(e)
        result["seconds"] = time.monotonic() - t0
        (out / "big").unlink()
        fd = os.open(out / "pre", os.O_RDWR | os.O_CREAT)
        try:
            os.posix_fallocate(fd, 0, BIG)  # the caller's part: it finds out first
        except OSError as e:
            result["fallocate"] = e.errno
        finally:
            os.close(fd)
            (out / "pre").unlink()
        result["mapped"] = await fetch(t, t.address, "two", out / "two", preallocated=True) \
            == (files.root / "two").read_bytes()
        (out / "two").unlink()
        result["after"] = await fetch(t, t.address, "small", out / "small") == \
            (files.root / "small").read_bytes()
        return result
    return dict(in_child(name, root, body))


@pytest.mark.parametrize("name", [
    "tcp", "local", pytest.param("ucx", marks=needs_ucx)])
def test_full_disk_ends_the_fetch_with_enospc(files_dir: Path, small_disk: Path,
                                              name: str) -> None:
    result = run_child("child_full_disk", name, str(files_dir), str(small_disk))
    assert result["plain"] == errno.ENOSPC, result
    assert result["seconds"] < 10, result
    assert result["fallocate"] == errno.ENOSPC
    assert result["mapped"] and result["after"], result


# -- UCX: 4. truncation, 6. changed(), 7. hashing off the UCX loop, 2. --listen --------------
def child_ucx_truncate(root: str) -> dict[str, Any]:
    async def body(t: Transport, files: Files) -> dict[str, Any]:
        result: dict[str, Any] = {}
        events = 0

        def truncate(*_: int) -> None:
            nonlocal events
            events += 1
            if events == 2:  # while the file is sent: a producer rewriting it with O_TRUNC
                os.truncate(files.root / "huge", 0)

        # The second of the server's checks or the client's progress reports, whichever
        # comes first (code without the changed() hook has only the second).
        files.changed = lambda: truncate() or None
        try:
            await fetch(t, t.address, "huge", files.root.parent / "out", progress=truncate)
            result["error"] = None
        except FetchError as e:
            result["error"] = str(e)
        files.changed = unchanged
        result["after"] = await fetch(t, t.address, "two", files.root.parent / "out") == \
            (files.root / "two").read_bytes()
        return result
    return dict(in_child("ucx", root, body))


@needs_ucx
def test_ucx_file_truncated_while_sent_aborts_that_transfer_only(files_dir: Path) -> None:
    result = run_child("child_ucx_truncate", str(files_dir))
    assert result["error"] and result["after"], result


def child_ucx_changed(root: str) -> dict[str, Any]:
    async def body(t: Transport, files: Files) -> dict[str, Any]:
        return await _changed_cases(t, files, files.root.parent / "out")
    return dict(in_child("ucx", root, body))


@needs_ucx
def test_ucx_changed_hook_aborts_the_transfer(files_dir: Path) -> None:
    _check_changed(run_child("child_ucx_changed", str(files_dir)), sent_before_check=0)


def child_ucx_digest_and_listen(root: str, other: str) -> dict[str, Any]:
    async def body(t: Transport, files: Files) -> dict[str, Any]:
        RecordingServed.digest_threads.clear()
        out = files.root.parent / "out"
        result: dict[str, Any] = {}
        result["verified"] = await fetch(t, t.address, "two", out, verify=True) == \
            (files.root / "two").read_bytes()
        result["digest_threads"] = RecordingServed.digest_threads
        port = split_address(t.address)[1]
        refusals: list[str] = []

        class Watch(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                if "serving on 127.0.0.1 only" in record.getMessage():
                    refusals.append(record.getMessage())

        logging.getLogger("dyadfs").addHandler(Watch())
        try:  # this host's other address: the UCX port answers there, the server must not
            await fetch(t, f"{other}:{port}", "small", out)
            result["other_address"] = "served"
        except FetchError as e:
            result["other_address"] = str(e)
        result["served"] = files.served
        result["refusals"] = refusals
        return result
    return dict(in_child("ucx", root, body))


@needs_ucx
def test_ucx_hashes_off_its_loop_and_serves_on_its_listen_address_only(
        files_dir: Path) -> None:
    other = default_host()
    if other.startswith("127."):
        pytest.skip("this host has no address but loopback")
    result = run_child("child_ucx_digest_and_listen", str(files_dir), other)
    assert result["verified"] and result["digest_threads"], result
    assert "dyadfs-ucx" not in result["digest_threads"], result  # not the UCX loop's thread
    # a connection that came to another address is closed before its request is read
    assert result["other_address"] != "served" and result["served"] == 1, result
    assert result["refusals"], result


# -- UCX: 1, 3. raw peers ------------------------------------------------------------------
def ucx_peer(address: str, actions: list[list[Any]], budget: float = 600) -> list[Any]:
    """A UCX peer doing *actions* (a child process's main; at most *budget* seconds of them),
    one result per action:
    ["connect"]; ["send_len", i, n]: an 8-byte length, as send_obj frames it, and nothing
    after; ["send_obj", i, hex]; ["send_raw", i, hex]: a message without a length;
    ["recv_obj", i, timeout]: hex, or "closed: ..."/"timeout"; ["closed_within", i, timeout]:
    seconds until the server closed endpoint i, or "open"; ["abort", i]; ["close", i].
    A receive given up on stays referenced until its endpoint is gone: UCX may still write
    into its buffer."""
    import asyncio

    import numpy as np
    import ucxx

    async def main() -> list[Any]:
        host, port = split_address(address)
        eps: list[Any] = []
        out: list[Any] = []
        pending: set[asyncio.Future[Any]] = set()
        deadline = time.monotonic() + budget

        async def within(aw: Awaitable[Any], timeout: float) -> Any:
            task = asyncio.ensure_future(aw)
            done, _ = await asyncio.wait({task}, timeout=timeout)
            if not done:
                pending.add(task)
                raise TimeoutError
            return task.result()

        for action in actions:
            op, args = action[0], action[1:]
            if op == "connect" and time.monotonic() > deadline:
                break
            try:
                if op == "connect":
                    eps.append(None)
                    eps[-1] = await ucxx.create_endpoint(host, port)
                    out.append("ok")
                    continue
                ep = eps[args[0]]
                if ep is None:
                    out.append("no endpoint")
                elif op == "send_len":
                    await ep.send(np.array([args[1]], dtype=np.uint64))
                    out.append("ok")
                elif op == "send_obj":
                    await ep.send_obj(bytes.fromhex(args[1]))
                    out.append("ok")
                elif op == "send_raw":
                    await ep.send(np.frombuffer(bytes.fromhex(args[1]) or b"\0", dtype=np.uint8))
                    out.append("ok")
                elif op == "recv_obj":
                    out.append(bytes(await within(ep.recv_obj(), args[1])).hex())
                elif op == "closed_within":
                    t0 = time.monotonic()
                    buf = np.empty(1 << 16, dtype=np.uint8)
                    try:
                        while True:
                            await within(ep.recv(buf), max(args[1] - (time.monotonic() - t0),
                                                           0.001))
                    except TimeoutError:
                        out.append("open")
                    except Exception:  # noqa: BLE001 - closed by the server
                        out.append(time.monotonic() - t0)
                elif op == "abort":
                    ep.abort()
                    out.append("ok")
                elif op == "close":
                    await ep.close()
                    out.append("ok")
            except TimeoutError:
                out.append("timeout")
            except Exception as e:  # noqa: BLE001 - what the server did to us
                out.append(f"closed: {type(e).__name__}")
            finally:
                print("done", json.dumps(action)[:80], json.dumps(out[-1:]), flush=True)
        for ep in eps:
            if ep is not None and not ep.closed:
                ep.abort()
        if pending:
            await asyncio.wait(pending, timeout=10)
        return out

    try:
        return asyncio.run(main())
    finally:
        ucxx.stop_notifier_thread()


class UCXServer:
    """A child process serving *root* with a UCXTransport (see :func:`ucx_server_main`)."""

    def __init__(self, root: Path, **kw: Any) -> None:
        code = ("import json, sys; import tests.test_transport as t; "
                "t.ucx_server_main(*json.loads(sys.argv[1]))")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [*filter(None, [os.environ.get("PYTHONPATH")]), str(ROOT)])}
        self.log = root.parent / "ucx-server.log"
        with open(self.log, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", code, json.dumps([str(root), kw])],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True, env=env,
                cwd=ROOT)
        self.address = self._line()

    def _line(self) -> str:
        assert self.proc.stdout is not None
        while True:  # UCX itself may print on stdout too
            line = self.proc.stdout.readline()
            if not line:
                raise AssertionError(f"the UCX server died ({self.proc.wait()}):\n"
                                     f"{self.log.read_text()[-3000:]}")
            if line.startswith("> "):
                return line[2:].strip()

    def ask(self, command: str) -> Any:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return json.loads(self._line())

    def close(self) -> str:
        try:
            self.ask("quit")
            self.proc.wait(30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        return self.log.read_text()


def ucx_server_main(root: str, kw: dict[str, Any]) -> None:
    """Serve *root* over UCX on 127.0.0.1; print the address, then answer stdin's commands:
    ``fetch NAME`` (from ourselves: does the server still serve?), ``rss`` (peak, KiB),
    ``quit``."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)

    async def body(t: Transport, files: Files) -> None:
        print(">", t.address, flush=True)
        out = files.root.parent / "server-out"
        while True:
            line = (await trio.to_thread.run_sync(sys.stdin.readline)).split()
            if not line or line[0] == "quit":
                print("> null", flush=True)
                return
            if line[0] == "rss":
                answer: Any = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            else:
                answer = await fetch(t, t.address, line[1], out) == \
                    (files.root / line[1]).read_bytes()
            print(">", json.dumps(answer), flush=True)

    in_child("ucx", root, body, **kw)


@pytest.fixture
def ucx_server(files_dir: Path) -> Iterator[Callable[..., UCXServer]]:
    if not HAVE_UCX:
        pytest.skip("needs UCXX")
    servers: list[UCXServer] = []

    def start(**kw: Any) -> UCXServer:
        servers.append(UCXServer(files_dir, **kw))
        return servers[-1]
    yield start
    for s in servers:
        if s.proc.poll() is None:
            s.proc.kill()
            s.proc.wait()


def test_ucx_oversized_length_is_refused_before_allocating(
        ucx_server: Callable[..., UCXServer]) -> None:
    server = ucx_server()
    rss = server.ask("rss")
    got = run_child("ucx_peer", server.address,
                    [["connect"], ["send_len", 0, 3 << 30], ["closed_within", 0, 20]])
    assert got[:2] == ["ok", "ok"] and got[2] != "open", got  # dropped, not waited on
    assert server.ask("rss") - rss < 256 << 10, "the server allocated what the peer announced"
    assert server.ask("fetch big") is True
    log = server.close()
    assert "too long" in log and "Traceback" not in log, log


def test_ucx_silent_peer_is_dropped_and_junk_refused(
        ucx_server: Callable[..., UCXServer]) -> None:
    server = ucx_server(message_timeout=1.0)
    got = run_child("ucx_peer", server.address, [
        ["connect"], ["closed_within", 0, 20],  # says nothing: dropped after ~1 s
        ["connect"], ["send_obj", 1, b"not json".hex()], ["recv_obj", 1, 20],
        ["connect"], ["send_raw", 2, b"x".hex()], ["closed_within", 2, 20],
        ["connect"], ["send_len", 3, 10], ["abort", 3]])
    assert isinstance(got[1], float) and got[1] < 10, got
    assert b'"ok": false' in bytes.fromhex(got[4]), got
    assert got[7] != "open", got
    assert server.ask("fetch big") is True
    log = server.close()
    assert "refused fetch" in log and "Traceback" not in log, log


def test_ucx_connections_beyond_the_cap_are_closed_at_once(
        ucx_server: Callable[..., UCXServer]) -> None:
    server = ucx_server(max_connections=2)
    got = run_child("ucx_peer", server.address, [
        ["connect"], ["connect"], ["connect"], ["closed_within", 2, 20],
        ["send_obj", 0, Request("ns", "s", b"small", 1).encode().hex()], ["recv_obj", 0, 20]])
    assert isinstance(got[3], float) and got[3] < 10, got
    assert json.loads(bytes.fromhex(got[5]))["ok"], got  # the first two are served
    assert server.ask("fetch small") is True
    assert "Traceback" not in server.close()



def _close_wait(port: int) -> int:
    """Sockets of this host in CLOSE-WAIT on local *port* (/proc/net/tcp, state 08)."""
    with open("/proc/net/tcp") as f:
        rows = [line.split() for line in f.readlines()[1:]]
    return sum(1 for r in rows if r[3] == "08" and int(r[1].split(":")[1], 16) == port)


@pytest.mark.xfail(strict=True, reason=(
    "UCX 1.21's TCP connection manager (tcp_sockcm) reads a connection request into a buffer "
    "of UCX_TCP_CM_PRIV_DATA_LEN (2 KiB) + header; a peer that sends more and then closes "
    "leaves it recv()ing 0 bytes of room forever: the socket stays in CLOSE-WAIT, its "
    "descriptor leaks, and the UCX thread spins on it (measured: 0.5-1.1 of a core). dyadfs "
    "cannot reach that socket; strict, so that a fixed UCX shows up here"))
def test_ucx_port_junk_over_2k_then_close_leaks_in_ucx(
        ucx_server: Callable[..., UCXServer]) -> None:
    server = ucx_server()
    host, port = split_address(server.address)
    for _ in range(20):
        with socket.create_connection((host, port)) as s:
            s.sendall(bytes(4096))
    deadline = time.monotonic() + 5
    while _close_wait(port) and time.monotonic() < deadline:
        time.sleep(0.05)  # polling the kernel's table, with a deadline
    assert _close_wait(port) == 0, f"{_close_wait(port)} sockets left in CLOSE-WAIT"


# -- 5. the control socket --------------------------------------------------------------------
class FakePuller:
    async def raw_fetch(self, owner: str, size: int) -> float:
        return 0.001


class FakeMount:
    """What the control server needs of a Mount."""

    def __init__(self, state: Path) -> None:
        self.config = SimpleNamespace(state_dir=state, mountpoint=Path("/nonexistent/mnt"))
        self.puller = FakePuller()

    def status(self) -> dict[str, Any]:
        return {"role": "test"}


async def ask(path: Path, data: bytes) -> bytes:
    """Send *data* to the control socket; what comes back until it closes."""
    with trio.socket.socket(socket.AF_UNIX) as s:
        await s.connect(str(path))
        await s.send(data)
        out = b""
        with trio.fail_after(60):
            while chunk := await s.recv(65536):
                out += chunk
    return out


def serve_control(state: Path, body: Callable[[Path], Awaitable[None]], *,
                  clock: trio.abc.Clock | None = None) -> None:
    from dyadfs.control import _serve_control

    async def main() -> None:
        async with trio.open_nursery() as n:
            path = await n.start(_serve_control, FakeMount(state))
            with trio.fail_after(10_000 if clock else 60):
                await body(path)
            assert json.loads(await ask(path, b'{"cmd": "status"}\n')) == {"role": "test"}
            n.cancel_scope.cancel()
    trio.run(main, clock=clock)


def test_control_socket_survives_junk_resets_floods_and_no_descriptors(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from dyadfs.control import MAX_CONNECTIONS
    caplog.set_level(logging.INFO)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)

    async def body(path: Path) -> None:
        for junk in (b"[1]\n", b'"x"\n', b"1e999\n", b"\xff\xfe\n", b"{\n",
                     b'{"cmd": "raw", "owner": "o", "size": 1e999}\n',
                     b'{"cmd": "raw", "owner": 5, "size": "x"}\n'):
            assert "error" in json.loads(await ask(path, junk)), junk
        try:  # a line that never ends: answered, or reset for what was left unread
            assert "error" in json.loads(await ask(path, b"x" * (1 << 20)))
        except ConnectionResetError:
            pass
        s = socket.socket(socket.AF_UNIX)  # a reset in the middle of a line
        s.connect(str(path))
        s.sendall(b'{"cmd": "sta')
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
        # a flood: the connections over the cap are closed at once, unanswered
        flood = [trio.socket.socket(socket.AF_UNIX) for _ in range(MAX_CONNECTIONS + 5)]
        for f in flood:
            await f.connect(str(path))
        with trio.fail_after(10):
            assert await flood[-1].recv(1) == b""
        for f in flood:
            f.close()
        # no descriptor for accept(): back off, then answer again
        failed = trio.Event()

        class Watch(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                if "Too many open files" in record.getMessage():
                    failed.set()

        watch = Watch()
        logging.getLogger("dyadfs").addHandler(watch)
        client = trio.socket.socket(socket.AF_UNIX)
        lowest = os.open(os.devnull, os.O_RDONLY)
        os.close(lowest)
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowest, hard))
        try:
            await client.connect(str(path))
            with trio.fail_after(10):
                await failed.wait()
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            logging.getLogger("dyadfs").removeHandler(watch)
        with client:
            await client.send(b"{}\n")
            with trio.fail_after(10):
                assert json.loads(await client.recv(65536)) == {"role": "test"}

    serve_control(tmp_path / "state", body)
    no_errors_logged(caplog)


def test_control_socket_drops_silent_and_slow_peers(tmp_path: Path) -> None:
    async def body(path: Path) -> None:
        silent, slow = trio.socket.socket(socket.AF_UNIX), trio.socket.socket(socket.AF_UNIX)
        await silent.connect(str(path))
        await slow.connect(str(path))
        t0 = trio.current_time()
        with silent, slow:
            async with trio.open_nursery() as n:
                times: list[float] = []

                async def watch(s: trio.socket.SocketType, drip: float | None) -> None:
                    times.append(await _closed_at(s, drip) - t0)

                n.start_soon(watch, silent, None)
                n.start_soon(watch, slow, 1.0)  # a byte a second, never a newline
        assert all(4.9 <= t <= 6.1 for t in times), times

    serve_control(tmp_path / "state", body, clock=trio.testing.MockClock(autojump_threshold=0))


# -- same host: the owner hands the file over, the consumer copies it (transport/local.py) ------
def child_local(root: str) -> dict[str, Any]:
    async def body(t: Transport, files: Files) -> dict[str, Any]:
        fds = len(os.listdir("/proc/self/fd"))
        result: dict[str, Any] = {
            "changed": await _changed_cases(t, files, files.root.parent / "out",
                                            checks=BIG // CHUNK)}
        out = files.root.parent / "outdir"
        out.mkdir()
        # A frame comes in the answer itself (one round trip): the owner vouches after its read;
        # a file it finds changed is refused in the trailer, and nothing is written.
        files.changed = lambda: "rewritten by its producer"
        try:
            await fetch(t, t.address, "small", out / "inline")
            result["inline_changed"] = "no error"
        except FetchError as e:
            result["inline_changed"] = str(e)
        result["inline_written"] = (out / "inline").stat().st_size
        files.changed = unchanged
        for name in ("small", "two", "huge", "empty"):
            result[name] = await fetch(t, t.address, name, out / name, verify=True) == \
                (files.root / name).read_bytes()
        # A file truncated while it is copied (a producer rewriting it with O_TRUNC).
        events = 0

        def truncate(n: int) -> None:
            nonlocal events
            events += 1
            if events == 2:
                os.truncate(files.root / "huge", 0)

        try:
            await fetch(t, t.address, "huge", out / "huge", progress=truncate)
            result["truncated"] = "no error"
        except FetchError as e:
            result["truncated"] = e.errno
        result["after"] = await fetch(t, t.address, "two", out / "two") == \
            (files.root / "two").read_bytes()
        # Refusals come back as such; a name nobody listens on is marked unreachable.
        try:
            await fetch(t, t.address, "missing", out / "missing")
        except FetchError as e:
            result["missing"] = e.errno
        assert isinstance(t, LocalTransport)
        try:
            await fetch(t, "@dyadfs-nobody-listens", "two", out / "x")
        except OSError as e:
            result["nobody"] = e.errno
        result["unreachable"] = sorted(t.unreachable)
        # Every handed-over file closed on both sides (kept connections: one socket pair).
        result["fds_left"] = len(os.listdir("/proc/self/fd")) - fds
        return result
    return dict(in_child("local", root, body))


def test_local_copies_vouched_chunks_and_refuses_what_the_owner_refuses(
        files_dir: Path) -> None:
    result = run_child("child_local", str(files_dir))
    # copied, then vouched; the last chunk by the trailer
    _check_changed(result["changed"], sent_before_check=1, checks=BIG // CHUNK)
    assert all(result[n] for n in ("small", "two", "huge", "empty")), result
    assert "rewritten by its producer" in result["inline_changed"], result
    assert result["inline_written"] == 0, result
    assert result["truncated"] == errno.ESTALE, result
    assert result["after"], result
    assert result["missing"] == errno.ENOENT, result
    assert result["nobody"] == errno.ECONNREFUSED, result
    assert result["unreachable"] == ["@dyadfs-nobody-listens"], result
    assert result["fds_left"] <= 2, result


def test_local_socket_junk_costs_only_that_connection(files_dir: Path) -> None:
    async def main() -> None:
        t = LocalTransport(message_timeout=1)
        files = Files(files_dir)
        async with trio.open_nursery() as n:
            await t.start(n, files.handle, "")
            assert t.address is not None and t.address.startswith("@")
            for junk in (b"\xff" * 10, struct.pack("!I", 1 << 30), b"\0\0\0\x05{]]]}",
                         struct.pack("!I", 1) + b"?"):
                s = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                await s.connect("\0" + t.address[1:])
                await s.send(junk)
                s.close()
            with trio.fail_after(10):
                assert await fetch(t, t.address, "two", files_dir.parent / "out") == \
                    (files_dir / "two").read_bytes()
            await t.aclose()
            n.cancel_scope.cancel()
    trio.run(main)

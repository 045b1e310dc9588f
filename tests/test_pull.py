"""Node-local storage: pulls between two mounts on one machine, over both transports."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from dyadfs import keys
from dyadfs.errors import FetchError
from dyadfs.transport.protocol import Request, Sink
from dyadfs.transport.tcp import TCPTransport

from .conftest import BOTH_KVS, Mounts, run, wait_for

pytestmark = pytest.mark.mounted
NS = "pull"

TRANSPORTS = ["ucx", "tcp", "local"]  # local: two mounts of one host (the default)


def pair(tmp_path: Path, mounts: Mounts, transport: str, *cons_opts: str) -> tuple[Path, Path]:
    prod = mounts.mount(tmp_path / "prod", "--role", "producer", "--namespace", NS,
                        "--transport", transport, "--listen", "127.0.0.1")
    cons = mounts.mount(tmp_path / "cons", "--role", "consumer", "--namespace", NS,
                        "--transport", transport, "--wait-timeout", "60", *cons_opts)
    return prod, cons


def sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def write_random(path: Path, size: int) -> None:
    run(["dd", "if=/dev/urandom", f"of={path}", "bs=1M", f"count={size >> 20}",
         "iflag=fullblock", "status=none"])


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_pull_large_file_streams_and_is_identical(tmp_path: Path, mounts: Mounts,
                                                  transport: str) -> None:
    prod, cons = pair(tmp_path, mounts, transport)
    # three readers at once, started before the file exists: one pull serves them all
    readers = [subprocess.Popen(["sha256sum", str(cons / "big.bin")], stdout=subprocess.PIPE)
               for _ in range(3)]
    wait_for(lambda: mounts.status(cons)["waiting"] == 3, 20, "three waiting readers")
    write_random(prod / "big.bin", 64 << 20)  # larger than any pull buffer
    want = sha(prod / "big.bin")
    for r in readers:
        out, _ = r.communicate(timeout=120)
        assert r.returncode == 0 and out.split()[0].decode() == want
    st = mounts.status(cons)
    assert st["pulled"] == 1 and st["bytes_pulled"] == 64 << 20
    # same host: handed over and copied in the kernel, unless the test asked for a network
    assert st["pulled_same_host"] == (1 if transport == "local" else 0), st
    # numpy reading a pulled frame
    run([sys.executable, "-c", "import numpy as np, sys; a = np.arange(1000, dtype='<f8'); "
         f"a.tofile({str(prod / 'arr.bin')!r})"])
    out = run([sys.executable, "-c", f"import numpy as np; print(np.fromfile("
               f"{str(cons / 'arr.bin')!r}, dtype='<f8').sum())"]).stdout
    assert out.strip() == b"499500.0"


@pytest.mark.parametrize("kvs_backend", BOTH_KVS, indirect=True)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_versions_refresh_and_current_copy_is_not_pulled_again(
        tmp_path: Path, mounts: Mounts, transport: str) -> None:
    prod, cons = pair(tmp_path, mounts, transport)
    run(f"mkdir {prod}/g && printf v1 > {prod}/g/f")
    assert run(["cat", str(cons / "g/f")]).stdout == b"v1"
    assert run(["cat", str(cons / "g/f")]).stdout == b"v1"
    assert mounts.status(cons)["pulled"] == 1  # the second open used the current copy
    run(f"printf v2-longer > {prod}/g/f")  # rewrite
    assert run(["cat", str(cons / "g/f")]).stdout == b"v2-longer"
    run(f"printf +append >> {prod}/g/f")  # append
    assert run(["cat", str(cons / "g/f")]).stdout == b"v2-longer+append"
    run(["truncate", "-s", "2", str(prod / "g/f")])
    assert run(["cat", str(cons / "g/f")]).stdout == b"v2"
    assert mounts.status(cons)["pulled"] == 4
    run(f"cp {cons}/g/f {tmp_path}/copy")  # cp, dd of a pulled file
    assert (tmp_path / "copy").read_bytes() == b"v2"
    assert run(["dd", f"if={cons}/g/f", "bs=1", "skip=1", "status=none"]).stdout == b"2"


@pytest.mark.parametrize("kvs_backend", BOTH_KVS, indirect=True)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_owner_gone_fails_with_eio_then_recovers(tmp_path: Path, mounts: Mounts,
                                                 transport: str) -> None:
    prod, cons = pair(tmp_path, mounts, transport, "--fetch-timeout", "2")
    run(f"printf payload > {prod}/f")
    pid = mounts.status(prod)["pid"]
    os.kill(pid, signal.SIGKILL)  # the owner's daemon dies: its mount is dead
    wait_for(lambda: not os.path.exists(f"/proc/{pid}"), 10, "the owner to die")
    subprocess.run(["fusermount3", "-uz", str(prod)], check=True)
    t0 = time.monotonic()
    r = run(["cat", str(cons / "f")], check=False)
    assert r.returncode != 0 and b"Input/output error" in r.stderr
    assert time.monotonic() - t0 < 30  # bounded by --fetch-timeout (2 s), not forever
    assert "pull of f failed" in mounts.logs()
    # the same mount comes back (same directory, so the same owner id): the open succeeds
    mounts.mount(prod, "--role", "producer", "--namespace", NS, "--transport", transport,
                 "--listen", "127.0.0.1")
    assert run(["cat", str(cons / "f")]).stdout == b"payload"


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_owner_killed_mid_pull_leaves_no_wrong_file(tmp_path: Path, mounts: Mounts,
                                                    transport: str) -> None:
    prod, cons = pair(tmp_path, mounts, transport, "--fetch-timeout", "3")
    write_random(prod / "huge.bin", 512 << 20)
    want = sha(prod / "huge.bin")
    reader = subprocess.Popen(["sha256sum", str(cons / "huge.bin")], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
    try:
        wait_for(lambda: mounts.status(cons)["pulling"] == 1 or reader.poll() is not None, 30,
                 "the pull to start")
        os.kill(mounts.status(prod)["pid"], signal.SIGKILL)
        out, err = reader.communicate(timeout=120)
    finally:
        reader.kill()
    subprocess.run(["fusermount3", "-uz", str(prod)])
    if reader.returncode == 0:  # the pull finished before the kill landed: still must be right
        assert out.split()[0].decode() == want
    else:
        assert b"Input/output error" in err
    mounts.mount(prod, "--role", "producer", "--namespace", NS, "--transport", transport,
                 "--listen", "127.0.0.1")
    assert run(["sha256sum", str(cons / "huge.bin")], timeout=120).stdout.split()[0].decode() \
        == want


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_eviction_under_cache_size(tmp_path: Path, mounts: Mounts, transport: str) -> None:
    prod, cons = pair(tmp_path, mounts, transport, "--cache-size", "3M")
    for i in range(6):
        write_random(prod / f"f{i}", 1 << 20)
    (prod / "mine").write_bytes(b"x")
    held = open(cons / "f0", "rb")  # open: never evicted
    try:
        for i in range(1, 6):
            assert sha(cons / f"f{i}") == sha(prod / f"f{i}")
        assert held.read() == (prod / "f0").read_bytes()
        run(f"echo local > {cons}/scratch")  # written here: never evicted
    finally:
        held.close()
    mounts.umount(cons)
    present = sorted(p.name for p in cons.iterdir() if p.name.startswith("f"))
    assert "f0" in present and "f5" in present and len(present) <= 4, present
    assert (cons / "scratch").read_text() == "local\n"
    mounts.mount(cons, "--role", "consumer", "--namespace", NS, "--transport", transport,
                 "--wait-timeout", "60", "--cache-size", "3M")
    assert sha(cons / "f1") == sha(prod / "f1")  # evicted: pulled again


def _registry(mounts: Mounts) -> dict[str, keys.MountRecord]:
    db = sqlite3.connect(mounts.state / "kvs.sqlite")
    rows = db.execute("SELECT key, value FROM kv WHERE ns=? AND key>=? AND key<?",
                      (NS, b"mounts/", b"mounts0")).fetchall()
    secret = db.execute("SELECT value FROM kv WHERE ns=? AND key=?",
                        (NS, keys.SECRET.encode())).fetchone()[0]
    db.close()
    out = {k.decode(): keys.MountRecord.decode(v, "x") for k, v in rows}
    out["secret"] = bytes(secret).decode()  # type: ignore[assignment]
    return out


def test_ucx_without_rdma_pulls_over_the_tcp_path(tmp_path: Path, mounts: Mounts) -> None:
    """Where UCX has no RDMA network transport (PyPI's UCX on Ethernet, and CI), UCX between
    hosts runs over TCP sockets, slower than dyadfs's own TCP path at every size measured:
    a --transport ucx mount pulls files above --ucx-threshold over TCP, and says so once."""
    prod = mounts.mount(tmp_path / "p", "--role", "producer", "--namespace", NS,
                        "--transport", "ucx", "--same-host", "off")
    cons = mounts.mount(tmp_path / "c", "--role", "consumer", "--namespace", NS,
                        "--transport", "ucx", "--same-host", "off", "--ucx-threshold", "1M")
    data = os.urandom(3 << 20)
    (prod / "big").write_bytes(data)
    assert (cons / "big").read_bytes() == data
    st = mounts.status(cons)
    assert st["pulled"] == 1 and st["pulled_same_host"] == 0, st
    logs = mounts.logs()
    if "no RDMA network transport" in logs:
        assert st["pulled_over_ucx"] == 0, st
    else:  # a host with InfiniBand or RoCE: above the threshold, UCX moves it
        assert "move over UCX" in logs and st["pulled_over_ucx"] == 1, (st, logs[-2000:])


def test_hostile_fetch_requests_are_refused(tmp_path: Path, mounts: Mounts) -> None:
    prod, cons = pair(tmp_path, mounts, "tcp")
    outside = tmp_path / "outside.txt"
    outside.write_text("secret outside")
    run(f"mkdir {prod}/d && printf ok > {prod}/d/pub")
    (tmp_path / "outdir").mkdir()
    (tmp_path / "outdir" / "f").write_text("secret outside")
    os.symlink(str(tmp_path / "outdir"), prod / "link")  # a symlink in the managed directory
    reg = _registry(mounts)
    secret = reg.pop("secret")
    rec = [r for r in reg.values() if r.dir == str(prod)][0]
    db = sqlite3.connect(mounts.state / "kvs.sqlite")
    pub = keys.FileRecord.decode(bytes(db.execute(
        "SELECT value FROM kv WHERE ns=? AND key=?", (NS, b"files/d/pub")).fetchone()[0]), "x")
    # a forged publication whose path leads through that symlink, as a hostile KVS writer would
    forged = keys.FileRecord("complete", 14, 77, 0, 0o644, pub.owner)
    db.execute("INSERT INTO kv VALUES (?, ?, ?)", (NS, b"files/link/f", forged.encode()))
    db.commit()
    db.close()
    sink_file = tmp_path / "sink"

    async def fetch(req: Request) -> bytes:
        t = TCPTransport()
        fd = os.open(sink_file, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
        try:
            await t.fetch(rec.tcp, req, Sink(fd, lambda n: None, lambda n: None))
            return sink_file.read_bytes()
        finally:
            os.close(fd)
            await t.aclose()

    def refused(req: Request) -> int:
        with pytest.raises(FetchError) as e:
            trio.run(fetch, req)
        return e.value.errno

    assert trio.run(fetch, Request(NS, secret, b"d/pub", pub.version)) == b"ok"
    assert refused(Request(NS, "wrong", b"d/pub", pub.version)) == errno.EACCES
    assert refused(Request("other", secret, b"d/pub", pub.version)) == errno.EACCES
    assert refused(Request(NS, secret, b"../../etc/passwd", 1)) in (errno.ENOENT, errno.EPERM)
    assert refused(Request(NS, secret, b"/etc/passwd", 1)) in (errno.ENOENT, errno.EPERM)
    assert refused(Request(NS, secret, b"d", 1)) == errno.ENOENT  # exists, not published
    assert refused(Request(NS, secret, b"never", 1)) == errno.ENOENT
    assert refused(Request(NS, secret, b"d/pub", pub.version + 1)) == errno.ESTALE
    assert refused(Request(NS, secret, b"link/f", 77)) == errno.EPERM  # through a symlink
    assert refused(Request(NS, secret, b"d/../d/pub", pub.version)) in (errno.ENOENT,
                                                                        errno.EPERM)

    async def raw(data: bytes) -> bytes:
        host, port = rec.tcp.rsplit(":", 1)  # type: ignore[union-attr]
        s = await trio.open_tcp_stream(host, int(port))
        await s.send_all(len(data).to_bytes(4, "big") + data)
        with trio.move_on_after(5):
            out = b""
            while True:
                chunk = await s.receive_some()
                if not chunk:
                    break
                out += chunk
        await s.aclose()
        return out

    for junk in (b"not json", json.dumps({"op": "fetch"}).encode(), b"\xff" * 100):
        assert b'"ok": false' in trio.run(raw, junk)
    logs = mounts.logs()
    assert logs.count("refused fetch") >= 11
    assert "secret outside" not in sink_file.read_text(errors="replace")
    assert run(["cat", str(cons / "d/pub")]).stdout == b"ok"  # the owner still serves


@pytest.mark.parametrize("module,option,needle", [
    ("ucxx", ["--transport", "ucx"], "--transport tcp"),
    ("flux", ["--kvs", "flux"], "flux-python"),
])
def test_missing_optional_module_is_a_one_line_error(tmp_path: Path, state_env: dict[str, str],
                                                     module: str, option: list[str],
                                                     needle: str) -> None:
    (tmp_path / "m").mkdir()
    code = (f"import sys, runpy; sys.modules[{module!r}] = None; sys.argv = ['dyadfs', "
            f"'mount', {str(tmp_path / 'm')!r}, *{option!r}, '--foreground']; "
            "runpy.run_module('dyadfs', run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=state_env, timeout=60)
    assert r.returncode != 0 and needle in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not os.path.ismount(tmp_path / "m")


def test_cache_size_counts_copies_pulled_before_a_restart(tmp_path: Path, mounts: Mounts) -> None:
    prod, cons = pair(tmp_path, mounts, "tcp", "--cache-size", "3M")
    for i in range(6):
        write_random(prod / f"f{i}", 1 << 20)
    for i in range(3):
        assert sha(cons / f"f{i}") == sha(prod / f"f{i}")
    mounts.umount(cons)
    mounts.mount(cons, "--role", "consumer", "--namespace", NS, "--transport", "tcp",
                 "--wait-timeout", "60", "--cache-size", "3M")
    for i in range(3, 6):
        assert sha(cons / f"f{i}") == sha(prod / f"f{i}")
    mounts.umount(cons)
    present = sorted(p.name for p in cons.iterdir() if p.name.startswith("f"))
    assert len(present) <= 4 and "f5" in present, present  # the 3M bound, plus the open one

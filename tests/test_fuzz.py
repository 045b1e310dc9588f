"""A storm of bad peers at every port of a real mount; then the mount must still serve.

The producer's plain TCP file server, its UCX listener (through UCXX and as a raw TCP port) and
its control socket get thousands of seeded cases: random bytes, truncated frames, oversized
length prefixes, valid-looking JSON of the wrong types, requests with a wrong secret or a path
out of bounds, resets in the middle of a message (SO_LINGER 0), slow-loris connections and many
connections at once. Then a consumer mount pulls a small file (over TCP) and a large one (over
UCX) byte-identical, ``dyadfs status`` answers, the daemon is the same process, and (the mounts
fixture) it logged no traceback. The seed is printed; DYADFS_FUZZ_SEED replays a run.
"""

from __future__ import annotations

import collections
import json
import os
import random
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from dyadfs import keys
from dyadfs.transport.protocol import Request
from dyadfs.transport.tcp import split_address

from .conftest import Mounts, kvs_get

pytestmark = pytest.mark.mounted
NS = "fz"
#: how long each of the two storms lasts (s): plain sockets, then a raw UCXX client (under the
#: first, the daemon's UCX thread gets too little of the interpreter to finish handshakes)
STORM = 15.0
#: connections at once in the plain storm, besides a flood of 1100 (over the cap of 1024)
PARALLEL = 48


def _frame(data: bytes) -> bytes:
    return struct.pack("!I", len(data)) + data


def _junk_json(rng: random.Random) -> bytes:
    values: list[Any] = [None, True, -1, 0, 1e999, -1e308, "", "x" * rng.randrange(1, 300),
                         [], {}, [1, "2"], {"a": {"b": []}}, 2**70, "zz", "00" * 40, "../..",
                         "/etc/passwd"]
    keys = ["op", "ns", "secret", "path", "version", "verify", "raw", "cmd", "owner", "size"]
    doc: Any = {k: rng.choice(values) for k in rng.sample(keys, rng.randrange(0, len(keys)))}
    if rng.random() < 0.5:
        doc["op"] = "fetch"
    if rng.random() < 0.1:
        doc = rng.choice(values)
    text = json.dumps(doc).replace("Infinity", "1e999")
    return text.encode()


class Storm:
    """Seeded cases against one mount's ports; counts what it threw."""

    def __init__(self, seed: int, tcp: str, ucx: str, control: str, secret: str,
                 published: tuple[str, int]) -> None:
        self.seed = seed
        self.tcp = split_address(tcp)
        self.ucx = split_address(ucx)
        self.control = control
        self.secret = secret
        self.published = published
        self.counts: dict[str, int] = {}
        self.deadline = 0.0

    def _count(self, kind: str) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1

    # -- one case: connect, send, maybe read a little, close or reset ------------------------
    async def _case(self, family: int, where: Any, pieces: list[bytes], *, read: bool,
                    reset: bool, pause: float = 0.0) -> None:
        sock = trio.socket.socket(family, socket.SOCK_STREAM)
        with sock:
            try:
                with trio.fail_after(5):
                    await sock.connect(where)
                    for piece in pieces:
                        while piece:
                            piece = piece[await sock.send(piece):]
                        if pause:
                            await trio.sleep(pause)  # a slow peer, not a synchronisation
                    if read:
                        with trio.move_on_after(1):
                            await sock.recv(65536)
                if reset:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except (OSError, trio.TooSlowError):
                pass  # the server closed on us: what it may do to a bad peer

    def _tcp_payload(self, rng: random.Random) -> tuple[str, list[bytes], bool]:
        kind = rng.choice(["bytes", "truncated", "oversized", "json", "secret", "paths",
                           "split", "empty"])
        ns = rng.choice([NS, "other", ""])
        if kind == "bytes":
            return kind, [rng.randbytes(rng.randrange(1, 5000))], rng.random() < 0.5
        if kind == "truncated":
            frame = _frame(_junk_json(rng))
            return kind, [frame[:rng.randrange(0, len(frame))]], False
        if kind == "oversized":
            n = rng.choice([65537, 1 << 20, 1 << 31, 0xFFFFFFFF])
            return kind, [struct.pack("!I", n) + rng.randbytes(rng.randrange(0, 100))], True
        if kind == "json":
            return kind, [_frame(_junk_json(rng))], True
        if kind == "secret":
            req = Request(ns, rng.choice(["wrong", "", self.secret[:-1]]),
                          self.published[0].encode(), self.published[1])
            return kind, [_frame(req.encode())] * rng.randrange(1, 4), True
        if kind == "paths":
            path = rng.choice([b"../../etc/passwd", b"/etc/passwd", b"", b"a\0b", b".",
                               b"x/" * 200, rng.randbytes(30), b".dyadfs/tmp/x", b"nope"])
            req = Request(NS, self.secret, path, rng.randrange(-5, 5),
                          verify=rng.random() < 0.5, raw=rng.choice([0, 0, -1, 1 << 40]))
            return kind, [_frame(req.encode())], True
        if kind == "split":  # one valid-looking frame in pieces of a byte or a few
            data = _frame(_junk_json(rng))
            cuts = sorted(rng.sample(range(1, len(data)), min(5, len(data) - 1)))
            return kind, [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)],
                                                     strict=True)], True
        return kind, [], False

    def _control_payload(self, rng: random.Random) -> tuple[str, list[bytes], bool]:
        kind = rng.choice(["bytes", "json", "long", "partial", "raw"])
        if kind == "bytes":
            return kind, [rng.randbytes(rng.randrange(1, 3000)) + b"\n"], True
        if kind == "json":
            return kind, [_junk_json(rng) + b"\n"], True
        if kind == "long":
            return kind, [b"{" * rng.randrange(4000, 20000)], True
        if kind == "partial":
            return kind, [b'{"cmd": "sta'], False
        size = rng.choice(["-1", "1e999", '"x"', "0", "[]"])
        return kind, [f'{{"cmd": "raw", "owner": "nobody", "size": {size}}}\n'.encode()], True

    async def _worker(self, i: int, make: Callable[[random.Random], Awaitable[None]]) -> None:
        rng = random.Random(f"{self.seed}-{i}")  # each worker its own sequence of cases
        while time.monotonic() < self.deadline:
            await make(rng)

    async def tcp_case(self, rng: random.Random) -> None:
        kind, pieces, read = self._tcp_payload(rng)
        self._count(f"tcp {kind}")
        await self._case(socket.AF_INET, self.tcp, pieces, read=read, reset=rng.random() < 0.4)

    async def control_case(self, rng: random.Random) -> None:
        kind, pieces, read = self._control_payload(rng)
        self._count(f"control {kind}")
        await self._case(socket.AF_UNIX, self.control, pieces, read=read,
                         reset=rng.random() < 0.4)

    async def ucx_port_case(self, rng: random.Random) -> None:
        """Plain TCP at the UCX listener: its connection manager must shrug junk off. Not more
        than UCX_TCP_CM_PRIV_DATA_LEN (2 KiB) before a close, which UCX 1.21 does not survive
        (test_transport.test_ucx_port_junk_over_2k_then_close_leaks_in_ucx)."""
        self._count("ucx port bytes")
        data = rng.choice([rng.randbytes(rng.randrange(1, 2048)),
                           struct.pack("<Q", rng.getrandbits(64)) + rng.randbytes(64), b""])
        await self._case(socket.AF_INET, self.ucx, [data], read=False,
                         reset=rng.random() < 0.5)

    async def slow_loris(self, where: Any, family: int) -> None:
        """One byte every half second for the whole storm (never a whole message)."""
        self._count("slow loris")
        await self._case(family, where, [b"\0"] * int(STORM * 2), read=False, reset=False,
                         pause=0.5)

    async def flood(self) -> None:
        """1100 connections to the TCP server at once (over its cap of 1024), then gone."""
        socks = []
        try:
            for _ in range(1100):
                s = trio.socket.socket()
                socks.append(s)
                try:
                    await s.connect(self.tcp)
                except OSError:
                    break
            self._count("flood connections")
            self.counts["flood connections"] = len(socks)
        finally:
            for s in socks:
                s.close()

    async def run(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds
        async with trio.open_nursery() as n:
            for where, family in ((self.tcp, socket.AF_INET), (self.control, socket.AF_UNIX)):
                for _ in range(3):
                    n.start_soon(self.slow_loris, where, family)
            n.start_soon(self.flood)
            for i in range(PARALLEL):
                make = (self.tcp_case, self.control_case, self.ucx_port_case)[i % 3]
                n.start_soon(self._worker, i, make)


def ucx_actions(seed: int, count: int, secret: str, published: tuple[str, int]) -> list[Any]:
    """Seeded junk for a raw UCXX client (test_transport.ucx_peer), one endpoint per case."""
    rng = random.Random(seed)
    actions: list[Any] = []
    for i in range(count):
        actions.append(["connect"])
        kind = rng.choice(["oversized", "json", "raw", "abort", "silent", "secret"])
        if kind == "oversized":
            actions.append(["send_len", i, rng.choice([65537, 1 << 31, 2**64 - 1])])
        elif kind == "json":
            actions.append(["send_obj", i, _junk_json(rng).hex()])
            actions.append(["recv_obj", i, 2])
        elif kind == "raw":
            actions.append(["send_raw", i, rng.randbytes(rng.randrange(1, 200)).hex()])
        elif kind == "abort":
            actions.append(["send_len", i, rng.randrange(1, 1000)])
        elif kind == "secret":
            req = Request(NS, "wrong", published[0].encode(), published[1])
            actions.append(["send_obj", i, req.encode().hex()])
            actions.append(["recv_obj", i, 2])
        actions.append(["abort" if kind != "silent" or rng.random() < 0.5 else "close", i])
    return actions


def test_a_storm_at_every_port_leaves_the_mount_serving(tmp_path: Path, mounts: Mounts) -> None:
    seed = int(os.environ.get("DYADFS_FUZZ_SEED", random.SystemRandom().randrange(2**32)))
    print(f"fuzz seed {seed} (DYADFS_FUZZ_SEED={seed} replays it)")
    prod = mounts.mount(tmp_path / "p", "--role", "producer", "--namespace", NS,
                        "--transport", "ucx", "--listen", "127.0.0.1")
    cons = mounts.mount(tmp_path / "c", "--role", "consumer", "--namespace", NS,
                        "--transport", "ucx", "--wait-timeout", "60")
    (prod / "before").write_bytes(b"published before the storm")
    assert (cons / "before").read_bytes() == b"published before the storm"
    status = mounts.status(prod)
    pid, ucx = status["pid"], status["address"]
    secret = (kvs_get(mounts, NS, keys.SECRET) or b"").decode()
    key = keys.mount_key(status["mount_id"])
    rec = keys.MountRecord.decode(kvs_get(mounts, NS, key) or b"", key)
    infos = [json.loads(p.read_text()) for p in (mounts.state / "mounts").glob("*.json")]
    control = [i["socket"] for i in infos if i["dir"] == str(prod)][0]
    assert rec.tcp and ucx and control

    storm = Storm(seed, rec.tcp, ucx, control, secret, ("before", 1))
    t0 = time.monotonic()
    trio.run(storm.run, STORM)
    args = tmp_path / "ucx-peer.json"
    args.write_text(json.dumps([ucx, ucx_actions(seed, 1000, secret, ("before", 1)), STORM]))
    peer = subprocess.Popen(
        [sys.executable, "-X", "faulthandler", "-c",
         "import json, sys; import tests.test_transport as t; "
         "print('RESULT ' + json.dumps(t.ucx_peer(*json.load(open(sys.argv[1])))), "
         "flush=True)", str(args)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        cwd=Path(__file__).resolve().parent.parent)
    out, err = peer.communicate(timeout=120)
    elapsed = time.monotonic() - t0
    assert peer.returncode == 0, err[:6000]
    ucx_results = json.loads([ln for ln in out.splitlines() if ln.startswith("RESULT ")][-1][7:])
    outcomes = collections.Counter("an answer" if r.startswith("7b") else r  # '{...'
                                   for r in map(str, ucx_results))
    total = sum(storm.counts.values())
    print(f"{total} cases in {elapsed:.1f} s: {dict(sorted(storm.counts.items()))}; "
          f"raw UCX peer: {len(ucx_results)} actions: {dict(outcomes)}")
    assert total >= 2000 and len(ucx_results) >= 100, (storm.counts, len(ucx_results))

    # The same daemon still serves: a small file over TCP, a large one over UCX, and status.
    assert mounts.status(prod)["pid"] == pid
    small, large = os.urandom(5757), os.urandom(8 << 20)
    (prod / "after-small").write_bytes(small)
    (prod / "after-large").write_bytes(large)
    assert (cons / "after-small").read_bytes() == small
    assert (cons / "after-large").read_bytes() == large
    assert mounts.status(cons)["pulled"] == 3
    assert "refused fetch" in mounts.logs()

"""Versions never mix: rewrites while a consumer pulls or reads.

Issue "Correctness: a consumer reads exactly a published version", items 2, 9 and 14
(reproduced 2026-12-02): a rewrite (O_TRUNC) of a 32 MiB file under a UCX pull killed the owner's
daemon with SIGBUS and the producer's writes failed with ENOTCONN; a same-size rewrite in
progress, or a rewrite while a consumer streams a large file, could be served as old and new
bytes mixed; on shared storage a reader that opened a file before the producer rewrote it in
place read a mix of versions.

The rule (design.md): a consumer's open that succeeded reads exactly one published version, or
gets an errno (EIO, ESTALE); never a mix, never a short file; the owner keeps serving.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import CPrograms, Mounts, run, wait_for
from .helpers import (
    Lines,
    Read,
    crc_file,
    daemon_alive,
    finish,
    node_local,
    parse_reads,
    parse_versions,
    shared_pair,
)

pytestmark = pytest.mark.mounted
NS = "rw"
TRANSPORTS = ["ucx", "tcp", "local"]  # local: two mounts of one host (the default)
FAILS_OK = (errno.EIO, errno.ESTALE)
VERSIONS = 6


def _verdict(reads: list[Read], versions: set[tuple[int, int]],
             errnos: tuple[int, ...] = FAILS_OK) -> list[str]:
    """The reads that are neither one whole version nor an allowed errno."""
    bad = []
    for r in reads:
        if r.err:
            if r.err not in errnos:
                bad.append(r.describe() + " (an errno not allowed here)")
        elif (r.size, r.crc) not in versions:
            bad.append(r.describe() + " (no version written had these bytes: mixed or short)")
    return bad


def _pid_alive(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}")


# -- item 2 ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_rewrite_under_a_pull_keeps_the_owner_alive(tmp_path: Path, mounts: Mounts,
                                                     cprogs: CPrograms, spawn,  # type: ignore[no-untyped-def]
                                                     transport: str) -> None:
    """A producer rewrites (O_TRUNC) a 32 MiB file again and again, each time just after a
    consumer's open started pulling the previous version, which the consumer then reads. Every
    producer write succeeds, every read is one whole version or EIO/ESTALE, and the owner still
    serves afterwards (today, UCX: SIGBUS in the owner's daemon at the 2nd rewrite, then the
    producer's writes fail with ENOTCONN)."""
    prod, cons = node_local(mounts, tmp_path, NS, transport, wait_timeout=30,
                            cons_opts=("--fetch-timeout", "5"))
    owner = mounts.status(prod)["pid"]
    wr = spawn([cprogs.rewriter, str(prod / "big.bin"), str(VERSIONS), str(32 << 20), "0", "7",
                "-1"], stdin=subprocess.PIPE)
    producer = Lines(wr)
    versions: list[tuple[int, int]] = []
    reads: list[Read] = []
    for v in range(VERSIONS):
        try:
            parts = producer.next(what=f"version {v}").split()
        except AssertionError:  # the producer failed: said below
            break
        versions.append((int(parts[1]), int(parts[2], 16)))
        if v == VERSIONS - 1 or not _pid_alive(owner):
            break
        rd = spawn([cprogs.reader, "-p", "-b", str(1 << 20), str(cons / "big.bin")],
                   stdin=subprocess.PIPE)
        consumer = Lines(rd)
        first = consumer.next(what="the consumer's open")
        producer.send(b"go\n")  # the next rewrite truncates the file now, under the pull
        if first.startswith(b"opened"):
            consumer.send(b"go\n")
            reads += parse_reads(b"\n".join(consumer.rest(timeout=90)))
        else:
            reads += parse_reads(first)
    if wr.poll() is None:
        producer.send(b"go\n")
    w_rest = producer.rest(timeout=60)
    w_err = producer.stderr()
    assert wr.returncode == 0 and len(versions) == VERSIONS, \
        f"a producer write failed after {len(versions)} versions: {w_err} {w_rest}; the " \
        f"owner's daemon is {'alive' if _pid_alive(owner) else 'dead'}"
    assert _pid_alive(owner), "the owner's daemon died during the rewrites (see its log)"
    bad = _verdict(reads, set(versions))
    assert not bad, f"{len(bad)} of {len(reads)} reads wrong:\n" + "\n".join(bad[:10])
    assert daemon_alive(mounts, prod)
    # the owner still serves: the last version, and a new file
    last = parse_reads(run([cprogs.reader, str(cons / "big.bin")], check=False).stdout)
    assert [(r.size, r.crc, r.err) for r in last] == [(*versions[-1], 0)]
    (prod / "after.txt").write_bytes(b"still serving\n")
    assert (cons / "after.txt").read_bytes() == b"still serving\n"


# -- item 9 ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_same_size_rewrite_in_progress_is_never_served_mixed(
        tmp_path: Path, mounts: Mounts, cprogs: CPrograms, spawn,  # type: ignore[no-untyped-def]
        transport: str) -> None:
    """The producer holds the file open read-write and overwrites it in place, a quarter at a
    time, not closed yet; a consumer that opens it then must read exactly v1 (or wait and read
    exactly v2), never v1 with some v2 bytes in it."""
    prod, cons = node_local(mounts, tmp_path, NS, transport, wait_timeout=30)
    size = 4 << 20
    v1 = parse_versions(run([cprogs.rewriter, str(prod / "f.bin"), "1", str(size), "0",
                             "1"]).stdout)[0]
    inplace = spawn([cprogs.inplace, str(prod / "f.bin"), "2", str(size // 4)],
                    stdin=subprocess.PIPE)
    lines = Lines(inplace)
    head = lines.next(what="the size line").split()
    v2 = (int(head[1]), int(head[3], 16))
    assert lines.next(what="the first chunk") == b"wrote 0"
    reader = spawn([cprogs.reader, str(cons / "f.bin")])  # the first open there: a pull
    wait_for(lambda: reader.poll() is not None or mounts.status(cons)["waiting"] == 1, 30,
             "the consumer's open to read or to wait")
    lines.send(b"go\n")
    assert lines.next(what="the second chunk") == b"wrote %d" % (size // 4)
    lines.send(b"end\n")
    assert lines.rest() == [b"closed"] and inplace.returncode == 0
    out, _ = finish(reader, 60, "the consumer's reader")
    got = parse_reads(out)
    bad = _verdict(got, {v1, v2}, errnos=())
    assert got and not bad, f"v1 {v1}, v2 {v2}: " + "; ".join(bad)
    # closed: the next open reads v2
    again = parse_reads(run([cprogs.reader, str(cons / "f.bin")], check=False).stdout)
    assert [(r.size, r.crc, r.err) for r in again] == [(*v2, 0)]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_rewrite_while_a_consumer_streams_a_large_file(tmp_path: Path, mounts: Mounts,
                                                       cprogs: CPrograms, spawn,  # type: ignore[no-untyped-def]
                                                       transport: str) -> None:
    """A 64 MiB file is rewritten (O_TRUNC, new bytes) just after a consumer's open started
    streaming it: that reader gets one whole version or an errno; the next open gets v2."""
    prod, cons = node_local(mounts, tmp_path, NS, transport, wait_timeout=30,
                            cons_opts=("--fetch-timeout", "5"))
    size = 64 << 20
    bad: list[str] = []
    for rnd in range(2):
        name = f"stream{rnd}.bin"
        v1 = parse_versions(run([cprogs.rewriter, str(prod / name), "1", str(size), "0",
                                 str(10 + rnd)]).stdout)[0]
        reader = spawn([cprogs.reader, "-p", "-b", str(1 << 20), str(cons / name)],
                       stdin=subprocess.PIPE)
        lines = Lines(reader)
        assert lines.next(what="the open").startswith(b"opened")  # the pull is under way
        v2 = parse_versions(run([cprogs.rewriter, str(prod / name), "1", str(size), "0",
                                 str(20 + rnd)], timeout=120).stdout)[0]
        lines.send(b"go\n")
        got = parse_reads(b"\n".join(lines.rest(timeout=120)))
        bad += _verdict(got, {v1, v2})
        again = parse_reads(run([cprogs.reader, str(cons / name)], check=False,
                                timeout=120).stdout)
        if [(r.size, r.crc, r.err) for r in again] != [(*v2, 0)]:
            bad.append(f"the open after the rewrite: {[r.describe() for r in again]}, "
                       f"want v2 {v2}")
    assert not bad, "\n".join(bad)
    assert daemon_alive(mounts, prod)


# -- item 14: shared storage ----------------------------------------------------------------------
@pytest.mark.parametrize("how", ["truncate", "inplace"])
def test_shared_reader_never_sees_a_later_version(tmp_path: Path, mounts: Mounts,
                                                  cprogs: CPrograms, spawn,  # type: ignore[no-untyped-def]
                                                  how: str) -> None:
    """Shared storage: a reader opens v1; then the producer rewrites the file (O_TRUNC, or in
    place with the same size) and closes it; then the reader reads. It must get v1 whole, or
    an errno (EIO/ESTALE): never v2's bytes, a mix, or a short file."""
    prod, cons, _ = shared_pair(mounts, tmp_path, NS)
    size = 8 << 20
    v1 = parse_versions(run([cprogs.rewriter, str(prod / "s.bin"), "1", str(size), "0",
                             "1"]).stdout)[0]
    reader = spawn([cprogs.reader, "-p", "-b", str(1 << 20), str(cons / "s.bin")],
                   stdin=subprocess.PIPE)
    lines = Lines(reader)
    assert lines.next(what="the open").startswith(b"opened")
    if how == "truncate":
        run([cprogs.rewriter, str(prod / "s.bin"), "1", str(size), "0", "2"])
    else:
        run([cprogs.inplace, str(prod / "s.bin"), "2", str(1 << 20)], input=b"end\n")
    lines.send(b"go\n")
    got = parse_reads(b"\n".join(lines.rest()))
    bad = _verdict(got, {v1})
    assert got and not bad, f"v1 {v1}: " + "; ".join(bad)


def test_shared_h5py_reader_never_sees_a_later_version(tmp_path: Path, mounts: Mounts,
                                                       spawn) -> None:  # type: ignore[no-untyped-def]
    """The same with h5py: a reader reads half a dataset, the producer rewrites it in place
    (h5py 'r+') and closes, the reader reads the other half: all of v1, or an OSError."""
    pytest.importorskip("h5py")
    prod, cons, _ = shared_pair(mounts, tmp_path, NS)
    make = ("import h5py, numpy as np, sys\n"
            "with h5py.File(sys.argv[1], sys.argv[2]) as f:\n"
            "    v = float(sys.argv[3])\n"
            "    if sys.argv[2] == 'w': f.create_dataset('x', data=np.full(1 << 20, v))\n"
            "    else: f['x'][:] = np.full(1 << 20, v)\n")
    run([sys.executable, "-c", make, str(prod / "d.h5"), "w", "1"])
    reader = spawn([sys.executable, "-c", """
import sys, h5py, numpy as np
try:
    f = h5py.File(sys.argv[1], 'r')
    first = f['x'][: 1 << 19]
    print('half', flush=True)
    sys.stdin.readline()
    second = f['x'][1 << 19:]
    print('values', sorted(set(np.concatenate([first, second]).tolist())), flush=True)
except OSError as e:
    print('oserror', e, flush=True)
""", str(cons / "d.h5")], stdin=subprocess.PIPE)
    lines = Lines(reader)
    assert lines.next(what="the first half") == b"half"
    run([sys.executable, "-c", make, str(prod / "d.h5"), "r+", "2"])
    lines.send(b"go\n")
    last = lines.next(what="the result")
    assert last == b"values [1.0]" or last.startswith(b"oserror"), last


@pytest.mark.parametrize("how", ["rdwr", "trunc"])
def test_shared_open_waits_while_the_producer_writes(tmp_path: Path, mounts: Mounts,
                                                     cprogs: CPrograms, spawn,  # type: ignore[no-untyped-def]
                                                     how: str) -> None:
    """Shared storage: while the producer has a published file open for writing (a rewrite in
    progress, "writing" in the KVS), a consumer's open waits, then reads the new version."""
    prod, cons, _ = shared_pair(mounts, tmp_path, NS)
    (prod / "w.bin").write_bytes(b"1" * 100_000)
    writer = spawn([sys.executable, "-c", f"""
import sys
f = open({str(prod / 'w.bin')!r}, {'r+b' if how == 'rdwr' else 'wb'!r}, buffering=0)
f.write(b'2' * 50_000)
print('half', flush=True)
sys.stdin.readline()
f.write(b'2' * 50_000)
f.close()
print('closed', flush=True)
"""], stdin=subprocess.PIPE)
    lines = Lines(writer)
    assert lines.next(what="the first half") == b"half"
    reader = spawn([cprogs.reader, str(cons / "w.bin")])
    wait_for(lambda: reader.poll() is not None or mounts.status(cons)["waiting"] == 1, 30,
             "the consumer's open to wait or to end")
    early = reader.poll() is not None
    lines.send(b"go\n")
    assert lines.next(what="the close") == b"closed"
    out, _ = finish(reader, 60, "the consumer's reader")
    got = [(r.size, r.crc, r.err) for r in parse_reads(out)]
    assert not early, f"the open did not wait for the writer's close: it read {got}"
    assert got == [(100_000, crc_file(prod / "w.bin")[1], 0)]

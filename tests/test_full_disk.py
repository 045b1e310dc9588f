"""Full disks: a pull that does not fit, and a producer whose writes fail.

Issue "Correctness: a consumer reads exactly a published version", items 3 and 4 (reproduced
2026-12-02): a consumer whose disk filled during a pull: UCX killed the daemon with SIGBUS and
left a 200 MiB temporary file, TCP never ended; a producer whose writes failed with ENOSPC
published what it managed (a partial file, or an empty one for a new file).

design.md: "a write failed (ENOSPC, EIO) ... not published"; "a full disk ... cost that request
an errno; the mount keeps serving everyone else". The small disks are tmpfs mounts (root only).
"""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import pytest

from dyadfs.keys import FileRecord

from .conftest import CPrograms, Mounts, kvs_get, run
from .helpers import (
    LOOPBACK,
    crc_file,
    daemon_alive,
    finish,
    parse_reads,
    parse_versions,
)

pytestmark = pytest.mark.mounted
NS = "full"
TRANSPORTS = ["ucx", "tcp", "local"]  # local: two mounts of one host (the default)


def record(mounts: Mounts, rel: str) -> FileRecord | None:
    raw = kvs_get(mounts, NS, "files/" + rel)
    return None if raw is None else FileRecord.decode(raw, rel)


def _files_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if not p.is_dir()) \
        if path.exists() else []


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_consumer_disk_fills_during_a_pull(tmp_path: Path, mounts: Mounts, tmpfs,  # type: ignore[no-untyped-def]
                                           cprogs: CPrograms, spawn, transport: str) -> None:
    """The consumer's storage is a 64 MiB tmpfs and the file is 200 MiB: the reader gets
    ENOSPC or EIO within 60 s, the mount stays up, no temporary file is left, and a small file
    still pulls (today: UCX, SIGBUS in the daemon and a 200 MiB temporary file left; TCP, the
    reader never ends)."""
    small = tmpfs(tmp_path / "cons.backing", "64m")
    prod = mounts.mount(tmp_path / "prod", "--role", "producer", "--namespace", NS,
                        "--transport", transport, *LOOPBACK)
    cons = mounts.mount(tmp_path / "cons", "--role", "consumer", "--namespace", NS,
                        "--transport", transport, *LOOPBACK, "--backing", str(small),
                        "--wait-timeout", "30", "--fetch-timeout", "10")
    run([cprogs.rewriter, str(prod / "big.bin"), "1", str(200 << 20), "0", "1"], timeout=120)
    t0 = time.monotonic()
    reader = spawn([cprogs.reader, "-b", str(1 << 20), str(cons / "big.bin")])
    out, err = finish(reader, 60, "a read of a 200 MiB file into a 64 MiB disk")
    took = time.monotonic() - t0
    got = parse_reads(out)
    assert len(got) == 1 and got[0].err in (errno.ENOSPC, errno.EIO), \
        f"want ENOSPC or EIO, got {[r.describe() for r in got]} {err.decode()}"
    assert took < 60
    assert daemon_alive(mounts, cons), "the consumer's mount died"
    assert _files_under(small / ".dyadfs" / "tmp") == [], "a temporary file was left"
    (prod / "small.txt").write_bytes(b"fits\n" * 1000)
    assert (cons / "small.txt").read_bytes() == b"fits\n" * 1000


def test_failed_writes_are_not_published(tmp_path: Path, mounts: Mounts, tmpfs,  # type: ignore[no-untyped-def]
                                         cprogs: CPrograms) -> None:
    """The producer's storage is a 16 MiB tmpfs. A 32 MiB dd fails with ENOSPC: what it wrote
    is not published and a consumer never reads it as a file (today: published, and the
    consumer reads 15 MiB "OK"). A rewrite that fails: the consumer reads the version it had
    or gets an errno, never the partial rewrite. A new file whose first write fails is not
    published (today: an empty file is)."""
    small = tmpfs(tmp_path / "prod.backing", "16m")
    prod = mounts.mount(tmp_path / "prod", "--role", "producer", "--namespace", NS,
                        "--transport", "tcp", *LOOPBACK, "--backing", str(small))
    cons = mounts.mount(tmp_path / "cons", "--role", "consumer", "--namespace", NS,
                        "--transport", "tcp", *LOOPBACK, "--wait-timeout", "3")
    v1 = parse_versions(run([cprogs.rewriter, str(prod / "old.bin"), "1", str(1 << 20), "0",
                             "1"]).stdout)[0]
    assert crc_file(cons / "old.bin") == v1  # the consumer holds v1

    r = run(["dd", "if=/dev/zero", f"of={prod}/partial.bin", "bs=1M", "count=32"], check=False)
    assert r.returncode != 0 and b"No space left" in r.stderr, r.stderr
    problems = []
    rec = record(mounts, "partial.bin")
    if rec is not None and rec.complete:
        problems.append(f"partial.bin published after a failed write: {rec}")
    got = parse_reads(run([cprogs.reader, str(cons / "partial.bin")], check=False).stdout)
    if not got or got[0].err == 0:
        problems.append(f"the consumer read partial.bin: {[g.describe() for g in got]}")

    r = run(["dd", "if=/dev/urandom", f"of={prod}/old.bin", "bs=1M", "count=32"], check=False)
    assert r.returncode != 0 and b"No space left" in r.stderr, r.stderr
    got = parse_reads(run([cprogs.reader, str(cons / "old.bin")], check=False).stdout)
    if not got or (got[0].err == 0 and (got[0].size, got[0].crc) != v1):
        problems.append(f"after a failed rewrite the consumer read old.bin as "
                        f"{[g.describe() for g in got]}, not v1 {v1} nor an errno")

    (small / "filler").write_bytes(b"")  # the disk is full now: even a first write fails
    with open(small / "filler", "ab") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC
    fd = os.open(prod / "new.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        with pytest.raises(OSError) as e:
            os.write(fd, os.urandom(65536))
        assert e.value.errno == errno.ENOSPC
    finally:
        os.close(fd)
    got = parse_reads(run([cprogs.reader, str(cons / "new.bin")], check=False).stdout)
    if not got or got[0].err == 0:  # the wait (3 s) outlasts a publication at release
        problems.append(f"the consumer read new.bin: {[g.describe() for g in got]}")
    rec = record(mounts, "new.bin")
    if rec is not None:
        problems.append(f"new.bin published after its only write failed: {rec}")
    assert not problems, "\n".join(problems)
    assert daemon_alive(mounts, prod)

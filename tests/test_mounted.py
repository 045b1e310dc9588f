"""One test per row of design.md's semantics table, on real mounts, with unmodified programs."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dyadfs.keys import FileRecord

from .conftest import Mounts, both_kvs, dyadfs_cmd, kvs_get, run, wait_for

pytestmark = pytest.mark.mounted
NS = "t"


@pytest.fixture(params=["local", pytest.param("flux", marks=pytest.mark.flux)])
def kvs_backend(request: pytest.FixtureRequest) -> str:
    return both_kvs(request)


def record(mounts: Mounts, rel: str, ns: str = NS) -> FileRecord | None:
    raw = kvs_get(mounts, ns, "files/" + rel)
    return None if raw is None else FileRecord.decode(raw, rel)


@pytest.fixture
def shared(tmp_path: Path, mounts: Mounts) -> tuple[Path, Path, Path]:
    """Two mounts (two 'nodes') over one backing directory: a producer and a consumer."""
    backing = tmp_path / "backing"
    backing.mkdir()
    prod = mounts.mount(tmp_path / "prod", "--role", "producer", "--shared-storage",
                        "--backing", str(backing), "--namespace", NS)
    cons = mounts.mount(tmp_path / "cons", "--role", "consumer", "--shared-storage",
                        "--backing", str(backing), "--namespace", NS, "--wait-timeout", "30")
    return prod, cons, backing


@pytest.fixture
def local_pair(tmp_path: Path, mounts: Mounts) -> tuple[Path, Path]:
    """A producer and a consumer with their own storage (node-local)."""
    prod = mounts.mount(tmp_path / "prod", "--role", "producer", "--namespace", NS,
                        "--transport", "tcp")
    cons = mounts.mount(tmp_path / "cons", "--role", "consumer", "--namespace", NS,
                        "--wait-timeout", "30", "--transport", "tcp")
    return prod, cons


def start(cmd: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(cmd, shell=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def waiting(mounts: Mounts, mp: Path, n: int) -> None:
    wait_for(lambda: mounts.status(mp)["waiting"] == n, 20, f"{n} waiting opens on {mp}")


# -- create, write, close ----------------------------------------------------------------------
def test_close_publishes_before_it_returns(tmp_path: Path, mounts: Mounts) -> None:
    mp = mounts.mount(tmp_path / "m", "--role", "producer", "--namespace", NS)
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(100_000))
    run(["cp", str(src), str(mp / "a.bin")])
    rec = record(mounts, "a.bin")  # no waiting: cp has returned, so close() has
    assert rec is not None and rec.complete and rec.size == 100_000
    run(["mkdir", "-p", str(mp / "group0")])
    run([sys.executable, "-c", f"open({str(mp / 'group0/f.dat')!r}, 'wb').write(b'x' * 5757)"])
    rec = record(mounts, "group0/f.dat")
    assert rec is not None and rec.size == 5757
    assert (tmp_path / "m" / "a.bin").read_bytes() == src.read_bytes()
    assert mounts.status(mp)["published"] >= 2


def test_rewrite_truncate_append_publish_new_versions(tmp_path: Path, mounts: Mounts) -> None:
    mp = mounts.mount(tmp_path / "m", "--role", "producer", "--namespace", NS)
    run(f"printf 'abc' > {mp}/f")
    v1 = record(mounts, "f")
    run(f"printf 'defg' >> {mp}/f")  # append
    v2 = record(mounts, "f")
    run(["truncate", "-s", "2", str(mp / "f")])  # truncate without an open handle
    v3 = record(mounts, "f")
    run(["dd", f"of={mp}/f", "bs=1", "seek=1", "conv=notrunc", "status=none"], input=b"Z")
    v4 = record(mounts, "f")
    run([sys.executable, "-c", f"f = open({str(mp / 'f')!r}, 'r+b'); f.seek(2); f.write(b'!'); "
         "f.close()"])
    v5 = record(mounts, "f")
    recs = [v1, v2, v3, v4, v5]
    assert all(r is not None and r.complete for r in recs)
    assert [r.size for r in recs] == [3, 7, 2, 2, 3]  # type: ignore[union-attr]
    assert len({r.version for r in recs}) == 5  # type: ignore[union-attr]
    assert (mp / "f").read_bytes() == b"aZ!"


def test_unlink_and_rename_follow(tmp_path: Path, mounts: Mounts) -> None:
    mp = mounts.mount(tmp_path / "m", "--role", "producer", "--namespace", NS)
    run(f"mkdir {mp}/d && echo one > {mp}/d/a && echo two > {mp}/b")
    run(["mv", str(mp / "b"), str(mp / "c")])
    assert record(mounts, "b") is None and record(mounts, "c").size == 4  # type: ignore[union-attr]
    run(["mv", str(mp / "d"), str(mp / "e")])  # a directory: its tree moves
    assert record(mounts, "d/a") is None and record(mounts, "e/a") is not None
    run(["mv", str(mp / "c"), str(mp / "e/a")])  # over an existing published file
    assert record(mounts, "c") is None and record(mounts, "e/a").size == 4  # type: ignore[union-attr]
    run(["rm", str(mp / "e/a")])
    assert record(mounts, "e/a") is None
    assert not (tmp_path / "m" / "e" / "a").exists()


# -- open for read ----------------------------------------------------------------------------
def test_open_of_present_file_reads_locally(shared: tuple[Path, Path, Path],
                                            mounts: Mounts) -> None:
    prod, cons, backing = shared
    (backing / "input.txt").write_bytes(b"pre-existing input\n")  # not produced through dyadfs
    assert run(["cat", str(cons / "input.txt")]).stdout == b"pre-existing input\n"
    run(f"echo made > {prod}/made.txt")
    assert run(["cat", str(cons / "made.txt")]).stdout == b"made\n"
    assert mounts.status(cons)["waits_done"] == 0


def test_open_of_unpublished_file_waits_for_it(shared: tuple[Path, Path, Path],
                                                mounts: Mounts, tmp_path: Path) -> None:
    prod, cons, _ = shared
    data = os.urandom(300_000)
    (tmp_path / "src").write_bytes(data)
    reader = start(f"cat {cons}/late.bin")
    waiting(mounts, cons, 1)
    assert reader.poll() is None
    run(["cp", str(tmp_path / "src"), str(prod / "late.bin")])
    out, err = reader.communicate(timeout=30)
    assert reader.returncode == 0, err
    assert out == data


def test_consumer_never_sees_a_partly_written_file(shared: tuple[Path, Path, Path],
                                                    mounts: Mounts) -> None:
    prod, cons, _ = shared
    writer = subprocess.Popen([sys.executable, "-c", f"""
import sys, time
f = open({str(prod / 'slow.bin')!r}, 'wb')
f.write(b'a' * 4096); f.flush()
print('half', flush=True)
sys.stdin.readline()
f.write(b'b' * 4096); f.close()
"""], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert writer.stdout is not None and writer.stdin is not None
    assert writer.stdout.readline() == b"half\n"
    reader = start(f"cat {cons}/slow.bin")
    waiting(mounts, cons, 1)  # the file exists in the backing, half written: the open waits
    writer.stdin.write(b"go\n")
    writer.stdin.close()
    writer.wait(timeout=30)
    out, _ = reader.communicate(timeout=30)
    assert out == b"a" * 4096 + b"b" * 4096


def test_wait_timeout_fails_with_etimedout(tmp_path: Path, mounts: Mounts) -> None:
    cons = mounts.mount(tmp_path / "c", "--role", "consumer", "--namespace", NS,
                        "--wait-timeout", "1")
    r = run([sys.executable, "-c", f"open({str(cons / 'never')!r}, 'rb')"], check=False)
    assert r.returncode != 0 and b"TimeoutError" in r.stderr and b"timed out" in r.stderr
    wait_for(lambda: "not published after 1.0 s" in mounts.logs(), 10, "the log line")
    assert mounts.logs().count("not published after") == 1
    assert mounts.status(cons)["wait_timeouts"] == 1
    with pytest.raises(OSError) as e:
        os.stat(cons / "never")
    assert e.value.errno == errno.ENOENT  # the failed open left no entry behind


def test_creators_never_wait(tmp_path: Path, mounts: Mounts) -> None:
    mp = mounts.mount(tmp_path / "m", "--role", "both", "--namespace", NS)  # both waits on reads
    t0 = time.monotonic()
    run(["touch", str(mp / "t")])
    run(["mkdir", str(mp / "d")])
    run(["mkdir", "-p", str(mp / "x/y/z")])
    run([sys.executable, "-c", f"open({str(mp / 'w')!r}, 'w').write('w')"])
    run(["cp", str(mp / "w"), str(mp / "d/w2")])
    run(["mv", str(mp / "w"), str(mp / "renamed")])
    run(["ln", "-s", "renamed", str(mp / "link")])
    run(["ln", str(mp / "renamed"), str(mp / "hard")])
    run(f"echo x >> {mp}/appended")
    assert time.monotonic() - t0 < 20  # generous; a wait would last forever (no timeout)
    assert (mp / "renamed").read_text() == "w" and (mp / "link").read_text() == "w"
    assert record(mounts, "d/w2") is not None and record(mounts, "hard") is not None


def test_producer_probe_for_restart_file_is_enoent(tmp_path: Path, mounts: Mounts) -> None:
    prod = mounts.mount(tmp_path / "p", "--role", "producer", "--namespace", NS)
    other = mounts.mount(tmp_path / "o", "--role", "producer", "--namespace", NS)
    run(f"echo x > {other}/restart.chk")  # published by another mount: a producer ignores it
    for path in ("restart.chk", "nothing.chk"):
        r = run([sys.executable, "-c", f"open({str(prod / path)!r})"], check=False, timeout=10)
        assert b"FileNotFoundError" in r.stderr


def test_stat_of_missing_name_is_enoent_at_once(tmp_path: Path, mounts: Mounts) -> None:
    cons = mounts.mount(tmp_path / "c", "--role", "consumer", "--namespace", NS)
    for cmd in (["stat", str(cons / "nope")], ["test", "-e", str(cons / "nope")],
                [sys.executable, "-c", f"import os,sys; sys.exit(os.path.exists("
                                       f"{str(cons / 'nope')!r}))"],
                ["ls", str(cons / "nope")]):
        r = run(cmd, check=False, timeout=10)  # no timeout configured: a wait would hang
        assert r.returncode != 0 or cmd[0] == sys.executable


def test_wait_on_stat_makes_stat_wait(tmp_path: Path, mounts: Mounts) -> None:
    prod = mounts.mount(tmp_path / "p", "--role", "producer", "--namespace", NS)
    cons = mounts.mount(tmp_path / "c", "--role", "consumer", "--namespace", NS,
                        "--wait-on-stat", "--transport", "tcp")
    stat = start(f"stat -c %s {cons}/later")
    waiting(mounts, cons, 1)
    run(f"printf 12345 > {prod}/later")
    out, _ = stat.communicate(timeout=30)
    assert out.strip() == b"5"


def test_listings_show_dot_and_dotdot_like_a_plain_directory(tmp_path: Path,
                                                            mounts: Mounts) -> None:
    """`ls -a` (and every readdir(3) loop in C) sees "." and ".." in a directory of a producer
    or consumer mount, as in a plain one, with the inode numbers stat gives."""
    prod = mounts.mount(tmp_path / "p", "--role", "producer", "--namespace", NS)
    cons = mounts.mount(tmp_path / "c", "--role", "consumer", "--namespace", NS,
                        "--transport", "tcp")
    plain = tmp_path / "plain"
    plain.mkdir()
    for d in (prod, plain):
        run(f"mkdir -p {d}/sub/deeper && printf x > {d}/sub/a && printf y > {d}/b")
    for sub in ("", "sub", "sub/deeper"):
        want = run(["ls", "-a", str(plain / sub)]).stdout.split()
        assert run(["ls", "-a", str(prod / sub)]).stdout.split() == want, sub
        assert run(["ls", "-a", str(cons / sub)]).stdout.split() == want, sub
    for mp in (prod, cons):
        listed = dict(reversed(line.split()) for line in
                      run(["ls", "-ai", str(mp / "sub")]).stdout.decode().splitlines())
        ino = {p: run(["stat", "-c", "%i", str(p)]).stdout.strip().decode()
               for p in (mp, mp / "sub", mp / "sub/a")}
        assert (listed["."], listed[".."], listed["a"]) == \
            (ino[mp / "sub"], ino[mp], ino[mp / "sub/a"]), (listed, ino)


def test_a_waiting_stat_never_freezes_its_directory(tmp_path: Path, mounts: Mounts) -> None:
    """A stat waiting under --wait-on-stat waits in GETATTR, not in the LOOKUP: the kernel holds
    a directory's lock during a LOOKUP (libfuse 3.14 does not pass on FUSE_PARALLEL_DIROPS), so
    a stat waiting there froze ``ls`` and every other name of that directory, unkillably."""
    prod = mounts.mount(tmp_path / "p", "--role", "producer", "--namespace", NS)
    cons = mounts.mount(tmp_path / "c", "--role", "consumer", "--namespace", NS,
                        "--wait-on-stat", "*.wait", "--transport", "tcp")
    run(f"mkdir {prod}/d && printf here > {prod}/d/here.dat")
    assert run(["cat", str(cons / "d/here.dat")]).stdout == b"here"
    stats = [start(f"stat -c '%s %F' {cons}/d/late{i}.wait") for i in range(4)]
    waiting(mounts, cons, 4)
    for cmd in (["ls", str(cons / "d")], ["stat", str(cons / "d/here.dat")],
                ["cat", str(cons / "d/here.dat")], ["stat", str(cons / "d/nope")]):
        r = run(cmd, check=False, timeout=5)  # froze until the stats ended before
        assert r.returncode == (1 if cmd[-1].endswith("nope") else 0), (cmd, r.stderr)
    assert all(p.poll() is None for p in stats)  # still waiting
    run(f"printf 12345 > {prod}/d/late0.wait && printf 1 > {prod}/d/late1.wait")
    run(f"mkdir {prod}/d/late2.wait")  # published as a directory: the stat shows one
    # made here, by the consumer (renamed into place, so that the stat sees it whole; a plain
    # create would end the stat at the create, with 0 bytes): its stat ends too
    run(f"printf abc > {cons}/d/made && mv {cons}/d/made {cons}/d/late3.wait")
    outs = [p.communicate(timeout=30) for p in stats]
    shown = [o.split(maxsplit=1) for o, _ in outs]
    assert [s[0] for s in shown[:2]] == [b"5", b"1"] and shown[2][1].strip() == b"directory", outs
    assert shown[3][0] == b"3", outs
    assert run(["stat", "-c", "%F", str(cons / "d/late2.wait")]).stdout.strip() == b"directory"
    assert run(["cat", str(cons / "d/late0.wait")]).stdout == b"12345"


def test_stat_and_ls_of_published_files_without_pulling(local_pair: tuple[Path, Path],
                                                         mounts: Mounts, tmp_path: Path) -> None:
    prod, cons = local_pair
    run(f"mkdir -p {prod}/group0 && head -c 5757 /dev/urandom > {prod}/group0/f0.dat")
    run(f"chmod 640 {prod}/group0/f0.dat")
    assert run(["ls", str(cons)]).stdout.split() == [b"group0"]  # a directory that appeared
    assert run(["ls", str(cons / "group0")]).stdout.split() == [b"f0.dat"]
    out = run(["stat", "-c", "%s %a %F", str(cons / "group0/f0.dat")]).stdout
    assert out.split() == [b"5757", b"640", b"regular", b"file"]
    assert mounts.status(cons)["pulled"] == 0


def test_missing_directory_on_consumer_is_waited_through(shared: tuple[Path, Path, Path],
                                                          mounts: Mounts) -> None:
    prod, cons, _ = shared
    reader = start(f"cat {cons}/group7/a4md_chunk0.dat")  # group7 exists nowhere yet
    waiting(mounts, cons, 1)
    run(f"mkdir {prod}/group7 && printf frame > {prod}/group7/a4md_chunk0.dat")
    out, err = reader.communicate(timeout=30)
    assert out == b"frame", err


def test_killed_waiter_leaks_nothing(shared: tuple[Path, Path, Path], mounts: Mounts) -> None:
    prod, cons, _ = shared
    reader = start(f"exec cat {cons}/never.bin")
    waiting(mounts, cons, 1)
    reader.send_signal(signal.SIGKILL)
    reader.wait(timeout=10)
    waiting(mounts, cons, 0)
    run(f"echo later > {prod}/never.bin")  # the mount is still fine afterwards
    assert run(["cat", str(cons / "never.bin")]).stdout == b"later\n"


def test_consumer_writes_stay_local(shared: tuple[Path, Path, Path], mounts: Mounts) -> None:
    _, cons, backing = shared
    run(f"echo scratch > {cons}/index.tmp")
    assert (backing / "index.tmp").read_text() == "scratch\n"
    assert record(mounts, "index.tmp") is None
    assert mounts.status(cons)["published"] == 0


# -- odd files ----------------------------------------------------------------------------------
def test_zero_byte_large_sparse_and_odd_names(shared: tuple[Path, Path, Path],
                                              mounts: Mounts) -> None:
    prod, cons, backing = shared
    run(["touch", str(prod / "empty")])
    # an empty new file is published at release, which may come just after close() returns
    wait_for(lambda: record(mounts, "empty") is not None, 10, "the empty file's publication")
    assert record(mounts, "empty").size == 0  # type: ignore[union-attr]
    assert run(["cat", str(cons / "empty")]).stdout == b""
    big = prod / "big.sparse"
    run(["truncate", "-s", "6G", str(big)])  # larger than any buffer; sparse on the backing
    run(["dd", "if=/dev/urandom", f"of={big}", "bs=1M", "count=1", "seek=5000",
         "conv=notrunc", "status=none"])
    assert record(mounts, "big.sparse").size == 6 << 30  # type: ignore[union-attr]
    tail = run(["dd", f"if={cons}/big.sparse", "bs=1M", "skip=5000", "count=1",
                "status=none"]).stdout
    assert tail == (backing / "big.sparse").open("rb").read(0) or len(tail) == 1 << 20
    with open(backing / "big.sparse", "rb") as f:
        f.seek(5000 << 20)
        assert f.read(1 << 20) == tail
    odd = b"\xff\xfe odd\nname \x01"
    path = os.path.join(os.fsencode(str(prod)), odd)
    with open(path, "wb") as f:
        f.write(b"odd")
    assert record(mounts, odd.decode("utf-8", "surrogateescape")) is not None
    with open(os.path.join(os.fsencode(str(cons)), odd), "rb") as f:
        assert f.read() == b"odd"
    assert odd in os.listdir(os.fsencode(str(cons)))


def test_direct_io_does_not_kill_the_mount(tmp_path: Path, mounts: Mounts) -> None:
    mp = mounts.mount(tmp_path / "m", "--namespace", NS)
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(8 * 4096))
    run(["dd", f"if={src}", f"of={mp}/d.bin", "bs=4096", "oflag=direct", "status=none"])
    assert run(["dd", f"if={mp}/d.bin", "bs=4096", "iflag=direct", "status=none"]).stdout == \
        src.read_bytes()
    # a misaligned O_DIRECT read fails on the backing (EINVAL): an error, not a dead mount
    run(["dd", f"if={mp}/d.bin", "of=/dev/null", "bs=1000", "iflag=direct", "status=none"],
        check=False)
    assert run(["cat", str(mp / "d.bin")]).stdout == src.read_bytes()
    assert mounts.status(mp)["unexpected_errors"] == 0


@pytest.mark.parametrize("role", ["producer", "consumer"])
def test_readers_see_writes_of_other_descriptors(tmp_path: Path, mounts: Mounts,
                                                 role: str) -> None:
    """Write-only descriptors bypass the page cache (direct I/O): a reader holding the file
    open must still see every write at once, as on a plain directory (tail -f of a log)."""
    mp = mounts.mount(tmp_path / "m", "--role", role, "--namespace", NS)
    path = mp / "log.txt"
    path.write_bytes(b"head\n")
    reader = os.open(path, os.O_RDONLY)
    try:
        assert os.read(reader, 100) == b"head\n"  # its pages are now in the kernel's cache
        with open(path, "ab") as f:  # O_WRONLY | O_APPEND
            f.write(b"tail\n")
        assert os.pread(reader, 100, 0) == b"head\ntail\n"
        w = os.open(path, os.O_WRONLY)
        try:
            os.pwrite(w, b"HEAD", 0)
        finally:
            os.close(w)
        assert os.pread(reader, 100, 0) == b"HEAD\ntail\n"
        follower = subprocess.Popen(["tail", "-f", "-n", "+1", str(path)],
                                    stdout=subprocess.PIPE)
        try:
            assert follower.stdout is not None
            assert follower.stdout.readline() == b"HEAD\n"
            assert follower.stdout.readline() == b"tail\n"
            with open(path, "ab") as f:
                f.write(b"more\n")
            assert follower.stdout.readline() == b"more\n"
        finally:
            follower.kill()
            follower.wait()
    finally:
        os.close(reader)
    assert (tmp_path / "m" / "log.txt").read_bytes() == b"HEAD\ntail\nmore\n"


def test_files_stay_in_dir_after_umount(tmp_path: Path, mounts: Mounts) -> None:
    mp = mounts.mount(tmp_path / "m", "--namespace", NS)
    run(f"mkdir {mp}/g && echo kept > {mp}/g/f")
    mounts.umount(mp)
    assert not os.path.ismount(mp)
    assert (mp / "g" / "f").read_text() == "kept\n"


# -- the command line ---------------------------------------------------------------------------
def test_status_json(tmp_path: Path, mounts: Mounts) -> None:
    mp = mounts.mount(tmp_path / "m", "--role", "consumer", "--namespace", "ns1")
    st = mounts.status(mp)
    for key in ("pid", "namespace", "published", "waiting", "role", "kvs", "errors"):
        assert key in st
    assert st["namespace"] == mounts.ns("ns1") and st["role"] == "consumer"
    out = dyadfs_cmd("status", env=mounts.env).stdout
    assert str(mp) in out
    # the text says where pulls come from (an outsider found it only in --json)
    assert "same host: on" in out and "0 from this host" in out, out


@pytest.mark.parametrize("args,needle", [
    (["mount", "{tmp}/missing"], "no such directory"),
    (["mount", "{tmp}/file"], "not a directory"),
    (["mount", "{tmp}/d", "--role", "reader"], "--role"),
    (["mount", "{tmp}/d", "--wait-timeout", "x"], "--wait-timeout"),
    (["mount", "{tmp}/d", "--backing", "{tmp}/missing"], "--backing"),
    (["umount", "{tmp}/d"], "not mounted"),
    (["status", "{tmp}/d"], "not a running dyadfs mount"),
])
def test_cli_errors_are_one_line(tmp_path: Path, state_env: dict[str, str], args: list[str],
                                 needle: str) -> None:
    (tmp_path / "file").write_text("x")
    (tmp_path / "d").mkdir()
    r = dyadfs_cmd(*[a.format(tmp=tmp_path) for a in args], env=state_env, check=False)
    assert r.returncode in (1, 2)
    assert needle in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_mounting_twice_is_an_error(tmp_path: Path, mounts: Mounts) -> None:
    mp = mounts.mount(tmp_path / "m", "--namespace", NS)
    r = dyadfs_cmd("mount", str(mp), env=mounts.env, check=False)
    assert r.returncode == 1 and "already mounted" in r.stderr

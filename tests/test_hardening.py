"""A busy workflow, a careless setup or a plain install must not break a mount."""

from __future__ import annotations

import errno
import json
import os
import resource
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from .conftest import CPrograms, Mounts, dyadfs_cmd, run, wait_for
from .helpers import LOOPBACK, Lines, crc_of, finish, parse_reads, shared_pair, waiting

pytestmark = pytest.mark.mounted
NS = "hard"


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def test_thousands_of_waiting_opens_leave_the_mount_responsive(tmp_path: Path,
                                                              mounts: Mounts) -> None:
    """Every waiting open holds a FUSE request; with pyfuse3's default of 99 workers the 99th
    made stat, ls and read of everything else on the mount hang."""
    # A blocked open holds a descriptor of the opening process already: the readers' process
    # raises its own limit (an ordinary user's soft limit is 1024).
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    n = min(int(os.environ.get("DYADFS_TEST_WAITERS", "10000")),
            hard - 64 if hard != resource.RLIM_INFINITY else 1 << 20)
    prod = mounts.mount(tmp_path / "p", "--role", "producer", "--namespace", NS,
                        "--transport", "tcp", "--listen", "127.0.0.1")
    cons = mounts.mount(tmp_path / "c", "--role", "consumer", "--namespace", NS,
                        "--transport", "tcp", "--wait-timeout", "300")
    (prod / "here.txt").write_bytes(b"already here\n")
    assert (cons / "here.txt").read_bytes() == b"already here\n"  # pulled before the crowd
    (cons / "local").mkdir()
    pid = mounts.status(cons)["pid"]
    rss_before = _rss_kib(pid)
    script = textwrap.dedent(f"""
        import resource, sys, threading
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        threading.stack_size(256 * 1024)
        ok = []
        def read(i):
            with open({str(cons)!r} + f"/w/f{{i}}", "rb") as f:
                if f.read() == f"frame {{i}}".encode():
                    ok.append(i)
        threads = [threading.Thread(target=read, args=(i,)) for i in range({n})]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        print(len(ok), flush=True)
    """)
    readers = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                               text=True)
    try:
        wait_for(lambda: mounts.status(cons)["waiting"] >= n, 120, f"{n} waiting opens")
        rss_waiting = _rss_kib(pid)
        # Everything else on the mount still answers, at once.
        t0 = time.monotonic()
        assert (cons / "here.txt").read_bytes() == b"already here\n"
        assert os.stat(cons / "here.txt").st_size == 13
        assert "here.txt" in os.listdir(cons)
        (cons / "local" / "scratch").write_bytes(b"x")
        assert time.monotonic() - t0 < 5, "the mount stalled behind the waiting opens"
        (prod / "w").mkdir()
        for i in range(n):
            (prod / "w" / f"f{i}").write_bytes(f"frame {i}".encode())
        out, _ = readers.communicate(timeout=300)
    finally:
        readers.kill()
        readers.wait()
    assert int(out.strip()) == n
    assert mounts.status(cons)["waiting"] == 0
    print(f"{n} waiting opens: daemon RSS {rss_before} -> {rss_waiting} KiB")


def test_opens_withdrawn_by_a_killed_process_never_stall_the_mount(tmp_path: Path,
                                                                   mounts: Mounts) -> None:
    """A process with thousands of threads opening unpublished names, killed (kill -9) while
    they start: the kernel withdraws the requests the daemon had not read yet, and a read of
    /dev/fuse that found the device readable can then block the daemon's only loop until some
    other request comes (seen: 11 minutes). Each round, a stat by another program answers."""
    cons = mounts.mount(tmp_path / "c", "--role", "consumer", "--namespace", NS,
                        "--wait-timeout", "300")
    (cons / "here").write_bytes(b"x")
    script = textwrap.dedent("""
        import sys, threading
        threading.stack_size(256 * 1024)
        def op(i):
            try:
                open(f"{sys.argv[1]}/w{sys.argv[2]}/f{i}", "rb")
            except OSError:
                pass
        for i in range(3000):
            threading.Thread(target=op, args=(i,), daemon=True).start()
        threading.Event().wait()
        """)
    slow = []
    for r in range(8):
        crowd = subprocess.Popen([sys.executable, "-c", script, str(cons), str(r)])
        time.sleep(0.1 + 0.07 * r)  # killed at a different point of its start each round
        crowd.kill()
        try:  # its threads end once the daemon answers (or forgets) their requests
            crowd.wait(60)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"round {r}: the killed process's threads still wait on the "
                                 "mount after 60 s: the daemon stopped answering") from None
        t0 = time.monotonic()
        st = run(["timeout", "30", "stat", "-c", "%s", str(cons / "here")], check=False)
        took = time.monotonic() - t0
        assert st.returncode == 0, f"round {r}: stat failed or hung: {st.stderr!r}"
        if took > 3:
            slow.append(f"round {r}: {took:.1f} s")
    assert not slow, f"the mount stalled after a killed crowd of opens: {slow}"
    wait_for(lambda: mounts.status(cons)["waiting"] == 0, 30, "the withdrawn waits to end")


def test_files_holding_the_secret_are_private(tmp_path: Path, mounts: Mounts) -> None:
    old = os.umask(0)  # a careless caller: the daemon must not inherit it for its own files
    try:
        mounts.mount(tmp_path / "m", "--namespace", NS, "--transport", "tcp")
    finally:
        os.umask(old)
    state = mounts.state
    for path in [state / "kvs.sqlite", *(state / "mounts").glob("*.json")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode & 0o077 == 0, f"{path} is {oct(mode)}"
    for d in (state, state / "mounts"):
        assert stat.S_IMODE(d.stat().st_mode) & 0o077 == 0, d


@pytest.mark.mounted
def test_an_unwritable_mount_directory_is_one_clear_line(tmp_path: Path, mounts: Mounts) -> None:
    """A mount directory the user cannot write (root: immutable; others: mode 0555) fails the
    start with what was refused, not the border line of a traceback (found by an outsider)."""
    d = tmp_path / "ro"
    d.mkdir()
    if os.geteuid() == 0:
        if subprocess.run(["chattr", "+i", str(d)], capture_output=True).returncode != 0:
            pytest.skip("root: chattr +i is not supported on this file system")
    else:
        d.chmod(0o555)
    try:
        r = dyadfs_cmd("mount", str(d), "--namespace", NS, "--transport", "tcp",
                       env=mounts.env, check=False)
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(d)], capture_output=True)
        d.chmod(0o755)
    assert r.returncode == 1, r.stderr
    assert f"{d}/.dyadfs: " in r.stderr and ("Permission denied" in r.stderr or
                                             "Operation not permitted" in r.stderr), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "+---" not in r.stderr, r.stderr
    assert not os.path.ismount(d)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (makes a directory owned by another "
                    "user)")
def test_a_state_dir_of_another_user_is_refused(tmp_path: Path,
                                                state_env: dict[str, str]) -> None:
    other = tmp_path / "theirs"
    other.mkdir()
    os.chown(other, 65534, 65534)
    (tmp_path / "m").mkdir()
    r = dyadfs_cmd("mount", str(tmp_path / "m"), "--transport", "tcp",
                   env={**state_env, "DYADFS_STATE_DIR": str(other)}, check=False)
    assert r.returncode == 1 and "belongs to uid 65534" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert not os.path.ismount(tmp_path / "m")


def test_without_ucxx_the_default_transport_is_tcp(tmp_path: Path, mounts: Mounts) -> None:
    """A plain `pip install dyadfs` has no UCXX: a mount without --transport still works."""
    mp = tmp_path / "m"
    mp.mkdir()
    log = tmp_path / "m.log"
    code = (f"import sys, runpy; sys.modules['ucxx'] = None; sys.argv = ['dyadfs', 'mount', "
            f"{str(mp)!r}, '--namespace', {NS!r}, '--foreground', '--log', {str(log)!r}]; "
            "runpy.run_module('dyadfs', run_name='__main__')")
    daemon = subprocess.Popen([sys.executable, "-c", code], env=mounts.env,
                              stderr=subprocess.PIPE)
    mounts.mounted.append(mp)
    try:
        wait_for(lambda: os.path.ismount(mp) or daemon.poll() is not None, 60, "the mount")
        assert daemon.poll() is None, daemon.stderr.read() if daemon.stderr else ""
        wait_for(lambda: "UCXX is not installed" in log.read_text(), 30, "the log line")
        assert mounts.status(mp)["transport"] == "tcp"
        run(f"echo ok > {mp}/f")
        assert (mp / "f").read_text() == "ok\n"
    finally:
        mounts.close()
        daemon.kill()
        daemon.wait()


def test_status_shows_a_killed_mount_as_stale(tmp_path: Path, mounts: Mounts) -> None:
    mp = mounts.mount(tmp_path / "m", "--namespace", NS, "--transport", "tcp")
    live = mounts.mount(tmp_path / "live", "--namespace", NS, "--transport", "tcp")
    pid = mounts.status(mp)["pid"]
    os.kill(pid, 9)
    wait_for(lambda: not os.path.exists(f"/proc/{pid}"), 10, "the daemon to die")
    subprocess.run(["fusermount3", "-uz", str(mp)], capture_output=True)
    out = dyadfs_cmd("status", env=mounts.env).stdout
    assert f"{mp}: stale: its daemon (pid {pid}) is gone" in out, out
    assert f"{live}: pid" in out
    r = dyadfs_cmd("status", str(mp), env=mounts.env, check=False)
    assert r.returncode == 1 and f"{mp}: stale: its daemon (pid {pid}) is gone" in r.stdout, r
    r = dyadfs_cmd("status", str(mp), "--json", env=mounts.env, check=False)
    assert r.returncode == 1 and json.loads(r.stdout) == {"dir": str(mp), "pid": pid,
                                                          "stale": True}, r
    mounts.mount(mp, "--namespace", NS, "--transport", "tcp")  # a restart replaces the record
    assert "stale" not in dyadfs_cmd("status", env=mounts.env).stdout


def test_umount_of_a_killed_mount_removes_its_record(tmp_path: Path, mounts: Mounts) -> None:
    """kill -9 of a daemon leaves its record (and the mount, without a reader); `dyadfs umount`
    then unmounts and removes the record; a second umount, with nothing left, says so."""
    mp = mounts.mount(tmp_path / "m", "--namespace", NS, "--transport", "tcp")
    pid = mounts.status(mp)["pid"]
    os.kill(pid, 9)
    out = dyadfs_cmd("status", env=mounts.env).stdout  # at once: perhaps not reaped yet
    assert f"{mp}: stale: its daemon (pid {pid}) is gone" in out, out
    wait_for(lambda: not os.path.exists(f"/proc/{pid}"), 10, "the daemon to die")
    r = dyadfs_cmd("umount", str(mp), env=mounts.env, check=False)
    assert r.returncode == 0, r.stderr
    assert str(mp) not in dyadfs_cmd("status", env=mounts.env).stdout
    r = dyadfs_cmd("umount", str(mp), env=mounts.env, check=False)
    assert r.returncode == 1 and "not mounted" in r.stderr, r.stderr


def test_sigterm_lets_open_writers_finish_and_publish(tmp_path: Path, mounts: Mounts) -> None:
    """Flux and Slurm send SIGTERM at job end: a writer with a file open must not get ENOTCONN;
    its close publishes, then the mount goes. New writers meanwhile get EROFS."""
    mp = mounts.mount(tmp_path / "m", "--role", "producer", "--namespace", NS,
                      "--transport", "tcp", "--term-grace", "60")
    writer = subprocess.Popen([sys.executable, "-c", f"""
import sys
f = open({str(mp / 'out.dat')!r}, 'wb')
f.write(b'first half '); f.flush()
print('open', flush=True)
sys.stdin.readline()
f.write(b'second half'); f.close()
print('closed', flush=True)
"""], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert writer.stdout is not None and writer.stdin is not None
    try:
        assert writer.stdout.readline() == "open\n"
        pid = mounts.status(mp)["pid"]
        os.kill(pid, 15)
        wait_for(lambda: "no new writers" in mounts.logs(), 10, "the daemon to drain")
        with pytest.raises(OSError) as e:
            open(mp / "late.dat", "wb").close()
        assert e.value.errno == 30  # EROFS
        assert os.path.ismount(mp)  # still serving its open writer
        writer.stdin.write("go\n")
        writer.stdin.flush()
        assert writer.stdout.readline() == "closed\n"
        assert writer.wait(30) == 0
        wait_for(lambda: not os.path.exists(f"/proc/{pid}"), 30, "the daemon to exit")
    finally:
        writer.kill()
        writer.wait()
    assert not os.path.ismount(mp)
    assert (mp / "out.dat").read_bytes() == b"first half second half"
    from .test_mounted import record
    rec = record(mounts, "out.dat", NS)
    assert rec is not None and rec.size == 22


def test_a_killed_writers_mark_fails_the_wait_after_fetch_timeout(
        tmp_path: Path, mounts: Mounts, cprogs: CPrograms, spawn) -> None:  # type: ignore[no-untyped-def]
    """Shared storage: a producer mount killed (kill -9) while a file is open for writing leaves
    its "writing" mark in the KVS. A consumer waiting on the file gets EIO once that mount has
    been gone for --fetch-timeout (not a wait for ever); so does one that opens it after the
    mount was restarted (the writer died with the run that marked it); a rewrite is read."""
    prod_opts = ("--role", "producer", "--shared-storage", "--namespace", NS, *LOOPBACK)
    prod, cons, backing = shared_pair(mounts, tmp_path, NS, cons_opts=("--fetch-timeout", "2"))
    writer = spawn([sys.executable, "-c", textwrap.dedent(f"""
        import sys
        f = open({str(prod / 'out.dat')!r}, 'wb')
        f.write(b'first half'); f.flush()
        print('open', flush=True)
        sys.stdin.readline()
        """)], stdin=subprocess.PIPE)
    assert Lines(writer).next(what="the writer's first half") == b"open"
    reader = spawn([cprogs.reader, str(cons / "out.dat")])
    waiting(mounts, cons, 1)
    pid = mounts.status(prod)["pid"]
    os.kill(pid, 9)
    wait_for(lambda: not os.path.exists(f"/proc/{pid}"), 10, "the daemon to die")
    writer.kill()
    subprocess.run(["fusermount3", "-uz", str(prod)], capture_output=True)
    out, _ = finish(reader, 30, "a reader waiting on a killed writer's mark")
    assert [(r.size, r.err) for r in parse_reads(out)] == [(-1, errno.EIO)]

    mounts.mount(prod, "--backing", str(backing), *prod_opts)
    again = run([cprogs.reader, str(cons / "out.dat")], timeout=30, check=False)
    assert [(r.size, r.err) for r in parse_reads(again.stdout)] == [(-1, errno.EIO)]
    (prod / "out.dat").write_bytes(b"whole file")
    reads = parse_reads(run([cprogs.reader, str(cons / "out.dat")], timeout=30).stdout)
    assert [(r.size, r.crc, r.err) for r in reads] == [(10, crc_of(b"whole file"), 0)]

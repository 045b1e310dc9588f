"""The embedded KVS: namespaces, atomic commits, listing, waiting lookups across processes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import trio

from dyadfs.errors import KVSError, WaitTimeout
from dyadfs.kvs.local import LocalKVS

from .conftest import FeedLog


def run_with(path: Path, fn):  # type: ignore[no-untyped-def]
    async def main():  # type: ignore[no-untyped-def]
        kvs = LocalKVS(path)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(kvs.run)
                result = await fn(kvs)
                nursery.cancel_scope.cancel()
            return result
        finally:
            await kvs.aclose()
    return trio.run(main)


def test_commit_get_list_remove(tmp_path: Path) -> None:
    async def body(kvs: LocalKVS) -> None:
        await kvs.ensure_namespace("a")
        await kvs.commit("a", {"files/x": b"1", "files/d/y": b"2", "files/d/z": b"3"})
        assert await kvs.get("a", "files/x") == b"1"
        assert await kvs.get("b", "files/x") is None  # namespaces are separate
        assert await kvs.list_prefix("a", "files/d/") == {"files/d/y": b"2", "files/d/z": b"3"}
        assert await kvs.children("a", "") == {"x": b"1", "d": None}
        assert await kvs.children("a", "d") == {"y": b"2", "z": b"3"}
        await kvs.commit("a", {"files/x": None, "files/d/y": b"22"})
        assert await kvs.get("a", "files/x") is None
        assert await kvs.get("a", "files/d/y") == b"22"
        assert await kvs.put_if_absent("a", "k", b"first") == b"first"
        assert await kvs.put_if_absent("a", "k", b"second") == b"first"
        await kvs.remove_namespace("a")
        assert await kvs.get("a", "files/d/y") is None
        with pytest.raises(KVSError, match="does not exist"):
            await kvs.ensure_namespace("a", create=False)
    run_with(tmp_path / "kvs.sqlite", body)


def test_any_bytes_in_keys(tmp_path: Path) -> None:
    name = (b"files/\xff\xfe odd\nname").decode("utf-8", "surrogateescape")

    async def body(kvs: LocalKVS) -> None:
        await kvs.commit("a", {name: b"v", "files/\xff": b"w"})
        assert await kvs.get("a", name) == b"v"
        assert set(await kvs.list_prefix("a", "files/")) == {name, "files/\xff"}
    run_with(tmp_path / "kvs.sqlite", body)


def test_failed_commit_changes_nothing(tmp_path: Path) -> None:
    async def body(kvs: LocalKVS) -> None:
        await kvs.commit("a", {"k1": b"old"})
        with pytest.raises((KVSError, TypeError)):
            await kvs.commit("a", {"k1": b"new", "k2": object()})  # type: ignore[dict-item]
        assert await kvs.get("a", "k1") == b"old"
        assert await kvs.get("a", "k2") is None
    run_with(tmp_path / "kvs.sqlite", body)


def test_wait_times_out_and_is_cancellable(tmp_path: Path) -> None:
    async def body(kvs: LocalKVS) -> None:
        with pytest.raises(WaitTimeout):
            await kvs.wait("a", "never", timeout=0.2)
        with trio.move_on_after(0.2) as scope:
            await kvs.wait("a", "never", timeout=None)
        assert scope.cancelled_caught
    run_with(tmp_path / "kvs.sqlite", body)


@pytest.mark.parametrize("notify_removed", [False, True])
def test_waiter_wakes_on_commit_by_another_process(tmp_path: Path, notify_removed: bool,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import dyadfs.kvs.local as local
    monkeypatch.setattr(local, "SAFETY_RECHECK", 3600.0)  # only the notification can wake it
    db = tmp_path / "kvs.sqlite"
    script = textwrap.dedent(f"""
        import trio
        from dyadfs.kvs.local import LocalKVS
        async def main():
            kvs = LocalKVS({str(db)!r})
            await kvs.commit("a", {{"files/late": b"here"}})
            await kvs.aclose()
        trio.run(main)
    """)

    async def body(kvs: LocalKVS) -> bytes:
        async with trio.open_nursery() as nursery:
            got: list[bytes] = []

            async def waiter() -> None:
                got.append(await kvs.wait("a", "files/late", timeout=30))
            nursery.start_soon(waiter)
            await trio.sleep(0.1)  # let the waiter block first (not a synchronisation)
            if notify_removed:  # removed by hand: the writer makes it again, watchers follow
                (tmp_path / "kvs.sqlite.notify").unlink()
                await trio.sleep(0.1)
            await trio.to_thread.run_sync(
                lambda: subprocess.run([sys.executable, "-c", script], check=True, timeout=60))
        return got[0]

    assert run_with(db, body) == b"here"


def test_wait_until_predicate_sees_changes(tmp_path: Path) -> None:
    async def body(kvs: LocalKVS) -> bytes | None:
        await kvs.commit("a", {"k": b"writing"})
        async with trio.open_nursery() as nursery:
            nursery.start_soon(kvs.commit, "a", {"k": b"complete"})
            value = await kvs.wait_until("a", "k", lambda v: v == b"complete", timeout=10)
        return value
    assert run_with(tmp_path / "kvs.sqlite", body) == b"complete"


def test_an_idle_waiter_costs_no_cpu(tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        import resource, trio
        from dyadfs.kvs.local import LocalKVS
        from dyadfs.errors import WaitTimeout
        async def main():
            kvs = LocalKVS({str(tmp_path / 'kvs.sqlite')!r})
            async with trio.open_nursery() as n:
                await n.start(kvs.run)
                before = resource.getrusage(resource.RUSAGE_SELF)
                try:
                    await kvs.wait("a", "never", timeout=2.0)
                except WaitTimeout:
                    pass
                after = resource.getrusage(resource.RUSAGE_SELF)
                n.cancel_scope.cancel()
            print((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime))
        trio.run(main)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    cpu = float(out)
    assert cpu < 0.02, f"an idle waiter used {cpu:.3f} s of CPU in 2 s"


@pytest.mark.parametrize("garbage", [b"this is not a database" * 100,
                                     b"SQLite format 3\x00" + b"\xff" * 4000],
                         ids=["not-sqlite", "bad-header"])
def test_damaged_database_says_what_to_do(tmp_path: Path, garbage: bytes) -> None:
    bad = tmp_path / "kvs.sqlite"
    bad.write_bytes(garbage)
    with pytest.raises(KVSError) as err:
        LocalKVS(bad)
    message = str(err.value)
    assert "\n" not in message and f"embedded KVS at {bad}" in message
    assert f"mv {bad} {bad}.broken" in message and "--kvs local:PATH" in message


def test_files_are_private_whatever_the_umask(tmp_path: Path) -> None:
    """The database holds the namespace's secret: 0600 (and so are its WAL and notify files),
    in directories made 0700."""
    import stat
    path = tmp_path / "a" / "b" / "kvs.sqlite"
    files = (path, path.with_name("kvs.sqlite.notify"), path.with_name("kvs.sqlite-wal"),
             path.with_name("kvs.sqlite-shm"))
    modes: dict[Path, int] = {}
    old = os.umask(0)
    try:
        async def body(kvs: LocalKVS) -> None:
            assert await kvs.put_if_absent("a", "meta/secret", b"s") == b"s"
            modes.update((p, stat.S_IMODE(p.stat().st_mode)) for p in files)
        run_with(path, body)
    finally:
        os.umask(old)
    assert modes == {p: 0o600 for p in files}
    for d in (tmp_path / "a", tmp_path / "a" / "b"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d


def test_point_reads_never_wait_on_the_trio_thread(tmp_path: Path) -> None:
    """The trio thread's read-only connection has no busy wait (a busy database would stall
    every FUSE request for its length): a busy read goes to the worker thread at once."""
    import sqlite3
    path = tmp_path / "kvs.sqlite"

    class Busy:
        def execute(self, *args: object) -> None:
            raise sqlite3.OperationalError("database is locked")

    async def body(kvs: LocalKVS) -> None:
        assert kvs._reader.execute("PRAGMA busy_timeout").fetchone() == (0,)
        await kvs.commit("a", {"files/x": b"1"})
        reader, kvs._reader = kvs._reader, Busy()  # type: ignore[assignment]
        try:
            assert await kvs.get("a", "files/x") == b"1"
            assert await kvs.is_dir("a", "") and not await kvs.is_dir("a", "x")
        finally:
            kvs._reader = reader
    run_with(path, body)


def test_put_if_absent_is_atomic_across_processes(tmp_path: Path) -> None:
    """Mounts started together: every caller, in every process, gets the one stored value."""
    db = tmp_path / "kvs.sqlite"
    script = textwrap.dedent(f"""
        import os, sys, trio
        from dyadfs.kvs.local import LocalKVS
        async def main():
            kvs = LocalKVS({str(db)!r})
            print("ready", flush=True)
            sys.stdin.readline()  # the barrier: every process is ready
            out = []
            async def one(i):
                mine = os.urandom(8).hex().encode()
                out.append(await kvs.put_if_absent("a", "meta/secret", mine))
            async with trio.open_nursery() as n:
                for i in range(8):
                    n.start_soon(one, i)
            await kvs.aclose()
            print(" ".join(v.decode() for v in out), flush=True)
        trio.run(main)
    """)
    LocalKVS(db)  # created once: the processes race on the key, not on making the file
    procs = [subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True) for _ in range(4)]
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        values = set()
        for p in procs:
            out, _ = p.communicate(timeout=60)
            values.update(out.split())
    finally:
        for p in procs:
            p.kill()
    assert len(values) == 1


def test_change_feed_in_commit_order_per_namespace(tmp_path: Path) -> None:
    async def body(kvs: LocalKVS) -> None:
        await kvs.commit("a", {"files/before": b"0"})
        feed = FeedLog()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(kvs.follow, "a", feed)
            await feed.until(1, skip=-1)
            assert feed.got == [None]  # what came before: rescan
            await kvs.commit("a", {"files/x": b"1", "mounts/m": b"{}"})  # only files/ keys
            await kvs.commit("b", {"files/other-namespace": b"1"})
            await kvs.commit("a", {"files/d/y": b"2", "files/x": None})
            await feed.until(3)
            assert feed.keys() == ["files/x", "files/d/y", "files/x"]
            nursery.cancel_scope.cancel()
    run_with(tmp_path / "kvs.sqlite", body)


def test_change_feed_cut_behind_a_follower_asks_for_a_rescan(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dyadfs.kvs.local as local
    monkeypatch.setattr(local, "FEED_KEEP", 5)
    monkeypatch.setattr(local, "FEED_BATCH", 4)

    async def body(kvs: LocalKVS) -> None:
        cursor = 0
        for i in range(12):  # the feed is cut every 4 entries to the last 5
            await kvs.commit("a", {f"files/f{i}": b"1"})
        cursor, keys, _ = kvs._feed_after("a", cursor)
        assert keys is None  # entries after 0 were cut: the follower must rescan
        cursor, keys, _ = kvs._feed_after("a", cursor)
        assert keys == []  # and then follows from the top
        await kvs.commit("a", {"files/new": b"1"})
        cursor, keys, _ = kvs._feed_after("a", cursor)
        assert keys == ["files/new"]
    run_with(tmp_path / "kvs.sqlite", body)


def _old_database(path: Path, schema: int, files: list[str]) -> None:
    """A database as dyadfs of database schema 1 or 2 left it."""
    import sqlite3
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
        CREATE TABLE namespaces (ns TEXT PRIMARY KEY, created REAL NOT NULL);
        CREATE TABLE kv (ns TEXT NOT NULL, key BLOB NOT NULL, value BLOB NOT NULL,
                         PRIMARY KEY (ns, key)) WITHOUT ROWID;
    """)
    if schema == 2:
        db.executescript("""
            CREATE TABLE feed (seq INTEGER PRIMARY KEY AUTOINCREMENT, ns TEXT NOT NULL,
                               key BLOB NOT NULL);
            INSERT INTO meta VALUES ('feed_pruned', '0');
        """)
    db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(schema),))
    for key in files:
        db.execute("INSERT INTO kv VALUES ('a', ?, CAST('v' AS BLOB))", (key.encode(),))
    db.execute("INSERT INTO kv VALUES ('a', CAST('mounts/m' AS BLOB), CAST('{}' AS BLOB))")
    db.commit()
    db.close()


@pytest.mark.parametrize("schema", [1, 2])
def test_older_database_is_upgraded_in_place(tmp_path: Path, schema: int) -> None:
    import sqlite3
    path = tmp_path / "kvs.sqlite"
    _old_database(path, schema, ["files/old", "files/d/x", "files/d/e/y", "files/d/e/z"])

    async def body(kvs: LocalKVS) -> None:
        assert await kvs.get("a", "files/old") == b"v"  # kept
        assert await kvs.children("a", "") == {"old": b"v", "d": None}  # and indexed
        assert await kvs.children("a", "d") == {"x": b"v", "e": None}
        assert await kvs.children("a", "d/e") == {"y": b"v", "z": b"v"}
        assert await kvs.is_dir("a", "d/e") and not await kvs.is_dir("a", "old")
        await kvs.commit("a", {"files/new": b"w"})
        assert kvs._feed_after("a", 0)[1] == ["files/new"]
        assert "new" in await kvs.children("a", "")
    run_with(path, body)
    assert sqlite3.connect(path).execute("SELECT v FROM meta WHERE k='schema'").fetchone() \
        == ("3",)


def test_newer_database_is_refused_with_advice(tmp_path: Path) -> None:
    import sqlite3
    path = tmp_path / "kvs.sqlite"
    _old_database(path, 2, [])
    db = sqlite3.connect(path)
    db.execute("UPDATE meta SET v='9' WHERE k='schema'")
    db.commit()
    db.close()
    with pytest.raises(KVSError, match="has schema 9, written by a newer dyadfs.*move it aside"):
        LocalKVS(path)


def test_directory_index(tmp_path: Path) -> None:
    """Entries, implicit directories, removal (an emptied directory stays) and drop."""
    odd = b"\xff odd".decode("utf-8", "surrogateescape")

    async def body(kvs: LocalKVS) -> None:
        await kvs.commit("a", {"files/d/x": b"1", "files/d/s/t/u": b"2", f"files/{odd}/y": b"3",
                               "mounts/m": b"{}", "meta/secret": b"s"})
        assert await kvs.children("a", "") == {"d": None, odd: None}  # no mounts/, no meta/
        assert await kvs.children("a", odd) == {"y": b"3"}
        assert await kvs.children("a", "d") == {"x": b"1", "s": None}
        assert await kvs.is_dir("a", "d/s/t") and await kvs.is_dir("a", "")
        assert not await kvs.is_dir("a", "d/x") and not await kvs.is_dir("a", "nope")
        await kvs.commit("a", {"files/d/s/t/u": None})
        assert await kvs.children("a", "d/s/t") == {} and await kvs.is_dir("a", "d/s/t")
        await kvs.commit("a", {"files/d/s": b"dir record"})  # a directory with a record
        assert await kvs.children("a", "d") == {"x": b"1", "s": b"dir record"}
        await kvs.commit("a", {}, drop=["d/s"])  # its record stays; what was below goes
        assert await kvs.children("a", "d") == {"x": b"1", "s": b"dir record"}
        assert not await kvs.is_dir("a", "d/s") and not await kvs.is_dir("a", "d/s/t")
        await kvs.commit("a", {"files/d/s": None, "files/d/x": None}, drop=["d"])
        assert await kvs.children("a", "") == {odd: None}
        await kvs.commit("a", {"files/d/n": b"4"}, drop=["d"])  # dropped, then published again
        assert await kvs.children("a", "d") == {"n": b"4"}
        assert await kvs.children("b", "") == {}  # namespaces are separate
        await kvs.remove_namespace("a")
        assert await kvs.children("a", "") == {}
    run_with(tmp_path / "kvs.sqlite", body)


def test_commit_waits_for_another_writer(tmp_path: Path) -> None:
    """A commit tried on the trio thread never waits there: if another process holds the
    write lock, it goes to a thread, waits for the lock, and commits."""
    import sqlite3
    path = tmp_path / "kvs.sqlite"

    async def body(kvs: LocalKVS) -> None:
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # holds the write lock
        done = trio.Event()

        async def commit() -> None:
            await kvs.commit("a", {"files/x": b"1"})
            done.set()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(commit)
            await trio.sleep(0.3)
            assert not done.is_set()  # still waiting for the lock, and the loop still runs
            other.execute("COMMIT")
            with trio.fail_after(10):
                await done.wait()
        other.close()
        assert await kvs.get("a", "files/x") == b"1"
        for i in range(300):  # past a checkpoint on the way
            await kvs.commit("a", {f"files/n{i}": b"v"})
        assert len(await kvs.list_prefix("a", "files/n")) == 300
    run_with(path, body)

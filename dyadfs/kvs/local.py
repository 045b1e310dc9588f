"""The embedded KVS: one SQLite database (WAL mode) per machine, shared by every mount on it.

Why SQLite: it is in the standard library, its WAL mode lets readers run while one writer
commits, and a transaction gives atomic multi-key commits across processes for free.

Waking waiters without polling: after each commit the writer touches ``<db>.notify``; every
process watches that file with inotify (``inotify_simple``, a small, well-kept
binding) and re-checks the keys it waits for when it changes. A waiter wakes within a
millisecond or two of the commit and an idle one costs no CPU. A slow re-check (every
``SAFETY_RECHECK`` seconds) covers the one case inotify can lose, a queue overflow.

SQLite calls are blocking, so they run in worker threads, one at a time (one connection). Two
exceptions, both on the trio thread and both without any busy wait (``timeout=0``): point reads
through a read-only connection, and commits through a third one; either goes to the worker
thread at once if SQLite says the database is busy, so that another process holding a lock
never stalls this one's file system.

The change feed (:meth:`LocalKVS.follow`, for ``--prefetch``): every commit also appends the
``files/`` keys it changed to the ``feed`` table, whose rowid is a sequence number across the
database. A follower keeps its last sequence number and reads what came after it when the notify
file changes. The feed keeps the last ``FEED_KEEP`` entries; a follower that fell further behind
is told to rescan (``meta.feed_pruned`` says how far the feed was cut).

The directory index (see :mod:`dyadfs.keys`) is the ``dirents`` table, one row per entry:
``(ns, dir, name, sub)`` where ``dir`` is the directory's path (``b""``: the top) and ``sub``
is 1 when something was published below ``dir/name`` (it is a directory, implicit unless
``files/dir/name`` also has a record). The row exists while the name has a record or
``sub`` is 1. A commit maintains it in the same transaction as the records: a put adds the
name's row and marks each ancestor ``sub`` (stopping at the first that already is: its own
ancestors are too), a removal deletes the row unless ``sub``, a drop deletes every row below
the directory and clears its ``sub``. So ``children`` is one indexed range read of the
directory's rows joined to their records, and ``is_dir`` one point read.

Database schema 3. Schema 1 had no feed, schema 2 no index; an older database is upgraded in
place when opened (the index is built from the records it holds).

The database holds the namespace's secret: it is created 0600 (its WAL and shared-memory files
take the same mode from SQLite), the notify file too, and any directory made for them 0700,
whatever the umask.
"""

from __future__ import annotations

import math
import os
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import inotify_simple
import trio

from ..errors import KVSError
from ..keys import FILES
from . import KVS, Predicate, timeout_error

if TYPE_CHECKING:
    from ..config import Config

SAFETY_RECHECK = 5.0
FEED_KEEP = 200_000
FEED_BATCH = 4096
CHECKPOINT_EVERY = 256  # commits on the trio thread between checkpoints (in the worker thread)
DB_SCHEMA = "3"
T = TypeVar("T")
_TABLES = (
    "CREATE TABLE IF NOT EXISTS namespaces (ns TEXT PRIMARY KEY, created REAL NOT NULL)",
    "CREATE TABLE IF NOT EXISTS kv (ns TEXT NOT NULL, key BLOB NOT NULL, value BLOB NOT NULL, "
    "PRIMARY KEY (ns, key)) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS feed (seq INTEGER PRIMARY KEY AUTOINCREMENT, ns TEXT NOT NULL, "
    "key BLOB NOT NULL)",
    "CREATE TABLE IF NOT EXISTS dirents (ns TEXT NOT NULL, dir BLOB NOT NULL, name BLOB NOT NULL, "
    "sub INTEGER NOT NULL, PRIMARY KEY (ns, dir, name)) WITHOUT ROWID",
)
_FILES = FILES.encode()
_FILES_END = _FILES[:-1] + bytes([_FILES[-1] + 1])  # every files/ key sorts below this


def _enc(key: str) -> bytes:
    return key.encode("utf-8", "surrogateescape")


def _dec(key: bytes) -> str:
    return key.decode("utf-8", "surrogateescape")


def _prefix_bounds(prefix: bytes) -> tuple[bytes, bytes | None]:
    """[lo, hi) holding exactly the blobs that start with *prefix*."""
    p = bytearray(prefix)
    while p and p[-1] == 0xFF:
        p.pop()
    if not p:
        return prefix, None
    p[-1] += 1
    return prefix, bytes(p)


def _advice(path: Path) -> str:
    return (f"move it aside (mv {path} {path}.broken) to start with an empty one (what it "
            "recorded is lost: unmount this machine's mounts first), or use another one with "
            "--kvs local:PATH")


def _private_dirs(directory: Path) -> None:
    """Make *directory* and any missing parent 0700 (whatever the umask); leave existing ones."""
    missing = []
    d = directory
    while not d.exists():
        missing.append(d)
        d = d.parent
    for d in reversed(missing):
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            continue  # made meanwhile by another mount
        os.chmod(d, 0o700)  # the umask may have taken bits away


def _private_file(path: Path) -> None:
    """Create *path* 0600 unless it exists (whatever the umask)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        return
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


def _split(path: bytes) -> tuple[bytes, bytes]:
    """(directory, name) of a path in the ``files/`` namespace."""
    d, _, n = path.rpartition(b"/")
    return d, n


def _index_put(db: sqlite3.Connection, ns: str, path: bytes) -> None:
    d, n = _split(path)
    db.execute("INSERT OR IGNORE INTO dirents VALUES (?, ?, ?, 0)", (ns, d, n))
    while d:
        d, n = _split(d)
        cur = db.execute("INSERT INTO dirents VALUES (?, ?, ?, 1) ON CONFLICT DO UPDATE "
                         "SET sub=1 WHERE sub=0", (ns, d, n))
        if cur.rowcount == 0:
            break  # already a directory: so are all its ancestors


def _index_remove(db: sqlite3.Connection, ns: str, path: bytes) -> None:
    d, n = _split(path)
    db.execute("DELETE FROM dirents WHERE ns=? AND dir=? AND name=? AND sub=0", (ns, d, n))


def _index_drop(db: sqlite3.Connection, ns: str, path: bytes) -> None:
    if not path:
        return  # the top is never dropped
    below = path + b"/"
    end = path + b"0"  # "0" follows "/": [path/, path0) is everything below path
    db.execute("DELETE FROM dirents WHERE ns=? AND (dir=? OR (dir>=? AND dir<?))",
               (ns, path, below, end))
    d, n = _split(path)
    db.execute("UPDATE dirents SET sub=0 WHERE ns=? AND dir=? AND name=?", (ns, d, n))
    db.execute("DELETE FROM dirents WHERE ns=? AND dir=? AND name=? AND NOT EXISTS "
               "(SELECT 1 FROM kv WHERE ns=? AND key=?)", (ns, d, n, ns, _FILES + path))


def _upgrade(db: sqlite3.Connection, path: Path) -> None:
    """Create the tables, or bring an older database to DB_SCHEMA, in one transaction."""
    db.execute("BEGIN IMMEDIATE")
    try:
        db.execute("CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL)")
        row = db.execute("SELECT v FROM meta WHERE k='schema'").fetchone()
        schema = None if row is None else row[0]
        if schema not in (None, "1", "2", DB_SCHEMA):
            raise KVSError(f"the embedded KVS at {path} has schema {schema}, written by a newer "
                           f"dyadfs; this one reads {DB_SCHEMA}: use that dyadfs, or "
                           f"{_advice(path)}")
        for statement in _TABLES:
            db.execute(statement)
        db.execute("INSERT OR IGNORE INTO meta VALUES ('feed_pruned', '0')")
        if schema != DB_SCHEMA:
            # Schema 1 and 2 have no index: build it from the records (a fresh database has
            # none). Schema 1's missing feed starts empty, as the CREATE above made it.
            rows = db.execute("SELECT ns, key FROM kv WHERE key>=? AND key<?",
                              (_FILES, _FILES_END)).fetchall()
            for ns, key in rows:
                _index_put(db, ns, bytes(key)[len(_FILES):])
            db.execute("INSERT OR REPLACE INTO meta VALUES ('schema', ?)", (DB_SCHEMA,))
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


class LocalKVS(KVS):
    name = "local"

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = path = Path(path)
        self._conns: list[sqlite3.Connection] = []
        try:
            self._open(path)
        except BaseException:
            for conn in self._conns:
                conn.close()
            raise
        self._limiter = trio.CapacityLimiter(1)
        self._fast_commits = 0
        self._changed = trio.Event()
        self._inotify: inotify_simple.INotify | None = None
        self._closed = False

    def _connect(self, path: Path, timeout: float) -> sqlite3.Connection:
        conn = sqlite3.connect(str(path), timeout=timeout, isolation_level=None,
                               check_same_thread=False)
        self._conns.append(conn)
        return conn

    def _open(self, path: Path) -> None:
        try:
            _private_dirs(path.parent)
            _private_file(path)
            self._db = self._connect(path, 30.0)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            _upgrade(self._db, path)
            # Point reads run on the trio thread through their own connection: a WAL reader
            # never waits for the writer, and a read (~20 us) costs less than a thread hop
            # (~150 us here). SQLite may still say busy (a checkpoint that resets the WAL,
            # another process' exclusive lock): then, with no busy wait here (a wait on the
            # trio thread would stall every FUSE request), the read goes to the worker thread.
            self._reader = self._connect(path, 0)
            self._reader.execute("PRAGMA query_only=1")
            # Commits, too, are tried on the trio thread first (a publication is on the path
            # from a producer's close() to its consumers): with no busy wait at all, so that a
            # commit of another process never stalls this one's file system; if the database
            # is locked, the commit goes to the worker thread, which waits. Checkpoints, which
            # may fsync, stay in the worker thread (see _after_fast_commit).
            self._fast = self._connect(path, 0)
            self._fast.execute("PRAGMA synchronous=NORMAL")
            self._fast.execute("PRAGMA wal_autocheckpoint=0")
            self._notify = path.with_name(path.name + ".notify")
            _private_file(self._notify)
        except sqlite3.Error as e:
            raise self._error(e, opening=True) from None
        except OSError as e:
            raise KVSError(f"cannot open the embedded KVS at {path}: {e.strerror or e}") \
                from None

    def _error(self, e: sqlite3.Error, opening: bool = False) -> KVSError:
        """One line for a SQLite error; for a damaged database, what to do about it."""
        code = getattr(e, "sqlite_errorcode", 0) & 0xFF
        if code in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
            return KVSError(f"the embedded KVS at {self.path} is damaged ({e}): "
                            f"{_advice(self.path)}")
        if opening:
            return KVSError(f"cannot open the embedded KVS at {self.path}: {e}")
        return KVSError(f"embedded KVS {self.path}: {e}")

    def _touch(self) -> None:
        """Tell every process on this machine that something was committed."""
        try:
            os.utime(self._notify)
        except FileNotFoundError:  # removed by hand: make it again (watchers re-watch it)
            _private_file(self._notify)

    @classmethod
    def from_config(cls, config: Config) -> LocalKVS:
        return cls(config.kvs_path)

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        def guarded() -> T:
            try:
                return fn(*args)
            except sqlite3.Error as e:
                raise self._error(e) from None
        return await trio.to_thread.run_sync(guarded, limiter=self._limiter)

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run a short read on the trio thread, or in the worker thread if SQLite is busy."""
        try:
            value = fn(self._reader)
        except sqlite3.OperationalError:
            value = await self._call(fn, self._db)
        except sqlite3.Error as e:
            raise self._error(e) from None
        await trio.lowlevel.checkpoint()
        return value

    # -- namespaces ------------------------------------------------------------------------
    async def ensure_namespace(self, ns: str, create: bool = True) -> None:
        def do() -> bool:
            if create:
                self._db.execute("INSERT OR IGNORE INTO namespaces VALUES (?, julianday('now'))",
                                 (ns,))
                return True
            return self._db.execute("SELECT 1 FROM namespaces WHERE ns=?", (ns,)).fetchone() \
                is not None
        if not await self._call(do):
            raise KVSError(f"namespace {ns!r} does not exist in {self.path}")

    async def remove_namespace(self, ns: str) -> None:
        def do() -> None:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("DELETE FROM kv WHERE ns=?", (ns,))
                self._db.execute("DELETE FROM dirents WHERE ns=?", (ns,))
                self._db.execute("DELETE FROM namespaces WHERE ns=?", (ns,))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._touch()
        await self._call(do)

    async def namespaces(self) -> list[str]:
        def do() -> list[str]:
            return [r[0] for r in self._db.execute("SELECT ns FROM namespaces ORDER BY ns")]
        result: list[str] = await self._call(do)
        return result

    # -- keys ----------------------------------------------------------------------------
    def _get(self, ns: str, key: str, db: sqlite3.Connection | None = None) -> bytes | None:
        row = (db or self._db).execute("SELECT value FROM kv WHERE ns=? AND key=?",
                                       (ns, _enc(key))).fetchone()
        return None if row is None else bytes(row[0])

    async def get(self, ns: str, key: str) -> bytes | None:
        return await self._read(lambda db: self._get(ns, key, db))

    async def commit(self, ns: str, puts: Mapping[str, bytes | None],
                     drop: Sequence[str] = ()) -> None:
        items = [(_enc(k), v) for k, v in puts.items()]
        feed = [(ns, _enc(k)) for k in puts if k.startswith(FILES)]
        dropped = [_enc(d) for d in drop]

        def do(db: sqlite3.Connection) -> None:
            db.execute("BEGIN IMMEDIATE")
            try:
                for path in dropped:  # first: this commit may publish below them again
                    _index_drop(db, ns, path)
                for key, value in items:
                    if value is None:
                        db.execute("DELETE FROM kv WHERE ns=? AND key=?", (ns, key))
                    else:
                        db.execute("INSERT OR REPLACE INTO kv VALUES (?, ?, ?)", (ns, key, value))
                    if key.startswith(_FILES):
                        path = key[len(_FILES):]
                        if value is None:
                            _index_remove(db, ns, path)
                        else:
                            _index_put(db, ns, path)
                if feed:
                    db.executemany("INSERT INTO feed (ns, key) VALUES (?, ?)", feed)
                    seq = db.execute("SELECT last_insert_rowid()").fetchone()[0]
                    if seq % FEED_BATCH < len(feed):  # now and then, cut the feed's tail
                        db.execute("DELETE FROM feed WHERE seq <= ?", (seq - FEED_KEEP,))
                        db.execute("UPDATE meta SET v=? WHERE k='feed_pruned'",
                                   (str(max(0, seq - FEED_KEEP)),))
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            self._touch()

        try:
            do(self._fast)
        except sqlite3.OperationalError as e:
            if e.sqlite_errorcode & 0xFF not in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                raise self._error(e) from None
            await self._call(do, self._db)  # another writer holds the lock: wait in a thread
        except sqlite3.Error as e:
            raise self._error(e) from None
        else:
            await self._after_fast_commit()

    async def _after_fast_commit(self) -> None:
        self._fast_commits += 1
        if self._fast_commits % CHECKPOINT_EVERY == 0:
            await self._call(self._db.execute, "PRAGMA wal_checkpoint(PASSIVE)")
        await trio.lowlevel.checkpoint()

    async def put_if_absent(self, ns: str, key: str, value: bytes) -> bytes:
        def do() -> bytes:
            db = self._db
            # atomic across processes: one statement, under SQLite's write lock
            cur = db.execute("INSERT OR IGNORE INTO kv VALUES (?, ?, ?)", (ns, _enc(key), value))
            if cur.rowcount:
                self._touch()
            stored = self._get(ns, key)
            assert stored is not None
            return stored
        result: bytes = await self._call(do)
        return result

    async def list_prefix(self, ns: str, prefix: str) -> dict[str, bytes]:
        lo, hi = _prefix_bounds(_enc(prefix))

        def do() -> dict[str, bytes]:
            if hi is None:
                rows = self._db.execute("SELECT key, value FROM kv WHERE ns=? AND key>=?",
                                        (ns, lo))
            else:
                rows = self._db.execute(
                    "SELECT key, value FROM kv WHERE ns=? AND key>=? AND key<?", (ns, lo, hi))
            return {_dec(bytes(k)): bytes(v) for k, v in rows}

        result: dict[str, bytes] = await self._call(do)
        return result

    # -- the directory index ---------------------------------------------------------------
    async def children(self, ns: str, path: str) -> dict[str, bytes | None]:
        d = _enc(path)
        prefix = _FILES + d + b"/" if d else _FILES

        def do() -> dict[str, bytes | None]:
            # || joins the blobs as text, byte for byte; the CAST makes it a blob again so
            # that it compares equal to the key column.
            rows = self._db.execute(
                "SELECT d.name, d.sub, kv.value FROM dirents AS d LEFT JOIN kv "
                "ON kv.ns=d.ns AND kv.key=CAST(? || d.name AS BLOB) WHERE d.ns=? AND d.dir=?",
                (prefix, ns, d))
            return {_dec(bytes(name)): None if value is None else bytes(value)
                    for name, sub, value in rows if sub or value is not None}

        # a thread: unlike a point read, a large directory takes milliseconds
        result: dict[str, bytes | None] = await self._call(do)
        return result

    async def is_dir(self, ns: str, path: str) -> bool:
        if not path:
            return True
        d, n = _split(_enc(path))

        def do(db: sqlite3.Connection) -> bool:
            row = db.execute("SELECT sub FROM dirents WHERE ns=? AND dir=? AND name=?",
                             (ns, d, n)).fetchone()
            return row is not None and bool(row[0])
        return await self._read(do)

    # -- the change feed -----------------------------------------------------------------
    def _feed_after(self, ns: str, seq: int) -> tuple[int, list[str] | None, bool]:
        """(new cursor, keys of *ns* changed after *seq*, whether more may follow); the keys are
        None if the feed was cut past *seq* (the follower must rescan)."""
        db = self._reader
        db.execute("BEGIN")  # one snapshot for both reads
        try:
            pruned = int(db.execute("SELECT v FROM meta WHERE k='feed_pruned'").fetchone()[0])
            if seq < pruned:
                top = db.execute("SELECT COALESCE(MAX(seq), 0) FROM feed").fetchone()[0]
                return int(top), None, False
            rows = db.execute("SELECT seq, ns, key FROM feed WHERE seq > ? ORDER BY seq "
                              "LIMIT ?", (seq, FEED_BATCH)).fetchall()
        finally:
            db.execute("COMMIT")
        if rows:  # other namespaces' rows too: the cursor moves past them
            seq = rows[-1][0]
        keys = [_dec(bytes(key)) for _, row_ns, key in rows if row_ns == ns]
        return seq, keys, len(rows) == FEED_BATCH

    async def follow(self, ns: str, on_change: Callable[[list[str] | None], None]) -> None:
        cursor = await self._read(
            lambda db: int(db.execute("SELECT COALESCE(MAX(seq), 0) FROM feed").fetchone()[0]))
        on_change(None)  # what was published before now: rescan
        while True:
            changed = self._changed  # taken before the read: no change can slip between
            more = False
            try:
                cursor, keys, more = self._feed_after(ns, cursor)
            except sqlite3.OperationalError:  # busy: read again at the next change
                keys = []
            await trio.lowlevel.checkpoint()
            if keys is None or keys:
                on_change(keys)
            if not more:
                with trio.move_on_after(SAFETY_RECHECK):
                    await changed.wait()

    # -- waiting -------------------------------------------------------------------------
    async def wait_until(self, ns: str, key: str, pred: Predicate,
                         timeout: float | None) -> bytes | None:
        deadline = math.inf if timeout is None else trio.current_time() + timeout
        with trio.move_on_at(deadline):
            while True:
                changed = self._changed  # taken before the read: no change can slip between
                value = await self.get(ns, key)
                if pred(value):
                    return value
                with trio.move_on_after(SAFETY_RECHECK):
                    await changed.wait()
        raise timeout_error(ns, key, timeout)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Watch for commits by any process on this machine; wake this process' waiters.

        The watch is on the notify file itself, not its directory: the directory also holds the
        database and its WAL, whose every write would wake every mount on the machine."""
        flags = inotify_simple.flags
        mask = flags.ATTRIB | flags.CLOSE_WRITE | flags.MODIFY | flags.DELETE_SELF | \
            flags.MOVE_SELF
        ino = inotify_simple.INotify()
        self._inotify = ino
        try:
            ino.add_watch(str(self._notify), mask)
            task_status.started()
            while True:
                await trio.lowlevel.wait_readable(ino.fileno())
                events = ino.read(timeout=0)
                if any(e.mask & (flags.DELETE_SELF | flags.MOVE_SELF | flags.IGNORED)
                       for e in events):
                    # someone removed the notify file: make it again and watch the new one
                    _private_file(self._notify)
                    ino.add_watch(str(self._notify), mask)
                self._changed.set()
                self._changed = trio.Event()
        finally:
            self._inotify = None
            ino.close()

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            self._reader.close()
            self._fast.close()
            await self._call(self._db.close)

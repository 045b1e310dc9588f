"""The consumer's rules: what a lookup of a missing name answers, and what an open for reading
waits for.

Where the waiting happens (design.md): LOOKUP always answers at once. For a reader that opens an
unpublished name it answers with a provisional entry (zero timeouts); OPEN waits for the
publication, then pulls or opens. The reader's intent comes from :mod:`dyadfs.intent`.

A producer mount (``--role producer``) never waits: :attr:`Consumer.active` is False, a missing
name is ENOENT at once, and an open is the plain directory's.
"""

from __future__ import annotations

import errno
import logging
import os
import stat as stat_mod
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

import trio
from pyfuse3 import FUSEError

from . import intent
from .errors import DyadfsError, FetchError, WaitTimeout
from .keys import DyadOwner, FileRecord
from .owners import PROBE_EVERY, Owners
from .paths import parent_of, show
from .patterns import matcher

if TYPE_CHECKING:
    from .backing import Backing
    from .catalog import Catalog
    from .config import Config
    from .nodes import Handle
    from .puller import Pull, Puller
    from .stats import Stats

log = logging.getLogger(__name__)

#: how often a waiting open checks that its caller still wants the answer (seconds)
CALLER_CHECK = 0.25
#: how many such checks a second all waiting opens together make at most (beyond
#: CALLER_CHECKS_PER_S * CALLER_CHECK waiters, each checks less often)
CALLER_CHECKS_PER_S = 1000

_T = TypeVar("_T")

#: what a lookup of a name missing from the backing answers: a kind ("file", "dir"), the
#: published record (None: provisional, or a directory) and whether the name is published (a
#: record, or a directory of the index; else provisional); or "waited": look in the backing
#: again; or "awaited": a provisional file whose GETATTR waits for the publication
#: (--wait-on-stat, see :meth:`Consumer.await_stat`)
Missing = tuple[str, FileRecord | None, bool]


class Consumer:
    def __init__(self, config: Config, catalog: Catalog | None, puller: Puller | None,
                 backing: Backing, stats: Stats) -> None:
        self.cfg = config
        self.catalog = catalog
        self.puller = puller
        self.backing = backing
        self.stats = stats
        self.active = config.waits and catalog is not None
        self._warned_intent = False
        self._stat_waits = matcher(config.wait_on_stat)
        self._never_waits = matcher(config.no_wait)
        self.owners = Owners(catalog.kvs, catalog.ns) if catalog is not None else None
        self._callers = _Callers()

    # -- lookups -----------------------------------------------------------------------------
    async def missing(self, name: bytes, rel: bytes, pid: int) -> Missing:
        """A lookup of *rel*, which the backing does not have: a published file or directory,
        a provisional entry for a reader about to open it, or ENOENT at once."""
        if not self.active:
            raise FUSEError(errno.ENOENT)
        assert self.catalog is not None
        rec = await self.catalog.get(rel)
        if rec is not None and rec.complete:
            if rec.kind != "file" and self._make_here(rel, rec):
                return "waited", None, False  # made: look in the backing again
            return rec.kind, rec, True
        if await self.catalog.is_directory(rel):
            return "dir", None, True
        if self._never_waits(rel):
            raise FUSEError(errno.ENOENT)
        call = intent.caller(pid)
        if call.intent is intent.Intent.UNKNOWN:
            return self._unknown_intent(rel, pid)
        if call.intent is intent.Intent.READ:
            where = intent.role_of(name, rel, call.path)
            return ("dir" if where == "dir" else "file"), None, False
        if call.intent is intent.Intent.STAT:
            rest = intent.rest_of(name, rel, call.path)
            if rest and self._stat_waits(rel + b"/" + rest):
                return "dir", None, False  # on the way to a name worth waiting for
            if self._stat_waits(rel):
                return "awaited", None, False
        raise FUSEError(errno.ENOENT)

    def _unknown_intent(self, rel: bytes, pid: int) -> Missing:
        """The caller's system call cannot be read (Yama's ptrace_scope >= 1 for a daemon that
        is not root, another user's process). Creators must never block, so a missing name is
        ENOENT at once, except the names the user said are worth waiting for
        (--wait-on-stat): those answer as for a stat that waits, and a stat or an open of one
        waits. What degrades: other readers see ENOENT instead of waiting, and a creator of a
        name matching --wait-on-stat waits too (its open asks for the name's attributes)."""
        if not self._warned_intent:
            self._warned_intent = True
            log.warning("cannot read /proc/%d/syscall (kernel.yama.ptrace_scope >= 1 for a "
                        "daemon that is not root, or another user's process): opens and stats "
                        "of unpublished names answer ENOENT at once instead of waiting, but "
                        "for names matching --wait-on-stat (%s), which wait", pid,
                        ",".join(self.cfg.wait_on_stat) or "none given")
        if self._stat_waits(rel):
            return "awaited", None, False
        raise FUSEError(errno.ENOENT)

    async def await_stat(self, rel: bytes, pid: int,
                         here: Callable[[], Awaitable[None]]) -> FileRecord | None:
        """A stat of *rel* (not published yet, --wait-on-stat) waits here, in the GETATTR that
        follows its lookup, never in the LOOKUP: libfuse 3.14 does not pass FUSE_PARALLEL_DIROPS
        on to the kernel (fixed in 3.17), so the kernel holds the directory's lock for a LOOKUP
        under way, and a stat waiting there would freeze every other lookup and ``ls`` of that
        directory. *here*: returns once the name got a file of this mount's own (a local
        create ends the wait too). Returns the published record (None: C DYAD's publication,
        pulled here, or the file made here)."""
        assert self.catalog is not None

        async def made_here() -> FileRecord | DyadOwner | None:
            await here()
            return None
        published: Awaitable[FileRecord | DyadOwner | None] = \
            self.catalog.wait_published(rel, self.cfg.wait_timeout)
        pub = await self.until_caller_dies(pid, published, rel, "stat", also=made_here())
        if pub is None:
            return None
        if isinstance(pub, DyadOwner):
            if not self.cfg.shared_storage:
                await self._pull_dyad(rel, pub, pid)
            return None
        return pub

    async def stale(self, rel: bytes, st: os.stat_result) -> bool:
        """Whether *rel*, present here, is a pulled copy of a version that is no longer the
        published one. Its lookup then answers a new provisional node, so that the open pulls
        the new version into a node of its own: the old one's cached pages stay with the
        descriptors still reading the old version."""
        if not self.active or self.cfg.shared_storage or self.puller is None:
            return False
        if stat_mod.S_ISLNK(st.st_mode):
            return await self._stale_link(rel)
        if not stat_mod.S_ISREG(st.st_mode):
            return False
        version = self.puller.cache.local_version(rel)
        if version is None:
            return False
        assert self.catalog is not None
        rec = await self.catalog.get(rel)
        return rec is not None and rec.complete and rec.version != version and \
            rec.owner != self.catalog.mount_id

    def _make_here(self, rel: bytes, rec: FileRecord) -> bool:
        """A published directory or symlink is made here at its first lookup (node-local
        storage): nothing to pull, and the local tree is then whole (git, cp -r, rsync)."""
        if self.cfg.shared_storage or (rec.kind == "symlink" and rec.target is None):
            return False
        parent = parent_of(rel)
        try:
            if parent != b".":
                self.backing.makedirs(parent)
            if rec.kind == "dir":
                self.backing.mkdir(rel, rec.mode & 0o7777 or 0o755)
            else:
                assert rec.target is not None
                self.backing.symlink(os.fsencode(rec.target), rel)
        except FileExistsError:
            pass
        except OSError as e:
            log.warning("cannot make the published %s %s here: %s", rec.kind, show(rel),
                        e.strerror or e)
            return False
        return True

    async def _stale_link(self, rel: bytes) -> bool:
        """A link made here from a publication whose target has changed since (the producer
        made the link again) is made again: it goes now, and the lookup makes the new one."""
        assert self.catalog is not None
        rec = await self.catalog.get(rel)
        if rec is None or rec.kind != "symlink" or rec.target is None or \
                rec.owner == self.catalog.mount_id:
            return False
        if self.backing.readlink(rel) == os.fsencode(rec.target):
            return False
        self.backing.unlink(rel)
        return True

    async def record(self, rel: bytes) -> FileRecord | None:
        """The published record of *rel* (the attributes of a provisional file)."""
        assert self.catalog is not None
        return await self.catalog.get(rel)

    async def published_children(self, rel: bytes) -> dict[bytes, FileRecord | None]:
        """Names published directly below directory *rel* (None: a directory)."""
        if not self.active:
            return {}
        assert self.catalog is not None
        return await self.catalog.children(rel)

    # -- opening for reading -----------------------------------------------------------------
    async def make_readable(self, rel: bytes, pid: int) -> Pull | None:
        """Consumer side of an open for reading: wait, refresh or pull as the semantics table
        says. Returns the pull to stream from when the file is still arriving."""
        if not self.active:
            return None
        assert self.catalog is not None
        st = self.backing.lstat_or_none(rel)
        if st is not None and not stat_mod.S_ISREG(st.st_mode):
            return None
        if self.cfg.shared_storage:
            await self._until_closed(rel, st is not None, pid)
            return None
        rec = await self.catalog.get(rel)
        if rec is not None and (rec.owner == self.catalog.mount_id or not rec.complete):
            return None  # ours: the local file is the truth
        if st is not None and self._current(rel, rec):
            return None
        if rec is None:
            pub = await self.wait_published(rel, pid)
            if isinstance(pub, DyadOwner):
                await self._pull_dyad(rel, pub, pid)
                return None
            rec = pub
            if rec.owner == self.catalog.mount_id:
                return None
        return await self._pull(rel, rec, pid)

    def _current(self, rel: bytes, rec: FileRecord | None) -> bool:
        """Whether the file present at *rel* is what an open should read: not published
        (a local file), or the pulled copy of the published version."""
        cache = self.puller.cache if self.puller is not None else None
        if rec is not None and (cache is None or cache.local_version(rel) != rec.version):
            return False
        if cache is not None:
            cache.touch(rel)
        return True

    async def _pull(self, rel: bytes, rec: FileRecord, pid: int) -> Pull | None:
        """Pull *rel* at *rec*'s version; if the owner is rewriting it meanwhile, the version
        it publishes next."""
        assert self.catalog is not None
        if self.puller is None:
            raise DyadfsError(f"{os.fsdecode(rel)} is published by another mount and this mount "
                              "has no transport to pull it", errno.EIO)
        while True:
            try:
                if self.cfg.verify:
                    await self.puller.ensure(rel, rec)  # verified before anyone reads a byte
                    return None
                return await self.puller.start(rel, rec)
            except FetchError as e:
                if e.errno != errno.ESTALE:
                    raise
            rec = await self._newer(rel, rec.version, pid)
            if rec.owner == self.catalog.mount_id:
                return None

    async def _newer(self, rel: bytes, version: int, pid: int) -> FileRecord:
        assert self.catalog is not None
        rec = await self.until_caller_dies(pid, self.catalog.wait_complete(
            rel, self.cfg.wait_timeout, newer_than=version), rel)
        assert rec is not None
        return rec

    async def _until_closed(self, rel: bytes, present: bool, pid: int) -> None:
        """Shared storage: wait until the file is there and nobody is writing it."""
        assert self.catalog is not None
        rec = await self.catalog.get(rel)
        if present and (rec is None or rec.complete):
            return  # present, and nobody is writing it
        if rec is not None and not rec.complete:
            await self.until_caller_dies(
                pid, self.catalog.wait_not_writing(rel, self.cfg.wait_timeout), rel,
                also=self._writer_gone(rel))
            return
        # Not there: wait for a publication whose file is there too (the backing is the
        # truth; a record without its file is stale, from an earlier run). C DYAD's key
        # counts: it is written at the close, so the file is whole; nothing to pull.
        await self.until_caller_dies(pid, self.catalog.wait_published(
            rel, self.cfg.wait_timeout, also=lambda: self.backing.exists(rel)), rel)

    async def _writer_gone(self, rel: bytes) -> FileRecord | None:
        """Shared storage: returns once *rel* is no longer marked "writing"; fails with EIO
        once the mount that marked it has been gone (see :mod:`dyadfs.owners`) for
        --fetch-timeout: killed mid-write, it will never replace its mark."""
        assert self.catalog is not None and self.owners is not None
        gone_since: float | None = None
        version = None
        while True:
            rec = await self.catalog.get(rel)
            if rec is None or rec.complete:
                return rec
            if rec.version != version:  # a new mark: a new writer
                version, gone_since = rec.version, None
            why = await self.owners.gone(rec.owner, rec.mtime_ns)
            now = trio.current_time()
            if why is None:
                gone_since = None
            elif gone_since is None:
                gone_since = now
                log.info("%s is marked \"writing\" by %s, which looks gone: %s", show(rel),
                         rec.owner, why)
            elif now - gone_since >= self.cfg.fetch_timeout:
                raise FetchError(f"{show(rel)} is marked \"writing\" by {rec.owner}, gone "
                                 f"for {self.cfg.fetch_timeout} s ({why})", errno.EIO)
            await trio.sleep(min(PROBE_EVERY, self.cfg.fetch_timeout / 4))

    def opened(self, handle: Handle, local_writers: bool) -> None:
        """Shared storage: remember which bytes a reader opened (see :meth:`check_read`). Not
        when this mount writes the file itself: that is local semantics, as on any
        directory."""
        if self.active and self.cfg.shared_storage and not local_writers and \
                handle.flags & os.O_ACCMODE == os.O_RDONLY:
            st = os.fstat(handle.fd)
            handle.opened = (st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def check_read(self, handle: Handle, rel: bytes) -> None:
        """Shared storage cannot keep a version's bytes once its producer rewrites the file in
        place: a read that may have seen the new bytes (the file changed since the open,
        checked after the read) fails with ESTALE rather than hand out a mix of versions."""
        if handle.opened is None:
            return
        st = os.fstat(handle.fd)
        if (st.st_size, st.st_mtime_ns, st.st_ctime_ns) != handle.opened:
            self.stats.errors += 1
            log.warning("%s changed under a reader on shared storage: ESTALE", show(rel))
            raise FUSEError(errno.ESTALE)

    def changed_locally(self, rel: bytes) -> None:
        """*rel* was written, removed or replaced here: it is no longer a pulled copy."""
        if self.puller is not None:
            self.puller.cache.forget(rel)

    # -- waiting -----------------------------------------------------------------------------
    async def wait_published(self, rel: bytes, pid: int,
                             what: str = "open") -> FileRecord | DyadOwner:
        """Until *rel* is published: by a dyadfs mount (its record), or, with DYAD interop, by
        C DYAD (DYAD's key and no record: the rank that serves it)."""
        assert self.catalog is not None
        return await self.until_caller_dies(
            pid, self.catalog.wait_published(rel, self.cfg.wait_timeout), rel, what)

    async def _pull_dyad(self, rel: bytes, owner: DyadOwner, pid: int) -> None:
        """Pull a file C DYAD published from its rank's dyad.fetch; the open reads it once
        whole (DYAD sends it in one message: nothing to stream)."""
        if self.puller is None:
            raise DyadfsError(f"{os.fsdecode(rel)} is published by C DYAD and this mount "
                              "has no transport to pull it", errno.EIO)
        await self.until_caller_dies(pid, self.puller.pull_dyad(rel, owner.rank), rel)

    async def until_caller_dies(self, pid: int, wait: Awaitable[_T], rel: bytes,
                                what: str = "open", also: Awaitable[_T] | None = None) -> _T:
        """Run *wait*, dropped if the process that asked is killed or interrupted first.
        *also*: a second way for the wait to end (its result or its error), whichever first.

        Once the daemon has read a request, the kernel keeps even a SIGKILLed caller in the
        syscall until the answer comes (and pyfuse3 does not pass on FUSE_INTERRUPT), so the
        caller's pending signals are watched: a deliverable one ends the wait with EINTR, after
        which the signal takes effect (a killed ``cat`` dies, Python raises KeyboardInterrupt).
        """
        result: list[_T] = []
        failure: list[Exception] = []
        self.stats.waiting += 1
        scope = trio.CancelScope()
        try:
            with scope:
                if not caller_alive(pid):
                    scope.cancel()  # gone before the wait began
                self._callers.watch(scope, pid)
                try:
                    if also is None:  # the common case: no task of its own (see _Callers)
                        result.append(await wait)
                    else:
                        result.append(await _first_of(wait, also))
                except Exception as e:  # re-raised below, outside the scope
                    failure.append(e)
        finally:
            self._callers.unwatch(scope)
            self.stats.waiting -= 1
        if failure:
            if isinstance(failure[0], WaitTimeout):
                self.stats.wait_timeouts += 1
                log.warning("%s of %s: not published after %s s: ETIMEDOUT", what,
                            show(rel), self.cfg.wait_timeout)
            raise failure[0]
        if not result:
            log.info("%s of %s: the waiting process was signalled or is gone; wait dropped",
                     what, show(rel))
            raise FUSEError(errno.EINTR)
        self.stats.waits_done += 1
        return result[0]


async def _first_of(one: Awaitable[_T], other: Awaitable[_T]) -> _T:
    """The result (or the error) of whichever of *one* and *other* ends first."""
    result: list[_T] = []
    failure: list[Exception] = []
    async with trio.open_nursery() as nursery:
        async def waiter(ending: Awaitable[_T]) -> None:
            try:
                result.append(await ending)
            except Exception as e:  # re-raised below, outside the nursery
                failure.append(e)
            nursery.cancel_scope.cancel()
        nursery.start_soon(waiter, one)
        nursery.start_soon(waiter, other)
    if failure:
        raise failure[0]
    return result[0]


class _Callers:
    """The processes whose requests wait (open, stat), looked after by one task.

    No event tells that a signal is pending: a look at /proc is it. One task looks, every
    CALLER_CHECK seconds, at up to CALLER_CHECKS_PER_S * CALLER_CHECK of the waiting callers
    in turn (each one at least every CALLER_CHECK s while fewer wait), and cancels the wait of
    one that is gone or signalled. A watching task per wait (and a nursery to hold it) cost
    ~7 KB per waiting request here, a third of the daemon's memory per wait, and with
    thousands waiting, thousands of wake-ups a second."""

    def __init__(self) -> None:
        self._waits: dict[trio.CancelScope, int] = {}
        self._cursor = 0
        self._running = False

    def watch(self, scope: trio.CancelScope, pid: int) -> None:
        self._waits[scope] = pid
        if not self._running:
            self._running = True
            trio.lowlevel.spawn_system_task(self._run, name="dyadfs: waiting callers")

    def unwatch(self, scope: trio.CancelScope) -> None:
        self._waits.pop(scope, None)

    async def _run(self) -> None:
        try:
            while self._waits:
                await trio.sleep(CALLER_CHECK)
                waits = list(self._waits.items())
                budget = max(1, int(CALLER_CHECKS_PER_S * CALLER_CHECK))
                if len(waits) > budget:  # in turn: each within len / CALLER_CHECKS_PER_S s
                    first = self._cursor % len(waits)
                    waits = (waits[first:] + waits[:first])[:budget]
                    self._cursor = first + budget
                for scope, pid in waits:
                    if not caller_alive(pid):
                        scope.cancel()
        finally:
            self._running = False


def caller_alive(tid: int) -> bool:
    """False once thread *tid* is gone or has a signal pending that it will take."""
    try:
        with open(f"/proc/{tid}/status", "rb") as f:
            fields = dict(line.split(b":", 1) for line in f if b":" in line)
        pending = int(fields[b"SigPnd"], 16) | int(fields[b"ShdPnd"], 16)
        blocked = int(fields[b"SigBlk"], 16) | int(fields[b"SigIgn"], 16)
        state = fields[b"State"].split()[0]
    except (OSError, KeyError, ValueError):
        return False
    return state not in (b"Z", b"X") and not pending & ~blocked

"""The producer's rules: which change of a file publishes it, and when.

The FUSE adapter (fs.py) tells this module what happens to a file (about to change, written,
a write failed, closed, truncated, renamed...) and this module decides what the KVS learns,
through the catalog. Each row of the README's publication table has one function here:

- the last close of a written handle publishes (:meth:`Producer.flushed`), before close()
  returns; a handle that may back a shared writable map (open read-write) publishes only once
  no process maps the file, at the last close or at RELEASE after the map went away;
- a new or truncated file is published even if left empty (:meth:`Producer.released`);
- a file unlinked before its last close is not published; neither is one whose write or
  truncation failed (ENOSPC, EIO) since its last publication, whose old publication is removed
  (its bytes are gone);
- ``--async-publish`` publications commit in the order of the closes (one queue);
- on shared storage a file is marked "writing" before its first change (creation,
  truncation, first write), not at open: an open for writing that writes nothing leaves the
  file as it was, and so does a failed create;
- renames, unlinks, hard links, chmod and touch follow (:meth:`Producer.renamed`...).

It also vouches for what the owner's file server sends (:meth:`Producer.vouch`): every change of
a file through this mount bumps a generation first, so a fetch of a version whose bytes are being
rewritten is refused, and a transfer under way stops at the first chunk read after the change.

A consumer mount (``--role consumer``) publishes nothing: :attr:`Producer.active` is False and
every call is a no-op.
"""

from __future__ import annotations

import logging
import math
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from .errors import DyadfsError
from .nodes import Handle, Key, key_of
from .paths import show

if TYPE_CHECKING:
    from .catalog import Catalog
    from .config import Config
    from .keys import FileRecord
    from .stats import Stats

log = logging.getLogger(__name__)

_Queued = tuple[list[bytes], os.stat_result, Key, int]  # names, attributes, identity, generation


@dataclass
class Changing:
    """A file being changed through this mount since its last publication here."""

    gen: int = 1  # bumped before every change of its bytes
    failed: bool = False  # a write or truncation failed: its bytes are not a version


@dataclass
class _Mark:
    """Shared storage: a file marked "writing", and what its record was before."""

    before: FileRecord | None
    holders: int = 0


class Producer:
    def __init__(self, config: Config, catalog: Catalog | None, stats: Stats) -> None:
        self.cfg = config
        self.catalog = catalog
        self.stats = stats
        self.active = config.publishes and catalog is not None
        self._changing: dict[Key, Changing] = {}
        self._marks: dict[bytes, _Mark] = {}
        self._queue, self._queued = trio.open_memory_channel[_Queued](math.inf)
        self._running = False
        #: whether a process maps the node's file writable (set by the file system)
        self.mapped: Callable[[Handle], bool] = lambda handle: False

    def attach(self, nursery: trio.Nursery) -> None:
        """Where ``--async-publish`` publications commit: one task, in the order of the
        closes (several tasks could commit an older record over a newer one)."""
        if self.cfg.async_publish and self.active:
            self._running = True
            nursery.start_soon(self._commit_queued)

    async def _commit_queued(self) -> None:
        async with self._queued:
            async for rels, st, key, gen in self._queued:
                try:
                    await self._commit(rels, st, key, gen)
                except DyadfsError as e:
                    log.error("asynchronous publication of %s failed: %s", show(rels[0]), e)

    # -- before and during a change ------------------------------------------------------
    def changing(self, key: Key | None) -> None:
        """The file of *key* is about to change: what was published of it is no longer there."""
        if key is None or not self.active:
            return
        state = self._changing.get(key)
        if state is None:
            self._changing[key] = Changing()
        else:
            state.gen += 1

    def truncated_to_zero(self, key: Key | None) -> None:
        """Whatever failed before, the file's bytes are now a whole version (empty)."""
        state = self._changing.get(key) if key is not None else None
        if state is not None:
            state.failed = False

    def failed(self, key: Key | None, rel: bytes, err: OSError) -> None:
        """A write or truncation of the file failed: it is not published until it is rewritten
        whole."""
        if key is None or not self.active:
            return
        self._changing.setdefault(key, Changing()).failed = True
        log.warning("%s: a write failed (%s): not published until it is rewritten", show(rel),
                    err.strerror or err)

    async def will_write(self, handle: Handle, rel: bytes) -> None:
        """Before a write through *handle*: on shared storage, the file is marked at the first
        one."""
        handle.written = True
        if handle.publishes and not handle.marked and self.cfg.shared_storage:
            await self.mark(rel)
            self.hold(handle, rel)

    async def mark(self, rel: bytes, mode: int = 0o644) -> None:
        """Shared storage: say that *rel* is being written, before it exists or changes, so that
        no consumer reads it half done."""
        if not (self.active and self.cfg.shared_storage) or rel in self._marks:
            return
        assert self.catalog is not None
        previous = await self.catalog.get(rel)
        self._marks[rel] = _Mark(previous if previous is not None and previous.complete
                                 else None)
        await self.catalog.mark_writing(rel, mode)

    def hold(self, handle: Handle, rel: bytes) -> None:
        """*handle* changes the file *rel* marked: its release decides about the mark."""
        mark = self._marks.get(rel)
        if mark is not None and not handle.marked:
            handle.marked = True
            mark.holders += 1

    async def unmark(self, rel: bytes) -> None:
        """Shared storage: the change announced by :meth:`mark` did not happen (a failed
        create, an open for writing closed unwritten): the record goes back to what it was."""
        mark = self._marks.pop(rel, None)
        if mark is None or self.catalog is None:
            return
        if mark.before is None:
            await self.catalog.remove(rel)
        else:
            await self.catalog.restore(rel, mark.before)

    # -- closing ---------------------------------------------------------------------------
    async def flushed(self, handle: Handle, rels: list[bytes]) -> None:
        """FLUSH comes with every close() and close() waits for it (RELEASE does not): a
        written handle publishes here, so that the publication is committed before the
        producer's close() returns, unless a process still maps the file (then at RELEASE)."""
        if handle.written and handle.publishes and not (
                handle.flags & os.O_ACCMODE == os.O_RDWR and self.mapped(handle)):
            handle.written = handle.pending = False
            await self._publish_handle(handle, rels)

    async def released(self, handle: Handle, rels: list[bytes], writers_left: bool) -> None:
        """The last reference to an open file went. A new or truncated file is published even
        if left empty, but here, not at its first flush: a shell's ``> f`` closes a dup of the
        descriptor before writing anything."""
        if (handle.written or handle.pending) and handle.publishes:
            handle.written = handle.pending = False
            await self._publish_handle(handle, rels)
        elif handle.marked and not writers_left:
            mark = self._marks.get(rels[0])
            if mark is not None:
                mark.holders -= 1
                if mark.holders <= 0 and not self._changing.get(key_of(os.fstat(handle.fd))):
                    await self.unmark(rels[0])

    async def _publish_handle(self, handle: Handle, rels: list[bytes]) -> None:
        st = os.fstat(handle.fd)
        rel = rels[0]
        if st.st_nlink == 0:
            log.info("%s was unlinked before its last close: not published", show(rel))
            return
        key = key_of(st)
        state = self._changing.get(key)
        if state is not None and state.failed:
            log.warning("%s: not published, a write failed since its last publication",
                        show(rel))
            await self._withdraw(rels)
            return
        gen = state.gen if state is not None else 0
        if self._running:
            self._queue.send_nowait((rels, st, key, gen))
        else:
            await self._commit(rels, st, key, gen)

    async def _commit(self, rels: list[bytes], st: os.stat_result, key: Key, gen: int) -> None:
        assert self.catalog is not None
        state = self._changing.get(key)
        if state is not None and state.gen == gen and not state.failed:
            # What is being published is what the file holds. Cleared before the commit: a
            # consumer woken by the commit may fetch before this task runs again.
            del self._changing[key]
        try:
            for rel in rels:
                await self.catalog.publish(rel, st)
                self._marks.pop(rel, None)
                self.stats.published += 1
        except BaseException:
            if state is not None:
                self._changing.setdefault(key, state)
            raise

    async def publish(self, rels: list[bytes], fd: int) -> None:
        """Publish the names *rels* of the file open at *fd*, as it is now (a truncation
        without an open file)."""
        if not self.active:
            return
        handle_st = os.fstat(fd)
        key = key_of(handle_st)
        state = self._changing.get(key)
        if state is not None and state.failed:
            await self._withdraw(rels)
            return
        await self._commit(rels, handle_st, key, state.gen if state is not None else 0)

    async def _withdraw(self, rels: list[bytes]) -> None:
        """The bytes a publication of ours named are gone: it goes too."""
        assert self.catalog is not None
        for rel in rels:
            self._marks.pop(rel, None)
            if await self._ours(rel):
                await self.catalog.remove(rel)

    async def _ours(self, rel: bytes) -> bool:
        assert self.catalog is not None
        rec = await self.catalog.get(rel)
        return rec is not None and rec.owner == self.catalog.mount_id

    # -- serving ---------------------------------------------------------------------------
    def vouch(self, st: os.stat_result, rec: FileRecord) -> str | None:
        """None while the file of *st* still holds the published version *rec*, else why not.

        Asked by the file server before it sends a published file and after every chunk it
        read: every change through this mount is announced first (:meth:`changing`); a change
        made behind the mount's back (on the backing directory itself) shows in the size or
        the modification time."""
        if key_of(st) in self._changing:
            return "the file is being rewritten"
        if st.st_size != rec.size or st.st_mtime_ns != rec.mtime_ns:
            return "the file changed since its publication"
        return None

    # -- other changes ---------------------------------------------------------------------
    async def attributes_changed(self, rel: bytes, st: os.stat_result) -> None:
        """A chmod or touch of a published file or directory: its published attributes
        follow."""
        if not self.active:
            return
        assert self.catalog is not None
        rec = await self.catalog.get(rel)
        if rec is None or rec.owner != self.catalog.mount_id or not rec.complete:
            return
        if stat.S_ISDIR(st.st_mode):
            await self.catalog.publish_dir(rel, st)
        elif stat.S_ISREG(st.st_mode):
            await self.catalog.publish(rel, st)

    async def linked(self, old: bytes, new: bytes, st: os.stat_result,
                     target: bytes | None = None) -> None:
        """A hard link to a published file (or symlink, *target*) is published under its new
        name too."""
        if self.active and await self._ours(old):
            assert self.catalog is not None
            if target is not None:
                await self.catalog.publish_symlink(new, target, st)
            else:
                await self.catalog.publish(new, st)
            self.stats.published += 1

    async def dir_made(self, rel: bytes, st: os.stat_result) -> None:
        """A directory made here is published, so that it reaches node-local consumers even
        when it stays empty (git's refs/, an output tree made before its files)."""
        if self.active and not self.cfg.shared_storage:
            assert self.catalog is not None
            await self.catalog.publish_dir(rel, st)

    async def symlink_made(self, rel: bytes, target: bytes, st: os.stat_result) -> None:
        """A symbolic link made here is published with its target (cp -r, rsync -a, tar -x
        trees keep their links on the consumers)."""
        if self.active and not self.cfg.shared_storage:
            assert self.catalog is not None
            await self.catalog.publish_symlink(rel, target, st)

    async def dir_removed(self, rel: bytes) -> None:
        """rmdir: the directory leaves the KVS (its record, or its place in the index)."""
        if self.active and not self.cfg.shared_storage:
            assert self.catalog is not None
            await self.catalog.remove(rel)

    async def unlinked(self, rel: bytes) -> None:
        self._marks.pop(rel, None)
        if self.active and await self._ours(rel):
            assert self.catalog is not None
            await self.catalog.remove(rel)

    async def renamed(self, old: bytes, new: bytes, replaced: bool, exchange: bool) -> None:
        """The publications of *old* (a file or a directory's tree) move to *new*."""
        if not self.active or exchange:
            return
        assert self.catalog is not None
        await self.catalog.move(old, new, replaced)

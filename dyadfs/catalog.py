"""The catalog: what a mount publishes and looks up, in the schema of :mod:`dyadfs.keys`.

It sits between the file system and the KVS so that ``fs.py`` speaks of files, directories and
links, not keys. On Flux it also writes DYAD's own key beside each file's publication (the
producer's broker rank, a JSON integer), so that C DYAD and dyadfs can share a namespace.

Listings and "is this a directory?" go through the KVS's directory index (see
:mod:`dyadfs.keys`), never through a scan of a subtree: their cost does not grow with the
namespace. A walk of a subtree (a renamed or removed directory, the producer's "do I own
anything here?") goes directory by directory through the same index.

Malformed records: a point read (:meth:`Catalog.get`) or a wait that meets one fails with a
:class:`KVSError` (EIO for the caller) and one log line naming the key, the field and the value;
it never looks unpublished (that would make an open wait forever). Listings and walks skip it,
with a warning, so that one bad key never hides a whole directory.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable

import trio

from . import keys
from .errors import DyadfsError, KVSError
from .keys import DyadOwner, FileRecord
from .kvs import KVS, timeout_error

log = logging.getLogger(__name__)


def _path(rel: bytes) -> str:
    """A path of the ``files/`` namespace (``""``: the top)."""
    return "" if rel in (b"", b".") else os.fsdecode(rel)


def _key_of(rel: bytes) -> str:
    return keys.file_key(os.fsdecode(rel))


def _join(rel: bytes, name: bytes) -> bytes:
    return name if rel in (b"", b".") else rel + b"/" + name


class Catalog:
    def __init__(self, kvs: KVS, ns: str, mount_id: str, *, dyad_keys: bool = False,
                 rank: int | None = None, key_depth: int = 3, key_bins: int = 1024) -> None:
        self.kvs = kvs
        self.ns = ns
        self.mount_id = mount_id
        self._dyad_keys = dyad_keys
        self._rank = rank
        self._depth = key_depth
        self._bins = key_bins
        self._last_version = 0

    def next_version(self) -> int:
        """Unique per publication: wall-clock nanoseconds, strictly increasing in this mount."""
        self._last_version = max(time.time_ns(), self._last_version + 1)
        return self._last_version

    # -- decoding --------------------------------------------------------------------------
    @staticmethod
    def _strict(raw: bytes | None, key: str) -> FileRecord | None:
        """The record in *raw* (None: not published); KVSError, logged, if it is malformed."""
        if raw is None:
            return None
        try:
            return FileRecord.decode(raw, key)
        except KVSError as e:
            log.warning("%s", e)
            raise

    @staticmethod
    def _lenient(raw: bytes, key: str) -> FileRecord | None:
        """For listings and walks: a malformed record is skipped, with a warning."""
        try:
            return FileRecord.decode(raw, key)
        except KVSError as e:
            log.warning("%s (skipped)", e)
            return None

    # -- reading -----------------------------------------------------------------------------
    async def get(self, rel: bytes) -> FileRecord | None:
        """The record published at *rel*, or None; KVSError (EIO) if it is malformed."""
        key = _key_of(rel)
        return self._strict(await self.kvs.get(self.ns, key), key)

    async def children(self, rel: bytes) -> dict[bytes, FileRecord | None]:
        """The published entries of directory *rel*: complete records of every kind, and None
        for a directory that is there only because something is published below it."""
        path = _path(rel)
        out: dict[bytes, FileRecord | None] = {}
        for name, raw in (await self.kvs.children(self.ns, path)).items():
            if raw is None:
                out[os.fsencode(name)] = None
                continue
            rec = self._lenient(raw, keys.file_key(f"{path}/{name}" if path else name))
            if rec is not None and rec.complete:
                out[os.fsencode(name)] = rec
        return out

    async def is_directory(self, rel: bytes) -> bool:
        """Whether *rel* is a directory in the namespace: something is (or was, until the
        directory is removed) published below it, or it is published as one. One point read,
        two when it is not a directory in the index."""
        if await self.kvs.is_dir(self.ns, _path(rel)):
            return True
        key = _key_of(rel)
        raw = await self.kvs.get(self.ns, key)
        rec = None if raw is None else self._lenient(raw, key)
        return rec is not None and rec.kind == "dir" and rec.complete

    async def published_files(self) -> list[bytes]:
        """Every file (not directory or link) published complete in the namespace: a full scan,
        for a rescan of ``--prefetch``."""
        out = []
        for key, raw in (await self.kvs.list_prefix(self.ns, keys.FILES)).items():
            rec = self._lenient(raw, key)
            if rec is not None and rec.complete and rec.kind == "file":
                out.append(os.fsencode(key[len(keys.FILES):]))
        return out

    async def _tree(self, rel: bytes) -> dict[bytes, FileRecord]:
        """Every record at *rel* and below it, whoever owns them, through the index: a file
        costs one read, a directory one listing per directory below it."""
        out: dict[bytes, FileRecord] = {}
        key = _key_of(rel)
        raw = await self.kvs.get(self.ns, key)
        rec = None if raw is None else self._lenient(raw, key)
        if rec is not None:
            out[rel] = rec
            if rec.kind != "dir":
                return out
        todo = [rel]
        while todo:
            d = todo.pop()
            path = _path(d)
            for name, value in (await self.kvs.children(self.ns, path)).items():
                child = _join(d, os.fsencode(name))
                if value is None:
                    todo.append(child)
                    continue
                rec = self._lenient(value, keys.file_key(os.fsdecode(child)))
                if rec is None:
                    continue
                out[child] = rec
                if rec.kind == "dir":
                    todo.append(child)
        return out

    async def owned_under(self, rel: bytes) -> dict[bytes, FileRecord]:
        """Records this mount owns at *rel* or below it (a file, or a directory's tree)."""
        return {r: rec for r, rec in (await self._tree(rel)).items()
                if rec.owner == self.mount_id}

    # -- publishing --------------------------------------------------------------------------
    def _dyad_key(self, rel: bytes) -> str | None:
        """DYAD's key of *rel* (None: no DYAD interop, or a name DYAD cannot have)."""
        if not self._dyad_keys:
            return None
        try:
            upath = rel.decode("utf-8")
        except UnicodeDecodeError:
            return None  # Flux keys are UTF-8 strings: DYAD cannot name this file, dyadfs can
        return keys.dyad_key(upath, self._depth, self._bins)

    def _dyad_puts(self, rel: bytes, present: bool) -> dict[str, bytes | None]:
        key = self._dyad_key(rel)
        if key is None:
            return {}
        return {key: str(self._rank if self._rank is not None else 0).encode() if present
                else None}

    def record_for(self, st: os.stat_result, state: str = "complete",
                   sha256: str | None = None, kind: str = "file",
                   target: str | None = None) -> FileRecord:
        if kind == "dir" or state != "complete":
            size = 0
        elif kind == "symlink":
            size = len(os.fsencode(target or ""))
        else:
            size = st.st_size
        return FileRecord(state=state, size=size, version=self.next_version(),
                          mtime_ns=st.st_mtime_ns, mode=st.st_mode & 0o7777,
                          owner=self.mount_id, sha256=sha256, kind=kind, target=target)

    async def publish(self, rel: bytes, st: os.stat_result) -> FileRecord:
        """Publish the file at *rel* (*st*: its stat)."""
        rec = self.record_for(st)
        await self.kvs.commit(self.ns, {_key_of(rel): rec.encode(), **self._dyad_puts(rel, True)})
        return rec

    async def publish_dir(self, rel: bytes, st: os.stat_result) -> FileRecord:
        """Publish the directory at *rel*, so that it reaches consumers even when empty."""
        rec = self.record_for(st, kind="dir")
        await self.kvs.commit(self.ns, {_key_of(rel): rec.encode()})
        return rec

    async def publish_symlink(self, rel: bytes, target: bytes,
                              st: os.stat_result) -> FileRecord:
        """Publish the symbolic link at *rel* to *target* (*st*: its lstat)."""
        rec = self.record_for(st, kind="symlink", target=os.fsdecode(target))
        await self.kvs.commit(self.ns, {_key_of(rel): rec.encode()})
        return rec

    async def mark_writing(self, rel: bytes, mode: int) -> None:
        """Shared storage: say that *rel* is being written, before it exists or changes."""
        rec = FileRecord(state="writing", size=0, version=self.next_version(),
                         mtime_ns=time.time_ns(), mode=mode & 0o7777, owner=self.mount_id)
        await self.kvs.commit(self.ns, {_key_of(rel): rec.encode()})

    async def restore(self, rel: bytes, rec: FileRecord) -> None:
        """Put back *rec*, a record of *rel* read before (a "writing" mark withdrawn)."""
        await self.kvs.commit(self.ns, {_key_of(rel): rec.encode(),
                                        **self._dyad_puts(rel, rec.complete and
                                                          rec.kind == "file")})

    async def remove(self, rel: bytes) -> None:
        """Unpublish *rel*, whatever it is. A directory also leaves the index unless something
        (of another mount) is still published below it."""
        drop = []
        path = _path(rel)
        if await self.kvs.is_dir(self.ns, path) and not await self.kvs.children(self.ns, path):
            drop.append(path)
        await self.kvs.commit(self.ns, {_key_of(rel): None, **self._dyad_puts(rel, False)},
                              drop=drop)

    async def move(self, old: bytes, new: bytes, replaced: bool) -> None:
        """Follow a rename of *old* (a file, link or directory with its tree) to *new*, in one
        commit; what this mount published at *new* before goes if *replaced*."""
        puts: dict[str, bytes | None] = {}
        drop: list[str] = []
        if replaced:
            there = await self._tree(new)
            for rel, rec in there.items():
                if rec.owner == self.mount_id:
                    puts[_key_of(rel)] = None
                    if rec.kind == "file":
                        puts.update(self._dyad_puts(rel, False))
            if all(rec.owner == self.mount_id for rec in there.values()):
                drop.append(_path(new))  # a replaced (empty) directory: its index goes
        tree = await self._tree(old)
        mine = {rel: rec for rel, rec in tree.items() if rec.owner == self.mount_id}
        for rel, rec in mine.items():
            moved = new + rel[len(old):]
            puts[_key_of(rel)] = None
            fresh = dataclasses.replace(rec, version=self.next_version())
            puts[_key_of(moved)] = fresh.encode()
            if rec.kind == "file":
                puts.update(self._dyad_puts(rel, False))
                puts.update(self._dyad_puts(moved, True))
        is_tree = old not in tree or tree[old].kind == "dir"
        if is_tree and len(mine) == len(tree) and await self.kvs.is_dir(self.ns, _path(old)):
            drop.append(_path(old))  # nothing of another mount stays below it
        if puts or drop:
            await self.kvs.commit(self.ns, puts, drop=drop)

    # -- waiting -----------------------------------------------------------------------------
    async def wait_complete(self, rel: bytes, timeout: float | None,
                            also: Callable[[], bool] | None = None,
                            newer_than: int | None = None) -> FileRecord:
        """Wait until *rel* is published and complete (in a version other than *newer_than*),
        and *also* holds (raises WaitTimeout). A malformed record ends the wait at once with
        KVSError: it would never become one."""
        key = _key_of(rel)

        def ready(raw: bytes | None) -> bool:
            rec = self._strict(raw, key)
            return rec is not None and rec.complete and rec.version != newer_than and \
                (also is None or also())

        rec = self._strict(await self.kvs.wait_until(self.ns, key, ready, timeout), key)
        assert rec is not None
        return rec

    async def wait_published(self, rel: bytes, timeout: float | None,
                             also: Callable[[], bool] | None = None) -> FileRecord | DyadOwner:
        """Wait until *rel* is published complete (and *also* holds), by a dyadfs mount or, with
        DYAD interop, by C DYAD: DYAD's key for *rel* appearing first, with no dyadfs record
        beside it (a dyadfs mount writes both in one commit), is C DYAD's publication."""
        dkey = self._dyad_key(rel)
        if dkey is None:
            return await self.wait_complete(rel, timeout, also)
        result: list[FileRecord | DyadOwner] = []
        failure: list[DyadfsError] = []

        async def ours(scope: trio.CancelScope) -> None:
            try:
                result.append(await self.wait_complete(rel, None, also))
            except DyadfsError as e:
                failure.append(e)
            scope.cancel()

        async def dyads(scope: trio.CancelScope) -> None:
            assert dkey is not None
            try:
                raw = await self.kvs.wait(self.ns, dkey, None)
                rec = await self.get(rel)
                if rec is not None:  # a dyadfs publication: ours() sees it, or waits on
                    return
                owner = keys.dyad_owner(raw, dkey)
            except DyadfsError as e:
                failure.append(e)
                scope.cancel()
                return
            if also is None or also():
                result.append(owner)
                scope.cancel()
            # else a stale key of an earlier run (shared storage: the file is not there):
            # only a dyadfs publication ends the wait now

        with trio.move_on_after(math.inf if timeout is None else timeout):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ours, nursery.cancel_scope)
                nursery.start_soon(dyads, nursery.cancel_scope)
        if result:
            return result[0]
        if failure:
            raise failure[0]
        raise timeout_error(self.ns, _key_of(rel), timeout)

    async def wait_not_writing(self, rel: bytes, timeout: float | None) -> FileRecord | None:
        """Shared storage: wait until nobody is writing *rel* (complete, or gone). A malformed
        record ends the wait at once with KVSError."""
        key = _key_of(rel)

        def settled(raw: bytes | None) -> bool:
            rec = self._strict(raw, key)
            return rec is None or rec.complete

        return self._strict(await self.kvs.wait_until(self.ns, key, settled, timeout), key)

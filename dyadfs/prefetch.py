"""``--prefetch``: pull every publication of the namespace as soon as it appears.

A consumer's open of a frame that was already prefetched then costs about a local open. The
prefetcher follows the KVS's change feed (:meth:`dyadfs.kvs.KVS.follow`), so each publication is
read once instead of rescanning the namespace at every commit, and hands the files, in
publication order, to a few workers that pull them through the puller. An open of a file that
is being prefetched joins that pull (single flight) and streams from it.

Bounded by ``--cache-size``: a prefetch starts only when it fits beside what must stay (open
files, pulls under way, prefetched copies nobody has opened yet); otherwise the prefetcher waits,
in publication order, until reads or evictions make room. A file larger than the whole cache is
not prefetched (an open still pulls it).

Keys come from the KVS, which other processes write: a path with an empty, ``.`` or ``..``
component, one inside ``.dyadfs``, or one whose directory is not a plain directory here (a
symlink) is skipped with a warning, never followed.
"""

from __future__ import annotations

import logging
import os
import stat
from typing import TYPE_CHECKING

import trio

from .errors import DyadfsError
from .keys import FILES, FileRecord
from .paths import HIDDEN, show

if TYPE_CHECKING:
    from .catalog import Catalog
    from .config import Config
    from .puller import Puller

log = logging.getLogger(__name__)

WORKERS = 2
RETRY = 1.0


class Prefetcher:
    def __init__(self, config: Config, root_fd: int, catalog: Catalog, puller: Puller) -> None:
        self.cfg = config
        self.root_fd = root_fd
        self.catalog = catalog
        self.puller = puller
        self._pending: dict[bytes, None] = {}  # in publication order
        self._rescan = False
        self._changed = trio.Event()
        puller.cache.on_room = self._kick

    @property
    def pending(self) -> int:
        return len(self._pending)

    def _kick(self) -> None:
        self._changed.set()

    def _on_change(self, keys: list[str] | None) -> None:
        if keys is None:
            self._rescan = True
        else:
            for key in keys:
                self._pending[os.fsencode(key[len(FILES):])] = None
        self._kick()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        send, recv = trio.open_memory_channel[tuple[bytes, FileRecord]](0)
        async with trio.open_nursery() as nursery, send:
            for _ in range(WORKERS):
                nursery.start_soon(self._worker, recv.clone())
            nursery.start_soon(self._follow)
            task_status.started()
            while True:
                await self._changed.wait()
                self._changed = trio.Event()
                if self._rescan:
                    self._rescan = False
                    for rel in await self.catalog.published_files():
                        self._pending[rel] = None
                await self._dispatch(send)

    async def _follow(self) -> None:
        while True:
            try:
                await self.catalog.kvs.follow(self.catalog.ns, self._on_change)
            except DyadfsError as e:
                log.warning("prefetch: the KVS change feed failed (%s); following it again in "
                            "%s s", e, RETRY)
            await trio.sleep(RETRY)
            self._on_change(None)  # whatever happened meanwhile

    async def _dispatch(self, send: trio.MemorySendChannel[tuple[bytes, FileRecord]]) -> None:
        limit = self.cfg.cache_size
        while self._pending:
            rel = next(iter(self._pending))
            try:
                rec = await self.catalog.get(rel)
            except DyadfsError:  # malformed: logged by the catalog; an open says EIO
                self._pending.pop(rel, None)
                continue
            if rec is None or not self._wanted(rel, rec) or \
                    (limit is not None and rec.size > limit):
                self._pending.pop(rel, None)
                continue
            if not self.puller.room_for(rec.size):
                return  # the puller kicks us when a read, a pull or an eviction frees room
            self._pending.pop(rel, None)
            await send.send((rel, rec))  # waits for a free worker

    def _wanted(self, rel: bytes, rec: FileRecord) -> bool:
        if not rec.complete or rec.kind != "file" or rec.owner == self.catalog.mount_id:
            return False
        if self.puller.cache.local_version(rel) == rec.version:
            return False
        pull = self.puller.active(rel)
        if pull is not None and pull.rec.version == rec.version:
            return False
        return self._safe(rel)

    def _safe(self, rel: bytes) -> bool:
        parts = rel.split(b"/")
        if any(p in (b"", b".", b"..") for p in parts) or parts[0] == HIDDEN:
            log.warning("prefetch: skipping %s, not a plain relative path", show(rel))
            return False
        for i in range(1, len(parts)):
            try:
                st = os.lstat(b"/".join(parts[:i]), dir_fd=self.root_fd)
            except FileNotFoundError:
                return True  # the rest is made by the pull
            except OSError:
                return False
            if not stat.S_ISDIR(st.st_mode):
                log.warning("prefetch: skipping %s, %s is not a directory here", show(rel),
                            show(b"/".join(parts[:i])))
                return False
        return True

    async def _worker(self, recv: trio.MemoryReceiveChannel[tuple[bytes, FileRecord]]) -> None:
        async with recv:
            async for rel, rec in recv:
                try:
                    await self.puller.prefetch(rel, rec)
                except DyadfsError:
                    pass  # logged by the puller; an open of the file pulls it again

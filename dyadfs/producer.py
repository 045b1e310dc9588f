"""The producer's rules: which change of a file publishes it, and when.

The FUSE adapter (fs.py) tells this module what happened to a name (opened for writing,
written, closed, truncated, renamed...) and this module decides what the KVS learns, through the
catalog. The rules are the README's publication table; each has one function here.

A consumer mount (``--role consumer``) publishes nothing: :attr:`Producer.active` is False and
every call is a no-op.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

import trio

from .errors import DyadfsError
from .nodes import Handle
from .paths import show

if TYPE_CHECKING:
    from .catalog import Catalog
    from .config import Config
    from .stats import Stats

log = logging.getLogger(__name__)


class Producer:
    def __init__(self, config: Config, catalog: Catalog | None, stats: Stats) -> None:
        self.cfg = config
        self.catalog = catalog
        self.stats = stats
        self.active = config.publishes and catalog is not None
        self._nursery: trio.Nursery | None = None

    def attach(self, nursery: trio.Nursery) -> None:
        """Where asynchronous publications (``--async-publish``) run."""
        self._nursery = nursery

    async def before_write(self, rel: bytes, mode: int = 0o644) -> bool:
        """Called before a file changes; returns whether its close publishes. With shared
        storage the file is marked as being written first, so no consumer reads it half
        done."""
        if not self.active:
            return False
        assert self.catalog is not None
        if self.cfg.shared_storage:
            await self.catalog.mark_writing(rel, mode)
        return True

    # -- closing ---------------------------------------------------------------------------
    async def flushed(self, handle: Handle, rel: bytes) -> None:
        """FLUSH comes with every close() and close() waits for it (RELEASE does not): a
        written handle publishes here, so that the publication is committed before the
        producer's close() returns."""
        if handle.written and handle.publishes:
            handle.written = handle.pending = False
            await self._publish_handle(handle, rel)

    async def released(self, handle: Handle, rel: bytes) -> None:
        """The last reference to an open file went. A new or truncated file is published even
        if left empty, but here, not at its first flush: a shell's ``> f`` closes a dup of the
        descriptor before writing anything."""
        if (handle.written or handle.pending) and handle.publishes:
            handle.written = handle.pending = False
            await self._publish_handle(handle, rel)

    async def _publish_handle(self, handle: Handle, rel: bytes) -> None:
        if self.cfg.async_publish and self._nursery is not None:
            self._nursery.start_soon(self._publish_stat, rel, os.fstat(handle.fd))
        else:
            await self.publish(rel, handle.fd)

    async def publish(self, rel: bytes, fd: int) -> None:
        """Publish *rel* as the file open at *fd* is now."""
        await self._publish_stat(rel, os.fstat(fd))

    async def _publish_stat(self, rel: bytes, st: os.stat_result) -> None:
        assert self.catalog is not None
        try:
            await self.catalog.publish(rel, st)
        except DyadfsError as e:
            if not self.cfg.async_publish:
                raise
            log.error("asynchronous publication of %s failed: %s", show(rel), e)
            return
        self.stats.published += 1

    # -- other changes ---------------------------------------------------------------------
    async def attributes_changed(self, rel: bytes, st: os.stat_result) -> None:
        """A chmod or touch of a published file: its published attributes follow."""
        if not self.active:
            return
        assert self.catalog is not None
        if rel in await self.catalog.owned_under(rel):
            await self.catalog.publish(rel, st)

    async def linked(self, old: bytes, new: bytes, st: os.stat_result) -> None:
        """A hard link to a published file is published under its new name too."""
        if not self.active:
            return
        assert self.catalog is not None
        if await self.catalog.owned_under(old):
            await self.catalog.publish(new, st)
            self.stats.published += 1

    async def unlinked(self, rel: bytes) -> None:
        if not self.active:
            return
        assert self.catalog is not None
        if await self.catalog.owned_under(rel):
            await self.catalog.remove(rel)

    async def renamed(self, old: bytes, new: bytes, replaced: bool, exchange: bool) -> None:
        """The publications of *old* (a file or a directory's tree) move to *new*."""
        if not self.active or exchange:
            return
        assert self.catalog is not None
        await self.catalog.move(old, new, replaced)

"""The catalog: what a mount publishes and looks up, in the schema of :mod:`dyadfs.keys`.

It sits between the file system and the KVS so that ``fs.py`` speaks of files, not keys. On
Flux it also writes DYAD's own key beside each publication (the producer's broker rank, a JSON
integer), so that C DYAD and dyadfs can share a namespace.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

from . import keys
from .errors import KVSError
from .keys import FileRecord
from .kvs import KVS

log = logging.getLogger(__name__)


def _key_of(rel: bytes) -> str:
    return keys.file_key(os.fsdecode(rel))


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

    def _decode(self, raw: bytes | None, key: str) -> FileRecord | None:
        if raw is None:
            return None
        try:
            return FileRecord.decode(raw, key)
        except KVSError as e:
            # A malformed value must not take the mount down; it reads as "not published".
            log.warning("%s", e)
            return None

    async def get(self, rel: bytes) -> FileRecord | None:
        key = _key_of(rel)
        return self._decode(await self.kvs.get(self.ns, key), key)

    def _dyad_puts(self, rel: bytes, present: bool) -> dict[str, bytes | None]:
        if not self._dyad_keys:
            return {}
        try:
            upath = rel.decode("utf-8")
        except UnicodeDecodeError:
            return {}  # Flux keys are UTF-8 strings: DYAD cannot name this file, dyadfs can
        key = keys.dyad_key(upath, self._depth, self._bins)
        return {key: str(self._rank if self._rank is not None else 0).encode() if present
                else None}

    def record_for(self, st: os.stat_result, state: str = "complete",
                   sha256: str | None = None) -> FileRecord:
        return FileRecord(state=state, size=st.st_size if state == "complete" else 0,
                          version=self.next_version(), mtime_ns=st.st_mtime_ns,
                          mode=st.st_mode & 0o7777, owner=self.mount_id, sha256=sha256)

    async def publish(self, rel: bytes, st: os.stat_result) -> FileRecord:
        rec = self.record_for(st)
        await self.kvs.commit(self.ns, {_key_of(rel): rec.encode(), **self._dyad_puts(rel, True)})
        return rec

    async def mark_writing(self, rel: bytes, mode: int) -> None:
        """Shared storage: say that *rel* is being written, before it exists or changes."""
        rec = FileRecord(state="writing", size=0, version=self.next_version(),
                         mtime_ns=time.time_ns(), mode=mode & 0o7777, owner=self.mount_id)
        await self.kvs.commit(self.ns, {_key_of(rel): rec.encode()})

    async def restore(self, rel: bytes, rec: FileRecord) -> None:
        """Put back *rec*, a record of *rel* read before (a "writing" mark withdrawn)."""
        await self.kvs.commit(self.ns, {_key_of(rel): rec.encode(),
                                        **self._dyad_puts(rel, rec.complete)})

    async def remove(self, rel: bytes) -> None:
        await self.kvs.commit(self.ns, {_key_of(rel): None, **self._dyad_puts(rel, False)})

    async def owned_under(self, rel: bytes) -> dict[bytes, FileRecord]:
        """Records this mount owns at *rel* or below it (a file, or a directory's tree)."""
        out: dict[bytes, FileRecord] = {}
        base = _key_of(rel)
        found = await self.kvs.list_prefix(self.ns, base)
        for key, raw in found.items():
            if key != base and not key.startswith(base + "/"):
                continue
            rec = self._decode(raw, key)
            if rec is not None and rec.owner == self.mount_id:
                out[os.fsencode(key[len(keys.FILES):])] = rec
        return out

    async def move(self, old: bytes, new: bytes, replaced: bool) -> None:
        """Follow a rename of *old* (a file or a directory) to *new*, in one commit."""
        puts: dict[str, bytes | None] = {}
        if replaced:
            for rel in await self.owned_under(new):
                puts[_key_of(rel)] = None
                puts.update(self._dyad_puts(rel, False))
        for rel, rec in (await self.owned_under(old)).items():
            moved = new + rel[len(old):]
            puts[_key_of(rel)] = None
            puts.update(self._dyad_puts(rel, False))
            fresh = FileRecord(state=rec.state, size=rec.size, version=self.next_version(),
                               mtime_ns=rec.mtime_ns, mode=rec.mode, owner=rec.owner,
                               sha256=rec.sha256)
            puts[_key_of(moved)] = fresh.encode()
            puts.update(self._dyad_puts(moved, True))
        if puts:
            await self.kvs.commit(self.ns, puts)

    async def wait_complete(self, rel: bytes, timeout: float | None,
                            also: Callable[[], bool] | None = None,
                            newer_than: int | None = None) -> FileRecord:
        """Wait until *rel* is published and complete (in a version other than *newer_than*),
        and *also* holds (raises WaitTimeout)."""
        key = _key_of(rel)

        def ready(raw: bytes | None) -> bool:
            rec = self._decode(raw, key)
            return rec is not None and rec.complete and rec.version != newer_than and \
                (also is None or also())

        raw = await self.kvs.wait_until(self.ns, key, ready, timeout)
        rec = self._decode(raw, key)
        assert rec is not None
        return rec

    async def wait_not_writing(self, rel: bytes, timeout: float | None) -> FileRecord | None:
        """Shared storage: wait until nobody is writing *rel* (complete, or gone)."""
        key = _key_of(rel)

        def settled(raw: bytes | None) -> bool:
            rec = self._decode(raw, key)
            return rec is None or rec.complete

        return self._decode(await self.kvs.wait_until(self.ns, key, settled, timeout), key)

    async def children(self, rel: bytes) -> dict[bytes, FileRecord | None]:
        """Published names directly below directory *rel*: a record for a file, None for a
        directory (something is published below it)."""
        prefix = keys.FILES if rel in (b"", b".") else _key_of(rel) + "/"
        out: dict[bytes, FileRecord | None] = {}
        for key, raw in (await self.kvs.list_prefix(self.ns, prefix)).items():
            rest = key[len(prefix):]
            if "/" in rest:
                out.setdefault(os.fsencode(rest.split("/", 1)[0]), None)
            else:
                rec = self._decode(raw, key)
                if rec is not None and rec.complete:
                    out[os.fsencode(rest)] = rec
        return out

    async def published_files(self) -> list[bytes]:
        """Every path published complete in the namespace."""
        out = []
        for key, raw in (await self.kvs.list_prefix(self.ns, keys.FILES)).items():
            rec = self._decode(raw, key)
            if rec is not None and rec.complete:
                out.append(os.fsencode(key[len(keys.FILES):]))
        return out

    async def is_directory(self, rel: bytes) -> bool:
        """Whether anything is published below *rel*."""
        prefix = _key_of(rel) + "/"
        return bool(await self.kvs.list_prefix(self.ns, prefix))

"""Serving the files this mount published to the mounts that pull them.

A fetch names a published path and version (see transport/protocol.py). Everything else is
refused and logged: a wrong secret or namespace, a path this mount did not publish, a version
that is not the published one, ``..``, an absolute path or a symlink on the way (paths are opened
component by component with ``O_NOFOLLOW`` under the backing directory's descriptor), a file that
changed since its publication.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

import trio

from .errors import DyadfsError, FetchError
from .transport.protocol import Request, Served, check_secret, open_beneath, refuse

if TYPE_CHECKING:
    from .catalog import Catalog
    from .keys import FileRecord
    from .stats import Stats

RAW_MAX = 4 << 30


def _same_size_and_mtime(st: os.stat_result, rec: FileRecord) -> str | None:
    if st.st_size != rec.size or st.st_mtime_ns != rec.mtime_ns:
        return "the file changed since its publication"
    return None


class FileServer:
    def __init__(self, root_fd: int, catalog: Catalog, secret: str, stats: Stats) -> None:
        self.root_fd = root_fd
        self.catalog = catalog
        self.secret = secret
        self.stats = stats
        #: None while a file still holds a published version (the producer's rules, which
        #: see every change made through the mount; set by the mount)
        self.vouch: Callable[[os.stat_result, FileRecord], str | None] = _same_size_and_mtime

    async def handle(self, req: Request) -> Served:
        why = check_secret(req, self.catalog.ns, lambda: self.secret)
        if why is not None:
            return refuse(errno.EACCES, why, req)
        if req.raw:
            return self._raw(req)
        try:
            rec = await self.catalog.get(req.path)
        except DyadfsError as e:
            return refuse(errno.EIO, str(e), req)
        if rec is None or not rec.complete or rec.kind != "file" or \
                rec.owner != self.catalog.mount_id:
            return refuse(errno.ENOENT, "not published by this mount", req)
        if rec.version != req.version:
            return refuse(errno.ESTALE, f"version {req.version} is not the published one "
                          f"({rec.version})", req)
        try:
            fd = open_beneath(self.root_fd, req.path)
        except FetchError as e:
            return refuse(e.errno, str(e), req)
        except OSError as e:
            return refuse(e.errno or errno.EIO, e.strerror or str(e), req)
        st = os.fstat(fd)
        why = self.vouch(st, rec)
        if why is not None:
            os.close(fd)
            return refuse(errno.ESTALE, why, req)
        self.stats.served += 1
        self.stats.bytes_served += st.st_size
        vouch = self.vouch
        return Served(fd=fd, size=st.st_size, verify=req.verify, _st=st,
                      changed=lambda: vouch(os.fstat(fd), rec))

    async def whole_file(self, upath: str) -> bytes:
        """DYAD's ``dyad.fetch`` (:mod:`dyadfs.dyad`): the whole published file at *upath*,
        with the checks of :meth:`handle` but the secret (C DYAD has none: Flux's own
        authentication admits the requester): no ``..``, absolute path or symlink on the way,
        only a file this mount published, in its published version, unchanged while read.
        FetchError with the errno the requester gets."""
        rel = os.fsencode(upath)
        try:
            fd = open_beneath(self.root_fd, rel)  # the path's checks come first
        except OSError as e:
            raise FetchError(e.strerror or str(e), e.errno or errno.EIO) from None
        try:
            rec = await self.catalog.get(rel)
            if rec is None or not rec.complete or rec.kind != "file" or \
                    rec.owner != self.catalog.mount_id:
                raise FetchError("not published by this mount", errno.ENOENT)
            why = self.vouch(os.fstat(fd), rec)
            if why is not None:
                raise FetchError(why, errno.ESTALE)
            data = await trio.to_thread.run_sync(_read_all, fd, rec.size)
            why = self.vouch(os.fstat(fd), rec)  # rewritten while it was read: torn
            if why is not None or len(data) != rec.size:
                raise FetchError(why or "the file changed while it was read", errno.ESTALE)
        finally:
            os.close(fd)
        self.stats.served += 1
        self.stats.bytes_served += len(data)
        return data

    @staticmethod
    def _raw(req: Request) -> Served:
        """``dyadfs bench``: zeros from memory, the transport's own limit."""
        if not 0 < req.raw <= RAW_MAX:
            return refuse(errno.EINVAL, f"raw size {req.raw} out of range", req)
        fd = os.memfd_create("dyadfs-raw")
        os.ftruncate(fd, req.raw)
        return Served(fd=fd, size=req.raw, _st=os.fstat(fd))


def _read_all(fd: int, size: int) -> bytes:
    """Up to *size* bytes of *fd* from offset 0 (fewer if it is shorter now)."""
    buf = bytearray(size)
    view = memoryview(buf)
    done = 0
    while done < size:
        n = os.preadv(fd, [view[done:]], done)
        if n == 0:
            break
        done += n
    return bytes(view[:done])

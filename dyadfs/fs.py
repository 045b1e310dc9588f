"""The FUSE adapter: each handler translates a kernel request and delegates.

- the backing directory: :mod:`dyadfs.backing` (``*at`` calls, no policy);
- what the kernel knows by number: :mod:`dyadfs.nodes`; what it may cache: :mod:`dyadfs.kernel`;
- what publishes, and when: :mod:`dyadfs.producer`;
- what a lookup of a missing name answers, what an open waits for: :mod:`dyadfs.consumer`,
  which pulls through :mod:`dyadfs.puller`.

Every handler is wrapped by :func:`_guard`: an exception other than ``FUSEError`` would end
``pyfuse3.main`` and kill the mount, so errors are translated there, in one place.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat as stat_mod
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import pyfuse3
import trio
from pyfuse3 import FUSEError

from .backing import Backing
from .consumer import Consumer
from .errors import DyadfsError
from .kernel import KernelCache, forget_name, invalidate, mapped_writable
from .mountinfo import fuse_device
from .nodes import ROOT, Handle, Node, Nodes, key_of
from .paths import HIDDEN
from .producer import Producer
from .stats import Stats

if TYPE_CHECKING:
    from .catalog import Catalog
    from .config import Config
    from .keys import FileRecord
    from .puller import Pull, Puller

log = logging.getLogger(__name__)

_WRITE_MODES = (os.O_WRONLY, os.O_RDWR)
_OPEN_STRIP = os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_DIRECT

#: reads and writes of at least this many bytes run in a worker thread, so that a slow disk
#: (Lustre, NFS, a busy device) never stalls the other requests of the mount; smaller ones run
#: on the loop's thread, where they cost less than the hop to a thread (about 50 us)
THREAD_IO = 256 * 1024
#: worker threads for the backing's blocking calls (large reads and writes, listings)
DISK_THREADS = 8

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def _guard(fn: F) -> F:
    """Translate every error at the handler boundary (the mount must never die)."""
    @functools.wraps(fn)
    async def wrapper(self: Operations, *args: Any) -> Any:
        try:
            return await fn(self, *args)
        except FUSEError:
            raise
        except OSError as e:
            raise FUSEError(e.errno or errno.EIO) from None
        except DyadfsError as e:
            self.stats.errors += 1
            raise FUSEError(e.errno) from None
        except Exception:
            self.stats.unexpected += 1
            log.exception("unexpected error in %s%r: answered EIO", fn.__name__, args[:2])
            raise FUSEError(errno.EIO) from None
    return wrapper  # type: ignore[return-value]


_HANDLERS = ("lookup", "forget", "getattr", "setattr", "readlink", "mknod", "mkdir", "unlink",
             "rmdir", "symlink", "rename", "link", "open", "read", "write", "flush", "release",
             "fsync", "opendir", "readdir", "releasedir", "fsyncdir", "statfs", "setxattr",
             "getxattr", "listxattr", "removexattr", "access", "create")


def _guard_handlers(cls: type) -> type:
    for name in _HANDLERS:
        if name in cls.__dict__:
            setattr(cls, name, _guard(cls.__dict__[name]))
    return cls


def _writes(flags: int) -> bool:
    return (flags & os.O_ACCMODE) in _WRITE_MODES


#: readdir lists "." and ".." first
DOTS = 2


def _dot(ino: int) -> pyfuse3.EntryAttributes:
    """What a listing says of "." or "..": a directory and its inode number (the kernel takes
    nothing else from these two entries)."""
    e = pyfuse3.EntryAttributes()
    e.st_ino = ino
    e.st_mode = stat_mod.S_IFDIR | 0o755
    return e


@_guard_handlers
class Operations(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False

    def __init__(self, config: Config, root_fd: int, catalog: Catalog | None,
                 puller: Puller | None = None, stats: Stats | None = None) -> None:
        super().__init__()
        self.cfg = config
        self.stats = stats or Stats()
        self.backing = Backing(root_fd)
        self.nodes = Nodes()
        self.kernel = KernelCache(config, self.backing.owner)
        self.producer = Producer(config, catalog, self.stats)
        self.producer.mapped = self._mapped
        self.consumer = Consumer(config, catalog, puller, self.backing, self.stats)
        self.catalog = catalog
        self._am_root = os.geteuid() == 0
        #: the named limiter of the worker threads doing the backing's blocking calls
        self._disk = trio.CapacityLimiter(DISK_THREADS)
        self._device: str | None = None
        #: a signal asked the mount to end: no new writers (see mount.Mount._signals)
        self.draining = False
        self._nursery: trio.Nursery | None = None
        #: called once the kernel's INIT is answered (what the answer sets is final by then)
        self.after_init: Callable[[], None] | None = None
        if puller is not None:
            puller.cache.is_open = self.nodes.is_open

    def init(self) -> None:
        # pyfuse3 calls this inside INIT, before the reply: the work runs just after it.
        if self.after_init is not None and self._nursery is not None:
            callback = self.after_init

            async def later() -> None:
                try:
                    callback()
                except Exception:  # a tuning step: never a reason to end the mount
                    log.exception("after INIT")
            self._nursery.start_soon(later)

    def attach(self, nursery: trio.Nursery) -> None:
        """Where background work (asynchronous publishing) runs."""
        self._nursery = nursery
        self.producer.attach(nursery)

    def writers(self) -> int:
        """Handles open for writing (what a graceful end waits for)."""
        return self.nodes.writers()

    def _no_new_writers(self) -> None:
        if self.draining:
            raise FUSEError(errno.EROFS)  # the mount is ending: read-only from now on

    def _mapped(self, handle: Handle) -> bool:
        if self._device is None:
            self._device = fuse_device(self.cfg.mountpoint)
        return self._device is not None and mapped_writable(self._device, handle.node.ino)

    # -- lookup --------------------------------------------------------------------------
    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self.stats.fuse_lookups += 1
        parent = self.nodes.get(parent_inode)
        if name == b"." or name == b"..":
            raise FUSEError(errno.ENOENT)  # supports_dot_lookup is off: never asked
        if parent_inode == ROOT and name == HIDDEN:
            raise FUSEError(errno.ENOENT)  # dyadfs' own state (pulls under way)
        rel = self.nodes.path_of(parent, name)
        entry = await self._lookup(parent, name, rel, ctx.pid)
        self.nodes.get(entry.st_ino).lookups += 1
        return entry

    async def _lookup(self, parent: Node, name: bytes, rel: bytes,
                      pid: int) -> pyfuse3.EntryAttributes:
        while True:  # after a wait (--wait-on-stat), look in the backing again
            st = self.backing.lstat_or_none(rel)
            if st is not None and not await self.consumer.stale(rel, st):
                return self.kernel.entry(self.nodes.present(parent, name, st), st)
            kind, rec, published = await self.consumer.missing(name, rel, pid)
            if kind != "waited":
                break
        if kind == "awaited":  # its GETATTR waits (never this LOOKUP: the directory's lock)
            node = self.nodes.absent(parent, name, "file")
            node.awaited = True
            return self.kernel.synthetic(node, "file", None, False)
        return self.kernel.synthetic(self.nodes.absent(parent, name, kind), kind, rec,
                                     published)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for ino, nlookup in inode_list:
            self.nodes.forget(ino, nlookup)

    # -- attributes ----------------------------------------------------------------------
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self.stats.fuse_getattrs += 1
        return await self._getattr(self.nodes.get(inode), ctx.pid)

    async def _getattr(self, node: Node, pid: int = 0) -> pyfuse3.EntryAttributes:
        for handle in self.nodes.handles_of(node):  # open, perhaps unlinked: it knows best
            if handle.own:
                pull = handle.pull
                arriving = pull.rec if pull is not None and not pull.done else None
                return self.kernel.entry(node, os.fstat(handle.fd), arriving=arriving)
        rel = self.nodes.rel(node)
        try:
            return self.kernel.entry(node, self.backing.lstat(rel))
        except FileNotFoundError:
            if node.provisional is None or not self.consumer.active:
                raise
        if node.provisional == "file" and node.awaited:
            return await self._await_stat(node, rel, pid)
        if node.provisional == "file":
            rec = await self.consumer.record(rel)
            return self.kernel.synthetic(node, "file", rec, rec is not None)
        # a directory stays what its lookup or listing showed: no KVS read per GETATTR (every
        # path through an uncached directory costs one)
        return self.kernel.synthetic(node, node.provisional, None, node.published)

    async def _await_stat(self, node: Node, rel: bytes, pid: int) -> pyfuse3.EntryAttributes:
        """The GETATTR of a stat that waits (--wait-on-stat) for *rel* to be published."""
        here = trio.Event()  # or the name gets a file here (this mount's own create)
        node.waker = here.set
        try:
            rec = await self.consumer.await_stat(rel, pid, here.wait)
        finally:
            node.waker = None
        node.awaited = False
        st = self.backing.lstat_or_none(rel)
        if rec is None and st is None:
            raise FUSEError(errno.ENOENT)  # made here, and gone again
        if (rec is not None and rec.kind != "file") or \
                (st is not None and not stat_mod.S_ISREG(st.st_mode)):
            # Published as a directory or a link: this node's type is wrong. ESTALE makes the
            # kernel look the name up again (once) and stat what the new lookup answers.
            for parent, name in list(node.links):
                self.nodes.drop_name(parent, name)
            raise FUSEError(errno.ESTALE)
        if st is not None:
            return self.kernel.entry(node, st)
        return self.kernel.synthetic(node, "file", rec, True)

    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self.nodes.get(inode)
        handle = self.nodes.handle_or_none(fh)
        rel = self.nodes.rel(node)
        if fields.update_size:
            await self._set_size(node, rel, handle, attr.st_size)
        if fields.update_mode:
            mode = stat_mod.S_IMODE(attr.st_mode)
            if handle is not None:
                os.chmod(handle.fd, mode)
            else:
                self.backing.chmod(rel, mode)
        if fields.update_uid or fields.update_gid or fields.update_ctime:
            uid = attr.st_uid if fields.update_uid else -1
            gid = attr.st_gid if fields.update_gid else -1
            if handle is not None:  # chown(-1, -1) is how a ctime moves to now
                os.chown(handle.fd, uid, gid)
            else:
                self.backing.chown(rel, uid, gid)
        if fields.update_atime or fields.update_mtime:
            self._set_times(rel, handle, attr, fields)
        if (fields.update_mode or fields.update_mtime) and not fields.update_size and \
                not (handle is not None and handle.written):
            await self.producer.attributes_changed(rel, self.backing.lstat(rel))
        return await self._getattr(node)

    async def _set_size(self, node: Node, rel: bytes, handle: Handle | None, size: int) -> None:
        self.consumer.changed_locally(rel)
        if handle is None:
            await self.producer.mark(rel)
        self.producer.changing(node.key)
        fd = handle.fd if handle is not None else self.backing.open(rel, os.O_WRONLY)
        try:
            try:
                os.truncate(fd, size)
            except OSError as e:
                self.producer.failed(node.key, rel, e)
                raise
            if size == 0:
                self.producer.truncated_to_zero(node.key)
            if handle is not None:
                handle.written = True
            else:
                await self.producer.publish(self.nodes.rels(node), fd)
        finally:
            if handle is None:
                os.close(fd)

    def _set_times(self, rel: bytes, handle: Handle | None, attr: pyfuse3.EntryAttributes,
                   fields: pyfuse3.SetattrFields) -> None:
        cur = os.fstat(handle.fd) if handle is not None else self.backing.lstat(rel)
        ns = (attr.st_atime_ns if fields.update_atime else cur.st_atime_ns,
              attr.st_mtime_ns if fields.update_mtime else cur.st_mtime_ns)
        if handle is not None:
            os.utime(handle.fd, ns=ns)
        else:
            self.backing.utime(rel, ns)

    # -- names ---------------------------------------------------------------------------
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        node = self.nodes.get(inode)
        rel = self.nodes.rel(node)
        try:
            return self.backing.readlink(rel)
        except FileNotFoundError:
            if node.provisional != "symlink":
                raise
        rec = await self.consumer.record(rel)  # listed, published, not made here yet
        if rec is None or rec.target is None:
            raise FUSEError(errno.ENOENT)
        return os.fsencode(rec.target)

    def _chown(self, rel: bytes, ctx: pyfuse3.RequestContext) -> None:
        if self._am_root:
            self.backing.chown(rel, ctx.uid, ctx.gid)

    def _new_entry(self, parent: Node, name: bytes) -> pyfuse3.EntryAttributes:
        st = self.backing.lstat(self.nodes.path_of(parent, name))
        node = self.nodes.present(parent, name, st)
        node.lookups += 1
        return self.kernel.entry(node, st)

    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        parent = self.nodes.get(parent_inode)
        rel = self.nodes.path_of(parent, name)
        self.backing.mknod(rel, mode, rdev)
        self._chown(rel, ctx)
        return self._new_entry(parent, name)

    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        parent = self.nodes.get(parent_inode)
        rel = self.nodes.path_of(parent, name)
        self.backing.mkdir(rel, mode)
        self._chown(rel, ctx)
        entry = self._new_entry(parent, name)
        await self.producer.dir_made(rel, self.backing.lstat(rel))
        return entry

    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        parent = self.nodes.get(parent_inode)
        rel = self.nodes.path_of(parent, name)
        self.backing.symlink(target, rel)
        self._chown(rel, ctx)
        entry = self._new_entry(parent, name)
        await self.producer.symlink_made(rel, target, self.backing.lstat(rel))
        return entry

    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self.nodes.get(inode)
        parent = self.nodes.get(new_parent_inode)
        old = self.nodes.rel(node)
        new = self.nodes.path_of(parent, new_name)
        self.backing.link(old, new)
        entry = self._new_entry(parent, new_name)  # the same node: one inode, every name
        st = self.backing.lstat(new)
        target = self.backing.readlink(new) if stat_mod.S_ISLNK(st.st_mode) else None
        await self.producer.linked(old, new, st, target)
        return entry

    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        parent = self.nodes.get(parent_inode)
        rel = self.nodes.path_of(parent, name)
        self.backing.unlink(rel)
        self.nodes.drop_name(parent.ino, name)
        self.consumer.changed_locally(rel)
        await self.producer.unlinked(rel)

    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        parent = self.nodes.get(parent_inode)
        rel = self.nodes.path_of(parent, name)
        self.backing.rmdir(rel)
        self.nodes.drop_name(parent.ino, name)
        await self.producer.dir_removed(rel)

    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: pyfuse3.RequestContext) -> None:
        p_old, p_new = self.nodes.get(parent_inode_old), self.nodes.get(parent_inode_new)
        old = self.nodes.path_of(p_old, name_old)
        new = self.nodes.path_of(p_new, name_new)
        replaced = self.backing.lstat_or_none(new) is not None
        self.backing.rename(old, new, flags)
        exchange = bool(flags & pyfuse3.RENAME_EXCHANGE)
        self.consumer.changed_locally(old)
        self.consumer.changed_locally(new)
        self.nodes.renamed(p_old, name_old, p_new, name_new, exchange)
        await self.producer.renamed(old, new, replaced, exchange)

    # -- files ---------------------------------------------------------------------------
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext) -> tuple[pyfuse3.FileInfo,
                                                          pyfuse3.EntryAttributes]:
        self._no_new_writers()
        parent = self.nodes.get(parent_inode)
        rel = self.nodes.path_of(parent, name)
        self.consumer.changed_locally(rel)
        await self.producer.mark(rel, mode)  # shared storage: before the file exists
        try:
            fd = self.backing.open(rel, (flags & ~(os.O_NOCTTY | os.O_DIRECT)) | os.O_CREAT,
                                   mode)
        except OSError:
            await self.producer.unmark(rel)  # EEXIST of O_EXCL, ENOSPC...: nothing changed
            raise
        try:
            self._chown(rel, ctx)
            entry = self._new_entry(parent, name)
        except BaseException:
            os.close(fd)
            raise
        node = self.nodes.get(entry.st_ino)
        self.producer.changing(node.key)
        handle = self.nodes.open_handle(fd, node, flags, self.producer.active)
        self.producer.hold(handle, rel)
        handle.pending = True  # published even if left empty (see Producer.released)
        return self.kernel.file_info(handle, flags), entry

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self.nodes.get(inode)
        rel = self.nodes.rel(node)
        if _writes(flags) or flags & os.O_TRUNC:
            self._no_new_writers()
            return await self._open_to_write(node, rel, flags)
        pull = await self.consumer.make_readable(rel, ctx.pid)
        if pull is not None and not pull.done:
            return self._open_stream(node, pull, flags)
        fd = self.backing.open(rel, flags & ~_OPEN_STRIP)
        try:
            st = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        handle = self._open_read(node, fd, st, flags)
        local_writers = any(_writes(h.flags) for h in self.nodes.handles_of(node))
        self.consumer.opened(handle, local_writers)
        return self.kernel.file_info(handle, flags, handle.own)

    def _open_read(self, node: Node, fd: int, st: os.stat_result, flags: int,
                   arriving: FileRecord | None = None) -> Handle:
        if node.key is None:
            named = node.told is not None  # a published file's name, which the kernel caches
            self.nodes.adopt(node, st)  # a provisional name's file arrived: it is that file
            if named:
                forget_name(node)
        handle = self.nodes.open_handle(fd, node, flags, publishes=False)
        handle.own = node.key == key_of(st)
        if handle.own:
            self.kernel.check_told(node, fd, arriving)
        return handle

    def _open_stream(self, node: Node, pull: Pull, flags: int) -> pyfuse3.FileInfo:
        """Read the file being pulled; reads wait for their bytes."""
        fd = os.dup(pull.fd)
        handle = self._open_read(node, fd, os.fstat(fd), flags, arriving=pull.rec)
        handle.pull = pull
        return self.kernel.file_info(handle, flags, handle.own)

    async def _open_to_write(self, node: Node, rel: bytes, flags: int) -> pyfuse3.FileInfo:
        self.consumer.changed_locally(rel)  # written here: no longer a pulled copy
        truncating = bool(flags & os.O_TRUNC)
        if truncating:
            await self.producer.mark(rel)
            self.producer.changing(node.key)
        try:
            fd = self.backing.open(rel, flags & ~_OPEN_STRIP)
        except OSError:
            if truncating:
                await self.producer.unmark(rel)
            raise
        node.provisional = None
        handle = self.nodes.open_handle(fd, node, flags, publishes=self.producer.active)
        if truncating:
            self.producer.truncated_to_zero(node.key)
            self.producer.hold(handle, rel)
            handle.pending = handle.publishes
        return self.kernel.file_info(handle, flags)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        handle = self.nodes.handle(fh)
        pull = handle.pull
        if pull is not None:
            if pull.done and pull.error is None:
                handle.pull = None
            else:
                await pull.wait_for(min(off + size, pull.size or 0))
        if size >= THREAD_IO:
            data = await trio.to_thread.run_sync(os.pread, handle.fd, size, off,
                                                 limiter=self._disk)
        else:
            data = os.pread(handle.fd, size, off)
        if handle.opened is not None:
            self.consumer.check_read(handle, self.nodes.rel(handle.node))
        return data

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        handle = self.nodes.handle(fh)
        node = handle.node
        await self.producer.will_write(handle, self.nodes.rel(node))
        self.producer.changing(node.key)
        try:
            if len(buf) >= THREAD_IO:
                n = await trio.to_thread.run_sync(os.pwrite, handle.fd, buf, off,
                                                  limiter=self._disk)
            else:
                n = os.pwrite(handle.fd, buf, off)
        except OSError as e:
            self.producer.failed(node.key, self.nodes.rel(node), e)
            raise
        if self.kernel.needs_page_drop(handle):
            # As a write through the page cache would have updated them. From a thread: the
            # kernel may wait for a page that a READ of ours holds locked.
            await trio.to_thread.run_sync(invalidate, node)
        return n

    async def flush(self, fh: int) -> None:
        if not self.producer.active:
            # A consumer mount publishes nothing: ENOSYS tells the kernel never to send FLUSH
            # again, and every close() saves a round trip through the daemon.
            raise FUSEError(errno.ENOSYS)
        handle = self.nodes.handle(fh)
        await self.producer.flushed(handle, self.nodes.rels(handle.node))

    async def release(self, fh: int) -> None:
        handle = self.nodes.close_handle(fh)
        node = handle.node
        try:
            writers_left = any(_writes(h.flags) for h in self.nodes.handles_of(node))
            await self.producer.released(handle, self.nodes.rels(node), writers_left)
        finally:
            os.close(handle.fd)

    async def fsync(self, fh: int, datasync: bool) -> None:
        handle = self.nodes.handle(fh)
        try:
            await trio.to_thread.run_sync(os.fdatasync if datasync else os.fsync, handle.fd)
        except OSError as e:  # written-back data was lost: the file is not a whole version
            if _writes(handle.flags):
                self.producer.failed(handle.node.key, self.nodes.rel(handle.node), e)
            raise

    # -- directories ---------------------------------------------------------------------
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        node = self.nodes.get(inode)
        rel = self.nodes.rel(node)
        entries: dict[bytes, tuple[pyfuse3.EntryAttributes, Node]] = {}
        try:
            listing = await trio.to_thread.run_sync(self.backing.scan, rel,
                                                    limiter=self._disk)
        except FileNotFoundError:
            if node.provisional is None:
                raise
            listing = []
        for name, st in listing:
            child = self.nodes.present(node, name, st)
            entries[name] = (self.kernel.entry(child, st), child)
        for name, rec in (await self.consumer.published_children(rel)).items():
            if name not in entries:
                kind = "dir" if rec is None else rec.kind
                child = self.nodes.absent(node, name, kind)
                entries[name] = (self.kernel.synthetic(child, kind, rec, published=True),
                                 child)
        return self.nodes.open_dir(node, [(n, a, c) for n, (a, c) in sorted(entries.items())])

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        handle = self.nodes.dir(fh)
        entries = handle.entries
        for i in range(start_id, len(entries) + DOTS):
            if i < DOTS:  # "." and "..", as a plain directory lists them (ls -a, find)
                here = handle.node
                ino = here.ino if i == 0 or here.ino == ROOT else here.parent
                if not pyfuse3.readdir_reply(token, b"." * (i + 1), _dot(ino), i + 1):
                    break
                continue  # READDIRPLUS takes no lookup of "." and ".." (the kernel skips them)
            name, attr, node = entries[i - DOTS]
            self.nodes.remember(node)  # forgotten since opendir: register again
            if not pyfuse3.readdir_reply(token, name, attr, i + 1):
                break
            node.lookups += 1

    async def releasedir(self, fh: int) -> None:
        self.nodes.close_dir(fh)

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        fd = self.backing.open_dir(self.nodes.rel(self.nodes.dir(fh).node))
        try:
            await trio.to_thread.run_sync(os.fsync, fd)
        finally:
            os.close(fd)

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        sv = self.backing.statvfs()
        out = pyfuse3.StatvfsData()
        for attr in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                     "f_ffree", "f_favail", "f_namemax"):
            setattr(out, attr, getattr(sv, attr))
        return out

    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        return True  # default_permissions: the kernel checks

    # -- extended attributes -------------------------------------------------------------
    def _xattr_path(self, node: Node) -> str:
        return self.backing.xattr_path(self.nodes.rel(node))

    async def setxattr(self, inode: int, name: bytes, value: bytes,
                       ctx: pyfuse3.RequestContext) -> None:
        os.setxattr(self._xattr_path(self.nodes.get(inode)), name, value, follow_symlinks=False)

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        node = self.nodes.get(inode)
        try:
            return os.getxattr(self._xattr_path(node), name, follow_symlinks=False)
        except OSError as e:
            if e.errno == errno.ENODATA or (e.errno == errno.ENOENT and node.provisional):
                raise FUSEError(pyfuse3.ENOATTR) from None
            raise

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        node = self.nodes.get(inode)
        try:
            names = os.listxattr(self._xattr_path(node), follow_symlinks=False)
        except FileNotFoundError:
            if node.provisional:
                return []  # not here yet: no attributes
            raise
        return [os.fsencode(n) for n in names]

    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        os.removexattr(self._xattr_path(self.nodes.get(inode)), name, follow_symlinks=False)

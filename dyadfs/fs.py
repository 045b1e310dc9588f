"""The FUSE operations: a passthrough of the backing directory, plus publish and wait.

The backing directory is reached only through a descriptor opened before the mount (``*at``
calls), so the files live in the managed directory itself, under the mount.

Inodes are dyadfs' own numbers, one per (parent, name), so that names the kernel sees before
they exist in the backing (published elsewhere, or provisional) have an inode too. The price:
two hard links show two inode numbers.

Where the waiting happens (design.md): LOOKUP always answers at once. For a reader that opens
an unpublished name it answers with a provisional entry (zero timeouts); OPEN waits for the
publication, then pulls or opens. The reader's intent comes from :mod:`dyadfs.intent`.

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
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import pyfuse3
import trio
from pyfuse3 import FUSEError

from . import intent
from .catalog import Catalog
from .errors import DyadfsError, WaitTimeout
from .keys import FileRecord

if TYPE_CHECKING:
    from .config import Config

log = logging.getLogger(__name__)

ROOT = pyfuse3.ROOT_INODE
#: attribute/entry timeout of names whose content only changes through this mount
STABLE_TIMEOUT = 1.0
#: how often a waiting open checks that its caller still wants the answer (seconds)
CALLER_CHECK = 0.25
_WRITE_MODES = (os.O_WRONLY, os.O_RDWR)
HIDDEN = b".dyadfs"
_OPEN_STRIP = os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_DIRECT


class Puller(Protocol):
    """Brings a published file into this node's storage (see pull.py)."""

    async def ensure(self, rel: bytes, rec: FileRecord) -> None: ...

    async def start(self, rel: bytes, rec: FileRecord) -> Any: ...

    def local_version(self, rel: bytes) -> int | None: ...

    def touch(self, rel: bytes) -> None: ...

    def forget(self, rel: bytes) -> None: ...


@dataclass
class Stats:
    published: int = 0
    waiting: int = 0
    waits_done: int = 0
    wait_timeouts: int = 0
    pulled: int = 0
    prefetched: int = 0
    pulling: int = 0
    bytes_pulled: int = 0
    served: int = 0
    bytes_served: int = 0
    errors: int = 0
    unexpected: int = 0


@dataclass(eq=False)
class Node:
    ino: int
    parent: int
    name: bytes
    lookups: int = 0
    provisional: str | None = None  # "file" or "dir": the kernel knows it, the backing does not
    handles: set[int] = field(default_factory=set)
    told: tuple[int, int] | None = None  # (size, mtime) the kernel may cache, on consumer mounts


@dataclass(eq=False)
class Handle:
    fd: int
    node: Node
    publishes: bool  # its close publishes (a producer's handle open for writing)
    pull: Any = None  # the Pull this handle reads from while it is under way
    written: bool = False  # data changed since the last publication: flush publishes
    pending: bool = False  # created or truncated, not written since: release publishes
    direct: bool = False  # open for writing only: writes bypass the kernel's page cache


@dataclass(eq=False)
class DirHandle:
    node: Node
    entries: list[tuple[bytes, pyfuse3.EntryAttributes, Node]]


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


def show(rel: bytes) -> str:
    """A path for a log line: any bytes, printable."""
    return rel.decode("utf-8", "backslashreplace")


def _join(rel: bytes, name: bytes) -> bytes:
    return name if rel == b"." else rel + b"/" + name


@_guard_handlers
class Operations(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False

    def __init__(self, config: Config, root_fd: int, catalog: Catalog | None,
                 puller: Puller | None = None, stats: Stats | None = None) -> None:
        super().__init__()
        self.cfg = config
        self.root_fd = root_fd
        self.catalog = catalog
        self.puller = puller
        self.stats = stats or Stats()
        self._nodes: dict[int, Node] = {ROOT: Node(ROOT, ROOT, b"", lookups=1)}
        self._names: dict[tuple[int, bytes], int] = {}
        self._next_ino = ROOT + 1
        self._handles: dict[int, Handle] = {}
        self._dirs: dict[int, DirHandle] = {}
        self._next_fh = 1
        self._root_owner = os.fstat(root_fd)
        self._am_root = os.geteuid() == 0
        self._nursery: trio.Nursery | None = None
        # Names and attributes on a producer mount change only through it: the kernel caches
        # them. On a consumer mount, names come and go with publications (LOOKUP must always
        # ask), and files change behind the kernel's back (pulls, a shared backing): a regular
        # file's attributes are cached, and OPEN drops them when the file is not what the
        # kernel was told (close-to-open: a stale size would cut reads short).
        self._timeout = STABLE_TIMEOUT if config.role == "producer" else 0.0
        self._track = config.role != "producer"
        self._warned_intent = False
        #: called once the kernel's INIT is answered (what the answer sets is final by then)
        self.after_init: Callable[[], None] | None = None

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

    def is_open(self, rel: bytes) -> bool:
        """Whether a handle is open on *rel* (pulled copies in use are never evicted)."""
        return any(self._rel(h.node) == rel for h in self._handles.values())

    # -- inodes and paths ----------------------------------------------------------------
    def _node(self, ino: int) -> Node:
        try:
            return self._nodes[ino]
        except KeyError:
            raise FUSEError(errno.ESTALE) from None

    def _rel(self, node: Node) -> bytes:
        parts = []
        while node.ino != ROOT:
            parts.append(node.name)
            node = self._nodes[node.parent]
        return b"/".join(reversed(parts)) or b"."

    def _child(self, parent: Node, name: bytes) -> Node:
        """The node of *name* in *parent*, made if new (its lookup count is the caller's)."""
        ino = self._names.get((parent.ino, name))
        if ino is not None:
            return self._nodes[ino]
        node = Node(self._next_ino, parent.ino, name)
        self._next_ino += 1
        self._nodes[node.ino] = node
        self._names[(parent.ino, name)] = node.ino
        return node

    def _drop_name(self, parent: int, name: bytes) -> None:
        ino = self._names.pop((parent, name), None)
        if ino is not None:
            node = self._nodes.get(ino)
            if node is not None and node.lookups <= 0 and not node.handles:
                del self._nodes[ino]

    def _lstat(self, rel: bytes) -> os.stat_result:
        return os.lstat(rel, dir_fd=self.root_fd)

    def _exists(self, rel: bytes) -> bool:
        try:
            self._lstat(rel)
        except OSError:
            return False
        return True

    def _entry(self, node: Node, st: os.stat_result,
               timeout: float | None = None) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = node.ino
        e.generation = 0
        t = self._timeout if timeout is None else timeout
        e.entry_timeout = t
        e.attr_timeout = t
        if self._track and timeout is None and stat_mod.S_ISREG(st.st_mode):
            e.attr_timeout = STABLE_TIMEOUT
            node.told = (st.st_size, st.st_mtime_ns)
        e.st_mode = st.st_mode
        e.st_nlink = st.st_nlink
        e.st_uid = st.st_uid
        e.st_gid = st.st_gid
        e.st_rdev = st.st_rdev
        e.st_size = st.st_size
        e.st_blksize = st.st_blksize
        e.st_blocks = st.st_blocks
        e.st_atime_ns = st.st_atime_ns
        e.st_mtime_ns = st.st_mtime_ns
        e.st_ctime_ns = st.st_ctime_ns
        return e

    def _synthetic(self, node: Node, kind: str, rec: FileRecord | None) -> pyfuse3.EntryAttributes:
        """Attributes of a name that is not in the backing: published elsewhere, or provisional."""
        e = pyfuse3.EntryAttributes()
        e.st_ino = node.ino
        e.entry_timeout = 0
        e.attr_timeout = 0
        root = self._root_owner
        e.st_uid, e.st_gid = root.st_uid, root.st_gid
        if kind == "dir":
            e.st_mode = stat_mod.S_IFDIR | 0o755
            e.st_nlink = 2
            e.st_mtime_ns = e.st_ctime_ns = e.st_atime_ns = root.st_mtime_ns
        else:
            e.st_mode = stat_mod.S_IFREG | (rec.mode if rec else 0o644)
            e.st_nlink = 1
            e.st_size = rec.size if rec else 0
            e.st_blocks = (e.st_size + 511) // 512
            t = rec.mtime_ns if rec else root.st_mtime_ns
            e.st_mtime_ns = e.st_ctime_ns = e.st_atime_ns = t
        e.st_blksize = 4096
        return e

    def _chown(self, rel: bytes, ctx: pyfuse3.RequestContext) -> None:
        if self._am_root:
            os.chown(rel, ctx.uid, ctx.gid, dir_fd=self.root_fd, follow_symlinks=False)

    def _xattr_path(self, node: Node) -> str:
        return f"/proc/self/fd/{self.root_fd}/{os.fsdecode(self._rel(node))}"

    # -- lookup --------------------------------------------------------------------------
    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        parent = self._node(parent_inode)
        if name == b"." or name == b"..":
            raise FUSEError(errno.ENOENT)  # supports_dot_lookup is off: never asked
        if parent_inode == ROOT and name == HIDDEN:
            raise FUSEError(errno.ENOENT)  # dyadfs' own state (pulls under way)
        rel = _join(self._rel(parent), name)
        entry = await self._lookup(parent, name, rel, ctx)
        self._nodes[entry.st_ino].lookups += 1
        return entry

    async def _lookup(self, parent: Node, name: bytes, rel: bytes,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        try:
            st = self._lstat(rel)
        except (FileNotFoundError, NotADirectoryError):
            pass
        else:
            node = self._child(parent, name)
            node.provisional = None
            return self._entry(node, st)
        if not self.cfg.waits or self.catalog is None:
            raise FUSEError(errno.ENOENT)
        rec = await self.catalog.get(rel)
        if rec is not None and rec.complete:
            node = self._child(parent, name)
            node.provisional = "file"
            return self._synthetic(node, "file", rec)
        if await self.catalog.is_directory(rel):
            node = self._child(parent, name)
            node.provisional = "dir"
            return self._synthetic(node, "dir", None)
        call = intent.caller(ctx.pid)
        if call.intent is intent.Intent.UNKNOWN and not self._warned_intent:
            self._warned_intent = True
            log.warning("cannot read /proc/%d/syscall: lookups of unpublished names answer "
                        "ENOENT instead of letting an open wait", ctx.pid)
        if call.intent is intent.Intent.READ:
            where = intent.role_of(name, rel, call.path)
            kind = "dir" if where == "dir" else "file"
            node = self._child(parent, name)
            node.provisional = kind
            return self._synthetic(node, kind, None)
        if call.intent is intent.Intent.STAT and self.cfg.wait_on_stat:
            await self._wait_published(rel, ctx.pid)
            return await self._lookup(parent, name, rel, ctx)
        raise FUSEError(errno.ENOENT)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for ino, nlookup in inode_list:
            node = self._nodes.get(ino)
            if node is None or ino == ROOT:
                continue
            node.lookups -= nlookup
            if node.lookups <= 0 and not node.handles:
                del self._nodes[ino]
                if self._names.get((node.parent, node.name)) == ino:
                    del self._names[(node.parent, node.name)]

    # -- attributes ----------------------------------------------------------------------
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self._node(inode)
        return await self._getattr(node)

    async def _getattr(self, node: Node) -> pyfuse3.EntryAttributes:
        for fh in node.handles:  # open, perhaps unlinked: the descriptor knows best
            return self._entry(node, os.fstat(self._handles[fh].fd))
        rel = self._rel(node)
        try:
            return self._entry(node, self._lstat(rel))
        except FileNotFoundError:
            if node.provisional is None or self.catalog is None:
                raise
        rec = await self.catalog.get(rel) if node.provisional == "file" else None
        return self._synthetic(node, node.provisional, rec)

    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self._node(inode)
        handle = self._handles.get(fh) if fh is not None else None
        rel = self._rel(node)
        target: int | bytes = handle.fd if handle is not None else rel
        if fields.update_size:
            if handle is not None:
                os.truncate(handle.fd, attr.st_size)
                handle.written = True
            else:
                publish = await self._before_write(rel)
                fd = os.open(rel, os.O_WRONLY | os.O_NOFOLLOW, dir_fd=self.root_fd)
                try:
                    os.truncate(fd, attr.st_size)
                    if publish:
                        await self._publish(rel, fd)
                finally:
                    os.close(fd)
        if fields.update_mode:
            if handle is not None:
                os.chmod(handle.fd, stat_mod.S_IMODE(attr.st_mode))
            else:
                os.chmod(rel, stat_mod.S_IMODE(attr.st_mode), dir_fd=self.root_fd)
        if fields.update_uid or fields.update_gid:
            uid = attr.st_uid if fields.update_uid else -1
            gid = attr.st_gid if fields.update_gid else -1
            if handle is not None:
                os.chown(handle.fd, uid, gid)
            else:
                os.chown(rel, uid, gid, dir_fd=self.root_fd, follow_symlinks=False)
        if fields.update_atime or fields.update_mtime:
            cur = os.fstat(target) if isinstance(target, int) else self._lstat(rel)
            ns = (attr.st_atime_ns if fields.update_atime else cur.st_atime_ns,
                  attr.st_mtime_ns if fields.update_mtime else cur.st_mtime_ns)
            if isinstance(target, int):
                os.utime(target, ns=ns)
            else:
                os.utime(rel, ns=ns, dir_fd=self.root_fd, follow_symlinks=False)
        if (fields.update_mode or fields.update_mtime) and not fields.update_size and \
                self.cfg.publishes and self.catalog is not None and \
                not (handle is not None and handle.written):
            # Published attributes follow a chmod or touch of a published file.
            if rel in await self.catalog.owned_under(rel):
                await self.catalog.publish(rel, self._lstat(rel))
        return await self._getattr(node)

    # -- names ---------------------------------------------------------------------------
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return os.readlink(self._rel(self._node(inode)), dir_fd=self.root_fd)

    async def _new_entry(self, parent: Node, name: bytes) -> pyfuse3.EntryAttributes:
        node = self._child(parent, name)
        node.provisional = None
        node.lookups += 1
        return self._entry(node, self._lstat(self._rel(node)))

    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        parent = self._node(parent_inode)
        rel = _join(self._rel(parent), name)
        os.mknod(rel, mode, rdev, dir_fd=self.root_fd)
        self._chown(rel, ctx)
        return await self._new_entry(parent, name)

    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        parent = self._node(parent_inode)
        rel = _join(self._rel(parent), name)
        os.mkdir(rel, mode, dir_fd=self.root_fd)
        self._chown(rel, ctx)
        return await self._new_entry(parent, name)

    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        parent = self._node(parent_inode)
        rel = _join(self._rel(parent), name)
        os.symlink(target, rel, dir_fd=self.root_fd)
        self._chown(rel, ctx)
        return await self._new_entry(parent, name)

    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self._node(inode)
        parent = self._node(new_parent_inode)
        old = self._rel(node)
        new = _join(self._rel(parent), new_name)
        os.link(old, new, src_dir_fd=self.root_fd, dst_dir_fd=self.root_fd,
                follow_symlinks=False)
        if self.cfg.publishes and self.catalog is not None:
            if await self.catalog.owned_under(old):
                await self.catalog.publish(new, self._lstat(new))
                self.stats.published += 1
        return await self._new_entry(parent, new_name)

    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        parent = self._node(parent_inode)
        rel = _join(self._rel(parent), name)
        os.unlink(rel, dir_fd=self.root_fd)
        self._drop_name(parent.ino, name)
        if self.puller is not None:
            self.puller.forget(rel)
        if self.catalog is not None and self.cfg.publishes:
            if await self.catalog.owned_under(rel):
                await self.catalog.remove(rel)

    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        parent = self._node(parent_inode)
        os.rmdir(_join(self._rel(parent), name), dir_fd=self.root_fd)
        self._drop_name(parent.ino, name)

    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: pyfuse3.RequestContext) -> None:
        p_old, p_new = self._node(parent_inode_old), self._node(parent_inode_new)
        old = _join(self._rel(p_old), name_old)
        new = _join(self._rel(p_new), name_new)
        try:
            replaced = self._lstat(new)
        except (FileNotFoundError, NotADirectoryError):
            replaced = None
        if flags:
            _renameat2(self.root_fd, old, new, flags)
        else:
            os.rename(old, new, src_dir_fd=self.root_fd, dst_dir_fd=self.root_fd)
        exchange = bool(flags & pyfuse3.RENAME_EXCHANGE)
        if self.puller is not None:
            self.puller.forget(old)
            self.puller.forget(new)
        ino_old = self._names.pop((p_old.ino, name_old), None)
        ino_new = self._names.pop((p_new.ino, name_new), None)
        if ino_old is not None:
            self._names[(p_new.ino, name_new)] = ino_old
            self._nodes[ino_old].parent, self._nodes[ino_old].name = p_new.ino, name_new
        if ino_new is not None:
            if exchange:
                self._names[(p_old.ino, name_old)] = ino_new
                self._nodes[ino_new].parent, self._nodes[ino_new].name = p_old.ino, name_old
            else:
                node = self._nodes[ino_new]
                if node.lookups <= 0 and not node.handles:
                    del self._nodes[ino_new]
        if self.catalog is not None and self.cfg.publishes and not exchange:
            await self.catalog.move(old, new, replaced is not None)

    # -- files ---------------------------------------------------------------------------
    def _new_handle(self, fd: int, node: Node, publishes: bool) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = Handle(fd, node, publishes)
        node.handles.add(fh)
        return fh

    async def _before_write(self, rel: bytes, mode: int = 0o644) -> bool:
        """Called before a file changes; returns whether its close publishes. With shared
        storage the file is marked as being written first, so no consumer reads it half done."""
        if not self.cfg.publishes or self.catalog is None:
            return False
        if self.cfg.shared_storage:
            await self.catalog.mark_writing(rel, mode)
        return True

    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext) -> tuple[pyfuse3.FileInfo,
                                                          pyfuse3.EntryAttributes]:
        parent = self._node(parent_inode)
        rel = _join(self._rel(parent), name)
        publish = await self._before_write(rel, mode)
        fd = os.open(rel, (flags & ~(os.O_NOCTTY | os.O_DIRECT)) | os.O_CREAT | os.O_NOFOLLOW,
                     mode, dir_fd=self.root_fd)
        try:
            self._chown(rel, ctx)
            entry = await self._new_entry(parent, name)
        except BaseException:
            os.close(fd)
            raise
        node = self._nodes[entry.st_ino]
        fh = self._new_handle(fd, node, publishes=publish)
        # A new file is published even if left empty, but at release, not at the first flush:
        # a shell's "> f" closes a dup of the descriptor before writing anything.
        self._handles[fh].pending = True
        return self._file_info(fh, flags), entry

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self._node(inode)
        rel = self._rel(node)
        writable = (flags & os.O_ACCMODE) in _WRITE_MODES
        if writable or flags & os.O_TRUNC:
            publish = await self._before_write(rel)
        else:
            publish = False
            if self.cfg.waits and self.catalog is not None:
                pull = await self._make_readable(node, rel, ctx.pid)
                if pull is not None and not pull.done:
                    # Stream: read the file being pulled; reads wait for their bytes.
                    fd = os.dup(pull.fd)
                    self._check_told(node, fd)
                    fh = self._new_handle(fd, node, publishes=False)
                    self._handles[fh].pull = pull
                    return pyfuse3.FileInfo(fh=fh)
        if publish and self.puller is not None:
            self.puller.forget(rel)  # written here: no longer a pulled copy
        fd = os.open(rel, (flags & ~_OPEN_STRIP) | os.O_NOFOLLOW, dir_fd=self.root_fd)
        node.provisional = None
        self._check_told(node, fd)
        fh = self._new_handle(fd, node, publishes=writable and publish)
        if flags & os.O_TRUNC and publish:
            self._handles[fh].pending = True
        return self._file_info(fh, flags)

    def _file_info(self, fh: int, flags: int) -> pyfuse3.FileInfo:
        """Writes of a handle open for writing only go straight to the daemon (FOPEN_DIRECT_IO)
        instead of through the kernel's page cache first: one page-cache fill and one copy
        less per byte (measured here: 16 MiB files written through a producer mount 400 ->
        640-1150 MiB/s). Invisible to programs: such a descriptor cannot be mmapped, and
        cached pages of other open descriptors are dropped after each write (see write)."""
        direct = flags & os.O_ACCMODE == os.O_WRONLY
        self._handles[fh].direct = direct
        return pyfuse3.FileInfo(fh=fh, direct_io=direct)

    def installed(self, rel: bytes) -> None:
        """A pull put a new file at *rel*: what the kernel caches of the old one goes."""
        ino = ROOT
        for part in rel.split(b"/"):
            found = self._names.get((ino, part))
            if found is None:
                return
            ino = found
        node = self._nodes.get(ino)
        if node is not None and node.told is not None:
            _invalidate(node, attr_only=True)

    def _check_told(self, node: Node, fd: int) -> None:
        """Drop the kernel's cached attributes of *node* if the file changed since (a pull, a
        writer on a shared backing). Attributes only: no pages, so no lock to wait for."""
        if node.told is not None:
            st = os.fstat(fd)
            if node.told != (st.st_size, st.st_mtime_ns):
                _invalidate(node, attr_only=True)

    async def _make_readable(self, node: Node, rel: bytes, pid: int) -> Any:
        """Consumer side of an open for reading: wait, refresh or pull as the table says."""
        assert self.catalog is not None
        try:
            st: os.stat_result | None = self._lstat(rel)
        except (FileNotFoundError, NotADirectoryError):
            st = None
        if st is not None and not stat_mod.S_ISREG(st.st_mode):
            return None
        if self.cfg.shared_storage:
            rec = await self.catalog.get(rel)
            if st is not None and (rec is None or rec.complete):
                return None  # present, and nobody is writing it
            if rec is not None and not rec.complete:
                await self._until_caller_dies(
                    pid, self.catalog.wait_not_writing(rel, self.cfg.wait_timeout), rel)
                return None
            # Not there: wait for a publication whose file is there too (the backing is the
            # truth; a record without its file is stale, from an earlier run).
            await self._until_caller_dies(pid, self.catalog.wait_complete(
                rel, self.cfg.wait_timeout, also=lambda: self._exists(rel)), rel)
            return None
        rec = await self.catalog.get(rel)
        if rec is not None and (rec.owner == self.catalog.mount_id or not rec.complete):
            return None  # ours: the local file is the truth
        if st is not None and (rec is None or (
                self.puller is not None and self.puller.local_version(rel) == rec.version)):
            if self.puller is not None:
                self.puller.touch(rel)
            return None  # present and current
        if rec is None:
            rec = await self._wait_published(rel, pid)
            if rec.owner == self.catalog.mount_id:
                return None
        if self.puller is None:
            raise DyadfsError(f"{os.fsdecode(rel)} is published by another mount and this mount "
                              "has no transport to pull it", errno.EIO)
        if self.cfg.verify:
            await self.puller.ensure(rel, rec)  # verified before anyone reads a byte
            return None
        return await self.puller.start(rel, rec)

    async def _wait_published(self, rel: bytes, pid: int) -> FileRecord:
        assert self.catalog is not None
        rec = await self._until_caller_dies(
            pid, self.catalog.wait_complete(rel, self.cfg.wait_timeout), rel)
        assert rec is not None
        return rec

    async def _until_caller_dies(self, pid: int, wait: Awaitable[FileRecord | None],
                                 rel: bytes) -> FileRecord | None:
        """Run *wait*, dropped if the process that asked is killed or interrupted first.

        Once the daemon has read a request, the kernel keeps even a SIGKILLed caller in the
        syscall until the answer comes (and pyfuse3 does not pass on FUSE_INTERRUPT), so the
        caller's pending signals are watched: a deliverable one ends the wait with EINTR, after
        which the signal takes effect (a killed ``cat`` dies, Python raises KeyboardInterrupt).
        """
        result: list[FileRecord | None] = []
        failure: list[Exception] = []
        self.stats.waiting += 1
        try:
            async with trio.open_nursery() as nursery:
                async def waiter() -> None:
                    try:
                        result.append(await wait)
                    except Exception as e:  # re-raised below, outside the nursery
                        failure.append(e)
                    nursery.cancel_scope.cancel()

                async def watch() -> None:
                    # No event tells that a signal is pending: a 4 Hz look at /proc is it.
                    while _caller_alive(pid):  # noqa: ASYNC110
                        await trio.sleep(CALLER_CHECK)
                    nursery.cancel_scope.cancel()

                nursery.start_soon(waiter)
                nursery.start_soon(watch)
        finally:
            self.stats.waiting -= 1
        if failure:
            if isinstance(failure[0], WaitTimeout):
                self.stats.wait_timeouts += 1
                log.warning("open of %s: not published after %s s: ETIMEDOUT",
                            show(rel), self.cfg.wait_timeout)
            raise failure[0]
        if not result:
            log.info("open of %s: the waiting process was signalled or is gone; wait dropped",
                     show(rel))
            raise FUSEError(errno.EINTR)
        self.stats.waits_done += 1
        return result[0]

    async def read(self, fh: int, off: int, size: int) -> bytes:
        handle = self._handles[fh]
        pull = handle.pull
        if pull is not None:
            if pull.done and pull.error is None:
                handle.pull = None
            else:
                await pull.wait_for(min(off + size, pull.size or 0))
        return os.pread(handle.fd, size, off)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        handle = self._handles[fh]
        handle.written = True
        n = os.pwrite(handle.fd, buf, off)
        if handle.direct and len(handle.node.handles) > 1:
            # Another descriptor may hold pages the kernel cached before this write (tail -f
            # of a log): drop them, as a write through the page cache would have updated them.
            # From a thread: the kernel may wait for a page that a READ of ours holds locked.
            await trio.to_thread.run_sync(_invalidate, handle.node)
        return n

    async def flush(self, fh: int) -> None:
        # flush comes with every close() and close() waits for it (release does not): publish
        # here, so that the publication is committed before the producer's close() returns.
        if not self.cfg.publishes:
            # A consumer mount publishes nothing: ENOSYS tells the kernel never to send FLUSH
            # again, and every close() saves a round trip through the daemon.
            raise FUSEError(errno.ENOSYS)
        handle = self._handles[fh]
        if handle.written and handle.publishes:
            handle.written = handle.pending = False
            await self._publish_handle(handle)

    async def release(self, fh: int) -> None:
        handle = self._handles.pop(fh)
        handle.node.handles.discard(fh)
        try:
            if (handle.written or handle.pending) and handle.publishes:
                handle.written = handle.pending = False
                await self._publish_handle(handle)
        finally:
            os.close(handle.fd)
            node = handle.node
            if node.lookups <= 0 and not node.handles and node.ino in self._nodes:
                del self._nodes[node.ino]

    async def _publish_handle(self, handle: Handle) -> None:
        rel = self._rel(handle.node)
        if self.cfg.async_publish and self._nursery is not None:
            st = os.fstat(handle.fd)
            self._nursery.start_soon(self._publish_stat, rel, st)
        else:
            await self._publish(rel, handle.fd)

    async def _publish(self, rel: bytes, fd: int) -> None:
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

    async def fsync(self, fh: int, datasync: bool) -> None:
        fd = self._handles[fh].fd
        await trio.to_thread.run_sync(os.fdatasync if datasync else os.fsync, fd)

    # -- directories ---------------------------------------------------------------------
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        node = self._node(inode)
        rel = self._rel(node)
        entries: dict[bytes, tuple[pyfuse3.EntryAttributes, Node]] = {}
        try:
            fd = os.open(rel, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=self.root_fd)
        except FileNotFoundError:
            if node.provisional is None:
                raise
            names: list[bytes] = []
        else:
            try:
                names = [os.fsencode(n) for n in os.listdir(fd)]
                if node.ino == ROOT and HIDDEN in names:
                    names.remove(HIDDEN)
            finally:
                os.close(fd)
            for name in names:
                child = self._child(node, name)
                try:
                    st = self._lstat(_join(rel, name))
                except FileNotFoundError:
                    continue
                entries[name] = (self._entry(child, st), child)
        if self.cfg.waits and self.catalog is not None:
            for name, rec in (await self.catalog.children(rel)).items():
                if name not in entries:
                    child = self._child(node, name)
                    kind = "file" if rec is not None else "dir"
                    child.provisional = child.provisional or kind
                    entries[name] = (self._synthetic(child, kind, rec), child)
        fh = self._next_fh
        self._next_fh += 1
        self._dirs[fh] = DirHandle(node, [(n, a, c) for n, (a, c) in sorted(entries.items())])
        return fh

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        entries = self._dirs[fh].entries
        for i in range(start_id, len(entries)):
            name, attr, node = entries[i]
            if node.ino not in self._nodes:  # forgotten since opendir: register again
                self._nodes[node.ino] = node
                self._names.setdefault((node.parent, node.name), node.ino)
            if not pyfuse3.readdir_reply(token, name, attr, i + 1):
                break
            node.lookups += 1

    async def releasedir(self, fh: int) -> None:
        del self._dirs[fh]

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        rel = self._rel(self._dirs[fh].node)
        fd = os.open(rel, os.O_RDONLY | os.O_DIRECTORY, dir_fd=self.root_fd)
        try:
            await trio.to_thread.run_sync(os.fsync, fd)
        finally:
            os.close(fd)

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        sv = os.statvfs(self.root_fd)
        out = pyfuse3.StatvfsData()
        for attr in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                     "f_ffree", "f_favail", "f_namemax"):
            setattr(out, attr, getattr(sv, attr))
        return out

    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        return True  # default_permissions: the kernel checks

    # -- extended attributes -------------------------------------------------------------
    async def setxattr(self, inode: int, name: bytes, value: bytes,
                       ctx: pyfuse3.RequestContext) -> None:
        os.setxattr(self._xattr_path(self._node(inode)), name, value, follow_symlinks=False)

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        node = self._node(inode)
        try:
            return os.getxattr(self._xattr_path(node), name, follow_symlinks=False)
        except OSError as e:
            if e.errno == errno.ENODATA or (e.errno == errno.ENOENT and node.provisional):
                raise FUSEError(pyfuse3.ENOATTR) from None
            raise

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        node = self._node(inode)
        try:
            names = os.listxattr(self._xattr_path(node), follow_symlinks=False)
        except FileNotFoundError:
            if node.provisional:
                return []  # not here yet: no attributes
            raise
        return [os.fsencode(n) for n in names]

    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        os.removexattr(self._xattr_path(self._node(inode)), name, follow_symlinks=False)


def _invalidate(node: Node, attr_only: bool = False) -> None:
    """Make the kernel forget what it caches of *node* (its attributes, and its pages unless
    *attr_only*)."""
    node.told = None
    try:
        pyfuse3.invalidate_inode(node.ino, attr_only=attr_only)
    except OSError as e:  # ENOENT: the kernel forgot the inode already
        log.debug("invalidating inode %d: %s", node.ino, e)


def _caller_alive(tid: int) -> bool:
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


_libc: Any = None


def _renameat2(dir_fd: int, old: bytes, new: bytes, flags: int) -> None:
    import ctypes
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.renameat2(dir_fd, old, dir_fd, new, ctypes.c_uint(flags)) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))

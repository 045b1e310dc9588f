"""What the kernel may cache of each node, and making it forget.

Names and attributes on a producer mount change only through it: the kernel caches them
(:data:`STABLE_TIMEOUT`). On a consumer mount, names come and go with publications (LOOKUP must
always ask, but for files published complete, whose names and attributes are cached like a
present file's), and files change behind the kernel's back (pulls, a shared backing, newer
versions): a regular file's attributes are cached, and OPEN drops them when the file is not what
the kernel was told (close-to-open: a stale size would cut reads short). ``Node.told`` remembers
what it was told.
"""

from __future__ import annotations

import logging
import os
import stat as stat_mod
from pathlib import Path
from typing import TYPE_CHECKING

import pyfuse3

from .mountinfo import fuse_device
from .nodes import Handle, Node

if TYPE_CHECKING:
    from .config import Config
    from .keys import FileRecord

log = logging.getLogger(__name__)

#: attribute/entry timeout of names whose content only changes through this mount
STABLE_TIMEOUT = 1.0


class KernelCache:
    def __init__(self, config: Config, owner: os.stat_result) -> None:
        self._timeout = STABLE_TIMEOUT if config.role == "producer" else 0.0
        self._track = config.role != "producer"
        self._shared = config.shared_storage
        self._owner = owner

    def entry(self, node: Node, st: os.stat_result, timeout: float | None = None,
              arriving: FileRecord | None = None) -> pyfuse3.EntryAttributes:
        """The attributes of a name present in the backing, as the kernel will cache them.

        *arriving*: the file is being pulled; the kernel is told the published size, mode and
        mtime, which the file will have once installed, so that nothing the kernel caches
        changes when the pull ends (a change would make it drop attributes that a reader's
        GETATTR is fetching, and that reader would read the old size: zero bytes)."""
        e = pyfuse3.EntryAttributes()
        e.st_ino = node.ino
        e.generation = 0
        t = self._timeout if timeout is None else timeout
        e.entry_timeout = t
        e.attr_timeout = t
        if self._track and timeout is None and stat_mod.S_ISREG(st.st_mode):
            e.attr_timeout = STABLE_TIMEOUT
            node.told = (st.st_size, st.st_mtime_ns)
        elif self._track and timeout is None and stat_mod.S_ISDIR(st.st_mode):
            # Every path through a directory revalidates its name and checks its mode
            # (permissions): uncached, each path-based call (ls -l: three per name) would
            # cost a LOOKUP and a GETATTR of it. A directory here goes only through this
            # mount, but on shared storage, where other nodes may remove or rename it.
            e.attr_timeout = STABLE_TIMEOUT
            if not self._shared:
                e.entry_timeout = STABLE_TIMEOUT
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
        if arriving is not None:
            e.st_size = arriving.size
            e.st_blocks = (arriving.size + 511) // 512
            e.st_mode = stat_mod.S_IFREG | arriving.mode
            e.st_mtime_ns = arriving.mtime_ns
        if node.told is not None:
            node.told = (e.st_size, e.st_mtime_ns)
        return e

    def synthetic(self, node: Node, kind: str, rec: FileRecord | None,
                  published: bool = False) -> pyfuse3.EntryAttributes:
        """Attributes of a name that is not in the backing: published elsewhere, or
        provisional (*published* False).

        On node-local storage, a file published complete is shown with the published size,
        mode and mtime, which its pulled copy of that version will have: the kernel may cache
        the name and these attributes like a present file's (an ``ls -l`` of 100,000 published
        names then costs no LOOKUP or GETATTR per name), and ``node.told`` remembers them, so
        that an open that finds a newer version makes the kernel drop them before it answers
        (:meth:`check_told`). A published directory is cached too (every path through it
        would otherwise cost a LOOKUP and a GETATTR of it). Provisional names are never
        cached: a provisional file's size, 0, is not the file's, and the next look asks
        again."""
        e = pyfuse3.EntryAttributes()
        e.st_ino = node.ino
        if kind == "file":
            published = rec is not None and rec.complete
        node.published = published
        cached = published and kind in ("file", "dir") and self._track and not self._shared
        e.entry_timeout = e.attr_timeout = STABLE_TIMEOUT if cached else 0
        root = self._owner
        e.st_uid, e.st_gid = root.st_uid, root.st_gid
        if kind == "dir":
            e.st_mode = stat_mod.S_IFDIR | (rec.mode if rec else 0o755)
            e.st_nlink = 2
            t = rec.mtime_ns if rec else root.st_mtime_ns
            e.st_mtime_ns = e.st_ctime_ns = e.st_atime_ns = t
        elif kind == "symlink" and rec is not None:
            e.st_mode = stat_mod.S_IFLNK | 0o777
            e.st_nlink = 1
            e.st_size = rec.size
            e.st_mtime_ns = e.st_ctime_ns = e.st_atime_ns = rec.mtime_ns
        else:
            e.st_mode = stat_mod.S_IFREG | (rec.mode if rec else 0o644)
            e.st_nlink = 1
            e.st_size = rec.size if rec else 0
            e.st_blocks = (e.st_size + 511) // 512
            t = rec.mtime_ns if rec else root.st_mtime_ns
            e.st_mtime_ns = e.st_ctime_ns = e.st_atime_ns = t
        e.st_blksize = 4096
        if cached and kind == "file":
            node.told = (e.st_size, e.st_mtime_ns)
        return e

    def check_told(self, node: Node, fd: int, arriving: FileRecord | None = None) -> None:
        """Drop the kernel's cached attributes of *node* if the file changed since (a pull, a
        writer on a shared backing, a newer version than the published one it was shown).
        Called before OPEN answers, so that every GETATTR of the reader comes after the
        invalidation (one sent before it would have its answer dropped by the kernel).
        Attributes only: no pages, so no lock to wait for. *arriving*: the file is being
        pulled; it is compared with what it will be (see :meth:`entry`)."""
        if node.told is None:
            return
        if arriving is not None:
            now = (arriving.size, arriving.mtime_ns)
        else:
            st = os.fstat(fd)
            now = (st.st_size, st.st_mtime_ns)
        if node.told != now:
            invalidate(node, attr_only=True)

    def file_info(self, handle: Handle, flags: int, own: bool = True) -> pyfuse3.FileInfo:
        """How the kernel caches the pages of an open file.

        - Writes of a handle open for writing only go straight to the daemon (FOPEN_DIRECT_IO)
          instead of through the kernel's page cache first: one page-cache fill and one copy
          less per byte (measured here: 16 MiB files written through a producer mount 400 ->
          640-1150 MiB/s). Invisible to programs: such a descriptor cannot be mmapped, and
          cached pages of other open descriptors are dropped after each write (see
          :meth:`needs_page_drop`).
        - A handle whose bytes are not its node's file (*own* False: a newer version pulled
          between the lookup and the open) bypasses the page cache too: the node's cached pages
          are another version's.
        - Pages are kept from one open to the next (FOPEN_KEEP_CACHE) where every change of a
          file goes through this mount, or makes a new node (a pulled copy's new version); on
          shared storage another node may rewrite a file in place, so each open starts with
          empty pages (close-to-open)."""
        handle.direct = flags & os.O_ACCMODE == os.O_WRONLY or not own
        return pyfuse3.FileInfo(fh=handle.fh, direct_io=handle.direct,
                                keep_cache=not self._shared)

    def needs_page_drop(self, handle: Handle) -> bool:
        """Whether a direct write through *handle* may leave stale pages in the kernel: another
        descriptor may hold pages cached before it (``tail -f`` of a log)."""
        return handle.direct and len(handle.node.handles) > 1


def forget_name(node: Node) -> None:
    """Make the kernel look the name of *node* up again at its next use. For a published
    file's synthetic node, whose name the kernel may cache, once it reads a pulled copy: from
    then on it is that copy's node, and a newer version must come with a node of its own (see
    nodes.py), found by a LOOKUP. Asynchronous (pyfuse3's thread): the kernel takes the
    directory's lock, which a request waiting for this very loop may hold."""
    pyfuse3.invalidate_entry_async(node.parent, node.name, ignore_enoent=True)


def invalidate(node: Node, attr_only: bool = False) -> None:
    """Make the kernel forget what it caches of *node* (its attributes, and its pages unless
    *attr_only*). Dropping pages may wait for a page a READ of ours holds locked: call it from
    a worker thread unless *attr_only*."""
    node.told = None
    try:
        pyfuse3.invalidate_inode(node.ino, attr_only=attr_only)
    except OSError as e:  # ENOENT: the kernel forgot the inode already
        log.debug("invalidating inode %d: %s", node.ino, e)


def raise_readahead(mountpoint: Path, kib: int = 1024) -> None:
    """Let the kernel read ahead 1 MiB (FUSE's default is 128 KiB), so that a sequential read
    is 1 MiB per FUSE request instead of 128 KiB: fewer round trips through the daemon. Needs
    root; else nothing changes. Must run after INIT's answer, which would cut it back.

    Not ``os.stat(mountpoint)`` to find the device: this runs on the FUSE loop's thread, which
    would have to answer it."""
    device = fuse_device(mountpoint)
    if device is None:
        return
    try:
        Path(f"/sys/class/bdi/{device}/read_ahead_kb").write_text(str(kib))
    except OSError as e:
        log.debug("read-ahead left at the kernel's default: %s", e)


def mapped_writable(device: str, ino: int) -> bool:
    """Whether any process (that this one may inspect) maps inode *ino* of the FUSE file system
    on *device* ("major:minor") shared and writable: its changes reach the file only when the
    map goes (munmap, exit), as WRITE requests that come before the file's RELEASE.

    Reads every ``/proc/PID/maps``: a few milliseconds; asked only at the close of a written
    read-write descriptor (see Producer.flushed)."""
    major, minor = (int(x) for x in device.split(":"))
    dev = f"{major:02x}:{minor:02x}".encode()
    want = str(ino).encode()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/maps", "rb") as f:
                for line in f:
                    fields = line.split(None, 5)
                    if len(fields) >= 5 and fields[3] == dev and fields[4] == want and \
                            fields[1][1:2] == b"w" and fields[1][3:4] == b"s":
                        return True
        except OSError:
            continue
    return False

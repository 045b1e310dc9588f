"""The backing directory, reached only through the descriptor opened before the mount.

Every call here is an ``*at`` system call relative to that descriptor, with ``O_NOFOLLOW`` where a
name is opened: the files live in the managed directory itself, under the mount, and nothing here
decides anything (no policy: see producer.py and consumer.py for the rules).
"""

from __future__ import annotations

import ctypes
import errno
import os
from typing import Any

from .paths import HIDDEN, join

_libc: Any = None


class Backing:
    def __init__(self, root_fd: int) -> None:
        self.root_fd = root_fd
        self.owner = os.fstat(root_fd)  # synthetic entries are shown with its owner and times

    # -- looking ---------------------------------------------------------------------------
    def lstat(self, rel: bytes) -> os.stat_result:
        return os.lstat(rel, dir_fd=self.root_fd)

    def lstat_or_none(self, rel: bytes) -> os.stat_result | None:
        """The attributes of *rel*, or None if it (or a directory on its way) is missing."""
        try:
            return self.lstat(rel)
        except (FileNotFoundError, NotADirectoryError):
            return None

    def exists(self, rel: bytes) -> bool:
        try:
            self.lstat(rel)
        except OSError:
            return False
        return True

    def readlink(self, rel: bytes) -> bytes:
        return os.readlink(rel, dir_fd=self.root_fd)

    def listdir(self, rel: bytes) -> list[bytes]:
        """The names in directory *rel* (dyadfs' own state left out)."""
        fd = os.open(rel, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=self.root_fd)
        try:
            names = [os.fsencode(n) for n in os.listdir(fd)]
        finally:
            os.close(fd)
        if rel == b"." and HIDDEN in names:
            names.remove(HIDDEN)
        return names

    def scan(self, rel: bytes) -> list[tuple[bytes, os.stat_result]]:
        """The names in directory *rel* with their attributes (a name removed meanwhile is
        left out). Blocking: 100,000 names take about a second on a local disk, more on
        Lustre or NFS; the file system calls it from a worker thread."""
        out = []
        for name in self.listdir(rel):
            st = self.lstat_or_none(join(rel, name))
            if st is not None:
                out.append((name, st))
        return out

    def statvfs(self) -> os.statvfs_result:
        return os.statvfs(self.root_fd)

    def xattr_path(self, rel: bytes) -> str:
        return f"/proc/self/fd/{self.root_fd}/{os.fsdecode(rel)}"

    # -- files -----------------------------------------------------------------------------
    def open(self, rel: bytes, flags: int, mode: int = 0o644) -> int:
        return os.open(rel, flags | os.O_NOFOLLOW, mode, dir_fd=self.root_fd)

    def open_dir(self, rel: bytes) -> int:
        return os.open(rel, os.O_RDONLY | os.O_DIRECTORY, dir_fd=self.root_fd)

    # -- changing names --------------------------------------------------------------------
    def mkdir(self, rel: bytes, mode: int) -> None:
        os.mkdir(rel, mode, dir_fd=self.root_fd)

    def makedirs(self, rel_dir: bytes, mode: int = 0o755) -> None:
        """Make directory *rel_dir* and its missing parents."""
        path = b""
        for part in rel_dir.split(b"/"):
            if not part or part == b".":
                continue
            path = part if not path else path + b"/" + part
            try:
                os.mkdir(path, mode, dir_fd=self.root_fd)
            except FileExistsError:
                pass

    def mknod(self, rel: bytes, mode: int, rdev: int) -> None:
        os.mknod(rel, mode, rdev, dir_fd=self.root_fd)

    def symlink(self, target: bytes, rel: bytes) -> None:
        os.symlink(target, rel, dir_fd=self.root_fd)

    def link(self, old: bytes, new: bytes) -> None:
        os.link(old, new, src_dir_fd=self.root_fd, dst_dir_fd=self.root_fd,
                follow_symlinks=False)

    def unlink(self, rel: bytes) -> None:
        os.unlink(rel, dir_fd=self.root_fd)

    def rmdir(self, rel: bytes) -> None:
        os.rmdir(rel, dir_fd=self.root_fd)

    def rename(self, old: bytes, new: bytes, flags: int = 0) -> None:
        if not flags:
            os.rename(old, new, src_dir_fd=self.root_fd, dst_dir_fd=self.root_fd)
            return
        global _libc
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
        if _libc.renameat2(self.root_fd, old, self.root_fd, new, ctypes.c_uint(flags)) != 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))

    # -- attributes of a name --------------------------------------------------------------
    def chmod(self, rel: bytes, mode: int) -> None:
        os.chmod(rel, mode, dir_fd=self.root_fd)

    def chown(self, rel: bytes, uid: int, gid: int) -> None:
        os.chown(rel, uid, gid, dir_fd=self.root_fd, follow_symlinks=False)

    def utime(self, rel: bytes, ns: tuple[int, int]) -> None:
        os.utime(rel, ns=ns, dir_fd=self.root_fd, follow_symlinks=False)


def fallocate(fd: int, size: int) -> bool:
    """Allocate the blocks of the first *size* bytes of *fd* (fallocate(2), mode 0): True when
    done, False when the file system cannot (EOPNOTSUPP: nothing allocated, the caller writes
    with pwrite instead). ENOSPC and other errors are raised: a full disk is known before a
    single byte is received."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if size == 0:
        return True
    if _libc.fallocate(fd, 0, ctypes.c_int64(0), ctypes.c_int64(size)) == 0:
        return True
    e = ctypes.get_errno()
    if e in (errno.EOPNOTSUPP, errno.ENOSYS):
        return False
    raise OSError(e, os.strerror(e))


def check_room(fd: int, size: int) -> None:
    """ENOSPC unless the file system of *fd* has *size* bytes free (for this user: root may
    use the blocks reserved for it)."""
    st = os.fstatvfs(fd)
    free = (st.f_bfree if os.geteuid() == 0 else st.f_bavail) * st.f_frsize
    if free < size:
        raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)}: {size} bytes needed, "
                      f"{free} free")

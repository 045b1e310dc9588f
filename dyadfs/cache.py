"""The pulled copies on this node: their versions, their LRU order, ``--cache-size``.

Invariants:
- A pulled copy remembers its version (an extended attribute, and in memory), so a current copy
  is not pulled again and a stale one is. At start the index is rebuilt from those attributes
  (:meth:`Cache.rebuild`), so ``--cache-size`` counts copies pulled before a restart.
- ``--cache-size`` evicts the least recently used pulled copies; never a file this node produced
  or wrote, never one that is open or being pulled. A prefetched copy nobody has opened yet goes
  only when an open needs the room; a prefetch never evicts one (see prefetch.py).
"""

from __future__ import annotations

import collections
import logging
import os
import stat
from collections.abc import Callable
from typing import TYPE_CHECKING

from .paths import HIDDEN, show

if TYPE_CHECKING:
    from .backing import Backing
    from .config import Config

log = logging.getLogger(__name__)

VERSION_XATTR = "user.dyadfs.version"


class Cache:
    def __init__(self, config: Config, backing: Backing) -> None:
        self.cfg = config
        self.backing = backing
        self._versions: dict[bytes, int] = {}
        self._lru: collections.OrderedDict[bytes, int] = collections.OrderedDict()
        self._unread: set[bytes] = set()  # prefetched, not opened since
        self._epochs: dict[bytes, int] = {}  # local changes of a path, counted
        #: whether a handle is open on a path (the file system's; open copies stay)
        self.is_open: Callable[[bytes], bool] = lambda rel: False
        #: whether a path is being pulled (the puller's; such copies stay)
        self.is_pulling: Callable[[bytes], bool] = lambda rel: False
        #: the prefetcher's wake-up: room may have been freed
        self.on_room: Callable[[], None] | None = None

    # -- what is here ----------------------------------------------------------------------
    def local_version(self, rel: bytes) -> int | None:
        """The version of the pulled copy at *rel*, or None if it is not a pulled copy."""
        if rel in self._versions:
            return self._versions[rel]
        try:
            fd = self.backing.open(rel, os.O_RDONLY | os.O_NONBLOCK)
        except OSError:
            return None
        try:
            value = int(os.getxattr(fd, VERSION_XATTR))
        except (OSError, ValueError):
            return None
        finally:
            os.close(fd)
        self._versions[rel] = value
        return value

    @staticmethod
    def mark(fd: int, version: int) -> None:
        """Remember in the file itself which version it is (before it is installed)."""
        try:
            os.setxattr(fd, VERSION_XATTR, str(version).encode())
        except OSError:
            pass  # no user xattrs on this file system: the version is kept in memory only

    def installed(self, rel: bytes, version: int, size: int, prefetched: bool) -> None:
        self._versions[rel] = version
        self._lru[rel] = size
        self._lru.move_to_end(rel)
        if prefetched:
            self._unread.add(rel)

    def rebuild(self) -> int:
        """Count the pulled copies already here (a mount started again over its directory):
        every file with a version attribute, least recently read first (by atime), so that
        --cache-size holds from the start. Blocking (a walk of the backing directory): run it
        in a thread, before serving. Returns how many were found."""
        found: list[tuple[int, bytes, int, int]] = []
        for dirpath, dirnames, filenames, dirfd in os.fwalk(".", dir_fd=self.backing.root_fd):
            if dirpath == ".":
                dirnames[:] = [d for d in dirnames if os.fsencode(d) != HIDDEN]
            for name in filenames:
                try:
                    st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
                    if not stat.S_ISREG(st.st_mode):
                        continue
                    version = int(os.getxattr(f"/proc/self/fd/{dirfd}/{name}", VERSION_XATTR))
                except (OSError, ValueError):
                    continue
                rel = os.fsencode(os.path.normpath(os.path.join(dirpath, name)))
                found.append((st.st_atime_ns, rel, version, st.st_size))
        for _, rel, version, size in sorted(found):
            self._versions[rel] = version
            self._lru[rel] = size
        return len(found)

    def touch(self, rel: bytes) -> None:
        """*rel* was opened: it becomes the most recently used."""
        if rel in self._lru:
            self._lru.move_to_end(rel)
        if rel in self._unread:
            self._unread.discard(rel)
            self.room()

    def epoch(self, rel: bytes) -> int:
        """How many times *rel* was changed locally (a pull started before a change must not
        be installed over it)."""
        return self._epochs.get(rel, 0)

    def forget(self, rel: bytes) -> None:
        """*rel* was written, removed or replaced locally: it is no longer a pulled copy, and
        is never evicted."""
        self._epochs[rel] = self._epochs.get(rel, 0) + 1
        self._versions.pop(rel, None)
        self._lru.pop(rel, None)
        self._unread.discard(rel)
        self.room()

    def room(self) -> None:
        if self.on_room is not None:
            self.on_room()

    # -- room ------------------------------------------------------------------------------
    def room_for(self, size: int, in_flight: int) -> bool:
        """Whether a prefetch of *size* bytes fits under --cache-size beside *in_flight* bytes
        being pulled, counting what eviction may remove (copies already read and not open) as
        free."""
        limit = self.cfg.cache_size
        if limit is None:
            return True
        kept = in_flight
        for rel, n in self._lru.items():
            if rel in self._unread or self.is_open(rel):
                kept += n
        return kept + size <= limit

    def evict(self) -> None:
        """Bring the pulled copies under --cache-size, least recently used first."""
        limit = self.cfg.cache_size
        if limit is None:
            return
        total = sum(self._lru.values())
        # Copies that were read go first (LRU); prefetched ones nobody opened yet only if
        # that is not enough (an open needed the room).
        for spare_unread in (True, False):
            for rel in list(self._lru):
                if total <= limit:
                    return
                if self.is_open(rel) or self.is_pulling(rel) or \
                        (spare_unread and rel in self._unread):
                    continue
                try:
                    self.backing.unlink(rel)
                except FileNotFoundError:
                    pass
                total -= self._lru.pop(rel)
                self._versions.pop(rel, None)
                self._unread.discard(rel)
                log.info("evicted %s (cache over %d bytes)", show(rel), limit)

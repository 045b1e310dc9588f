"""Pulling published files into this node's storage, and serving the ones this mount owns.

Invariants (what a crash or a failure can and cannot leave behind):
- A pull writes under ``.dyadfs/tmp/`` in the backing directory and renames into place only when
  every byte has arrived and the size (and, with ``--verify``, the SHA-256) matches. A crash
  leaves at most a temporary file, removed at the next start; never a short file under a real
  name.
- One pull per path at a time: every opener of a path shares it (single flight).
- Readers may start before a pull ends (``Pull.wait_for``) and never get bytes that have not
  arrived; with ``--verify`` an open waits for the whole, verified file instead.
- A pulled copy remembers its version (an extended attribute, and in memory), so a current copy
  is not pulled again and a stale one is.
- ``--cache-size`` evicts the least recently used pulled copies; never a file this node produced,
  never one that is open or being pulled. A prefetched copy nobody has opened yet goes only when
  an open needs the room; a prefetch never evicts one (see prefetch.py).
"""

from __future__ import annotations

import collections
import errno
import hashlib
import logging
import os
import secrets
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

from . import keys
from .catalog import Catalog
from .errors import DyadfsError, FetchError
from .fs import show
from .keys import FileRecord, MountRecord
from .transport import Transport
from .transport.protocol import Request, Served, Sink, check_secret, open_beneath, refuse

if TYPE_CHECKING:
    from .config import Config
    from .fs import Stats

log = logging.getLogger(__name__)

STATE_DIR = b".dyadfs"
TMP_DIR = b".dyadfs/tmp"
VERSION_XATTR = "user.dyadfs.version"
RAW_MAX = 4 << 30


class Pull:
    """One transfer of one version of one path, shared by everyone who opens it meanwhile."""

    def __init__(self, rel: bytes, rec: FileRecord, fd: int, tmp: bytes) -> None:
        self.rel = rel
        self.rec = rec
        self.fd = fd
        self.tmp = tmp
        self.size: int | None = None
        self.received = 0
        self.done = False
        self.error: DyadfsError | None = None
        self.wanted = False  # an open asked for it (else only the prefetcher did)
        self._changed = trio.Event()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def progress(self, n: int) -> None:
        self.received = n
        self._wake()

    def sized(self, n: int) -> None:
        self.size = n
        self._wake()

    def finish(self, error: DyadfsError | None) -> None:
        self.done = True
        self.error = error
        self._wake()

    async def wait_started(self) -> None:
        while self.size is None and not self.done:
            await self._changed.wait()
        if self.error is not None:
            raise self.error

    async def wait_for(self, end: int) -> None:
        """Until bytes [0, end) have arrived (or the pull failed)."""
        while self.received < end and not self.done:
            await self._changed.wait()
        if self.error is not None:
            raise DyadfsError(f"pull of {show(self.rel)} failed: {self.error}",
                              errno.EIO)

    async def wait_done(self) -> None:
        while not self.done:
            await self._changed.wait()
        if self.error is not None:
            raise self.error


def makedirs_at(root_fd: int, rel_dir: bytes) -> None:
    path = b""
    for part in rel_dir.split(b"/"):
        if not part:
            continue
        path = part if not path else path + b"/" + part
        try:
            os.mkdir(path, 0o755, dir_fd=root_fd)
        except FileExistsError:
            pass


class Puller:
    def __init__(self, config: Config, root_fd: int, catalog: Catalog, transport: Transport,
                 fallback: Transport, secret: str, stats: Stats,
                 is_open: Callable[[bytes], bool]) -> None:
        self.cfg = config
        self.root_fd = root_fd
        self.catalog = catalog
        self.transport = transport
        self.fallback = fallback
        self.secret = secret
        self.stats = stats
        self.is_open = is_open
        self._pulls: dict[bytes, Pull] = {}
        self._versions: dict[bytes, int] = {}
        self._lru: collections.OrderedDict[bytes, int] = collections.OrderedDict()
        self._unread: set[bytes] = set()  # prefetched, not opened since
        self.on_room: Callable[[], None] | None = None  # the prefetcher's wake-up
        self.on_installed: Callable[[bytes], None] | None = None  # the file system's cache
        self._nursery: trio.Nursery | None = None
        self._owners: dict[str, MountRecord] = {}
        makedirs_at(root_fd, TMP_DIR)
        tmp_fd = os.open(TMP_DIR, os.O_RDONLY | os.O_DIRECTORY, dir_fd=root_fd)
        try:
            for name in os.listdir(tmp_fd):  # leftovers of a crash: never under a real name
                os.unlink(name, dir_fd=tmp_fd)
        finally:
            os.close(tmp_fd)

    def attach(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery

    # -- what is here ----------------------------------------------------------------------
    def local_version(self, rel: bytes) -> int | None:
        if rel in self._versions:
            return self._versions[rel]
        try:
            fd = os.open(rel, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=self.root_fd)
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

    def touch(self, rel: bytes) -> None:
        if rel in self._lru:
            self._lru.move_to_end(rel)
        if rel in self._unread:
            self._unread.discard(rel)
            self._room()

    def forget(self, rel: bytes) -> None:
        """*rel* was removed or replaced locally: it is no longer a pulled copy."""
        self._versions.pop(rel, None)
        self._lru.pop(rel, None)
        self._unread.discard(rel)
        self._room()

    def _room(self) -> None:
        if self.on_room is not None:
            self.on_room()

    def room_for(self, size: int) -> bool:
        """Whether a prefetch of *size* bytes fits under --cache-size, counting what eviction
        may remove (copies already read and not open) as free."""
        limit = self.cfg.cache_size
        if limit is None:
            return True
        kept = sum(p.rec.size for p in self._pulls.values() if not p.done)
        for rel, n in self._lru.items():
            if rel in self._unread or self.is_open(rel):
                kept += n
        return kept + size <= limit

    def active(self, rel: bytes) -> Pull | None:
        pull = self._pulls.get(rel)
        return None if pull is None or pull.done else pull

    # -- pulling ---------------------------------------------------------------------------
    async def ensure(self, rel: bytes, rec: FileRecord) -> None:
        """Until *rel* at *rec*'s version is here, complete."""
        pull = await self.start(rel, rec)
        await pull.wait_done()

    async def prefetch(self, rel: bytes, rec: FileRecord) -> None:
        """Pull *rel* for nobody yet (``--prefetch``)."""
        pull = await self.start(rel, rec, wanted=False)
        await pull.wait_done()

    async def start(self, rel: bytes, rec: FileRecord, wanted: bool = True) -> Pull:
        """Start (or join) the pull of *rel*; returns once its size is known."""
        pull = self._pulls.get(rel)
        if pull is None or (pull.done and pull.error is not None) or \
                (pull.rec.version != rec.version and pull.done):
            tmp = TMP_DIR + b"/" + secrets.token_hex(8).encode()
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600, dir_fd=self.root_fd)
            pull = Pull(rel, rec, fd, tmp)
            self._pulls[rel] = pull
            assert self._nursery is not None
            self._nursery.start_soon(self._run, pull)
        if wanted:
            pull.wanted = True
            self.touch(rel)
        await pull.wait_started()
        return pull

    async def raw_fetch(self, owner: str, size: int) -> float:
        """Seconds to move *size* bytes from *owner*'s memory to here, without files: the
        transport's own limit between the same two processes (for ``dyadfs bench``)."""
        where = await self._owner_address(owner, fresh=True, size=1 << 62)  # UCX itself
        if where is None:
            raise FetchError(f"owner {owner} is not registered", errno.ENOENT)
        transport, address = where
        req = Request(self.catalog.ns, self.secret, b"", 0, raw=size)
        t0 = time.perf_counter()
        await transport.fetch(address, req, Sink(-1, lambda n: None, lambda n: None))
        return time.perf_counter() - t0

    async def _owner_address(self, owner: str, fresh: bool = False,
                             size: int = 0) -> tuple[Transport, str] | None:
        mrec = None if fresh else self._owners.get(owner)
        if mrec is None:
            raw = await self.catalog.kvs.get(self.catalog.ns, keys.mount_key(owner))
            if raw is None:
                return None
            mrec = MountRecord.decode(raw, keys.mount_key(owner))
            self._owners[owner] = mrec
        if mrec.tcp and size < self.cfg.ucx_threshold:
            # Small files over the kept TCP connection: a UCX endpoint costs ~25 ms to wire
            # up here, more than a frame takes to move (see the README's benchmarks).
            return self.fallback, mrec.tcp
        if self.transport.name != "tcp" and mrec.transport == self.transport.name \
                and mrec.address:
            return self.transport, mrec.address
        if mrec.tcp:
            return self.fallback, mrec.tcp
        return None

    async def _run(self, pull: Pull) -> None:
        rel = pull.rel
        t0 = time.monotonic()
        error: DyadfsError | None = None
        self.stats.pulling += 1
        try:
            await self._transfer(pull)
            await self._install(pull)
        except DyadfsError as e:
            error = e
        except OSError as e:
            error = FetchError(f"{e.strerror or e}", e.errno or errno.EIO)
        finally:
            self.stats.pulling -= 1
            if error is not None or pull.rel not in self._versions or \
                    self._versions[pull.rel] != pull.rec.version:
                try:  # not installed: the temporary file goes
                    os.unlink(pull.tmp, dir_fd=self.root_fd)
                except FileNotFoundError:
                    pass
            os.close(pull.fd)
            if self._pulls.get(rel) is pull and error is None:
                del self._pulls[rel]
        if error is not None:
            self.stats.errors += 1
            log.error("pull of %s failed: %s", show(rel), error)
            pull.finish(FetchError(str(error), errno.EIO))
            self._room()
            return
        self.stats.pulled += 1
        self.stats.bytes_pulled += pull.rec.size
        if not pull.wanted:
            self.stats.prefetched += 1
            self._unread.add(rel)
        log.debug("pulled %s (%d B) in %.3f s", show(rel), pull.rec.size,
                  time.monotonic() - t0)
        pull.finish(None)
        self._evict()
        self._room()

    async def _transfer(self, pull: Pull) -> None:
        """Fetch until complete, retrying a dead or refusing owner until --fetch-timeout."""
        deadline = trio.current_time() + self.cfg.fetch_timeout
        delay = 0.02
        last: str = "no attempt"
        attempt = 0
        while True:
            where = await self._owner_address(pull.rec.owner, fresh=attempt > 0,
                                              size=pull.rec.size)
            attempt += 1
            if where is None:
                last = f"owner {pull.rec.owner} is not registered"
            else:
                transport, address = where
                req = Request(self.catalog.ns, self.secret, pull.rel, pull.rec.version,
                              self.cfg.verify)
                # --fetch-timeout bounds a silence, not a transfer: every arrival of bytes
                # moves the deadline (a 100 GB file may take minutes; a dead owner may not).
                scope = trio.CancelScope(deadline=trio.current_time() + self.cfg.fetch_timeout)

                def arrived(n: int, scope: trio.CancelScope = scope) -> None:
                    pull.progress(n)
                    scope.deadline = trio.current_time() + self.cfg.fetch_timeout

                sink = Sink(pull.fd, lambda n: self._sized(pull, n), arrived)
                progressed = [False]

                def arrived_here(n: int, arrived: Any = arrived,
                                 progressed: list[bool] = progressed) -> None:
                    progressed[0] = True
                    arrived(n)

                sink.on_progress = arrived_here
                try:
                    with scope:
                        await transport.fetch(address, req, sink)
                    if scope.cancelled_caught:
                        raise trio.TooSlowError(f"nothing arrived for {self.cfg.fetch_timeout} s")
                except (FetchError, OSError, trio.TooSlowError) as e:
                    last = f"{address}: {getattr(e, 'strerror', None) or e or type(e).__name__}"
                    if progressed[0]:  # this attempt moved bytes: the owner was alive
                        deadline = trio.current_time() + self.cfg.fetch_timeout
                    if isinstance(e, FetchError) and e.errno == errno.ESTALE:
                        fresh = await self.catalog.get(pull.rel)  # a newer version meanwhile?
                        if fresh is not None and fresh.complete:
                            pull.rec = fresh
                else:
                    if pull.received != pull.rec.size or pull.size != pull.rec.size:
                        last = f"got {pull.received} bytes, expected {pull.rec.size}"
                    elif self.cfg.verify and not await self._verified(pull, sink.sha256):
                        last = "checksum mismatch"
                    else:
                        return
            if trio.current_time() + delay > deadline:
                raise FetchError(f"no owner served it within {self.cfg.fetch_timeout} s "
                                 f"({last})", errno.EIO)
            await trio.sleep(delay)
            delay = min(delay * 2, 0.5)

    def _sized(self, pull: Pull, n: int) -> None:
        if n != pull.rec.size:
            raise FetchError(f"owner announced {n} bytes, published {pull.rec.size}",
                             errno.ESTALE)
        os.ftruncate(pull.fd, n)  # readers' fstat shows the final size from the start
        pull.received = 0
        pull.sized(n)

    async def _verified(self, pull: Pull, want: str | None) -> bool:
        def digest() -> str:
            h = hashlib.sha256()
            off = 0
            while True:
                data = os.pread(pull.fd, 4 << 20, off)
                if not data:
                    return h.hexdigest()
                h.update(data)
                off += len(data)
        return want is not None and await trio.to_thread.run_sync(digest) == want

    async def _install(self, pull: Pull) -> None:
        rec = pull.rec
        os.fchmod(pull.fd, rec.mode & 0o7777)
        os.utime(pull.fd, ns=(rec.mtime_ns, rec.mtime_ns))
        try:
            os.setxattr(pull.fd, VERSION_XATTR, str(rec.version).encode())
        except OSError:
            pass  # no user xattrs on this file system: the version is kept in memory only
        parent = pull.rel.rpartition(b"/")[0]
        if parent:
            makedirs_at(self.root_fd, parent)
        os.rename(pull.tmp, pull.rel, src_dir_fd=self.root_fd, dst_dir_fd=self.root_fd)
        if self.on_installed is not None:
            self.on_installed(pull.rel)
        self._versions[pull.rel] = rec.version
        self._lru[pull.rel] = rec.size
        self._lru.move_to_end(pull.rel)

    def _evict(self) -> None:
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
                if self.is_open(rel) or self.active(rel) is not None or \
                        (spare_unread and rel in self._unread):
                    continue
                try:
                    os.unlink(rel, dir_fd=self.root_fd)
                except FileNotFoundError:
                    pass
                total -= self._lru.pop(rel)
                self._versions.pop(rel, None)
                self._unread.discard(rel)
                log.info("evicted %s (cache over %d bytes)", show(rel), limit)


class FileServer:
    """Answers fetches of the files this mount published (see transport/protocol.py)."""

    def __init__(self, root_fd: int, catalog: Catalog, secret: str, stats: Stats) -> None:
        self.root_fd = root_fd
        self.catalog = catalog
        self.secret = secret
        self.stats = stats

    async def handle(self, req: Request) -> Served:
        why = check_secret(req, self.catalog.ns, lambda: self.secret)
        if why is not None:
            return refuse(errno.EACCES, why, req)
        if req.raw:
            if not 0 < req.raw <= RAW_MAX:
                return refuse(errno.EINVAL, f"raw size {req.raw} out of range", req)
            fd = os.memfd_create("dyadfs-raw")  # zeros, from memory: the transport's limit
            os.ftruncate(fd, req.raw)
            return Served(fd=fd, size=req.raw, _st=os.fstat(fd))
        try:
            rec = await self.catalog.get(req.path)
        except DyadfsError as e:
            return refuse(errno.EIO, str(e), req)
        if rec is None or not rec.complete or rec.owner != self.catalog.mount_id:
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
        if st.st_size != rec.size:
            os.close(fd)
            return refuse(errno.ESTALE, "the file changed since its publication", req)
        self.stats.served += 1
        self.stats.bytes_served += st.st_size
        return Served(fd=fd, size=st.st_size, verify=req.verify, _st=st)

"""Pulling a published file from the mount that owns it into this node's storage.

Invariants (what a crash or a failure can and cannot leave behind):
- A pull writes under ``.dyadfs/tmp/`` in the backing directory and renames into place only when
  every byte has arrived and the size (and, with ``--verify``, the SHA-256) matches. A crash
  leaves at most a temporary file, removed at the next start; never a short file under a real
  name.
- One pull per path at a time: every opener of a path shares it (single flight).
- Readers may start before a pull ends (``Pull.wait_for``) and never get bytes that have not
  arrived; with ``--verify`` an open waits for the whole, verified file instead.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import trio

from . import keys
from .cache import Cache
from .errors import DyadfsError, FetchError
from .hashing import sha256_fd
from .keys import FileRecord, MountRecord
from .paths import TMP_DIR, parent_of, show
from .transport import Transport
from .transport.protocol import Request, Sink

if TYPE_CHECKING:
    from .backing import Backing
    from .catalog import Catalog
    from .config import Config
    from .stats import Stats

log = logging.getLogger(__name__)


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


class Puller:
    def __init__(self, config: Config, backing: Backing, catalog: Catalog,
                 transport: Transport, fallback: Transport, secret: str, stats: Stats) -> None:
        self.cfg = config
        self.backing = backing
        self.catalog = catalog
        self.transport = transport
        self.fallback = fallback
        self.secret = secret
        self.stats = stats
        self.cache = Cache(config, backing)
        self.cache.is_pulling = lambda rel: self.active(rel) is not None
        self._pulls: dict[bytes, Pull] = {}
        #: called when a pull put a new file at a path (the file system's kernel cache)
        self.on_installed: Callable[[bytes], None] | None = None
        self._nursery: trio.Nursery | None = None
        self._owners: dict[str, MountRecord] = {}
        backing.makedirs(TMP_DIR)
        tmp_fd = backing.open_dir(TMP_DIR)
        try:
            for name in os.listdir(tmp_fd):  # leftovers of a crash: never under a real name
                os.unlink(name, dir_fd=tmp_fd)
        finally:
            os.close(tmp_fd)

    def attach(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery

    def active(self, rel: bytes) -> Pull | None:
        pull = self._pulls.get(rel)
        return None if pull is None or pull.done else pull

    def room_for(self, size: int) -> bool:
        """Whether a prefetch of *size* bytes fits under --cache-size now."""
        in_flight = sum(p.rec.size for p in self._pulls.values() if not p.done)
        return self.cache.room_for(size, in_flight)

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
            fd = self.backing.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            pull = Pull(rel, rec, fd, tmp)
            self._pulls[rel] = pull
            assert self._nursery is not None
            self._nursery.start_soon(self._run, pull)
        if wanted:
            pull.wanted = True
            self.cache.touch(rel)
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
        installed = False
        self.stats.pulling += 1
        try:
            await self._transfer(pull)
            self._install(pull)
            installed = True
        except DyadfsError as e:
            error = e
        except OSError as e:
            error = FetchError(f"{e.strerror or e}", e.errno or errno.EIO)
        finally:
            self.stats.pulling -= 1
            if not installed:
                try:  # not installed: the temporary file goes
                    self.backing.unlink(pull.tmp)
                except FileNotFoundError:
                    pass
            os.close(pull.fd)
            if self._pulls.get(rel) is pull and error is None:
                del self._pulls[rel]
        if error is not None:
            self.stats.errors += 1
            log.error("pull of %s failed: %s", show(rel), error)
            pull.finish(FetchError(str(error), errno.EIO))
            self.cache.room()
            return
        self.stats.pulled += 1
        self.stats.bytes_pulled += pull.rec.size
        if not pull.wanted:
            self.stats.prefetched += 1
        log.debug("pulled %s (%d B) in %.3f s", show(rel), pull.rec.size,
                  time.monotonic() - t0)
        pull.finish(None)
        self.cache.evict()
        self.cache.room()

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
                outcome, progressed = await self._attempt(pull, transport, address)
                if outcome is None:
                    return
                last = outcome
                if progressed:  # this attempt moved bytes: the owner was alive
                    deadline = trio.current_time() + self.cfg.fetch_timeout
            if trio.current_time() + delay > deadline:
                raise FetchError(f"no owner served it within {self.cfg.fetch_timeout} s "
                                 f"({last})", errno.EIO)
            await trio.sleep(delay)
            delay = min(delay * 2, 0.5)

    async def _attempt(self, pull: Pull, transport: Transport,
                       address: str) -> tuple[str | None, bool]:
        """One fetch from *address*: (None, _) when complete, else (why not, whether bytes
        arrived)."""
        req = Request(self.catalog.ns, self.secret, pull.rel, pull.rec.version, self.cfg.verify)
        # --fetch-timeout bounds a silence, not a transfer: every arrival of bytes moves the
        # deadline (a 100 GB file may take minutes; a dead owner may not).
        scope = trio.CancelScope(deadline=trio.current_time() + self.cfg.fetch_timeout)
        progressed = False

        def arrived(n: int) -> None:
            nonlocal progressed
            progressed = True
            pull.progress(n)
            scope.deadline = trio.current_time() + self.cfg.fetch_timeout

        sink = Sink(pull.fd, lambda n: self._sized(pull, n), arrived)
        try:
            with scope:
                await transport.fetch(address, req, sink)
            if scope.cancelled_caught:
                raise trio.TooSlowError(f"nothing arrived for {self.cfg.fetch_timeout} s")
        except (FetchError, OSError, trio.TooSlowError) as e:
            if isinstance(e, FetchError) and e.errno == errno.ESTALE:
                fresh = await self.catalog.get(pull.rel)  # a newer version meanwhile?
                if fresh is not None and fresh.complete:
                    pull.rec = fresh
            why = getattr(e, "strerror", None) or str(e) or type(e).__name__
            return f"{address}: {why}", progressed
        if pull.received != pull.rec.size or pull.size != pull.rec.size:
            return f"got {pull.received} bytes, expected {pull.rec.size}", progressed
        if self.cfg.verify and not await self._verified(pull, sink.sha256):
            return "checksum mismatch", progressed
        return None, progressed

    def _sized(self, pull: Pull, n: int) -> None:
        if n != pull.rec.size:
            raise FetchError(f"owner announced {n} bytes, published {pull.rec.size}",
                             errno.ESTALE)
        os.ftruncate(pull.fd, n)  # readers' fstat shows the final size from the start
        pull.received = 0
        pull.sized(n)

    async def _verified(self, pull: Pull, want: str | None) -> bool:
        return want is not None and \
            await trio.to_thread.run_sync(sha256_fd, pull.fd) == want

    def _install(self, pull: Pull) -> None:
        rec = pull.rec
        os.fchmod(pull.fd, rec.mode & 0o7777)
        os.utime(pull.fd, ns=(rec.mtime_ns, rec.mtime_ns))
        Cache.mark(pull.fd, rec.version)
        parent = parent_of(pull.rel)
        if parent != b".":
            self.backing.makedirs(parent)
        self.backing.rename(pull.tmp, pull.rel)
        if self.on_installed is not None:
            self.on_installed(pull.rel)
        self.cache.installed(pull.rel, rec.version, rec.size, prefetched=not pull.wanted)

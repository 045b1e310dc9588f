"""Pulling a published file from the mount that owns it into this node's storage.

Invariants (what a crash or a failure can and cannot leave behind):
- A pull writes under ``.dyadfs/tmp/`` in the backing directory and renames into place only when
  every byte has arrived and the size (and, with ``--verify``, the SHA-256) matches. A crash
  leaves at most a temporary file, removed at the next start; never a short file under a real
  name.
- A pull moves one version: every opener of that version of a path shares it (single
  flight); an opener of a newer version starts a pull of its own, and only the newest published
  version is installed under the real name. A pull never switches versions: if the owner says
  its version is gone (rewritten), the pull fails and the openers still waiting start over with
  the new publication.
- The temporary file's blocks are allocated before any byte arrives (fallocate), so a full disk
  is an error at the start (ENOSPC for the reader), never a SIGBUS in a map or a silent hole.
- Readers of a large file may start before the pull ends (``Pull.wait_for``) and only get bytes
  the owner vouched for: the owner checks that the file is unchanged after reading each chunk
  (protocol.CHUNK) and before sending the next, so a chunk is readable here once a byte of the
  next one (or the trailer) has arrived. A file of at most one chunk is read only once complete;
  with ``--verify`` every open waits for the whole, verified file.
- A local change of the path while it is pulled (the consumer writes its own file there) wins:
  the pull is not installed over it.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import secrets
import time
from typing import TYPE_CHECKING

import trio

from . import keys
from .backing import check_room, fallocate
from .cache import Cache
from .errors import DyadfsError, FetchError
from .hashing import sha256_fd
from .keys import FileRecord, MountRecord
from .paths import TMP_DIR, parent_of, show
from .transport import Transport
from .transport.local import LocalTransport, host_id
from .transport.protocol import CHUNK, Request, Sink

if TYPE_CHECKING:
    from .backing import Backing
    from .catalog import Catalog
    from .config import Config
    from .dyad import DyadClient
    from .stats import Stats

log = logging.getLogger(__name__)

#: errors of this node's own storage: no owner can help, the reader hears them as they are
_LOCAL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)
_PASSED_ON = (*_LOCAL, errno.ESTALE)

#: pulls from one owner's address at once; the others wait their turn. 10,000 opens released
#: by one publication burst opened 10,000 connections to the owner, whose server closes those
#: beyond its cap (1,024): 7,000 pulls failed with EIO.
PULLS_PER_OWNER = 32


class _Turns:
    """The turns of the pulls from one owner's address, and when one of them last moved a byte
    (a pull waiting its turn gives up only after --fetch-timeout without any)."""

    def __init__(self) -> None:
        self.slots = trio.Semaphore(PULLS_PER_OWNER)
        self.moved = -math.inf


#: the version a copy pulled from C DYAD is marked with: DYAD has none (dyadfs' versions are
#: wall-clock nanoseconds, never 0), so any dyadfs publication of the name differs from it
DYAD_VERSION = 0


class _DyadPull:
    """One pull from C DYAD's dyad.fetch, shared by every open of the name meanwhile."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.error: DyadfsError | None = None


class Pull:
    """One transfer of one version of one path, shared by everyone who opens it meanwhile."""

    def __init__(self, rel: bytes, rec: FileRecord, fd: int, tmp: bytes, epoch: int) -> None:
        self.rel = rel
        self.rec = rec
        self.fd = fd
        self.tmp = tmp
        self.epoch = epoch  # the cache's count of local changes of rel when it started
        self.size: int | None = None
        self.received = 0
        self.vouched = 0  # bytes a reader may read: every chunk but the one arriving
        self.done = False
        self.error: DyadfsError | None = None
        self.wanted = False  # an open asked for it (else only the prefetcher did)
        self.reserved = False  # the file's blocks are allocated (fallocate)
        self._changed = trio.Event()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def progress(self, n: int) -> None:
        self.received = n
        vouched = ((n - 1) // CHUNK) * CHUNK if n > 0 else 0
        if vouched > self.vouched:
            self.vouched = vouched
            self._wake()

    def sized(self, n: int) -> None:
        self.size = n
        self._wake()

    def finish(self, error: DyadfsError | None) -> None:
        self.done = True
        self.error = error
        if error is None:
            self.vouched = self.received
        self._wake()

    async def wait_started(self) -> None:
        while self.size is None and not self.done:
            await self._changed.wait()
        if self.error is not None:
            raise self.error

    async def wait_for(self, end: int) -> None:
        """Until bytes [0, end) may be read (or the pull failed)."""
        while self.vouched < end and not self.done:
            await self._changed.wait()
        if self.error is not None and self.vouched < end:
            raise DyadfsError(f"pull of {show(self.rel)} failed: {self.error}",
                              self.error.errno)

    async def wait_done(self) -> None:
        while not self.done:
            await self._changed.wait()
        if self.error is not None:
            raise self.error


class Puller:
    def __init__(self, config: Config, backing: Backing, catalog: Catalog,
                 transport: Transport, fallback: Transport, secret: str, stats: Stats,
                 local: LocalTransport | None = None) -> None:
        self.cfg = config
        self.backing = backing
        self.catalog = catalog
        self.transport = transport
        self.fallback = fallback
        self.local = local  # same-host pulls (transport/local.py), if on
        self.host_id = host_id()
        self._not_local: set[str] = set()  # owners the local socket did not reach
        self.secret = secret
        self.stats = stats
        self.cache = Cache(config, backing)
        self.cache.is_pulling = lambda rel: self.active(rel) is not None
        self._pulls: dict[bytes, Pull] = {}
        self._nursery: trio.Nursery | None = None
        self._owners: dict[str, MountRecord] = {}
        self._turns: dict[str, _Turns] = {}  # address -> the turns of its pulls
        self._dyad_pulls: dict[bytes, _DyadPull] = {}
        #: the client of C DYAD's dyad.fetch (--dyad-compat; set by the mount)
        self.dyad: DyadClient | None = None
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
        """Start (or join) the pull of *rel* at *rec*'s version; returns once its size is
        known, or, for a file of at most one chunk, once it is complete."""
        pull = self._pulls.get(rel)
        if pull is None or pull.rec.version != rec.version or \
                (pull.done and pull.error is not None):
            tmp = TMP_DIR + b"/" + secrets.token_hex(8).encode()
            fd = self.backing.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            pull = Pull(rel, rec, fd, tmp, self.cache.epoch(rel))
            self._pulls[rel] = pull
            assert self._nursery is not None
            self._nursery.start_soon(self._run, pull)
        if wanted:
            pull.wanted = True
            self.cache.touch(rel)
        if rec.size <= CHUNK:
            await pull.wait_done()
        else:
            await pull.wait_started()
        return pull

    # -- files C DYAD published -------------------------------------------------------------
    async def pull_dyad(self, rel: bytes, rank: int) -> None:
        """Until *rel*, published by C DYAD on broker *rank*, is here complete: single flight,
        the same install rules as a dyadfs pull (a temporary file in .dyadfs/tmp, allocated
        before the bytes land, renamed into place only whole, never over a local change)."""
        if self.dyad is None:
            raise FetchError(f"{show(rel)} is published by C DYAD, and DYAD interop is off",
                             errno.EIO)
        flight = self._dyad_pulls.get(rel)
        if flight is None:
            flight = self._dyad_pulls[rel] = _DyadPull()
            assert self._nursery is not None
            self._nursery.start_soon(self._run_dyad, rel, rank, flight)
        await flight.done.wait()
        if flight.error is not None:
            raise flight.error

    async def _run_dyad(self, rel: bytes, rank: int, flight: _DyadPull) -> None:
        self.stats.pulling += 1
        t0 = time.monotonic()
        try:
            size = await self._transfer_dyad(rel, rank)
        except (DyadfsError, OSError) as e:
            self.stats.errors += 1
            err = e.errno if e.errno in _LOCAL else errno.EIO
            why = str(e) if isinstance(e, DyadfsError) else e.strerror or str(e)
            log.error("pull of %s from C DYAD (rank %d) failed: %s", show(rel), rank, why)
            flight.error = FetchError(f"pull of {show(rel)} from C DYAD failed: {why}",
                                      err or errno.EIO)
        else:
            if size is not None:
                self.stats.pulled += 1
                self.stats.bytes_pulled += size
                log.debug("pulled %s (%d B) from C DYAD on rank %d in %.3f s", show(rel),
                          size, rank, time.monotonic() - t0)
                self.cache.evict()
                self.cache.room()
        finally:
            self.stats.pulling -= 1
            del self._dyad_pulls[rel]
            flight.done.set()

    async def _transfer_dyad(self, rel: bytes, rank: int) -> int | None:
        """Fetch *rel* into a temporary file and install it: its size, or None if something
        made here meanwhile wins (the temporary file goes either way unless installed)."""
        assert self.dyad is not None
        tmp = TMP_DIR + b"/" + secrets.token_hex(8).encode()
        fd = self.backing.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        installed = False
        try:
            epoch = self.cache.epoch(rel)
            size = await self.dyad.fetch(rank, os.fsdecode(rel), fd, self.cfg.fetch_timeout)
            if size == 0:
                # DYAD cannot move a 0-byte file; an empty answer is no proof of one
                raise FetchError(f"rank {rank}'s dyad.fetch answered no bytes", errno.EIO)
            os.fchmod(fd, 0o644)
            Cache.mark(fd, DYAD_VERSION)
            if self.cache.epoch(rel) != epoch or self.backing.lstat_or_none(rel):
                log.info("pulled %s from C DYAD, but it was made here meanwhile: not "
                         "installed", show(rel))
                return None
            parent = parent_of(rel)
            if parent != b".":
                self.backing.makedirs(parent)
            self.backing.rename(tmp, rel)
            installed = True
            self.cache.installed(rel, DYAD_VERSION, size, prefetched=False)
            return size
        finally:
            os.close(fd)
            if not installed:
                try:
                    self.backing.unlink(tmp)
                except FileNotFoundError:
                    pass

    async def raw_fetch(self, owner: str, size: int) -> float:
        """Seconds to move *size* bytes from *owner*'s memory to here, without files: the
        transport's own limit between the same two processes (for ``dyadfs bench``)."""
        where = await self._owner_address(owner, fresh=True, size=1 << 62, itself=True)
        if where is None:
            raise FetchError(f"owner {owner} is not registered", errno.ENOENT)
        transport, address = where
        req = Request(self.catalog.ns, self.secret, b"", 0, raw=size)
        t0 = time.perf_counter()
        await transport.fetch(address, req, Sink(-1, lambda n: None, lambda n: None))
        return time.perf_counter() - t0

    async def _owner_address(self, owner: str, fresh: bool = False, size: int = 0,
                             itself: bool = False) -> tuple[Transport, str] | None:
        """How to reach *owner* for a file of *size* bytes (*itself*: the mount's transport,
        for dyadfs bench's raw transfers)."""
        mrec = None if fresh else self._owners.get(owner)
        if mrec is None:
            raw = await self.catalog.kvs.get(self.catalog.ns, keys.mount_key(owner))
            if raw is None:
                return None
            mrec = MountRecord.decode(raw, keys.mount_key(owner))
            self._owners[owner] = mrec
        if self.local is not None and mrec.local and mrec.host_id == self.host_id and \
                owner not in self._not_local:
            # A mount of this host: the owner hands the file over, the kernel copies it.
            return self.local, mrec.local
        if mrec.tcp and not itself and (size < self.cfg.ucx_threshold or
                                     not getattr(self.transport, "network_rdma", True)):
            # Small files over the kept TCP connection: a UCX endpoint costs ~25 ms to wire
            # up here, more than a frame takes to move. And every file where UCX has no RDMA
            # network transport: its TCP moved 16-256 MiB at 0.3-0.5x of dyadfs's TCP path
            # (see the README's benchmarks).
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
            installed = await self._install(pull)
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
            # What the reader sees: a full disk as such, a version gone as ESTALE (the open
            # starts over), anything else about the owner as EIO.
            err = error.errno if error.errno in _PASSED_ON else errno.EIO
            pull.finish(FetchError(str(error), err))
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
                    if transport is self.local:
                        self.stats.pulled_same_host += 1
                    elif transport.name == "ucx":
                        self.stats.pulled_over_ucx += 1
                    return
                last = outcome
                if transport is self.local and address in self.local.unreachable:
                    # Not reachable that way after all (another network namespace): the
                    # network from now on.
                    log.info("same-host pull from %s failed (%s): over the network from now "
                             "on", pull.rec.owner, outcome)
                    self._not_local.add(pull.rec.owner)
                    continue
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
        turns = self._turns.setdefault(address, _Turns())
        queued = trio.current_time()
        while True:
            quiet_since = max(queued, turns.moved)
            with trio.move_on_at(quiet_since + self.cfg.fetch_timeout):
                await turns.slots.acquire()
                break
            if turns.moved <= quiet_since:
                return (f"{address}: waited {self.cfg.fetch_timeout} s for a turn among "
                        f"{PULLS_PER_OWNER} pulls from it, and none of them moved a byte"), False
        try:
            outcome = await self._fetch(pull, transport, address, turns)
        finally:
            turns.slots.release()
        if outcome[0] is None:  # a whole file (perhaps an empty one) came: the owner serves
            turns.moved = trio.current_time()
        return outcome

    async def _fetch(self, pull: Pull, transport: Transport, address: str,
                     turns: _Turns) -> tuple[str | None, bool]:
        req = Request(self.catalog.ns, self.secret, pull.rel, pull.rec.version, self.cfg.verify)
        # --fetch-timeout bounds a silence, not a transfer: every arrival of bytes moves the
        # deadline (a 100 GB file may take minutes; a dead owner may not).
        scope = trio.CancelScope(deadline=trio.current_time() + self.cfg.fetch_timeout)
        progressed = False

        def arrived(n: int) -> None:
            nonlocal progressed
            progressed = True
            pull.progress(n)
            turns.moved = trio.current_time()
            scope.deadline = turns.moved + self.cfg.fetch_timeout

        reserve = transport is not self.local
        sink = Sink(pull.fd, lambda n: self._sized(pull, sink, n, reserve), arrived)
        try:
            with scope:
                await transport.fetch(address, req, sink)
            if scope.cancelled_caught:
                raise trio.TooSlowError(f"nothing arrived for {self.cfg.fetch_timeout} s")
        except (FetchError, OSError, trio.TooSlowError) as e:
            err = getattr(e, "errno", None)
            if err in _LOCAL:  # this node's disk: no owner can help
                raise FetchError(f"{show(pull.rel)}: {os.strerror(err)}", err) from None
            if err == errno.ESTALE:  # the owner no longer has this version
                raise FetchError(f"{address}: version {pull.rec.version} is gone: {e}",
                                 errno.ESTALE) from None
            why = getattr(e, "strerror", None) or str(e) or type(e).__name__
            return f"{address}: {why}", progressed
        if pull.received != pull.rec.size or pull.size != pull.rec.size:
            return f"got {pull.received} bytes, expected {pull.rec.size}", progressed
        if self.cfg.verify and not await self._verified(pull, sink.sha256):
            return "checksum mismatch", progressed
        return None, progressed

    def _sized(self, pull: Pull, sink: Sink, n: int, reserve: bool = True) -> None:
        if n != pull.rec.size:
            raise FetchError(f"owner announced {n} bytes, published {pull.rec.size}",
                             errno.ESTALE)
        if reserve and not pull.reserved:
            # Every block now: a full disk is ENOSPC here, not a SIGBUS in a map later.
            pull.reserved = fallocate(pull.fd, n)
            if not pull.reserved:
                os.ftruncate(pull.fd, n)
        elif pull.size is None:
            # Same host: the kernel copies into the file (copy_file_range), nothing maps it,
            # and a disk that fills meanwhile is the copy's ENOSPC. A disk already too full is
            # ENOSPC here, at once. (Allocating first would cost as much as the copy on tmpfs,
            # which zeroes every page it allocates, and delay the first byte by as much.)
            check_room(pull.fd, n)
            os.ftruncate(pull.fd, n)
        sink.preallocated = pull.reserved
        pull.received = 0
        pull.sized(n)

    async def _verified(self, pull: Pull, want: str | None) -> bool:
        return want is not None and \
            await trio.to_thread.run_sync(sha256_fd, pull.fd) == want

    async def _install(self, pull: Pull) -> bool:
        """Put the pulled file under its real name, unless something newer is there: a newer
        publication, or a local change of the path. Its readers keep reading it either way."""
        rec = pull.rec
        os.fchmod(pull.fd, rec.mode & 0o7777)
        os.utime(pull.fd, ns=(rec.mtime_ns, rec.mtime_ns))
        Cache.mark(pull.fd, rec.version)
        current = await self.catalog.get(pull.rel)
        if current is not None and current.complete and current.version != rec.version:
            log.info("pulled %s, but a newer version is published: not installed",
                     show(pull.rel))
            return False
        if self.cache.epoch(pull.rel) != pull.epoch:
            log.info("pulled %s, but it was changed here meanwhile: not installed",
                     show(pull.rel))
            return False
        parent = parent_of(pull.rel)
        if parent != b".":
            self.backing.makedirs(parent)
        self.backing.rename(pull.tmp, pull.rel)
        self.cache.installed(pull.rel, rec.version, rec.size, prefetched=not pull.wanted)
        return True

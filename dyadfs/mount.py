"""A mount's lifecycle: open the managed directory, mount over it, serve, clean up.

Startup and teardown live in one ``AsyncExitStack`` around one nursery (as in s3ql): the KVS
watcher, the control socket (``dyadfs status``), the file server of the transport and the FUSE
main loop are its tasks. The mount ends when the kernel unmounts it (``dyadfs umount``) or on
SIGTERM/SIGINT, which unmount it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import resource
import secrets
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from . import __version__, keys
from .backing import Backing
from .catalog import Catalog
from .config import Config
from .control import _control_request as _control_request  # re-exported
from .control import _serve_control
from .control import query_socket as query_socket  # re-exported
from .errors import ConfigError, KVSError, UsageError
from .fs import Operations
from .kernel import raise_readahead
from .keys import MountRecord
from .kvs import KVS, open_kvs
from .mountinfo import fuse_mounted
from .prefetch import Prefetcher
from .puller import Puller
from .server import FileServer
from .stats import Stats
from .transport import Transport, default_host, transport_reason
from .transport import load as load_transport
from .transport.local import LocalTransport, host_id
from .transport.tcp import TCPTransport

log = logging.getLogger(__name__)


def mount_slug(mountpoint: Path) -> str:
    return hashlib.sha1(os.fsencode(str(mountpoint))).hexdigest()[:16]


def info_path(config: Config) -> Path:
    return config.state_dir / "mounts" / f"{mount_slug(config.mountpoint)}.json"


def mount_id_for(config: Config) -> str:
    """Stable across restarts of the same mount, so that a restarted producer serves what it
    published before."""
    digest = hashlib.sha1(f"{socket.gethostname()}:{config.mountpoint}".encode()).hexdigest()
    return f"{socket.gethostname()}-{digest[:10]}"


#: FUSE requests handled at once. Every waiting open holds one until its file is published,
#: so this bounds the waiting opens, not the daemon's speed; pyfuse3's default (99) let 99
#: waiting opens stall every other request of the mount. A worker costs a trio task and the
#: touched pages of a request buffer (measured: 10,000 waiting opens, RSS +20 MB).
MAX_TASKS = 1 << 20
#: how often a read of /dev/fuse that would block is interrupted (see _unstick_fuse_reads)
UNSTICK = 0.5


@contextlib.contextmanager
def _unstick_fuse_reads() -> Iterator[None]:
    """pyfuse3 reads a request after /dev/fuse polled readable, with a blocking read on the
    trio thread; if the kernel withdrew the request in between (its caller was killed), the
    read blocks the whole loop until another request comes (seen: 11 minutes after a SIGKILL of
    a 5,000-thread waiting process). A periodic SIGALRM interrupts such a read (EINTR, which
    pyfuse3 retries after polling again) within UNSTICK seconds. Python restarts its own
    interrupted calls (PEP 475), and an idle mount pays two wake-ups a second."""
    previous = signal.signal(signal.SIGALRM, lambda signum, frame: None)
    signal.setitimer(signal.ITIMER_REAL, UNSTICK, UNSTICK)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _raise_descriptor_limit() -> None:
    """Every open file of every reader and each pull under way holds descriptors of the
    daemon: an ordinary user's soft limit (1024) made the 1,000th simultaneous pull fail with
    EMFILE. The soft limit goes up to the hard one, as libfuse's passthrough_hp does."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (OSError, ValueError) as e:
            log.warning("descriptor limit stays at %d: %s", soft, e)


def check_state_dir(state_dir: Path) -> None:
    """The state directory holds the embedded KVS and its secret: refuse one that another user
    owns (they could read the secret, or replace the database)."""
    try:
        st = state_dir.stat()
    except FileNotFoundError:
        return
    if st.st_uid != os.getuid():
        raise UsageError(f"{state_dir} belongs to uid {st.st_uid}, not to you: use your own "
                         "(DYADFS_STATE_DIR=...) or remove it")


def check_mountpoint(config: Config) -> None:
    mp = config.mountpoint
    if not mp.exists():
        raise UsageError(f"{mp}: no such directory")
    if not mp.is_dir():
        raise UsageError(f"{mp}: not a directory")
    if fuse_mounted(mp):
        raise UsageError(f"{mp}: already mounted (dyadfs umount {mp} first)")
    if config.backing is not None and not config.backing.is_dir():
        raise UsageError(f"--backing {config.backing}: not a directory")
    if not os.path.exists("/dev/fuse"):
        raise UsageError("/dev/fuse is missing: FUSE is not available on this machine")
    check_fuse_device()


FUSE_HINT = ("check that /dev/fuse is readable and writable by this user (ls -l /dev/fuse: "
             "usually crw-rw-rw-, mode 0666), that fusermount3 is setuid root "
             "(ls -l /usr/bin/fusermount3: -rwsr-xr-x), and, for allow_other, "
             "user_allow_other in /etc/fuse.conf")


def check_fuse_device() -> None:
    """An unprivileged user mounts through /dev/fuse: say so in one line when it cannot be
    opened, before the daemon starts (libfuse would only print its own message and fail)."""
    if os.geteuid() == 0:
        return
    try:
        os.close(os.open("/dev/fuse", os.O_RDWR))
    except OSError as e:
        raise UsageError(f"cannot open /dev/fuse ({e.strerror}): {FUSE_HINT}") from None


class Mount:
    """One running mount."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.stats = Stats()
        self.started = time.time()
        self.mount_id = mount_id_for(config)
        self.kvs: KVS | None = None
        self.transport: Any = None
        self.puller: Puller | None = None
        self.server: FileServer | None = None
        self.prefetcher: Prefetcher | None = None
        self.dyad_service: Any = None  # dyad.DyadService (imported only with --dyad-compat)
        self._terminated = False
        self._kernel_unmounted = False

    def status(self) -> dict[str, Any]:
        c = self.config
        s = self.stats
        return {
            "version": __version__, "pid": os.getpid(), "dir": str(c.mountpoint),
            "mount_id": self.mount_id, "role": c.role, "namespace": c.namespace,
            "kvs": c.kvs, "kvs_path": str(c.kvs_path) if c.kvs != "flux" else None,
            "shared_storage": c.shared_storage,
            "backing": str(c.backing or c.mountpoint),
            "transport": None if self.transport is None else self.transport.name,
            "address": None if self.transport is None else self.transport.address,
            "started": self.started,
            "published": s.published, "waiting": s.waiting, "waits_done": s.waits_done,
            "wait_timeouts": s.wait_timeouts, "pulled": s.pulled, "pulling": s.pulling,
            "prefetch": c.prefetch, "prefetched": s.prefetched,
            "prefetch_pending": None if self.prefetcher is None else self.prefetcher.pending,
            "bytes_pulled": s.bytes_pulled, "pulled_same_host": s.pulled_same_host,
            "pulled_over_ucx": s.pulled_over_ucx,
            "same_host": c.same_host, "served": s.served,
            "bytes_served": s.bytes_served, "errors": s.errors,
            "unexpected_errors": s.unexpected,
            "dyad_compat": c.dyad_compat,
            "dyad_service": None if self.dyad_service is None else
            self.dyad_service.registered,
            "fuse_lookups": s.fuse_lookups, "fuse_getattrs": s.fuse_getattrs,
        }

    def run(self) -> None:
        check_mountpoint(self.config)
        check_state_dir(self.config.state_dir)
        _raise_descriptor_limit()
        backing = self.config.backing or self.config.mountpoint
        root_fd = os.open(backing, os.O_RDONLY | os.O_DIRECTORY)
        try:
            self.kvs = open_kvs(self.config)  # with this process' umask: it holds the secret
            # The kernel has applied the caller's umask to every mode a request carries already:
            # files made for callers get exactly those. dyadfs' own files set their modes.
            os.umask(0)
            trio.run(self._main, root_fd)
        except BaseExceptionGroup as group:
            # A user error raised inside the nursery still deserves its one line.
            user = _user_error(group, backing)
            if user is None:
                raise
            if not isinstance(user, _USER_ERRORS):  # the environment's: the whole story logged
                log.error("the mount failed", exc_info=group)
            raise user from None
        finally:
            os.close(root_fd)

    async def _main(self, root_fd: int) -> None:
        c = self.config
        assert self.kvs is not None
        kvs = self.kvs
        async with contextlib.AsyncExitStack() as stack:
            stack.push_async_callback(kvs.aclose)
            await kvs.ensure_namespace(c.namespace, create=True)
            catalog = Catalog(kvs, c.namespace, self.mount_id, dyad_keys=c.dyad_compat,
                              rank=getattr(kvs, "rank", None), key_depth=c.key_depth,
                              key_bins=c.key_bins)
            nursery = await stack.enter_async_context(trio.open_nursery())
            await nursery.start(kvs.run)
            puller = await self._start_transport(stack, nursery, root_fd, catalog)
            ops = Operations(c, root_fd, catalog, puller, self.stats)
            ops.attach(nursery)
            if self.server is not None:
                self.server.vouch = ops.producer.vouch
            if c.dyad_compat:
                await self._start_dyad(nursery, puller)
            if puller is not None and c.prefetch:
                self.prefetcher = Prefetcher(c, root_fd, catalog, puller)
                await nursery.start(self.prefetcher.run)
            options = {"fsname=dyadfs", "subtype=dyadfs", "default_permissions"}
            if os.geteuid() == 0:
                options.add("allow_other")
            # INIT's answer sets read-ahead to at most the kernel's default; raise it after that.
            ops.after_init = lambda: raise_readahead(c.mountpoint)
            try:
                pyfuse3.init(ops, str(c.mountpoint), options)
            except RuntimeError as e:  # fuse_session_mount failed; libfuse logged why
                raise UsageError(f"cannot mount {c.mountpoint} ({e}): {FUSE_HINT}") from None
            stack.callback(self._close_fuse)
            control = await nursery.start(_serve_control, self)
            stack.callback(_unlink, control)
            nursery.start_soon(self._signals, ops)
            info = info_path(c)
            _write_json(info, {"pid": os.getpid(), "dir": str(c.mountpoint),
                               "socket": str(control), "log": str(c.log) if c.log else None})
            stack.callback(_unlink, info)
            log.info("mounted %s (role %s, namespace %s, kvs %s)", c.mountpoint, c.role,
                     c.namespace, c.kvs)
            if c.transport_defaulted and c.transport == "tcp" and not c.shared_storage:
                log.info("pulls between hosts use TCP: %s", transport_reason())
            with _unstick_fuse_reads():
                await pyfuse3.main(max_tasks=MAX_TASKS)
            self._kernel_unmounted = not self._terminated
            log.info("unmounted %s", c.mountpoint)
            nursery.cancel_scope.cancel()

    async def _start_transport(self, stack: contextlib.AsyncExitStack, nursery: trio.Nursery,
                               root_fd: int, catalog: Catalog) -> Puller | None:
        """Serve what this mount owns (plain TCP always, plus UCX), register it, and return
        the puller that fetches what others own. On shared storage nothing is pulled: the TCP
        server and the registry record only tell consumers that this mount is alive, for the
        "writing" marks it holds (see :mod:`dyadfs.owners`)."""
        c = self.config
        assert self.kvs is not None
        kvs = self.kvs
        secret = (await kvs.put_if_absent(c.namespace, keys.SECRET,
                                          secrets.token_hex(16).encode())).decode()
        host = c.listen or default_host()
        server = self.server = FileServer(root_fd, catalog, secret, self.stats)
        tcp = TCPTransport()
        stack.push_async_callback(tcp.aclose)
        await tcp.start(nursery, server.handle, host)
        transport: Transport = tcp
        if c.transport != "tcp" and not c.shared_storage:
            transport = load_transport(c.transport)()
            stack.push_async_callback(transport.aclose)
            await transport.start(nursery, server.handle, host)
        self.transport = transport
        local: LocalTransport | None = None
        if c.same_host and not c.shared_storage:
            local = LocalTransport()
            stack.push_async_callback(local.aclose)
            await local.start(nursery, server.handle, host)
        record = MountRecord(host=socket.gethostname(), pid=os.getpid(),
                             dir=str(c.mountpoint), transport=transport.name,
                             address=transport.address, started=self.started,
                             rank=getattr(kvs, "rank", None), tcp=tcp.address,
                             local=None if local is None else local.address,
                             host_id=host_id())
        key = keys.mount_key(self.mount_id)
        await kvs.commit(c.namespace, {key: record.encode()})
        stack.push_async_callback(self._unregister, key)
        if c.shared_storage:
            return None
        puller = Puller(c, Backing(root_fd), catalog, transport, tcp, secret, self.stats,
                        local=local)
        if c.cache_size is not None:
            found = await trio.to_thread.run_sync(puller.cache.rebuild)
            log.info("%d pulled copies here from before (--cache-size counts them)", found)
            puller.cache.evict()
        puller.attach(nursery)
        self.puller = puller
        log.info("serving on %s (%s), tcp %s", transport.address, transport.name, tcp.address)
        return puller

    async def _start_dyad(self, nursery: trio.Nursery, puller: Puller | None) -> None:
        """C DYAD interop (--dyad-compat): pull what C DYAD publishes through its dyad.fetch,
        and serve this mount's files to C DYAD consumers through the same service on this
        broker, unless DYAD's own module holds it. Not with shared storage: there nothing
        moves, and DYAD's key (written with each publication) is all a C consumer waits for."""
        from .dyad import DyadClient, DyadService  # imports flux

        if puller is not None:
            puller.dyad = DyadClient()
        if self.server is not None and self.config.publishes:
            self.dyad_service = DyadService(self.server.whole_file)
            await nursery.start(self.dyad_service.run)

    async def _unregister(self, key: str) -> None:
        assert self.kvs is not None
        with trio.move_on_after(5):
            await self.kvs.commit(self.config.namespace, {key: None})

    def _close_fuse(self) -> None:
        # Unmount unless the kernel already did (dyadfs umount): also when startup failed after
        # the mount, so that a failed start never leaves a dead mount behind.
        pyfuse3.close(unmount=not self._kernel_unmounted)

    async def _signals(self, ops: Operations) -> None:
        """SIGTERM (what Flux and Slurm send at the end of a job), SIGINT, SIGHUP: like
        ``dyadfs umount``, but bounded: no new writers; the open ones may finish and publish
        for up to --term-grace seconds; then the mount goes. A second signal: at once."""
        c = self.config
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
            async for sig in sigs:
                ops.draining = True
                if ops.writers():
                    log.info("signal %d: no new writers; unmounting once the %d open ones "
                             "close (at most %s s)", sig, ops.writers(), c.term_grace)
                    with trio.move_on_after(c.term_grace):
                        async with trio.open_nursery() as nursery:
                            async def again() -> None:
                                await sigs.__anext__()
                                nursery.cancel_scope.cancel()
                            nursery.start_soon(again)
                            while ops.writers():  # noqa: ASYNC110 - bounded by term_grace
                                await trio.sleep(0.05)
                            nursery.cancel_scope.cancel()
                    if ops.writers():
                        log.warning("unmounting with %d files still open for writing",
                                    ops.writers())
                log.info("signal %d: unmounting", sig)
                self._terminated = True
                pyfuse3.terminate()
                return


_USER_ERRORS = (ConfigError, UsageError, KVSError)


def _first(group: BaseExceptionGroup[Any], kinds: tuple[type[BaseException], ...]
           ) -> BaseException | None:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            found = _first(exc, kinds)
            if found is not None:
                return found
        elif isinstance(exc, kinds):
            return exc
    return None


def _user_error(group: BaseExceptionGroup[Any], backing: Path) -> Exception | None:
    """The one line a failed start deserves: a user error as it is; a system call the
    environment refused (a mount directory the user cannot write, a read-only or full disk)
    as what it refused, e.g. ``.dyadfs: Permission denied``."""
    found = _first(group, _USER_ERRORS)
    if isinstance(found, Exception):
        return found
    err = _first(group, (OSError,))
    if isinstance(err, OSError):
        where = f"{backing / os.fsdecode(err.filename)}: " if err.filename else ""
        return ConfigError(f"cannot start the mount: {where}{err.strerror or err}")
    return None


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with open(fd, "w") as f:
        f.write(json.dumps(data))
    tmp.replace(path)


def query_status(config: Config, timeout: float = 5.0) -> dict[str, Any]:
    """The status of the mount of ``config.mountpoint``, from its daemon."""
    path = info_path(config)
    info = read_info(path)
    if info is None:
        why = "its daemon is gone (a stale record)" if path.exists() else \
            f"no record of it in {path.parent}"
        raise UsageError(f"{config.mountpoint}: not a running dyadfs mount: {why}")
    return query_socket(info["socket"], timeout)


def read_info(path: Path) -> dict[str, Any] | None:
    try:
        info: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    try:
        pid = int(info["pid"])
    except (KeyError, ValueError):
        return None
    return info if daemon_alive(pid) else None  # else the daemon is gone


def daemon_alive(pid: int) -> bool:
    """Whether process *pid* runs (a killed daemon not reaped yet is a zombie: gone)."""
    try:
        os.kill(pid, 0)
    except OSError as e:
        return e.errno == errno.EPERM
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in (b"Z", b"X")


def stale_record(config: Config) -> dict[str, Any] | None:
    """The status of the mount of ``config.mountpoint`` if its daemon was killed (its record
    is left), else None."""
    path = info_path(config)
    try:
        info: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if read_info(path) is not None:
        return None
    return {"dir": info.get("dir", str(config.mountpoint)), "pid": info.get("pid"),
            "stale": True}


def forget_stale(config: Config) -> bool:
    """Remove the record (and socket) of the mount of ``config.mountpoint`` if its daemon is
    gone. True if there was one."""
    path = info_path(config)
    if not path.exists() or read_info(path) is not None:
        return False
    _unlink(path.with_suffix(".sock"))
    _unlink(path)
    return True


def all_mounts(state_dir: Path) -> list[dict[str, Any]]:
    out = []
    for p in sorted((state_dir / "mounts").glob("*.json")):
        info = read_info(p)
        if info is not None:
            out.append(info)
    return out


def stale_mounts(state_dir: Path) -> list[dict[str, Any]]:
    """Records of mounts whose daemon is gone (killed: it could not remove its record). A
    restart of the same mount replaces its record."""
    out = []
    for p in sorted((state_dir / "mounts").glob("*.json")):
        try:
            info: dict[str, Any] = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if read_info(p) is None:
            out.append({"dir": info.get("dir"), "pid": info.get("pid"), "stale": True})
    return out

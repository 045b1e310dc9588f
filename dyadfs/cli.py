"""The ``dyadfs`` command: mount, umount, status, bench.

Exit codes: 0 success; 1 the command could not act (DIR missing, not mounted, busy, the daemon
failed); 2 a wrong option or setting. Errors are one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import __version__
from . import config as config_mod
from .errors import ConfigError, KVSError, UsageError
from .mountinfo import fuse_mounted

log = logging.getLogger("dyadfs")

EXIT_FAIL = 1
EXIT_CONFIG = 2
#: the reader of our output went away (what a process killed by SIGPIPE reports: 128 + 13)
EXIT_SIGPIPE = 141
READY_TIMEOUT = 60.0
UMOUNT_TIMEOUT = 60.0


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"dyadfs: error: {message} (see dyadfs {self.prog.split()[-1]} -h)\n")
        raise SystemExit(EXIT_CONFIG)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="dyadfs", description="DYAD's producer/consumer data movement as a "
                "FUSE file system.")
    p.add_argument("--version", action="version", version=f"dyadfs {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    m = sub.add_parser("mount", help="overlay dyadfs on a managed directory")
    m.add_argument("dir", help="the managed directory")
    m.add_argument("--role", choices=config_mod.ROLES,
                   help="producer publishes, consumer waits and pulls, both (default) does both")
    m.add_argument("--namespace", help="KVS namespace shared by the workflow's mounts "
                   "(DYAD_KVS_NAMESPACE; default dyadfs)")
    m.add_argument("--shared-storage", action="store_const", const=True,
                   help="every mount sees the same backing storage: wait, never copy")
    m.add_argument("--backing", metavar="PATH",
                   help="keep the files in PATH instead of DIR itself")
    m.add_argument("--cache-size", metavar="BYTES",
                   help="bound the pulled copies (LRU; e.g. 512M, 4G)")
    m.add_argument("--prefetch", action="store_const", const=True,
                   help="pull every publication as soon as it appears (bounded by "
                   "--cache-size)")
    m.add_argument("--wait-timeout", metavar="SECONDS",
                   help="fail a waiting open with ETIMEDOUT after this long (default: forever)")
    m.add_argument("--wait-on-stat", nargs="?", const="**", metavar="PATTERN[,PATTERN...]",
                   help="a stat of an unpublished name matching one of these globs (relative "
                   "to DIR; * within a name, ** across directories; e.g. '*.h5,group*/**') "
                   "waits like an open; alone: every name")
    m.add_argument("--no-wait", metavar="PATTERN[,PATTERN...]",
                   help="names matching these globs never wait: an open or stat of one that "
                   "is not published answers ENOENT at once (files programs probe for, e.g. "
                   "'**/.git/**,*.lock')")
    m.add_argument("--fetch-timeout", metavar="SECONDS",
                   help="give up a pull from an unreachable owner after this long (default 10)")
    m.add_argument("--term-grace", metavar="SECONDS",
                   help="on SIGTERM, let files open for writing finish and publish for this "
                   "long before unmounting (default 30)")
    m.add_argument("--kvs", metavar="local|local:PATH|flux",
                   help="the KVS (default: flux when FLUX_URI is set, else local)")
    m.add_argument("--transport", choices=config_mod.TRANSPORTS,
                   help="how pulled bytes move between hosts (default ucx where the node has "
                   "an RDMA device, else tcp)")
    m.add_argument("--listen", metavar="HOST", help="address to serve files on")
    m.add_argument("--verify", action="store_const", const=True,
                   help="check a SHA-256 of every pulled file")
    m.add_argument("--ucx-threshold", metavar="BYTES",
                   help="files smaller than this move over the kept TCP connection even with "
                   "--transport ucx (default 4M; 0: always UCX)")
    m.add_argument("--same-host", metavar="on|off",
                   help="pull from a mount of this same host by handing over the file and "
                   "copying it in the kernel, not over the network (default on)")
    m.add_argument("--async-publish", action="store_const", const=True,
                   help="let close() return before the publication is committed")
    m.add_argument("--dyad-compat", metavar="on|off",
                   help="share the namespace with C DYAD (Flux only; default on with the Flux "
                   "KVS): write and watch DYAD's keys, serve and use DYAD's dyad.fetch")
    m.add_argument("--foreground", action="store_const", const=True,
                   help="stay in the foreground instead of starting a daemon")
    m.add_argument("--log", metavar="FILE", help="log to FILE")
    m.add_argument("--debug", action="store_const", const=True, help="log debug messages")

    u = sub.add_parser("umount", help="flush, unmount and wait for the daemon to exit")
    u.add_argument("dir")

    s = sub.add_parser("status", help="what a mount (or every mount) is doing")
    s.add_argument("dir", nargs="?")
    s.add_argument("--json", action="store_true", help="print JSON")

    n = sub.add_parser("namespace", help="list, create or remove KVS namespaces")
    n.add_argument("action", choices=("list", "create", "remove"))
    n.add_argument("name", nargs="?")
    n.add_argument("--kvs", metavar="local|local:PATH|flux")

    b = sub.add_parser("bench", help="measure dyadfs beside its baselines")
    b.add_argument("--quick", action="store_true", help="fewer sizes and repetitions")
    b.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    b.add_argument("--plot", metavar="FILE.png", help="draw throughput against size")
    b.add_argument("--sizes", nargs="+", metavar="MiB", help="pull sizes (default 1 16 64 256)")
    b.add_argument("--frames", type=int, help="frames in the latency runs")
    b.add_argument("--consumers", type=int, metavar="K",
                   help="scale up to K consumer mounts (default 4; 2 with --quick)")
    b.add_argument("--transport", choices=("local", *config_mod.TRANSPORTS),
                   help="only this transport (local: two mounts of this host hand files "
                   "over, the default; ucx, tcp: over the network, --same-host off)")
    b.add_argument("--names", nargs="+", metavar="N", help="directory sizes of the lookup and "
                   "ls -l scaling rows (default 1000 10000 100000; 1000 10000 with --quick)")
    b.add_argument("--dir", metavar="PATH", help="where to make the bench's directories "
                   "(default: the temporary directory)")
    b.add_argument("--peer", metavar="PREFIX", help="also run the same C clients on DYAD "
                   "installed in PREFIX (lib/dyad.so, lib/libdyad_wrapper.so; flux on PATH) "
                   "and on dyadfs, side by side")
    b.add_argument("--peer-frames", type=int, metavar="N",
                   help="frames in the side-by-side frame latency (default 50)")
    b.add_argument("--peer-sizes", nargs="+", metavar="MiB",
                   help="file sizes of the side-by-side bulk rows (default 1 16 64)")
    b.add_argument("--peer-files", type=int, metavar="N",
                   help="files of each size in the side-by-side bulk rows (default 5)")
    return p


_MOUNT_OPTIONS = ("role", "namespace", "shared_storage", "backing", "cache_size", "prefetch",
                  "wait_timeout", "wait_on_stat", "no_wait", "fetch_timeout", "term_grace", "kvs",
                  "transport", "listen", "verify", "ucx_threshold", "same_host",
                  "async_publish", "dyad_compat", "foreground", "log", "debug")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    try:
        if args.command == "mount":
            return _mount(args, argv)
        if args.command == "umount":
            return _umount(args)
        if args.command == "status":
            return _status(args)
        if args.command == "namespace":
            return _namespace(args)
        if args.command == "bench":
            from .bench import main as bench_main
            return bench_main(args)
    except ConfigError as e:
        sys.stderr.write(f"dyadfs: error: {e}\n")
        return EXIT_CONFIG
    except (UsageError, KVSError) as e:
        sys.stderr.write(f"dyadfs: error: {e}\n")
        return EXIT_FAIL
    except BrokenPipeError:
        # Whoever read our output stopped (dyadfs status | head -1): like a C tool killed by
        # SIGPIPE, stop quietly; stdout goes to /dev/null so the exit flush cannot fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_SIGPIPE
    return EXIT_CONFIG


def _setup_logging(cfg: config_mod.Config) -> None:
    handler: logging.Handler
    if cfg.log is not None:
        cfg.log.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(cfg.log)
    else:
        handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(
        "%(asctime)s.%(msecs)03d %(process)d %(levelname)s %(name)s: %(message)s",
        "%Y-%m-%d %H:%M:%S"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if cfg.debug else logging.INFO)


def _mount(args: argparse.Namespace, argv: list[str]) -> int:
    from . import mount as mount_mod

    options = {k: getattr(args, k) for k in _MOUNT_OPTIONS}
    cfg = config_mod.build(args.dir, options)
    mount_mod.check_mountpoint(cfg)
    if not cfg.shared_storage:
        from .transport import check_available
        check_available(cfg.transport)  # a missing UCXX is a one-line error here, not later
    if cfg.foreground:
        _setup_logging(cfg)
        try:
            mount_mod.Mount(cfg).run()
        except (ConfigError, UsageError, KVSError) as e:
            if cfg.log is not None:
                log.error("%s", e)  # to the log file; stderr gets the one line below
            sys.stderr.write(f"dyadfs: error: {e}\n")
            return EXIT_CONFIG if isinstance(e, ConfigError) else EXIT_FAIL
        return 0
    return _start_daemon(cfg, argv)


def _start_daemon(cfg: config_mod.Config, argv: list[str]) -> int:
    """Start ``dyadfs mount --foreground`` in a new session; return once the mount is up."""
    from . import mount as mount_mod

    logfile = cfg.log or cfg.state_dir / "logs" / f"{mount_mod.mount_slug(cfg.mountpoint)}.log"
    logfile.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    child_argv = [sys.executable, "-m", "dyadfs", *argv, "--foreground"]
    if cfg.log is None:
        child_argv += ["--log", str(logfile)]
    start = logfile.stat().st_size if logfile.exists() else 0
    with open(logfile, "ab") as out, open(os.devnull, "rb") as devnull:
        proc = subprocess.Popen(child_argv, stdin=devnull, stdout=out, stderr=out,
                                start_new_session=True, close_fds=True)
    info = mount_mod.info_path(cfg)
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.stderr.write(f"dyadfs: error: {_last_error(logfile, start)}\n")
            return EXIT_FAIL
        data = mount_mod.read_info(info)
        if data is not None and data.get("pid") == proc.pid and \
                fuse_mounted(cfg.mountpoint):
            print(f"dyadfs: mounted {cfg.mountpoint} (pid {proc.pid}, role {cfg.role}, "
                  f"namespace {cfg.namespace}, log {logfile})")
            return 0
        time.sleep(0.02)
    proc.terminate()
    sys.stderr.write(f"dyadfs: error: the daemon did not mount {cfg.mountpoint} within "
                     f"{READY_TIMEOUT:.0f} s; see {logfile}\n")
    return EXIT_FAIL


def _last_error(logfile: Path, start: int) -> str:
    try:
        with open(logfile, "rb") as f:
            f.seek(start)
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        lines = []
    for line in reversed(lines):
        if line.startswith("dyadfs: error: "):
            return line[len("dyadfs: error: "):]
    tail = [ln for ln in lines if ln.strip()]
    return (tail[-1] if tail else "the daemon exited") + f" (see {logfile})"


def _umount(args: argparse.Namespace) -> int:
    from . import mount as mount_mod

    cfg = config_mod.build(args.dir, {})
    info = mount_mod.read_info(mount_mod.info_path(cfg))
    if not fuse_mounted(cfg.mountpoint):
        if info is None:
            if mount_mod.forget_stale(cfg):  # killed: nothing mounted, its record left
                print(f"dyadfs: {cfg.mountpoint} was not mounted (its daemon is gone); "
                      "removed its stale record", file=sys.stderr)
                return 0
            raise UsageError(f"{cfg.mountpoint}: not mounted")
    else:
        tool = shutil.which("fusermount3") or shutil.which("fusermount")
        if tool is None:
            raise UsageError("fusermount3 not found (install fuse3)")
        r = subprocess.run([tool, "-u", str(cfg.mountpoint)], capture_output=True, text=True)
        if r.returncode != 0:
            msg = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else "fusermount3 failed"
            if "busy" in msg:
                gone = "its daemon is gone, so it will never work again; " if info is None \
                    else ""
                msg += (f" (a process has a file or its working directory in it: "
                        f"`fuser -vm {cfg.mountpoint}` names it; {gone}"
                        f"`fusermount3 -uz {cfg.mountpoint}` detaches it now and lets "
                        "those processes finish)")
            raise UsageError(f"cannot unmount {cfg.mountpoint}: {msg}")
    if info is not None:
        pid = int(info["pid"])
        deadline = time.monotonic() + UMOUNT_TIMEOUT
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.02)
        else:
            raise UsageError(f"{cfg.mountpoint} is unmounted but its daemon (pid {pid}) "
                             f"did not exit within {UMOUNT_TIMEOUT:.0f} s")
    mount_mod.forget_stale(cfg)  # a killed daemon's record (a clean exit removes its own)
    return 0


def _status(args: argparse.Namespace) -> int:
    from . import mount as mount_mod

    if args.dir:
        cfg = config_mod.build(args.dir, {})
        stale = mount_mod.stale_record(cfg)
        if stale is not None:  # killed: say so as plain status does, and fail
            print(json.dumps(stale, indent=2) if args.json else _status_line(stale))
            return 1
        statuses = [mount_mod.query_status(cfg)]
    else:
        state_dir = config_mod.default_state_dir()
        statuses = []
        for info in mount_mod.all_mounts(state_dir):
            try:
                statuses.append(mount_mod.query_socket(info["socket"], 5.0))
            except UsageError as e:  # one mount that does not answer hides no other
                gone = not mount_mod.daemon_alive(int(info["pid"]))  # killed since listed
                statuses.append({"dir": info["dir"], "pid": info["pid"], "stale": True} if gone
                                else {"dir": info["dir"], "pid": info["pid"], "error": str(e)})
        statuses += mount_mod.stale_mounts(state_dir)
    if args.json:
        print(json.dumps(statuses[0] if args.dir else statuses, indent=2))
        return 0
    if not statuses:
        print("no dyadfs mounts")
    for st in statuses:
        _print_status(st)
    return 0


def _namespace(args: argparse.Namespace) -> int:
    import trio

    from .kvs import open_kvs

    if args.action != "list" and not args.name:
        raise ConfigError(f"dyadfs namespace {args.action}: name the namespace")
    cfg = config_mod.build(".", {"kvs": args.kvs, "namespace": args.name})

    async def run() -> None:
        kvs = open_kvs(cfg)
        try:
            if args.action == "list":
                for ns in await kvs.namespaces():
                    print(ns)
            elif args.action == "create":
                await kvs.ensure_namespace(cfg.namespace, create=True)
            else:
                await kvs.remove_namespace(cfg.namespace)
        finally:
            await kvs.aclose()

    trio.run(run)
    return 0


def _status_line(st: dict[str, Any]) -> str:
    return (f"{st['dir']}: stale: its daemon (pid {st['pid']}) is gone; "
            f"dyadfs umount {st['dir']} unmounts it and removes this record")


def _print_status(st: dict[str, Any]) -> None:
    if st.get("stale"):
        print(_status_line(st))
        return
    if "error" in st:
        print(f"{st['dir']}: pid {st['pid']} does not answer: {st['error']}")
        return
    print(f"{st['dir']}: pid {st['pid']}, role {st['role']}, namespace {st['namespace']}, "
          f"kvs {st['kvs']}, transport {st['transport'] or '-'}"
          f"{', same host: on' if st.get('same_host') and not st['shared_storage'] else ''}"
          f"{', shared storage' if st['shared_storage'] else ''}")
    print(f"  published {st['published']}, waiting {st['waiting']}, pulled {st['pulled']} "
          f"({st['bytes_pulled']} B, {st.get('pulled_same_host', 0)} from this host), "
          f"served {st['served']} ({st['bytes_served']} B), "
          f"timeouts {st['wait_timeouts']}, errors {st['errors']}")
    print(f"  FUSE requests: lookups {st.get('fuse_lookups', 0)}, "
          f"getattrs {st.get('fuse_getattrs', 0)}; waits done {st.get('waits_done', 0)}")
    if st.get("prefetch"):
        print(f"  prefetch on: prefetched {st['prefetched']}, queued {st['prefetch_pending']}")
    if st.get("dyad_compat"):
        service = {True: "this mount serves DYAD's dyad.fetch",
                   False: "dyad.fetch served by DYAD's module or another mount",
                   None: "no dyad.fetch service here"}[st.get("dyad_service")]
        print(f"  C DYAD interop on: {service}")

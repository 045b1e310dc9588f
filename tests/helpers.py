"""Helpers of the correctness tests (tests/test_c_frames.py and the others added with them):
mount layouts, the C programs' output, checks that a mount is still alive."""

from __future__ import annotations

import errno
import os
import subprocess
import zlib
from dataclasses import dataclass
from pathlib import Path

from .conftest import Mounts, is_fuse_mount, wait_for

LOOPBACK = ("--listen", "127.0.0.1")


@dataclass(frozen=True)
class Read:
    """One line of tests/c/reader.c (or freader.c): what one open + read-to-EOF got."""

    path: str
    size: int  # -1: the open failed
    crc: int
    err: int

    def describe(self) -> str:
        if self.err:
            return f"{self.path}: {errno.errorcode.get(self.err, self.err)} after {self.size} B"
        return f"{self.path}: {self.size} B crc {self.crc:08x}"


def parse_reads(out: bytes) -> list[Read]:
    reads = []
    for line in out.decode(errors="replace").splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[0] != "opened":
            reads.append(Read(parts[0], int(parts[1]), int(parts[2], 16), int(parts[3])))
    return reads


def parse_versions(out: bytes) -> list[tuple[int, int]]:
    """(size, crc) per version from tests/c/writer.c or rewriter.c ("i size crc" lines)."""
    return [(int(p[1]), int(p[2], 16)) for p in (ln.split() for ln in out.decode().splitlines())
            if len(p) == 3]


def crc_of(data: bytes) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


def crc_file(path: Path | str) -> tuple[int, int]:
    """(size, crc) of a file, read in chunks."""
    crc, size = 0, 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
    return size, crc & 0xFFFFFFFF


def node_local(mounts: Mounts, tmp_path: Path, ns: str, transport: str, layout: str = "roles",
               cons_opts: tuple[str, ...] = (), prod_opts: tuple[str, ...] = (),
               wait_timeout: int = 60, backing: bool = False) -> tuple[Path, Path]:
    """A producer and a consumer with storage of their own, on loopback. *layout* "roles":
    ``--role producer`` and ``--role consumer``; "both": two ``--role both`` mounts. With
    *backing*, each keeps its files in ``<name>.backing`` (readable without the mount)."""
    roles = ("producer", "consumer") if layout == "roles" else ("both", "both")
    out = []
    for name, role, opts in (("prod", roles[0], prod_opts), ("cons", roles[1], cons_opts)):
        extra: tuple[str, ...] = ()
        if backing:
            b = tmp_path / f"{name}.backing"
            b.mkdir(exist_ok=True)
            extra = ("--backing", str(b))
        if name == "cons" or role == "both":
            extra += ("--wait-timeout", str(wait_timeout))
        out.append(mounts.mount(tmp_path / name, "--role", role, "--namespace", ns,
                                "--transport", transport, *LOOPBACK, *extra, *opts))
    return out[0], out[1]


def shared_pair(mounts: Mounts, tmp_path: Path, ns: str, cons_opts: tuple[str, ...] = (),
                prod_opts: tuple[str, ...] = (),
                wait_timeout: int = 60) -> tuple[Path, Path, Path]:
    """Two mounts ("two nodes") over one backing directory with --shared-storage."""
    backing = tmp_path / "backing"
    backing.mkdir(exist_ok=True)
    prod = mounts.mount(tmp_path / "prod", "--role", "producer", "--shared-storage",
                        "--backing", str(backing), "--namespace", ns, *LOOPBACK, *prod_opts)
    cons = mounts.mount(tmp_path / "cons", "--role", "consumer", "--shared-storage",
                        "--backing", str(backing), "--namespace", ns, "--wait-timeout",
                        str(wait_timeout), *LOOPBACK, *cons_opts)
    return prod, cons, backing


def daemon_alive(mounts: Mounts, mp: Path) -> bool:
    """The mount is there and its daemon answers ``dyadfs status``."""
    if not is_fuse_mount(mp):
        return False
    try:
        pid = mounts.status(mp)["pid"]
    except (AssertionError, ValueError, subprocess.TimeoutExpired):
        return False
    return os.path.exists(f"/proc/{pid}")


def waiting(mounts: Mounts, mp: Path, n: int, timeout: float = 20) -> None:
    wait_for(lambda: mounts.status(mp)["waiting"] == n, timeout, f"{n} waiting opens on {mp}")


def finish(proc: subprocess.Popen[bytes], timeout: float, what: str) -> tuple[bytes, bytes]:
    """Wait for a spawned program, bounded: a hang is a failure that says what hung."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        try:
            out, err = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:  # stuck in the kernel: even SIGKILL waits
            raise AssertionError(f"{what} still running after {timeout} s, and SIGKILL did "
                                 "not end it within 15 s (stuck in a system call)") from None
        raise AssertionError(f"{what} still running after {timeout} s; its output so far:\n"
                             f"{out.decode(errors='replace')[-2000:]}\n"
                             f"{err.decode(errors='replace')[-2000:]}") from None
    return out, err


class Lines:
    """The stdout lines of a spawned program, read by a thread: ``next(timeout)`` never hangs
    the test on a program that stopped talking."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        import queue
        import threading
        self.proc = proc
        self.queue: queue.Queue[bytes] = queue.Queue()
        self.seen: list[bytes] = []
        self.eof = False
        self.err = ""  # stderr, once the program ended

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                self.queue.put(line)
            self.queue.put(b"")

        threading.Thread(target=pump, daemon=True).start()

    def next(self, timeout: float = 30, what: str = "a line") -> bytes:
        import queue
        try:
            line = self.queue.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no {what} from {self.proc.args!r} within {timeout} s; "
                                 f"so far: {self.seen!r}") from None
        if not line:
            self.eof = True
            self.stderr()
            raise AssertionError(f"{self.proc.args!r} ended before {what}: {self.err}")
        self.seen.append(line)
        return line.rstrip(b"\n")

    def rest(self, timeout: float = 60) -> list[bytes]:
        """Every remaining line, once the program ended (bounded)."""
        import queue
        self.proc.wait(timeout=timeout)
        out: list[bytes] = []
        while not self.eof:
            try:
                line = self.queue.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"{self.proc.args!r} ended, its output did not") from None
            if not line:
                self.eof = True
                break
            self.seen.append(line)
            out.append(line.rstrip(b"\n"))
        return out

    def stderr(self) -> str:
        """What the program wrote on stderr (read once it ended)."""
        if not self.err and self.proc.stderr is not None and self.proc.poll() is not None:
            self.err = self.proc.stderr.read().decode(errors="replace")
        return self.err

    def send(self, text: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text)
        self.proc.stdin.flush()

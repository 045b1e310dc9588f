"""THE producer/consumer differential test: what a consumer reads is always a published version.

A long seeded random sequence of producer operations on a producer mount (create, write at an
offset, rewrite with O_TRUNC, append, truncate, rename, unlink, a file unlinked while open,
symlinks, empty directories, numpy memmap writes, hard links), interleaved with consumer opens,
reads, listings and descriptors held open across producer operations, on a consumer mount.
The test keeps every version it published (a version: a file's bytes at each close, truncate,
rename or link that publishes it) and checks:

- every consumer read returns exactly the bytes of one published version of that name, at
  least as new as the latest one published before the consumer's open started (close-to-open):
  the operations run one after the other, so that is the latest one;
- a descriptor opened before producer operations reads the version it opened, whole;
- never a mix, a short file or a ghost: a name the consumer lists is published or local there,
  and opening it does not fail with EIO;
- a file unlinked before its close is never published; symlinks and empty directories the
  producer made are there on the consumer.

Variants: node-local over UCX and over TCP, and shared storage. The seed is printed (and in the
failure message); ``DYADFS_DIFF_OPS`` (default 2000) and ``DYADFS_DIFF_SEED`` make other runs.
Every discrepancy is collected (up to 200) and reported by kind, so that one bug does not hide
the others.
"""

from __future__ import annotations

import errno
import os
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from dyadfs.keys import FileRecord

from .conftest import Mounts, kvs_get, wait_for
from .helpers import LOOPBACK

pytestmark = pytest.mark.mounted
NS = "diff2"
OPS = int(os.environ.get("DYADFS_DIFF_OPS", "2000"))
SEED = os.environ.get("DYADFS_DIFF_SEED")
TRACE = bool(os.environ.get("DYADFS_DIFF_TRACE"))  # print every operation as it runs
DIRS = ["d0", "d1", "d1/e"]
FILES = ["a", "b", "c", "d0/x", "d0/y", "d1/z", "d1/e/w"]
LINKS = ["l0", "d0/l1"]
EMPTY_DIRS = ["m0", "d1/m1"]
LIST_DIRS = ["", "d0", "d1", "d1/e"]


@dataclass
class Model:
    """What the producer's directory holds, and what was published, by the test's account."""

    files: dict[str, int] = field(default_factory=dict)  # name -> inode (hard links share)
    data: dict[int, bytearray] = field(default_factory=dict)
    versions: dict[str, list[bytes]] = field(default_factory=dict)  # every publication, in order
    published: set[str] = field(default_factory=set)
    links: dict[str, str] = field(default_factory=dict)
    dirs: set[str] = field(default_factory=set)
    next_ino: int = 1

    def publish(self, name: str) -> None:
        self.versions.setdefault(name, []).append(bytes(self.data[self.files[name]]))
        self.published.add(name)

    def publish_group(self, name: str) -> None:
        """A change through *name* changes every name of its inode (hard links)."""
        ino = self.files[name]
        for other in [n for n, i in self.files.items() if i == ino]:
            self.publish(other)

    def new_file(self, name: str, data: bytes) -> None:
        self.files[name] = self.next_ino
        self.data[self.next_ino] = bytearray(data)
        self.next_ino += 1


class Run:
    def __init__(self, mounts: Mounts, prod: Path, cons: Path, prod_backing: Path,
                 cons_backing: Path, seed: int, shared: bool) -> None:
        self.mounts, self.prod, self.cons = mounts, prod, cons
        self.prod_backing, self.cons_backing = prod_backing, cons_backing
        self.rng = random.Random(seed)
        self.seed = seed
        self.shared = shared
        self.m = Model()
        self.problems: list[tuple[int, str, str]] = []
        self.step = 0
        self.counts: Counter[str] = Counter()
        self.trace: list[tuple[int, str, tuple[str, ...]]] = []  # (step, what, names)

    # -- bookkeeping ---------------------------------------------------------------------------
    def problem(self, kind: str, msg: str) -> None:
        self.problems.append((self.step, kind, msg))

    def note(self, what: str, *names: str) -> None:
        self.trace.append((self.step, what, names))
        if TRACE:
            print(f"{self.step}: {what}", flush=True)

    def history(self, step: int, msg: str, last: int = 8) -> str:
        """The operations before *step* on the names a problem's message mentions."""
        names = {w.rstrip(":,") for w in msg.split()} & (set(FILES) | set(LINKS) |
                                                         set(EMPTY_DIRS))
        hits = [f"{st}:{what}" for st, what, ns in self.trace
                if st <= step and names & set(ns)]
        return "; ".join(hits[-last:])

    def data(self) -> bytes:
        r = self.rng.random()
        size = self.rng.choice([1, 17, 100, 4096, 5000, 70_000]) if r < 0.97 else 5 << 20
        return self.rng.randbytes(size)

    def record(self, name: str) -> FileRecord | None:
        raw = kvs_get(self.mounts, NS, "files/" + name)
        return None if raw is None else FileRecord.decode(raw, name)

    def existing(self) -> list[str]:
        return sorted(self.m.files)

    # -- producer operations (each keeps the model in step) -------------------------------------
    def p_create(self, name: str) -> None:
        data = self.data()
        fd = os.open(self.prod / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _write_all(fd, data)
        finally:
            os.close(fd)
        if name in self.m.files:
            self.m.data[self.m.files[name]][:] = data
            self.m.publish_group(name)
        else:
            self.m.new_file(name, data)
            self.m.publish(name)

    def p_pwrite(self, name: str) -> None:
        buf = self.m.data[self.m.files[name]]
        off = self.rng.randrange(0, len(buf) + 100)
        data = self.rng.randbytes(self.rng.choice([1, 10, 3000]))
        fd = os.open(self.prod / name, os.O_RDWR)
        try:
            os.pwrite(fd, data, off)
        finally:
            os.close(fd)
        if off > len(buf):
            buf.extend(bytes(off - len(buf)))
        buf[off:off + len(data)] = data
        self.m.publish_group(name)

    def p_append(self, name: str) -> None:
        data = self.rng.randbytes(self.rng.choice([1, 50, 5000]))
        fd = os.open(self.prod / name, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        self.m.data[self.m.files[name]].extend(data)
        self.m.publish_group(name)

    def p_truncate(self, name: str) -> None:
        buf = self.m.data[self.m.files[name]]
        size = self.rng.choice([0, len(buf) // 2, len(buf) + 1000])
        os.truncate(self.prod / name, size)
        if size <= len(buf):
            del buf[size:]
        else:
            buf.extend(bytes(size - len(buf)))
        self.m.publish_group(name)

    def p_rename(self, old: str, new: str) -> None:
        self.note(f"rename {old} {new}", old, new)
        os.rename(self.prod / old, self.prod / new)
        if self.m.files.get(new) == self.m.files[old]:
            return  # two names of one inode: rename does nothing
        self.m.files[new] = self.m.files.pop(old)
        self.m.published.discard(old)
        self.m.publish(new)

    def p_unlink(self, name: str) -> None:
        os.unlink(self.prod / name)
        del self.m.files[name]
        self.m.published.discard(name)

    def p_unlink_open(self, name: str) -> None:
        fd = os.open(self.prod / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, self.rng.randbytes(1000))
            os.unlink(self.prod / name)
        finally:
            os.close(fd)
        rec = self.record(name)
        if rec is not None:
            self.problem("published after unlink", f"{name} unlinked before its close has a "
                         f"record: {rec}")

    def p_symlink(self, name: str) -> None:
        self.note(f"symlink {name}", name)
        if name in self.m.links:
            os.unlink(self.prod / name)
            del self.m.links[name]
            return
        target = self.rng.choice(["a", "d0/x", "../a", "x", "nowhere/at/all"])
        os.symlink(target, self.prod / name)
        self.m.links[name] = target

    def p_mkdir(self, name: str) -> None:
        self.note(f"mkdir/rmdir {name}", name)
        if name in self.m.dirs:
            os.rmdir(self.prod / name)
            self.m.dirs.discard(name)
        else:
            os.mkdir(self.prod / name)
            self.m.dirs.add(name)

    def p_memmap(self, name: str) -> None:
        buf = self.m.data[self.m.files[name]]
        if not buf:
            return self.p_create(name)
        off = self.rng.randrange(0, len(buf))
        data = self.rng.randbytes(min(len(buf) - off, self.rng.choice([1, 100, 4096])))
        before = self.record(name)
        mm = np.memmap(self.prod / name, dtype=np.uint8, mode="r+")
        mm[off:off + len(data)] = np.frombuffer(data, dtype=np.uint8)
        mm.flush()
        del mm
        buf[off:off + len(data)] = data
        # numpy closed its descriptor before the writes: the publication comes with the
        # release of the mapping, just after. Wait for it (bounded).
        try:
            wait_for(lambda: (r := self.record(name)) is not None and
                     (before is None or r.version != before.version), 10,
                     "the memmap write's publication")
        except AssertionError:
            self.problem("memmap write not published", f"{name}: the record is still "
                         f"{self.record(name)} 10 s after the map was flushed and dropped")
        self.m.publish_group(name)

    def p_link(self, old: str, new: str) -> None:
        self.note(f"link {old} {new}", old, new)
        os.link(self.prod / old, self.prod / new)
        self.m.files[new] = self.m.files[old]
        self.m.publish(new)

    def producer_op(self, focus: str | None = None) -> str:
        rng = self.rng
        have = self.existing()
        name = focus if focus is not None and rng.random() < 0.5 else rng.choice(FILES)
        kind = rng.choices(["create", "pwrite", "append", "truncate", "rename", "unlink",
                            "unlink_open", "symlink", "mkdir", "memmap", "link"],
                           [20, 12, 8, 6, 6, 4, 3, 3, 2, 3, 3])[0]
        if kind in ("pwrite", "append", "truncate", "rename", "unlink", "memmap", "link") \
                and name not in self.m.files:
            kind = "create"
        if kind == "unlink_open" and name in self.m.files:
            kind = "pwrite"
        self.counts[kind] += 1
        before = len(self.trace)
        try:
            if kind == "create":
                self.p_create(name)
            elif kind == "pwrite":
                self.p_pwrite(name)
            elif kind == "append":
                self.p_append(name)
            elif kind == "truncate":
                self.p_truncate(name)
            elif kind == "rename":
                self.p_rename(name, rng.choice([n for n in FILES if n != name]))
            elif kind == "unlink":
                self.p_unlink(name)
            elif kind == "unlink_open":
                self.p_unlink_open(name)
            elif kind == "symlink":
                self.p_symlink(rng.choice(LINKS))
            elif kind == "mkdir":
                self.p_mkdir(rng.choice(EMPTY_DIRS))
            elif kind == "memmap":
                self.p_memmap(name)
            elif kind == "link":
                free = [n for n in FILES if n not in self.m.files]
                if free:
                    self.p_link(name, rng.choice(free))
            if len(self.trace) == before:
                self.note(f"{kind} {name}", name)
            if name in self.m.files:  # the other names of its inode changed too
                ino = self.m.files[name]
                self.note(f"({kind} through {name})",
                          *[n for n, i in self.m.files.items() if i == ino and n != name])
        except OSError as e:
            self.problem("producer op failed", f"{kind} {name}: {e!r} (have {have})")
            self.resync()
        return kind

    def resync(self) -> None:
        """After a failed producer operation: take the producer's directory as the truth."""
        for name in FILES:
            p = self.prod_backing / name
            if p.is_file() and not p.is_symlink():
                if name in self.m.files:
                    self.m.data[self.m.files[name]][:] = p.read_bytes()
                else:
                    self.m.new_file(name, p.read_bytes())
            else:
                self.m.files.pop(name, None)

    # -- consumer operations -------------------------------------------------------------------
    def _read_all(self, fd: int, into: bytearray, limit: int | None = None) -> None:
        for _ in range(100_000):  # bounded
            want = 1 << 20 if limit is None else min(1 << 20, limit - len(into))
            if want <= 0:
                return
            chunk = os.read(fd, want)
            if not chunk:
                return
            into += chunk

    def _judge(self, name: str, got: bytes, want: bytes, how: str) -> None:
        if got == want:
            return
        history = self.m.versions.get(name, [])
        if got in history:
            kind = "stale version (close-to-open)"
            detail = f"version {history.index(got)} of {len(history)}"
        elif len(got) < len(want) and want.startswith(got):
            kind, detail = "short read", f"{len(got)} of {len(want)} B"
        elif len(got) == 0:
            kind, detail = "zero bytes", f"want {len(want)} B"
        else:
            kind = "no published version (mixed?)"
            first = next((i for i, (x, y) in enumerate(zip(got, want, strict=False)) if x != y),
                         min(len(got), len(want)))
            tail = got[first:first + 4096]
            detail = (f"{len(got)} B, want {len(want)} B; first difference at byte {first}"
                      f"{' (zeros from there)' if tail and not any(tail) else ''}")
        self.problem(kind, f"{how} {name}: {detail}")

    def c_read(self, name: str) -> None:
        self.note(f"c_read {name}", name)
        want = self.m.versions[name][-1]
        got = bytearray()
        try:
            fd = os.open(self.cons / name, os.O_RDONLY)
            try:
                self._read_all(fd, got)
            finally:
                os.close(fd)
        except OSError as e:
            self.problem("errno on a published name", f"read {name}: {e!r}")
            return
        self._judge(name, bytes(got), want, "read")

    def c_held(self, name: str) -> None:
        self.note(f"c_held {name}", name)
        want = self.m.versions[name][-1]
        got = bytearray()
        try:
            fd = os.open(self.cons / name, os.O_RDONLY)
        except OSError as e:
            self.problem("errno on a published name", f"open {name}: {e!r}")
            return
        try:
            self._read_all(fd, got, limit=len(want) // 2)
            done = [self.producer_op(focus=name) for _ in range(self.rng.randint(1, 3))]
            self._read_all(fd, got)
        except OSError as e:
            if e.errno not in (errno.EIO, errno.ESTALE):
                self.problem("errno on a held descriptor", f"{name}: {e!r}")
            return
        finally:
            os.close(fd)
        if bytes(got) != want:
            self.problem("held descriptor changed version",
                         f"{name} opened at {len(want)} B, read {len(got)} B after {done}")

    def _kinds_here(self, d: str) -> dict[str, str]:
        """Names the consumer may list in *d*: published, or on the producer, or local."""
        pre = d + "/" if d else ""
        out: dict[str, str] = {}
        for n in self.m.published:
            if n.startswith(pre):
                out[n[len(pre):].split("/")[0]] = "published"
        for n in list(self.m.links) + sorted(self.m.dirs) + DIRS:
            if n.startswith(pre) and "/" not in n[len(pre):]:
                out[n[len(pre):]] = "producer"
        return out

    def c_list(self, d: str) -> None:
        try:
            names = sorted(os.listdir(self.cons / d))
        except FileNotFoundError:
            return
        except OSError as e:
            self.problem("errno on ls", f"ls {d or '.'}: {e!r}")
            return
        allowed = self._kinds_here(d)
        opened = 0
        for n in names:
            rel = f"{d}/{n}" if d else n
            local = os.path.lexists(self.cons_backing / rel)
            if n not in allowed and not local:
                self.problem("ghost in ls", f"ls {d or '.'} lists {n}: neither published nor "
                             "local")
                continue
            if rel in FILES and opened < 2 and (rel in self.m.published or local):
                opened += 1
                got = bytearray()
                try:
                    fd = os.open(self.cons / rel, os.O_RDONLY)
                    try:
                        self._read_all(fd, got)
                    finally:
                        os.close(fd)
                except OSError as e:
                    if e.errno == errno.EIO or rel in self.m.published:
                        self.problem("errno on a listed name", f"{rel}: {e!r}")
                    continue
                if rel in self.m.published:
                    self._judge(rel, bytes(got), self.m.versions[rel][-1], "listed")
                elif bytes(got) not in self.m.versions.get(rel, []):
                    self.problem("no published version (mixed?)",
                                 f"listed local copy {rel}: {len(got)} B")

    def c_tree(self) -> None:
        for name, target in self.m.links.items():
            try:
                got = os.readlink(self.cons / name)
            except OSError as e:
                self.problem("symlink missing", f"{name} -> {target}: {e!r}")
                continue
            if got != target:
                self.problem("symlink differs", f"{name} -> {got}, want {target}")
        for name in self.m.dirs:
            if not (self.cons / name).is_dir():
                self.problem("empty directory missing", name)

    def consumer_op(self) -> str:
        rng = self.rng
        kind = rng.choices(["read", "held", "list", "tree"], [30, 6, 8, 2])[0]
        published = sorted(self.m.published)
        if kind in ("read", "held") and not published:
            kind = "list"
        self.counts["c_" + kind] += 1
        if kind == "read":
            self.c_read(rng.choice(published))
        elif kind == "held":
            self.c_held(rng.choice(published))
        elif kind == "list":
            self.c_list(rng.choice(LIST_DIRS))
        else:
            self.c_tree()
        return kind

    # -- the run -------------------------------------------------------------------------------
    def check_producer(self) -> None:
        """The model against the producer's own directory (a bug in this test, or in the
        producer mount, shows here)."""
        for name in FILES:
            p = self.prod_backing / name
            exists = p.is_file() and not p.is_symlink()
            if exists != (name in self.m.files) or \
                    (exists and p.read_bytes() != self.m.data[self.m.files[name]]):
                self.problem("producer differs from the model", name)
                self.resync()
                return

    def go(self, ops: int, budget: float) -> None:
        for d in DIRS:
            os.mkdir(self.prod / d)
        t_end = time.monotonic() + budget
        for self.step in range(ops):
            if time.monotonic() > t_end or len(self.problems) >= 200:
                break
            if self.rng.random() < 0.55:
                self.producer_op()
            else:
                self.consumer_op()
            if self.step % 250 == 249:
                self.check_producer()
        self.check_producer()

    def report(self) -> str:
        kinds = Counter(k for _, k, _ in self.problems)
        lines = [f"seed {self.seed} ({'shared' if self.shared else 'node-local'}): "
                 f"{len(self.problems)} problems in {self.step + 1} steps; by kind: "
                 f"{dict(kinds)}; operations: {dict(self.counts)}"]
        seen: Counter[str] = Counter()
        for step, kind, msg in self.problems:
            seen[kind] += 1
            if seen[kind] <= 4:
                lines.append(f"  step {step}: {kind}: {msg}")
                if seen[kind] == 1:
                    lines.append(f"      (before: {self.history(step, msg)})")
        return "\n".join(lines)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    for _ in range(100_000):
        if not view:
            return
        view = view[os.write(fd, view):]


@pytest.mark.parametrize("variant", ["node-local-ucx", "node-local-tcp", "shared"])
def test_consumer_reads_only_published_versions(tmp_path: Path, mounts: Mounts,
                                                variant: str) -> None:
    seed = int(SEED) if SEED else {"node-local-ucx": 11, "node-local-tcp": 12, "shared": 13}[
        variant]
    print(f"DYADFS_DIFF_SEED={seed} DYADFS_DIFF_OPS={OPS} ({variant})")
    if variant == "shared":
        backing = tmp_path / "backing"
        backing.mkdir()
        prod = mounts.mount(tmp_path / "prod", "--role", "producer", "--shared-storage",
                            "--backing", str(backing), "--namespace", NS, *LOOPBACK)
        cons = mounts.mount(tmp_path / "cons", "--role", "consumer", "--shared-storage",
                            "--backing", str(backing), "--namespace", NS, *LOOPBACK,
                            "--wait-timeout", "20")
        pb = cb = backing
    else:
        transport = variant.rsplit("-", 1)[1]
        pb, cb = tmp_path / "prod.backing", tmp_path / "cons.backing"
        pb.mkdir()
        cb.mkdir()
        prod = mounts.mount(tmp_path / "prod", "--role", "producer", "--namespace", NS,
                            "--transport", transport, *LOOPBACK, "--backing", str(pb))
        cons = mounts.mount(tmp_path / "cons", "--role", "consumer", "--namespace", NS,
                            "--transport", transport, *LOOPBACK, "--backing", str(cb),
                            "--wait-timeout", "20", "--fetch-timeout", "2")
    r = Run(mounts, prod, cons, pb, cb, seed, variant == "shared")
    r.go(OPS, budget=float(os.environ.get("DYADFS_DIFF_BUDGET", "60")))
    print(r.report())
    assert not r.problems, r.report()

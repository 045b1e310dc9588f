"""A producer mount is the plain directory to every POSIX call: the same long random sequence of
operations on a producer mount and on a plain directory gives the same results, errno for errno.
"""

from __future__ import annotations

import os
import random
import stat
from pathlib import Path

import pytest

from .conftest import Mounts

pytestmark = pytest.mark.mounted

NAMES = ["a", "b", "c", "d/x", "d/y", "e", "e/z", "d"]


def _ops(rng: random.Random) -> list[tuple[str, tuple]]:  # type: ignore[type-arg]
    kinds = ["create", "pwrite", "append", "truncate", "read", "rename", "unlink", "mkdir",
             "rmdir", "listdir", "stat", "open_excl", "chmod", "symlink", "readlink"]
    out = []
    for _ in range(600):
        k = rng.choice(kinds)
        n1, n2 = rng.choice(NAMES), rng.choice(NAMES)
        data = rng.randbytes(rng.choice([0, 1, 100, 5000, 70000]))
        out.append((k, (n1, n2, data, rng.randrange(0, 80000), rng.choice([0o600, 0o644, 0o755]))))
    return out


def _apply(root: str, kind: str, args: tuple) -> object:  # type: ignore[type-arg]
    n1, n2, data, off, mode = args
    p1, p2 = os.path.join(root, n1), os.path.join(root, n2)
    try:
        if kind == "create":
            fd = os.open(p1, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                return os.write(fd, data)
            finally:
                os.close(fd)
        if kind == "open_excl":
            os.close(os.open(p1, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            return "ok"
        if kind == "pwrite":
            fd = os.open(p1, os.O_RDWR)
            try:
                return os.pwrite(fd, data, off)
            finally:
                os.close(fd)
        if kind == "append":
            fd = os.open(p1, os.O_WRONLY | os.O_APPEND)
            try:
                os.write(fd, data)
                return os.fstat(fd).st_size
            finally:
                os.close(fd)
        if kind == "truncate":
            os.truncate(p1, off)
            return "ok"
        if kind == "read":
            with open(p1, "rb") as f:
                return f.read()
        if kind == "rename":
            os.rename(p1, p2)
            return "ok"
        if kind == "unlink":
            os.unlink(p1)
            return "ok"
        if kind == "mkdir":
            os.mkdir(p1, mode)
            return "ok"
        if kind == "rmdir":
            os.rmdir(p1)
            return "ok"
        if kind == "listdir":
            return sorted(os.listdir(p1))
        if kind == "stat":
            st = os.lstat(p1)
            size = st.st_size if stat.S_ISREG(st.st_mode) else None
            return (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), size, st.st_nlink
                    if not stat.S_ISDIR(st.st_mode) else None)
        if kind == "chmod":
            os.chmod(p1, mode)
            return "ok"
        if kind == "symlink":
            os.symlink(n2, p1)
            return "ok"
        if kind == "readlink":
            return os.readlink(p1)
    except OSError as e:
        return ("errno", e.errno)
    raise AssertionError(kind)


def _tree(root: str) -> dict[str, object]:
    out: dict[str, object] = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, root)
            if os.path.islink(p):
                out[rel] = ("link", os.readlink(p))
            elif os.path.isdir(p):
                out[rel] = "dir"
            else:
                out[rel] = Path(p).read_bytes()
    return out


@pytest.mark.parametrize("seed", [1, 2])
def test_producer_mount_behaves_like_a_plain_directory(tmp_path: Path, mounts: Mounts,
                                                       seed: int) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    mp = mounts.mount(tmp_path / "m", "--role", "producer", "--namespace", "diff")
    ops = _ops(random.Random(seed))
    for i, (kind, args) in enumerate(ops):
        want = _apply(str(plain), kind, args)
        got = _apply(str(mp), kind, args)
        assert got == want, f"step {i}: {kind}{args[:2]}: mount {got!r} != plain {want!r}"
    assert _tree(str(mp)) == _tree(str(plain))
    assert mounts.status(mp)["unexpected_errors"] == 0

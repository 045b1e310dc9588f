"""Symlinks and empty directories made by a producer reach a node-local consumer: trees copied
with cp -r, rsync -a and tar -x, and a git repository, are whole there."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from .conftest import Mounts, run

pytestmark = pytest.mark.mounted
NS = "trees"


def _tree(root: Path) -> dict[str, object]:
    out: dict[str, object] = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = p.read_bytes()
    return out


def _source(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    (src / "a" / "empty").mkdir(parents=True)
    (src / "a" / "f.txt").write_bytes(b"file in a\n")
    (src / "top.bin").write_bytes(os.urandom(3000))
    os.symlink("a/f.txt", src / "rel-link")
    os.symlink("../top.bin", src / "a" / "up-link")
    os.symlink("nowhere/at/all", src / "dangling")
    return src


@pytest.mark.parametrize("tool", ["cp", "rsync", "tar"])
def test_copied_trees_are_whole_on_the_consumer(tmp_path: Path, mounts: Mounts,
                                                tool: str) -> None:
    if tool == "rsync" and shutil.which("rsync") is None:
        pytest.skip("rsync is not installed")
    src = _source(tmp_path)
    prod = mounts.mount(tmp_path / "p", "--role", "producer", "--namespace", NS,
                        "--transport", "tcp", "--listen", "127.0.0.1")
    cons = mounts.mount(tmp_path / "c", "--role", "consumer", "--namespace", NS,
                        "--transport", "tcp", "--wait-timeout", "30")
    if tool == "cp":
        run(["cp", "-r", str(src), str(prod / "tree")])
    elif tool == "rsync":
        run(["rsync", "-a", f"{src}/", str(prod / "tree")])
    else:
        run(f"tar -C {src} -cf {tmp_path}/t.tar . && mkdir {prod}/tree && "
            f"tar -C {prod}/tree -xf {tmp_path}/t.tar")
    assert _tree(cons / "tree") == _tree(src)


def test_a_git_repository_works_on_the_consumer(tmp_path: Path, mounts: Mounts) -> None:
    """git probes for optional files (packed-refs, info/grafts) with open(): on a consumer
    those would wait for a publication; --no-wait '**/.git/**' makes them answer ENOENT."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    prod = mounts.mount(tmp_path / "p", "--role", "producer", "--namespace", NS,
                        "--transport", "tcp", "--listen", "127.0.0.1")
    cons = mounts.mount(tmp_path / "c", "--role", "consumer", "--namespace", NS,
                        "--transport", "tcp", "--wait-timeout", "30",
                        "--no-wait", "**/.git/**")
    git = "git -c user.name=t -c user.email=t@t -c init.defaultBranch=main"
    run(f"cd {prod} && {git} init -q repo && cd repo && echo hi > f && {git} add f && "
        f"{git} commit -qm one && {git} branch side")
    log = run(["git", "-C", str(cons / "repo"), "log", "--oneline"]).stdout
    assert b"one" in log
    branches = run(["git", "-C", str(cons / "repo"), "branch", "--list"]).stdout
    assert b"side" in branches
    assert (cons / "repo" / "f").read_bytes() == b"hi\n"

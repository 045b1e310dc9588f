"""Trees reach a node-local consumer whole: symlinks, empty directories, git repositories.

Issue "Correctness: a consumer reads exactly a published version", item 8 (2026-12-02): only
regular files were published, so `cp -r`, `rsync -a` and `tar -x` of a tree with symlinks and
empty directories arrived without them, and a git repository made on the producer was "not a
git repository" on the consumer. design.md: "symlinks and empty directories made by a producer:
reach node-local consumers too".
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from .conftest import Mounts, run
from .helpers import node_local

pytestmark = pytest.mark.mounted
NS = "tree"


def _make_tree(root: Path) -> None:
    (root / "sub" / "deep").mkdir(parents=True)
    (root / "empty").mkdir()
    (root / "sub" / "emptier").mkdir()
    (root / "a.txt").write_bytes(b"alpha\n")
    (root / "sub" / "b.bin").write_bytes(os.urandom(100_000))
    (root / "sub" / "deep" / "c.txt").write_bytes(b"")
    os.symlink("sub/b.bin", root / "link_rel")
    os.symlink("../a.txt", root / "sub" / "link_up")
    os.symlink("does/not/exist", root / "dangling")
    os.symlink("sub", root / "dirlink")
    os.chmod(root / "a.txt", 0o640)


def _tree(root: Path) -> dict[str, object]:
    """What a program walking the tree sees: kinds, link targets, bytes, modes of files."""
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
                out[rel] = ("file", oct(os.stat(p).st_mode & 0o777), Path(p).read_bytes())
    return out


def _diff(want: dict[str, object], got: dict[str, object]) -> list[str]:
    out = []
    for k in sorted(set(want) | set(got)):
        if k not in got:
            out.append(f"missing on the consumer: {k} {str(want[k])[:60]}")
        elif k not in want:
            out.append(f"extra on the consumer: {k}")
        elif want[k] != got[k]:
            out.append(f"differs: {k}: {str(got[k])[:60]} != {str(want[k])[:60]}")
    return out


def test_cp_rsync_tar_trees_reach_the_consumer(tmp_path: Path, mounts: Mounts) -> None:
    """The same tree copied onto the producer by cp -r, rsync -a and tar -x: each consumer
    copy walks the same (kinds, symlink targets, empty directories, bytes, modes)."""
    src = tmp_path / "src"
    _make_tree(src)
    want = _tree(src)
    prod, cons = node_local(mounts, tmp_path, NS, "tcp", wait_timeout=30)
    run(["cp", "-r", "--preserve=mode", str(src), str(prod / "cp_tree")])
    tools = ["cp_tree"]
    if shutil.which("rsync"):
        run(["rsync", "-a", f"{src}/", f"{prod}/rs_tree/"])
        tools.append("rs_tree")
    run(["tar", "-C", str(src), "-cf", str(tmp_path / "t.tar"), "."])
    (prod / "tar_tree").mkdir()
    run(["tar", "-C", str(prod / "tar_tree"), "-xf", str(tmp_path / "t.tar")])
    tools.append("tar_tree")
    problems = []
    for tree in tools:
        assert _tree(prod / tree) == want, f"the producer's own {tree} differs"
        problems += [f"{tree}: {d}" for d in _diff(want, _tree(cons / tree))]
    assert not problems, f"{len(problems)} differences:\n" + "\n".join(problems)
    if "rs_tree" not in tools:
        pytest.skip("rsync is not installed: checked cp -r and tar -x only")


def test_git_repository_reaches_the_consumer(tmp_path: Path, mounts: Mounts) -> None:
    """git init, two commits and a branch on the producer: git log, branch and status work on
    the consumer and agree with the producer. git probes for optional files (packed-refs,
    info/grafts) with open(), which on a consumer waits for a publication that never comes:
    the consumer mount says --no-wait for them (main's option for such probes; without it git
    fails after --wait-timeout with "couldn't read .git/packed-refs: Connection timed out",
    and git status and log wait out the timeout on .gitignore, .gitattributes, .mailmap)."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    env = {**os.environ, "HOME": str(tmp_path), "GIT_CONFIG_NOSYSTEM": "1",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.org",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.org"}
    prod, cons = node_local(mounts, tmp_path, NS, "tcp", wait_timeout=10,
                            cons_opts=("--no-wait", "**/.git/**,**/.gitignore,"
                                       "**/.gitattributes,**/.mailmap"))
    repo = prod / "repo"

    def git(where: Path, *args: str) -> bytes:
        return run(["git", "-C", str(where), *args], env=env).stdout

    run(["git", "init", "-q", "-b", "main", str(repo)], env=env)
    (repo / "src").mkdir()
    (repo / "src" / "main.c").write_text("int main(void) { return 0; }\n")
    (repo / "README").write_text("hello\n")
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "first")
    git(repo, "branch", "feature")
    (repo / "README").write_text("hello again\n")
    git(repo, "commit", "-q", "-am", "second")
    want_log = git(repo, "log", "--oneline", "--all")
    want_branches = git(repo, "branch", "--list")
    assert len(want_log.splitlines()) == 2
    t0 = time.monotonic()
    r = run(["git", "-C", str(cons / "repo"), "log", "--oneline", "--all"], env=env,
            check=False)
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout == want_log
    assert git(cons / "repo", "branch", "--list") == want_branches
    assert git(cons / "repo", "status", "--porcelain") == b""
    assert git(cons / "repo", "show", "feature:README") == b"hello\n"
    assert time.monotonic() - t0 < 10, "git waited for names it only probes for"

"""``--prefetch``: a consumer mount pulls every publication as soon as it appears, within
``--cache-size``, and never follows a hostile key out of its directory."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from .conftest import BOTH_KVS, Mounts, run, wait_for

pytestmark = pytest.mark.mounted
NS = "pf"


def mount_pair(tmp_path: Path, mounts: Mounts, *cons_opts: str) -> tuple[Path, Path, Path]:
    """Producer, prefetching consumer, and the consumer's backing (read without the mount)."""
    prod = mounts.mount(tmp_path / "prod", "--role", "producer", "--namespace", NS,
                        "--transport", "tcp", "--listen", "127.0.0.1")
    backing = tmp_path / "cons.backing"
    backing.mkdir()
    cons = mounts.mount(tmp_path / "cons", "--role", "consumer", "--namespace", NS,
                        "--transport", "tcp", "--wait-timeout", "60", "--prefetch",
                        "--backing", str(backing), *cons_opts)
    return prod, cons, backing


@pytest.mark.parametrize("kvs_backend", BOTH_KVS, indirect=True)
def test_prefetch_pulls_publications_before_any_open(tmp_path: Path, mounts: Mounts) -> None:
    prod = mounts.mount(tmp_path / "prod", "--role", "producer", "--namespace", NS,
                        "--transport", "tcp", "--listen", "127.0.0.1")
    (prod / "before").write_bytes(b"published before the consumer mounted")
    backing = tmp_path / "cons.backing"
    backing.mkdir()
    cons = mounts.mount(tmp_path / "cons", "--role", "consumer", "--namespace", NS,
                        "--transport", "tcp", "--wait-timeout", "60", "--prefetch",
                        "--backing", str(backing))
    odd = os.fsencode("frame \n") + b"\xff.dat"
    # a reader already waiting for a frame shares the prefetcher's pull of it
    waiting = subprocess.Popen(["cat", str(cons / "group0/a4md_chunk7.dat")],
                               stdout=subprocess.PIPE)
    wait_for(lambda: mounts.status(cons)["waiting"] == 1, 20, "a waiting reader")
    run(f"mkdir -p {prod}/group0 && for i in 0 1 2 3 4 5 6 7; do "
        f"head -c 5757 /dev/urandom > {prod}/group0/a4md_chunk$i.dat; done")
    with open(os.path.join(os.fsencode(prod), b"group0", odd), "wb") as f:
        f.write(b"odd name")
    # nobody opens anything: the files arrive in the consumer's storage by themselves
    out, _ = waiting.communicate(timeout=60)
    assert out == (prod / "group0/a4md_chunk7.dat").read_bytes()
    # nine came by themselves; the waiting reader's frame was pulled once, for it
    wait_for(lambda: mounts.status(cons)["pulled"] == 10, 30, "ten pulled files")
    assert mounts.status(cons)["prefetched"] in (9, 10)
    for i in range(8):
        name = f"group0/a4md_chunk{i}.dat"
        assert (backing / name).read_bytes() == (prod / name).read_bytes()
    assert (backing / "before").read_bytes() == (prod / "before").read_bytes()
    assert open(os.path.join(os.fsencode(backing), b"group0", odd), "rb").read() == b"odd name"
    # an open reads the prefetched copy: no further pull
    assert run(["cat", str(cons / "group0/a4md_chunk3.dat")]).stdout == \
        (prod / "group0/a4md_chunk3.dat").read_bytes()
    st = mounts.status(cons)
    assert st["pulled"] == 10 and st["prefetch_pending"] == 0
    # a rewrite is prefetched again, as a new version
    run(f"printf rewritten > {prod}/group0/a4md_chunk3.dat")
    wait_for(lambda: (backing / "group0/a4md_chunk3.dat").read_bytes() == b"rewritten", 30,
             "the new version to be prefetched")
    assert run(["cat", str(cons / "group0/a4md_chunk3.dat")]).stdout == b"rewritten"
    assert mounts.status(cons)["pulled"] == 11


def test_prefetch_stays_within_cache_size(tmp_path: Path, mounts: Mounts) -> None:
    prod, cons, backing = mount_pair(tmp_path, mounts, "--cache-size", "3M")
    frames = {}
    for i in range(8):
        frames[i] = os.urandom(1 << 20)
        (prod / f"f{i}").write_bytes(frames[i])

    def cached() -> int:
        return sum(p.stat().st_size for p in backing.iterdir() if p.name.startswith("f"))

    # three fit; the rest wait for room (prefetched copies nobody read are not evicted)
    wait_for(lambda: mounts.status(cons)["prefetched"] == 3, 30, "three prefetched files")
    time.sleep(0.5)  # give a runaway prefetcher the chance to exceed the bound
    assert mounts.status(cons)["prefetched"] == 3 and cached() <= 3 << 20
    assert mounts.status(cons)["prefetch_pending"] == 5
    for i in range(8):  # reading makes room: the next ones come in, still within the bound
        assert run(["cat", str(cons / f"f{i}")]).stdout == frames[i]
        assert cached() <= 3 << 20
    wait_for(lambda: mounts.status(cons)["prefetch_pending"] == 0, 30, "an empty queue")
    assert mounts.status(cons)["errors"] == 0


def test_prefetch_skips_hostile_keys(tmp_path: Path, mounts: Mounts) -> None:
    prod, cons, backing = mount_pair(tmp_path, mounts)
    run(f"printf real > {prod}/real")
    wait_for(lambda: mounts.status(cons)["prefetched"] == 1, 30, "the real file")
    owner = mounts.status(prod)["mount_id"]
    (backing / "link").symlink_to(tmp_path / "outside", target_is_directory=True)
    (tmp_path / "outside").mkdir()
    db = sqlite3.connect(mounts.state / "kvs.sqlite")
    rec = json.dumps({"schema": 1, "state": "complete", "size": 4, "version": 1, "mtime_ns": 0,
                      "mode": 0o644, "owner": owner, "sha256": None}).encode()
    for bad in ("files/../escape", "files/a/../../escape", "files/.dyadfs/tmp/x",
                "files//abs", "files/link/inside"):
        db.execute("INSERT INTO kv VALUES (?, ?, ?)", (NS, bad.encode(), rec))
        db.execute("INSERT INTO feed (ns, key) VALUES (?, ?)", (NS, bad.encode()))
    db.commit()
    db.close()
    os.utime(mounts.state / "kvs.sqlite.notify")
    run(f"printf after > {prod}/after")  # the prefetcher got past the bad keys
    wait_for(lambda: mounts.status(cons)["prefetched"] == 2, 30, "the file after them")
    assert not (tmp_path / "escape").exists() and not (backing.parent / "escape").exists()
    assert list((tmp_path / "outside").iterdir()) == []
    assert "prefetch: skipping" in mounts.logs()


@pytest.mark.parametrize("opts, message", [
    (["--role", "producer"], "a producer mount pulls nothing"),
    (["--shared-storage"], "nothing to pull"),
])
def test_prefetch_with_nothing_to_pull_is_a_one_line_error(tmp_path: Path, mounts: Mounts,
                                                           opts: list[str], message: str) -> None:
    (tmp_path / "m").mkdir()
    r = run(["dyadfs", "mount", str(tmp_path / "m"), "--prefetch", *opts], check=False,
            env=mounts.env)
    assert r.returncode == 2 and message in r.stderr.decode()
    assert b"Traceback" not in r.stderr


def test_prefetch_path_check(tmp_path: Path) -> None:
    """The check itself, for an owner that would serve anything (the real one refuses)."""
    from dyadfs.prefetch import Prefetcher

    (tmp_path / "d").mkdir()
    (tmp_path / "file").write_bytes(b"")
    (tmp_path / "link").symlink_to("/etc", target_is_directory=True)
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        pf = Prefetcher.__new__(Prefetcher)
        pf.root_fd = fd
        ok = [b"x", b"d/x", b"new/dir/x", b"d/new/x", b".dyadfs-not/x"]
        bad = [b"../x", b"d/../../x", b"/abs", b"d//x", b".", b"d/.", b".dyadfs/tmp/x",
               b"link/passwd", b"file/x"]
        assert [r for r in ok if not pf._safe(r)] == []
        assert [r for r in bad if pf._safe(r)] == []
    finally:
        os.close(fd)

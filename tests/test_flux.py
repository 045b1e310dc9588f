"""Flux: the Flux KVS backend on a real ``flux start --test-size=2``, DYAD-compatible keys, and
the Flux examples. Skipped, with the reason, where no ``flux`` command exists."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dyadfs.keys import MountRecord, dyad_key, mount_key

from .conftest import FLUX_OK, FUSE_OK, FeedLog, FluxInstance, Mounts, kvs_get, run

pytestmark = [pytest.mark.flux, pytest.mark.mounted,
              pytest.mark.skipif(not FLUX_OK, reason="no flux command: flux-core is not "
                                 "installed (Flux tests skipped)"),
              pytest.mark.skipif(not FUSE_OK, reason="needs /dev/fuse and fuse3")]
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def kvs_backend() -> str:
    return "flux"


def test_dyad_keys_and_ranks(tmp_path: Path, mounts: Mounts) -> None:
    assert mounts.flux is not None
    prod = mounts.mount(tmp_path / "p", "--role", "producer", "--namespace", "dk",
                        "--transport", "tcp")
    cons = mounts.mount(tmp_path / "c", "--role", "consumer", "--namespace", "dk",
                        "--transport", "tcp", "--wait-timeout", "30")
    run(f"mkdir {prod}/group0 && head -c 5757 /dev/urandom > {prod}/group0/a4md_chunk0.dat")
    ns = mounts.ns("dk")
    out = mounts.flux.flux("kvs", "get", "--namespace", ns,
                           "12d.d1.20d.group0/a4md_chunk0.dat")
    assert out.stdout.strip() == "0", out.stderr  # the producer's broker rank, as DYAD writes
    assert dyad_key("group0/a4md_chunk0.dat") == "12d.d1.20d.group0/a4md_chunk0.dat"
    assert run(["cmp", str(prod / "group0/a4md_chunk0.dat"),
                str(cons / "group0/a4md_chunk0.dat")]).returncode == 0
    ranks = set()
    for mp in (prod, cons):
        st = mounts.status(mp)
        raw = kvs_get(mounts, "dk", mount_key(st["mount_id"]))
        assert raw is not None
        ranks.add(MountRecord.decode(raw, "x").rank)
    assert ranks == {0, 1}  # the producer on broker 0, the consumer on broker 1
    run(["rm", str(prod / "group0/a4md_chunk0.dat")])
    out = mounts.flux.flux("kvs", "get", "--namespace", ns, "12d.d1.20d.group0/a4md_chunk0.dat")
    assert out.returncode != 0  # unpublished: DYAD's key goes too


@pytest.mark.parametrize("script", ["node_local.sh", "shared_storage.sh"])
def test_flux_examples(tmp_path: Path, state_env: dict[str, str], script: str) -> None:
    env = {**state_env, "DYADFS": f"{sys.executable} -m dyadfs",
           "PROD_DIR": str(tmp_path / "md_prod"), "CONS_DIR": str(tmp_path / "md_cons"),
           "SHARED_DIR": str(tmp_path / "md_shared")}
    env.pop("FLUX_URI", None)
    try:
        r = subprocess.run(["flux", "start", "--test-size=2", "bash",
                            str(ROOT / "examples" / "flux" / script)],
                           capture_output=True, text=True, env=env, timeout=600)
    finally:
        for d in tmp_path.iterdir():
            subprocess.run(["fusermount3", "-uz", str(d)], capture_output=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    if script == "node_local.sh":
        assert "10 of 10 frames byte-identical" in r.stdout
        lines = r.stdout.splitlines()
        key_line = lines.index("== DYAD's key for frame 0 holds the producer's rank:")
        assert lines[key_line + 1].strip() == "0"
    else:
        assert "consumer read 10 of 10 frames" in r.stdout


def test_flux_instance_serves_both_ranks(flux_instance: FluxInstance) -> None:
    assert len(flux_instance.uris) == 2 and flux_instance.uris[0] != flux_instance.uris[1]


def test_flux_change_feed(flux_instance: FluxInstance) -> None:
    import trio

    from dyadfs.kvs.flux import FluxKVS

    ns = f"feed-{os.getpid()}"

    async def main() -> FeedLog:
        writer = FluxKVS(flux_instance.uris[0])
        reader = FluxKVS(flux_instance.uris[1])  # another broker: another node
        await writer.ensure_namespace(ns)
        await writer.commit(ns, {"files/early": b"0"})
        feed = FeedLog()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader.follow, ns, feed)
            await feed.until(1, skip=-1)
            await writer.commit(ns, {"files/g/x": b"1", "mounts/m": b"{}"})
            await writer.commit(ns, {"files/g/y": b"2", "files/early": None})
            await feed.until(3)
            nursery.cancel_scope.cancel()
        await writer.remove_namespace(ns)
        return feed

    feed = trio.run(main)
    assert feed.got[0] == ["files/early"]  # the first answer is the whole feed so far
    assert feed.keys() == ["files/g/x", "files/g/y", "files/early"]

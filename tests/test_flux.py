"""Flux: the Flux KVS backend on a real ``flux start --test-size=2``, DYAD-compatible keys, and
the Flux examples. Skipped, with the reason, where no ``flux`` command exists."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
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


def test_flux_put_if_absent_is_atomic_across_brokers(flux_instance: FluxInstance) -> None:
    """Mounts started together (``flux exec -r all dyadfs mount``) must agree on the namespace's
    secret: many concurrent callers in two processes, one on each broker, get one value."""
    import trio

    from dyadfs.kvs.flux import FluxKVS

    ns = f"secret-{os.getpid()}-{os.urandom(3).hex()}"
    script = textwrap.dedent(f"""
        import os, sys, trio
        from dyadfs.kvs.flux import FluxKVS
        async def main():
            kvs = FluxKVS()
            print("ready", flush=True)
            sys.stdin.readline()  # the barrier: both processes are ready
            out = []
            async def one():
                value = os.urandom(8).hex().encode()
                out.append(await kvs.put_if_absent({ns!r}, "meta/secret", value))
            async with trio.open_nursery() as n:
                for _ in range(16):
                    n.start_soon(one)
            print(" ".join(v.decode() for v in out), flush=True)
        trio.run(main)
    """)
    trio.run(FluxKVS(flux_instance.uris[0]).ensure_namespace, ns)
    procs = [subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=flux_instance.env(rank))
             for rank in (0, 1)]
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        values: list[str] = []
        for p in procs:
            out, _ = p.communicate(timeout=120)
            values += out.split()
    finally:
        for p in procs:
            p.kill()
        trio.run(FluxKVS(flux_instance.uris[0]).remove_namespace, ns)
    assert len(values) == 32 and len(set(values)) == 1, values


def test_flux_listing_log_compaction_races_writers(flux_instance: FluxInstance,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Writers on both brokers publish and remove in one directory while its listing log is
    compacted again and again (each writer every 3 of its appends, readers when they see a long
    log): no publication is lost, none comes back, and old generations are retired."""
    import json

    import trio
    import trio.lowlevel

    import dyadfs.kvs.flux as fluxkvs
    from dyadfs.kvs.flux import FluxKVS

    monkeypatch.setattr(fluxkvs, "COMPACT_EVERY", 3)
    monkeypatch.setattr(fluxkvs, "COMPACT_MIN", 8)
    ns = f"compact-{os.getpid()}-{os.urandom(3).hex()}"
    expected: dict[str, bytes | None] = {}

    async def writer(kvs: FluxKVS, tag: str) -> None:
        for i in range(40):
            name = f"{tag}{i % 9}"
            value = None if i % 5 == 4 else f"{tag}-{i}".encode()
            await kvs.commit(ns, {f"files/d/{name}": value})
            expected[name] = value

    async def reader(kvs: FluxKVS) -> None:
        while True:
            await kvs.children(ns, "d")
            await trio.lowlevel.checkpoint()

    async def main() -> tuple[dict[str, bytes | None], dict[str, bytes | None], list[str]]:
        a, b = FluxKVS(flux_instance.uris[0]), FluxKVS(flux_instance.uris[1])
        await a.ensure_namespace(ns)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(a.run)
                await nursery.start(b.run)
                nursery.start_soon(reader, a)
                nursery.start_soon(reader, b)
                async with trio.open_nursery() as writers:
                    for kvs, tag in ((a, "p"), (a, "q"), (b, "r"), (b, "s")):
                        writers.start_soon(writer, kvs, tag)
                nursery.cancel_scope.cancel()  # a compaction under way ends its step first
            # b's broker has seen every commit once one of b's own is answered
            await b.commit(ns, {"mounts/sync": b"{}"})
            seen_a, seen_b = await a.children(ns, "d"), await b.children(ns, "d")
            logdir = await a._run(
                lambda: a._take_treeobj(a._send(ns, fluxkvs._log_dir("d"), fluxkvs._READDIR)))
        finally:
            await a.remove_namespace(ns)
        assert logdir is not None
        kinds = [json.dumps(ent["type"]) for ent in logdir["data"].values()]
        return seen_a, seen_b, kinds

    seen_a, seen_b, kinds = trio.run(main)
    want = {k: v for k, v in expected.items() if v is not None}
    assert seen_a == want and seen_b == want
    assert kinds.count('"symlink"') >= 5, kinds  # retired generations: it did compact


def test_flux_compaction_cut_short_is_finished_by_anyone(flux_instance: FluxInstance) -> None:
    """A compactor that died between its two commits leaves two live generations: listings
    stay right meanwhile, writers go to the new one, and the next compaction finishes it."""
    import trio

    import dyadfs.kvs.flux as fluxkvs
    from dyadfs.kvs.flux import FluxKVS

    ns = f"cut-{os.getpid()}-{os.urandom(3).hex()}"

    async def main() -> None:
        kvs = FluxKVS(flux_instance.uris[0])
        await kvs.ensure_namespace(ns)
        try:
            await kvs.commit(ns, {"files/d/a": b"1", "files/d/b": b"2"})
            ldir = fluxkvs._log_dir("d")
            await kvs._run(kvs._commit, ns, [("absent", f"{ldir}.g1"),
                                             ("mkdir", f"{ldir}.g1")])  # C1, and no C2
            assert await kvs.children(ns, "d") == {"a": b"1", "b": b"2"}
            await kvs.commit(ns, {"files/d/a": None, "files/d/c": b"3"})  # to g1, after a retry
            assert await kvs.children(ns, "d") == {"b": b"2", "c": b"3"}
            assert kvs._gen_of(ns, "d").k == 1
            await kvs._run(kvs._compact, ns, "d")  # finishes g0 -> g1
            live, every = fluxkvs._gens(await kvs._run(
                lambda: kvs._take_treeobj(kvs._send(ns, ldir, fluxkvs._READDIR))))
            assert list(live) == [1] and every == {0, 1}
            assert await kvs.children(ns, "d") == {"b": b"2", "c": b"3"}
            await kvs._run(kvs._compact, ns, "d")  # a whole compaction: g1 -> g2
            assert await kvs.children(ns, "d") == {"b": b"2", "c": b"3"}
            stale = FluxKVS(flux_instance.uris[1])  # believes g0 is the newest
            await stale.commit(ns, {"files/d/e": b"5"})
            assert await kvs.children(ns, "d") == {"b": b"2", "c": b"3", "e": b"5"}
        finally:
            await kvs.remove_namespace(ns)

    trio.run(main)


def test_flux_listing_survives_a_namespace_made_again(flux_instance: FluxInstance) -> None:
    """A mount that knew a namespace before it was removed and made again believes in a
    generation the new namespace never had: what it publishes is listed all the same, and the
    next compaction brings every writer back to one generation."""
    import trio

    import dyadfs.kvs.flux as fluxkvs
    from dyadfs.kvs.flux import FluxKVS

    ns = f"again-{os.getpid()}-{os.urandom(3).hex()}"

    async def main() -> None:
        old, fresh = FluxKVS(flux_instance.uris[0]), FluxKVS(flux_instance.uris[0])
        await old.ensure_namespace(ns)
        try:
            for i in range(2):
                await old.commit(ns, {f"files/d/{i}": b"v"})
                await old._run(old._compact, ns, "d")
            assert old._gen_of(ns, "d").k == 2
            # the namespace made again, as far as d goes (removing a Flux namespace and making
            # it again under the same name takes the broker a while)
            await fresh._run(fresh._commit, ns, [("unlink", fluxkvs._log_dir("d")),
                                                 ("unlink", fluxkvs._node("d")),
                                                 ("unlink", fluxkvs.flux_key("files/d/0")),
                                                 ("unlink", fluxkvs.flux_key("files/d/1"))])
            await fresh.commit(ns, {"files/d/x": b"1"})  # g0 of the new namespace
            await old.commit(ns, {"files/d/y": b"2"})  # g2, the generation it believes in
            assert await fresh.children(ns, "d") == {"x": b"1", "y": b"2"}
            await fresh._run(fresh._compact, ns, "d")
            assert await fresh.children(ns, "d") == {"x": b"1", "y": b"2"}
            await fresh.commit(ns, {"files/d/x": b"3"})  # learns the generation, after a retry
            await old.commit(ns, {"files/d/z": b"4"})
            assert await old.children(ns, "d") == {"x": b"3", "y": b"2", "z": b"4"}
            assert fresh._gen_of(ns, "d").k == old._gen_of(ns, "d").k == 2
        finally:
            await fresh.remove_namespace(ns)

    trio.run(main)

"""The catalog over both KVS backends: record kinds, the directory index (listings whose cost
does not grow with the namespace), moves and removals, and malformed records."""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeVar

import pytest
import trio

from dyadfs import keys
from dyadfs.catalog import Catalog
from dyadfs.errors import KVSError, WaitTimeout
from dyadfs.keys import FileRecord
from dyadfs.kvs import KVS

from .conftest import BOTH_KVS

T = TypeVar("T")
Body = Callable[[Catalog], Awaitable[T]]


def st(size: int = 5, mode: int = 0o100644, mtime_ns: int = 1_700_000_000_000_000_000) -> Any:
    return SimpleNamespace(st_size=size, st_mode=mode, st_mtime_ns=mtime_ns)


@pytest.fixture
def with_catalog(kvs_backend: str, tmp_path: Path,
                 request: pytest.FixtureRequest) -> Callable[[Body[Any]], Any]:
    """Run an async body with a Catalog on a fresh namespace of the backend under test."""
    def make() -> KVS:
        if kvs_backend == "flux":
            from dyadfs.kvs.flux import FluxKVS
            return FluxKVS(request.getfixturevalue("flux_instance").uris[0])
        from dyadfs.kvs.local import LocalKVS
        return LocalKVS(tmp_path / "kvs.sqlite")

    def run(body: Body[T]) -> T:
        async def main() -> T:
            kvs = make()
            ns = f"cat-{os.getpid()}-{os.urandom(3).hex()}"
            await kvs.ensure_namespace(ns)
            try:
                async with trio.open_nursery() as nursery:
                    await nursery.start(kvs.run)
                    result = await body(Catalog(kvs, ns, "mount-a"))
                    nursery.cancel_scope.cancel()
                return result
            finally:
                await kvs.remove_namespace(ns)
                await kvs.aclose()
        return trio.run(main)
    return run


both = pytest.mark.parametrize("kvs_backend", BOTH_KVS, indirect=True)


@both
def test_records_of_every_kind_and_the_listing(with_catalog: Callable[[Body[None]], None]) -> None:
    async def body(cat: Catalog) -> None:
        f = await cat.publish(b"a/f", st(7))
        e = await cat.publish_dir(b"a/e", st(4096, 0o40750))
        ln = await cat.publish_symlink(b"a/l", b"../t\xff", st(5, 0o120777))
        await cat.publish(b"a/b/c/deep", st())
        assert (e.kind, e.size, e.mode, e.target) == ("dir", 0, 0o750, None)
        assert (ln.kind, ln.size, ln.target) == ("symlink", 5, "../t\udcff")
        assert await cat.get(b"a/l") == ln and await cat.get(b"a/e") == e
        assert await cat.children(b"a") == {b"f": f, b"e": e, b"l": ln, b"b": None}
        assert await cat.children(b"") == {b"a": None}
        assert await cat.children(b"a/b/c") == {b"deep": await cat.get(b"a/b/c/deep")}
        for rel, is_dir in [(b"a", True), (b"a/b", True), (b"a/e", True), (b"a/f", False),
                            (b"a/l", False), (b"nope", False), (b"a/b/c/deep", False)]:
            assert await cat.is_directory(rel) == is_dir, rel
    with_catalog(body)


@both
def test_listing_leaves_out_what_is_not_a_published_name(
        with_catalog: Callable[[Body[None]], None]) -> None:
    async def body(cat: Catalog) -> None:
        await cat.kvs.commit(cat.ns, {keys.mount_key("m1"): b"{}", keys.SECRET: b"s"})
        await cat.mark_writing(b"w", 0o644)  # being written: not listed yet
        await cat.publish(b"x", st())
        assert set(await cat.children(b"")) == {b"x"}
        assert await cat.published_files() == [b"x"]
    with_catalog(body)


@both
def test_removal_and_moves_follow_with_the_index(
        with_catalog: Callable[[Body[None]], None]) -> None:
    async def body(cat: Catalog) -> None:
        await cat.publish_dir(b"d", st())
        await cat.publish(b"d/x", st())
        await cat.publish(b"d/sub/y", st())
        await cat.publish_symlink(b"d/l", b"x", st())
        await cat.move(b"d", b"e", replaced=False)  # a directory: its whole tree, one commit
        assert set(await cat.children(b"")) == {b"e"}
        assert set(await cat.children(b"e")) == {b"x", b"sub", b"l"}
        assert (await cat.get(b"e")).kind == "dir"  # type: ignore[union-attr]
        assert await cat.get(b"d/x") is None and await cat.get(b"e/sub/y") is not None
        assert not await cat.is_directory(b"d") and await cat.is_directory(b"e/sub")
        await cat.publish(b"z", st(3))
        await cat.move(b"z", b"e/x", replaced=True)  # a file over a file
        assert (await cat.get(b"e/x")).size == 3  # type: ignore[union-attr]
        assert set(await cat.children(b"")) == {b"e"}
        await cat.remove(b"e/sub/y")  # an emptied directory stays, as on the producer
        assert await cat.children(b"e/sub") == {} and b"sub" in await cat.children(b"e")
        await cat.remove(b"e/sub")  # rmdir: gone
        assert b"sub" not in await cat.children(b"e") and not await cat.is_directory(b"e/sub")
        await cat.publish_dir(b"empty", st())
        await cat.move(b"empty", b"e/sub", replaced=False)
        assert (await cat.children(b"e"))[b"sub"].kind == "dir"  # type: ignore[union-attr]
        await cat.remove(b"e/sub")
        assert b"sub" not in await cat.children(b"e")
        await cat.publish(b"e/sub/again", st())  # a directory that comes back
        assert set(await cat.children(b"e/sub")) == {b"again"}
    with_catalog(body)


@both
def test_a_directory_stays_while_another_mount_publishes_below_it(
        with_catalog: Callable[[Body[None]], None]) -> None:
    async def body(cat: Catalog) -> None:
        other = Catalog(cat.kvs, cat.ns, "mount-b")
        await cat.publish(b"k/mine", st())
        await other.publish(b"k/theirs", st())
        await cat.move(b"k", b"m", replaced=False)  # only what this mount owns moves
        assert set(await cat.children(b"")) == {b"k", b"m"}
        assert set(await cat.children(b"k")) == {b"theirs"}
        await cat.remove(b"k")
        assert set(await cat.children(b"k")) == {b"theirs"}
        assert await cat.owned_under(b"k") == {}
        assert set(await other.owned_under(b"")) == {b"k/theirs"}
    with_catalog(body)


# -- malformed records ----------------------------------------------------------------------
@both
def test_malformed_record_is_an_error_not_unpublished(
        with_catalog: Callable[[Body[None]], None], caplog: pytest.LogCaptureFixture) -> None:
    bad = {"files/neg": b'{"schema":2,"kind":"file","state":"complete","size":-1,"version":1,'
                        b'"mtime_ns":1,"mode":420,"owner":"m","sha256":null,"target":null}',
           "files/junk": b"\x00 not json"}

    async def body(cat: Catalog) -> None:
        await cat.kvs.commit(cat.ns, bad)
        with pytest.raises(KVSError, match="field 'size' is -1") as err:
            await cat.get(b"neg")
        assert err.value.errno == errno.EIO
        with pytest.raises(KVSError, match="'files/junk': not JSON"):
            await cat.get(b"junk")
        with trio.fail_after(10):  # they end at once: a malformed record never becomes good
            with pytest.raises(KVSError, match="field 'size' is -1"):
                await cat.wait_complete(b"neg", None)
            with pytest.raises(KVSError, match="not JSON"):
                await cat.wait_not_writing(b"junk", None)

            async def spoil() -> None:
                await trio.sleep(0.2)
                await cat.kvs.commit(cat.ns, {"files/later": bad["files/junk"]})
            async with trio.open_nursery() as nursery:
                nursery.start_soon(spoil)
                with pytest.raises(KVSError, match="'files/later': not JSON"):
                    await cat.wait_complete(b"later", None)  # waiting, when it turns bad
        with pytest.raises(WaitTimeout):  # a good record still waits as before
            await cat.wait_complete(b"missing", 0.2)

    with caplog.at_level(logging.WARNING, logger="dyadfs.catalog"):
        with_catalog(body)
    assert any("field 'size' is -1" in r.getMessage() for r in caplog.records)


@both
def test_listings_skip_a_malformed_record_with_one_warning(
        with_catalog: Callable[[Body[None]], None], caplog: pytest.LogCaptureFixture) -> None:
    async def body(cat: Catalog) -> None:
        await cat.publish(b"d/good", st())
        await cat.kvs.commit(cat.ns, {"files/d/bad": b"[]"})
        caplog.clear()
        assert set(await cat.children(b"d")) == {b"good"}
        assert [r.getMessage() for r in caplog.records] == \
            ["malformed file record at 'files/d/bad': not a JSON object: [] (skipped)"]
        caplog.clear()
        assert await cat.published_files() == [b"d/good"]
        assert len(caplog.records) == 1

    with caplog.at_level(logging.WARNING, logger="dyadfs.catalog"):
        with_catalog(body)


# -- cost -----------------------------------------------------------------------------------
async def _fill(cat: Catalog, below: int) -> None:
    """A directory "small" of 10 entries, one of them a directory holding *below* files."""
    rec = FileRecord("complete", 1, 1, 1, 0o644, cat.mount_id).encode()
    for start in range(0, below, 5000):
        await cat.kvs.commit(cat.ns, {keys.file_key(f"small/big/f{i}"): rec
                                      for i in range(start, min(below, start + 5000))})
    await cat.kvs.commit(cat.ns, {keys.file_key(f"small/f{i}"): rec for i in range(9)})


def _vm_steps(db: sqlite3.Connection, counter: list[int]) -> None:
    def step() -> int:
        counter[0] += 1
        return 0
    db.set_progress_handler(step, 1)


@pytest.mark.parametrize("kvs_backend", BOTH_KVS, indirect=True)
def test_listing_cost_does_not_grow_with_the_namespace(
        with_catalog: Callable[[Body[dict[str, int]]], dict[str, int]],
        kvs_backend: str) -> None:
    """children() of a 10-entry directory and is_directory() cost the same whether 10 or
    10,000 names are published below it: SQLite work (virtual machine steps) on the embedded
    KVS, RPCs on Flux. No timing."""
    def cost(below: int) -> dict[str, int]:
        async def body(cat: Catalog) -> dict[str, int]:
            await _fill(cat, below)
            out = {}
            for what, call in [("children", lambda: cat.children(b"small")),
                               ("is_directory", lambda: cat.is_directory(b"small")),
                               ("is_directory missing", lambda: cat.is_directory(b"small/n")),
                               ("get", lambda: cat.get(b"small/f1"))]:
                await call()  # type: ignore[no-untyped-call]
                if kvs_backend == "flux":
                    before = cat.kvs.rpcs  # type: ignore[attr-defined]
                    await call()  # type: ignore[no-untyped-call]
                    out[what] = cat.kvs.rpcs - before  # type: ignore[attr-defined]
                else:
                    counter = [0]
                    for db in (cat.kvs._db, cat.kvs._reader):  # type: ignore[attr-defined]
                        _vm_steps(db, counter)
                    await call()  # type: ignore[no-untyped-call]
                    out[what] = counter[0]
            return out
        return with_catalog(body)

    few, many = cost(10), cost(10_000)
    for what in few:
        assert many[what] <= few[what] * 1.2 + 2, (what, few, many)
    if kvs_backend == "flux":
        assert many["children"] <= 4 and many["is_directory"] == 1 and many["get"] == 1

"""The FUSE operations driven in-process (no kernel): publication, lookups, error translation."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from types import SimpleNamespace

import pyfuse3
import pytest
import trio

from dyadfs import config, fs
from dyadfs.catalog import Catalog
from dyadfs.kernel import STABLE_TIMEOUT
from dyadfs.kvs.local import LocalKVS

CTX = SimpleNamespace(pid=0, uid=os.getuid(), gid=os.getgid(), umask=0o022)


def with_ops(tmp_path: Path, role: str, body, **cfg):  # type: ignore[no-untyped-def]
    backing = tmp_path / "backing"
    backing.mkdir(exist_ok=True)
    c = config.build(tmp_path / "mnt", {"role": role, **cfg},
                     env={"DYADFS_STATE_DIR": str(tmp_path / "state")})

    async def main():  # type: ignore[no-untyped-def]
        kvs = LocalKVS(c.kvs_path)
        fd = os.open(backing, os.O_RDONLY | os.O_DIRECTORY)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(kvs.run)
                ops = fs.Operations(c, fd, Catalog(kvs, c.namespace, "me"))
                ops.attach(nursery)
                result = await body(ops, kvs, backing)
                nursery.cancel_scope.cancel()
            return result
        finally:
            os.close(fd)
            await kvs.aclose()
    return trio.run(main)


def test_every_handler_is_guarded() -> None:
    for name in fs._HANDLERS:
        method = getattr(fs.Operations, name)
        if name in fs.Operations.__dict__:
            assert hasattr(method, "__wrapped__"), f"{name} can let an exception escape"


def test_unexpected_error_answers_eio_and_is_counted(tmp_path: Path, monkeypatch,
                                                     caplog) -> None:  # type: ignore[no-untyped-def]
    async def body(ops, kvs, backing):  # type: ignore[no-untyped-def]
        monkeypatch.setattr(ops.backing, "lstat", lambda rel: 1 / 0)
        with pytest.raises(pyfuse3.FUSEError) as e:
            await ops.getattr(pyfuse3.ROOT_INODE, CTX)
        assert e.value.errno == errno.EIO
        assert ops.stats.unexpected == 1
        monkeypatch.setattr(ops.backing, "lstat", lambda rel: (_ for _ in ()).throw(
            PermissionError(errno.EACCES, "no")))
        with pytest.raises(pyfuse3.FUSEError) as e:
            await ops.getattr(pyfuse3.ROOT_INODE, CTX)
        assert e.value.errno == errno.EACCES
    with_ops(tmp_path, "both", body)
    assert "ZeroDivisionError" in caplog.text


def test_create_write_flush_publishes(tmp_path: Path) -> None:
    async def body(ops, kvs, backing):  # type: ignore[no-untyped-def]
        fi, entry = await ops.create(pyfuse3.ROOT_INODE, b"f", 0o100644,
                                     os.O_WRONLY | os.O_CREAT, CTX)
        await ops.write(fi.fh, 0, b"hello")
        assert await ops.catalog.get(b"f") is None
        await ops.flush(fi.fh)
        rec = await ops.catalog.get(b"f")
        assert rec.size == 5 and rec.owner == "me"
        await ops.release(fi.fh)
        assert (backing / "f").read_bytes() == b"hello"
        await ops.unlink(pyfuse3.ROOT_INODE, b"f", CTX)
        assert await ops.catalog.get(b"f") is None
    with_ops(tmp_path, "producer", body)


def test_consumer_lookups(tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    async def body(ops, kvs, backing):  # type: ignore[no-untyped-def]
        with pytest.raises(pyfuse3.FUSEError) as e:  # unknown intent: ENOENT at once
            await ops.lookup(pyfuse3.ROOT_INODE, b"missing", CTX)
        assert e.value.errno == errno.ENOENT
        other = Catalog(kvs, ops.catalog.ns, "someone-else")
        st = os.stat(__file__)
        await other.publish(b"g/frame", st)
        d = await ops.lookup(pyfuse3.ROOT_INODE, b"g", CTX)
        # published names are cached like present ones (see KernelCache.synthetic)
        assert d.st_mode & 0o170000 == 0o040000 and d.entry_timeout == STABLE_TIMEOUT
        f = await ops.lookup(d.st_ino, b"frame", CTX)
        assert f.st_size == st.st_size and f.attr_timeout == f.entry_timeout == STABLE_TIMEOUT
        await kvs.commit(ops.catalog.ns, {"files/bad": b"{not json"})
        with pytest.raises(pyfuse3.FUSEError) as e:
            await ops.lookup(pyfuse3.ROOT_INODE, b"bad", CTX)
        assert e.value.errno == errno.EIO  # a malformed record is an error, not "unpublished"
        assert ops.stats.unexpected == 0
    with_ops(tmp_path, "consumer", body)
    assert "malformed file record at 'files/bad'" in caplog.text


def test_open_of_unpublished_name_times_out(tmp_path: Path) -> None:
    async def body(ops, kvs, backing):  # type: ignore[no-untyped-def]
        parent = ops.nodes.get(pyfuse3.ROOT_INODE)
        node = ops.nodes.absent(parent, b"late", "file")
        with pytest.raises(pyfuse3.FUSEError) as e:
            await ops.open(node.ino, os.O_RDONLY, SimpleNamespace(pid=os.getpid(), uid=0, gid=0))
        assert e.value.errno == errno.ETIMEDOUT
        assert ops.stats.wait_timeouts == 1 and ops.stats.waiting == 0
    with_ops(tmp_path, "consumer", body, wait_timeout="0.3")


def test_unreadable_intent_waits_only_for_declared_names(tmp_path: Path) -> None:
    """Where /proc/<tid>/syscall cannot be read (pid 0 here; Yama ptrace_scope for a non-root
    daemon), a creator must still never block: missing names are ENOENT at once, but names
    matching --wait-on-stat answer as for a stat that waits: their GETATTR (a stat) and
    their open wait."""
    async def body(ops, kvs, backing):  # type: ignore[no-untyped-def]
        with pytest.raises(pyfuse3.FUSEError) as e:
            await ops.lookup(pyfuse3.ROOT_INODE, b"scratch.tmp", CTX)
        assert e.value.errno == errno.ENOENT
        entry = await ops.lookup(pyfuse3.ROOT_INODE, b"frame.dat", CTX)
        node = ops.nodes.get(entry.st_ino)
        assert node.provisional == "file" and node.awaited
        assert entry.entry_timeout == entry.attr_timeout == 0  # so a stat asks GETATTR
        me = SimpleNamespace(pid=os.getpid(), uid=0, gid=0)
        with pytest.raises(pyfuse3.FUSEError) as e:
            await ops.getattr(node.ino, me)
        assert e.value.errno == errno.ETIMEDOUT  # the stat waited for the publication
        with pytest.raises(pyfuse3.FUSEError) as e:
            await ops.open(node.ino, os.O_RDONLY, me)
        assert e.value.errno == errno.ETIMEDOUT  # so did the open
    with_ops(tmp_path, "consumer", body, wait_timeout="0.3", wait_on_stat="*.dat")

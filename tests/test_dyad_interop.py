"""C DYAD and dyadfs in one Flux namespace, both ways (issue 13): DYAD's own LD_PRELOAD wrapper
around the C programs of tests/c/, DYAD's own broker module, real dyadfs mounts, on a real
``flux start --test-size=2``. Skipped, with the reason, without a DYAD install (DYAD_PREFIX, else
/opt/dyad: lib/dyad.so and lib/libdyad_wrapper.so) or without flux."""

from __future__ import annotations

import errno
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from dyadfs.keys import dyad_key

from .conftest import FLUX_OK, FUSE_OK, FUSE_SKIP, CPrograms, FluxInstance, Mounts, dyadfs_cmd, run
from .helpers import daemon_alive, finish, parse_reads, parse_versions, waiting

DYAD_PREFIX = Path(os.environ.get("DYAD_PREFIX", "/opt/dyad"))
MODULE = DYAD_PREFIX / "lib" / "dyad.so"
WRAPPER = DYAD_PREFIX / "lib" / "libdyad_wrapper.so"


def _missing() -> str | None:
    if not FLUX_OK:
        return "no flux command: flux-core is not installed (DYAD interop tests skipped)"
    for path in (MODULE, WRAPPER):
        if not path.exists():
            return (f"no DYAD install: {path} is missing (set DYAD_PREFIX to DYAD's install "
                    "prefix; DYAD interop tests skipped)")
    return None


pytestmark = [pytest.mark.dyad, pytest.mark.flux, pytest.mark.mounted,
              pytest.mark.skipif(_missing() is not None, reason=_missing() or ""),
              pytest.mark.skipif(not FUSE_OK, reason=FUSE_SKIP)]

FRAME = 5757  # the seed's frame: 200 atoms
BIG = (3 << 20) + 4099  # a few MiB, not a multiple of anything


@pytest.fixture
def kvs_backend() -> str:
    return "flux"


class Dyad:
    """DYAD beside the session's Flux instance: its module (removed at teardown) and the
    environment of its LD_PRELOAD wrapper."""

    def __init__(self, flux: FluxInstance, logs: Path) -> None:
        self.flux = flux
        self.logs = logs
        self.loaded: list[int] = []

    def flux_at(self, rank: int, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["timeout", "60", "flux", *args], capture_output=True, text=True,
                              env=self.flux.env(rank), timeout=90)

    def namespace(self, ns: str) -> None:
        r = self.flux_at(0, "kvs", "namespace", "create", ns)
        assert r.returncode == 0 or "exists" in r.stderr, r.stderr

    def load(self, rank: int, producer_dir: Path) -> None:
        """DYAD's module on *rank*, serving *producer_dir* (its logs under the test's dir)."""
        log = str(self.logs / "dyad_mod")
        r = self.flux_at(rank, "module", "load", str(MODULE), "--mode=FLUX_RPC",
                         f"--info_log={log}", f"--error_log={log}", str(producer_dir))
        assert r.returncode == 0, f"flux module load dyad.so failed: {r.stderr}"
        self.loaded.append(rank)

    def env(self, rank: int, ns: str, producer: Path | None = None,
            consumer: Path | None = None, shared: bool = False) -> dict[str, str]:
        """A C DYAD client's environment on *rank* (DYAD's variables and nothing else)."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("DYAD_", "DYADFS_"))}
        env.update(FLUX_URI=self.flux.uris[rank], LD_PRELOAD=str(WRAPPER),
                   DYAD_KVS_NAMESPACE=ns, DYAD_DTL_MODE="FLUX_RPC")
        if producer is not None:
            env["DYAD_PATH_PRODUCER"] = str(producer)
        if consumer is not None:
            env["DYAD_PATH_CONSUMER"] = str(consumer)
        if shared:
            env["DYAD_SHARED_STORAGE"] = "1"
        return env

    def teardown(self) -> None:
        for rank in self.loaded:
            self.flux_at(rank, "module", "remove", "dyad")
        self.loaded.clear()


@pytest.fixture
def dyad(flux_instance: FluxInstance, mounts: Mounts, tmp_path: Path) -> Iterator[Dyad]:
    logs = tmp_path / "dyad-logs"
    logs.mkdir()
    d = Dyad(flux_instance, logs)
    try:
        yield d
    finally:
        d.teardown()


def write(cprogs: CPrograms, prefix: Path, size: int, seed: int,
          env: dict[str, str] | None = None) -> tuple[int, int]:
    """One file ``<prefix>0`` of *size* bytes written by tests/c/writer.c (open, write, close);
    under DYAD's wrapper when *env* says so. Returns its (size, crc)."""
    r = run(["timeout", "60", cprogs.writer, str(prefix), "1", str(size), str(seed)], env=env,
            timeout=90)
    (version,) = parse_versions(r.stdout)
    return version


def reads_of(out: bytes) -> dict[str, tuple[int, int, int]]:
    return {Path(r.path).name: (r.size, r.crc, r.err) for r in parse_reads(out)}


def fuse_mounts_left(tmp_path: Path) -> list[str]:
    with open("/proc/mounts") as f:
        return [ln for ln in f if "fuse" in ln and str(tmp_path) in ln]


# -- (i) C DYAD producer -> dyadfs consumer -------------------------------------------------------
def test_c_dyad_producer_to_dyadfs_consumer(tmp_path: Path, mounts: Mounts, dyad: Dyad,
                                            cprogs: CPrograms, spawn) -> None:  # type: ignore[no-untyped-def]
    ns = mounts.ns("c2fs")
    prod = tmp_path / "cprod"
    (prod / "group0").mkdir(parents=True)
    dyad.namespace(ns)
    dyad.load(0, prod)
    cons = mounts.mount(tmp_path / "cons", "--role", "consumer", "--namespace", "c2fs",
                        "--transport", "tcp", "--wait-timeout", "60", "--fetch-timeout", "5")
    assert mounts.status(cons)["dyad_compat"] is True
    # the reader waits for names nobody has published, in a directory that does not exist yet
    reader = spawn(["timeout", "90", cprogs.reader, str(cons / "group0" / "frame0"),
                    str(cons / "big0")])
    waiting(mounts, cons, 1)
    penv = dyad.env(0, ns, producer=prod)
    frame = write(cprogs, prod / "group0" / "frame", FRAME, 11, penv)
    big = write(cprogs, prod / "big", BIG, 12, penv)
    out, err = finish(reader, 90, "the reader of C DYAD's files")
    got = reads_of(out)
    assert got["frame0"] == (*frame, 0), err
    assert got["big0"] == (*big, 0), err
    st = mounts.status(cons)
    assert st["pulled"] == 2 and st["bytes_pulled"] == FRAME + BIG
    # the pulled copies are local files now: read again, nothing is pulled again
    again = reads_of(run([cprogs.reader, str(cons / "group0" / "frame0")]).stdout)
    assert again["frame0"] == (*frame, 0)
    assert mounts.status(cons)["pulled"] == 2
    assert not list((tmp_path / "cons").glob(".dyadfs/tmp/*"))  # no temporary file left


def test_stat_waits_for_a_c_dyad_file(tmp_path: Path, mounts: Mounts, dyad: Dyad,
                                      cprogs: CPrograms, spawn) -> None:  # type: ignore[no-untyped-def]
    """--wait-on-stat: a stat of a name C DYAD has not published yet waits, then sees the
    pulled file."""
    ns = mounts.ns("c2fsstat")
    prod = tmp_path / "cprod"
    prod.mkdir()
    dyad.namespace(ns)
    dyad.load(0, prod)
    cons = mounts.mount(tmp_path / "cons", "--role", "consumer", "--namespace", "c2fsstat",
                        "--transport", "tcp", "--wait-timeout", "60", "--wait-on-stat", "st*")
    stat = spawn(["timeout", "60", "stat", "-c", "%s", str(cons / "st0")])
    waiting(mounts, cons, 1)
    frame = write(cprogs, prod / "st", FRAME, 16, dyad.env(0, ns, producer=prod))
    out, err = finish(stat, 60, "stat of a C DYAD file")
    assert out.strip() == str(FRAME).encode(), err
    assert reads_of(run([cprogs.reader, str(cons / "st0")]).stdout)["st0"] == (*frame, 0)


def test_c_dyad_empty_file_is_eio_not_an_empty_file(tmp_path: Path, mounts: Mounts, dyad: Dyad,
                                                    cprogs: CPrograms) -> None:
    """DYAD's module cannot send a 0-byte file (it answers an error); dyadfs says EIO, with a
    log line, rather than hand out an empty file that may be a failure; the mount goes on."""
    ns = mounts.ns("c2fs0")
    prod = tmp_path / "cprod"
    prod.mkdir()
    dyad.namespace(ns)
    dyad.load(0, prod)
    cons = mounts.mount(tmp_path / "cons", "--role", "consumer", "--namespace", "c2fs0",
                        "--transport", "tcp", "--wait-timeout", "60", "--fetch-timeout", "5")
    penv = dyad.env(0, ns, producer=prod)
    write(cprogs, prod / "empty", 0, 13, penv)
    r = run(["timeout", "60", cprogs.reader, str(cons / "empty0")], check=False)
    assert reads_of(r.stdout)["empty0"] == (-1, 0, errno.EIO)
    assert "from C DYAD (rank 0) failed" in mounts.logs()
    assert not (tmp_path / "cons" / "empty0").exists()  # no empty file under the real name
    assert not list((tmp_path / "cons").glob(".dyadfs/tmp/*"))
    frame = write(cprogs, prod / "frame", FRAME, 14, penv)  # and the mount still serves
    assert reads_of(run([cprogs.reader, str(cons / "frame0")]).stdout)["frame0"] == (*frame, 0)


def test_c_dyad_file_without_a_service_is_eio(tmp_path: Path, mounts: Mounts, dyad: Dyad,
                                              cprogs: CPrograms) -> None:
    """C DYAD published (its key names rank 0) but nothing serves dyad.fetch there: the open
    fails with EIO at once (the broker answers ENOSYS), not after a hang."""
    ns = mounts.ns("nomod")
    prod = tmp_path / "cprod"
    prod.mkdir()
    dyad.namespace(ns)
    cons = mounts.mount(tmp_path / "cons", "--role", "consumer", "--namespace", "nomod",
                        "--transport", "tcp", "--wait-timeout", "60", "--fetch-timeout", "30")
    write(cprogs, prod / "orphan", FRAME, 15, dyad.env(0, ns, producer=prod))
    r = run(["timeout", "20", cprogs.reader, str(cons / "orphan0")], check=False)
    assert reads_of(r.stdout)["orphan0"] == (-1, 0, errno.EIO)
    assert "ENOSYS" in mounts.logs() or "Function not implemented" in mounts.logs()


# -- (ii) dyadfs producer -> C DYAD consumer, no DYAD module anywhere ---------------------------
def test_dyadfs_producer_to_c_dyad_consumer_without_module(
        tmp_path: Path, mounts: Mounts, dyad: Dyad, cprogs: CPrograms, spawn) -> None:  # type: ignore[no-untyped-def]
    ns = mounts.ns("fs2c")
    dyad.namespace(ns)
    prod = mounts.mount(tmp_path / "prod", "--role", "producer", "--namespace", "fs2c",
                        "--transport", "tcp")
    assert mounts.status(prod)["dyad_service"] is True  # it registered dyad.fetch on rank 0
    assert "C DYAD interop on: this mount serves DYAD's dyad.fetch" in \
        dyadfs_cmd("status", str(prod), env=mounts.env).stdout
    ccons = tmp_path / "ccons"
    (ccons / "group0").mkdir(parents=True)  # DYAD's consumer directories must exist
    names = [ccons / "group0" / "frame0", ccons / "big0", ccons / "empty0"]
    reader = spawn(["timeout", "90", cprogs.reader, *map(str, names)],
                   env=dyad.env(1, ns, consumer=ccons))
    (prod / "group0").mkdir()
    frame = write(cprogs, prod / "group0" / "frame", FRAME, 21)  # plain programs, no DYAD
    big = write(cprogs, prod / "big", BIG, 22)
    empty = write(cprogs, prod / "empty", 0, 23)
    out, err = finish(reader, 90, "the C DYAD consumer")
    got = reads_of(out)
    said = f"exit {reader.returncode}; stdout {out!r}; stderr {err[-3000:]!r}"
    assert got.get("frame0") == (*frame, 0), said
    assert got.get("big0") == (*big, 0), said
    assert got.get("empty0") == (*empty, 0), said
    # DYAD's client swallows errors (an empty file): the producer's count says it served them
    assert mounts.status(prod)["served"] == 3


# -- (iii) dyadfs producer beside DYAD's module on the same broker ------------------------------
def test_dyadfs_producer_beside_dyad_module(tmp_path: Path, mounts: Mounts, dyad: Dyad,
                                           cprogs: CPrograms) -> None:
    ns = mounts.ns("beside")
    dyad.namespace(ns)
    mp = tmp_path / "prod"
    mp.mkdir()
    dyad.load(0, mp)  # DYAD's module serves the mount point: it reads through the mount
    prod = mounts.mount(mp, "--role", "producer", "--namespace", "beside", "--transport", "tcp")
    assert mounts.status(prod)["dyad_service"] is False  # the module holds dyad.fetch
    assert "dyad.fetch served by DYAD's module or another mount" in \
        dyadfs_cmd("status", str(prod), env=mounts.env).stdout
    assert "dyad.fetch is served on this broker already" in mounts.logs()
    cons = mounts.mount(tmp_path / "cons", "--role", "consumer", "--namespace", "beside",
                        "--transport", "tcp", "--wait-timeout", "60")
    frame = write(cprogs, prod / "frame", FRAME, 31)
    big = write(cprogs, prod / "big", BIG, 32)
    ccons = tmp_path / "ccons"
    ccons.mkdir()
    c = run(["timeout", "60", cprogs.reader, str(ccons / "frame0"), str(ccons / "big0")],
            env=dyad.env(1, ns, consumer=ccons))
    assert reads_of(c.stdout) == {"frame0": (*frame, 0), "big0": (*big, 0)}
    fs = run(["timeout", "60", cprogs.reader, str(cons / "frame0"), str(cons / "big0")])
    assert reads_of(fs.stdout) == {"frame0": (*frame, 0), "big0": (*big, 0)}
    # dyadfs served only its own consumer; DYAD's module served the C one
    assert mounts.status(prod)["served"] == 2
    assert daemon_alive(mounts, prod)


# -- (iv) shared storage, both directions -------------------------------------------------------
def test_shared_storage_dyadfs_producer_to_c_dyad_consumer(
        tmp_path: Path, mounts: Mounts, dyad: Dyad, cprogs: CPrograms, spawn) -> None:  # type: ignore[no-untyped-def]
    """DYAD's consumer in shared-storage mode waits for DYAD's key, which dyadfs writes."""
    ns = mounts.ns("shfs2c")
    dyad.namespace(ns)
    shared = tmp_path / "shared"
    shared.mkdir()
    prod = mounts.mount(tmp_path / "prod", "--role", "producer", "--shared-storage",
                        "--backing", str(shared), "--namespace", "shfs2c")
    reader = spawn(["timeout", "90", cprogs.reader, str(shared / "frame0"),
                    str(shared / "big0")], env=dyad.env(1, ns, consumer=shared, shared=True))
    frame = write(cprogs, prod / "frame", FRAME, 41)
    big = write(cprogs, prod / "big", BIG, 42)
    out, err = finish(reader, 90, "the C DYAD consumer (shared storage)")
    assert reads_of(out) == {"frame0": (*frame, 0), "big0": (*big, 0)}, err


def test_shared_storage_c_dyad_producer_to_dyadfs_consumer(
        tmp_path: Path, mounts: Mounts, dyad: Dyad, cprogs: CPrograms, spawn) -> None:  # type: ignore[no-untyped-def]
    """DYAD's key appearing means the C producer closed the file: the waiting open reads it
    where it is, nothing is pulled."""
    ns = mounts.ns("shc2fs")
    dyad.namespace(ns)
    shared = tmp_path / "shared"
    shared.mkdir()
    cons = mounts.mount(tmp_path / "cons", "--role", "consumer", "--shared-storage",
                        "--backing", str(shared), "--namespace", "shc2fs", "--wait-timeout",
                        "60")
    reader = spawn(["timeout", "90", cprogs.reader, str(cons / "frame0"), str(cons / "big0")])
    waiting(mounts, cons, 1)
    penv = dyad.env(0, ns, producer=shared, shared=True)
    frame = write(cprogs, shared / "frame", FRAME, 51, penv)
    big = write(cprogs, shared / "big", BIG, 52, penv)
    out, err = finish(reader, 90, "the dyadfs consumer (shared storage)")
    assert reads_of(out) == {"frame0": (*frame, 0), "big0": (*big, 0)}, err
    st = mounts.status(cons)
    assert st["pulled"] == 0 and st["waits_done"] >= 2


# -- (v) hostile requests to dyadfs' dyad.fetch -------------------------------------------------
def dyad_rpc(uri: str, payload: bytes | None, streaming: bool = True,
             nodeid: int = 0) -> tuple[bytes, int]:
    """A raw dyad.fetch request, as any Flux client may send one: (bytes, errno ending it)."""
    import flux
    import flux.constants
    from flux.core.inner import ffi, raw

    h = flux.Flux(uri)
    flags = flux.constants.FLUX_RPC_STREAMING if streaming else 0
    fut = raw.flux_rpc(h, "dyad.fetch", ffi.NULL if payload is None else payload, nodeid,
                       flags)
    data, size = ffi.new("const void *[1]"), ffi.new("size_t *")
    chunks = []
    try:
        while True:
            raw.flux_future_wait_for(fut, 30.0)
            try:
                raw.flux_rpc_get_raw(fut, data, size)
            except OSError as e:
                return b"".join(chunks), e.errno or 0
            chunks.append(bytes(ffi.buffer(data[0], size[0])))
            if not streaming:
                return b"".join(chunks), 0
            raw.flux_future_reset(fut)
    finally:
        raw.flux_future_destroy(fut)


def test_hostile_dyad_fetch_requests_get_errors(tmp_path: Path, mounts: Mounts, dyad: Dyad,
                                               cprogs: CPrograms) -> None:
    ns = mounts.ns("hostile")
    dyad.namespace(ns)
    backing = tmp_path / "backing"
    backing.mkdir()
    prod = mounts.mount(tmp_path / "prod", "--role", "producer", "--namespace", "hostile",
                        "--transport", "tcp", "--backing", str(backing))
    frame = write(cprogs, prod / "frame", FRAME, 61)
    os.symlink("/etc", prod / "esc")  # a published symlink that leads out of the directory
    (backing / "secret.txt").write_bytes(b"never published\n")  # behind the mount's back
    uri = dyad.flux.uris[1]

    def ask(upath: object, streaming: bool = True) -> int:
        body, err = dyad_rpc(uri, json.dumps({"upath": upath}).encode(), streaming)
        assert body == b""
        return err

    assert ask("../etc/passwd") == errno.EPERM
    assert ask("/etc/passwd") == errno.EPERM
    assert ask("esc/passwd") == errno.EPERM
    assert ask("") == errno.EPERM
    assert ask("nothere") == errno.ENOENT
    assert ask("secret.txt") == errno.ENOENT  # present, but this mount never published it
    assert ask("frame0", streaming=False) == errno.EPROTO
    assert ask(7) == errno.EPROTO
    assert dyad_rpc(uri, b"not json") == (b"", errno.EPROTO)
    assert dyad_rpc(uri, None) == (b"", errno.EPROTO)
    logged = mounts.logs()
    assert "refused dyad.fetch of '../etc/passwd'" in logged
    assert "not a streaming request (EPROTO)" in logged
    # and it still serves, both dyad.fetch and C DYAD consumers
    assert daemon_alive(mounts, prod)
    body, err = dyad_rpc(uri, json.dumps({"upath": "frame0"}).encode())
    assert err == errno.ENODATA and len(body) == FRAME
    ccons = tmp_path / "ccons"
    ccons.mkdir()
    c = run(["timeout", "60", cprogs.reader, str(ccons / "frame0")],
            env=dyad.env(1, ns, consumer=ccons))
    assert reads_of(c.stdout) == {"frame0": (*frame, 0)}


def test_dyad_fetch_never_sends_a_file_being_rewritten(tmp_path: Path, mounts: Mounts,
                                                       dyad: Dyad) -> None:
    """While a writer rewrites a published file in place, dyad.fetch refuses it (ESTALE: a C
    DYAD consumer would otherwise get a mix of two versions); after its close, the new bytes."""
    ns = mounts.ns("torn")
    dyad.namespace(ns)
    prod = mounts.mount(tmp_path / "prod", "--role", "producer", "--namespace", "torn",
                        "--transport", "tcp")
    old, new = os.urandom(FRAME), os.urandom(FRAME)
    (prod / "f").write_bytes(old)
    uri = dyad.flux.uris[1]
    ask = json.dumps({"upath": "f"}).encode()
    assert dyad_rpc(uri, ask) == (old, errno.ENODATA)
    with open(prod / "f", "r+b") as f:
        f.write(new[:100])
        f.flush()  # through the mount: the file now holds neither version
        assert dyad_rpc(uri, ask) == (b"", errno.ESTALE)
        f.write(new[100:])
    assert dyad_rpc(uri, ask) == (new, errno.ENODATA)  # published again at the close


def test_dyad_compat_off_turns_both_directions_off(tmp_path: Path, mounts: Mounts, dyad: Dyad,
                                                   cprogs: CPrograms) -> None:
    ns = mounts.ns("off")
    cprod = tmp_path / "cprod"
    cprod.mkdir()
    dyad.namespace(ns)
    dyad.load(0, cprod)
    cons = mounts.mount(tmp_path / "cons", "--role", "consumer", "--namespace", "off",
                        "--transport", "tcp", "--wait-timeout", "3", "--dyad-compat", "off")
    write(cprogs, cprod / "c", FRAME, 71, dyad.env(0, ns, producer=cprod))
    r = run(["timeout", "60", cprogs.reader, str(cons / "c0")], check=False)
    assert reads_of(r.stdout)["c0"] == (-1, 0, errno.ETIMEDOUT)  # DYAD's key not watched
    prod = mounts.mount(tmp_path / "prod", "--role", "producer", "--namespace", "off",
                        "--transport", "tcp", "--dyad-compat", "off")
    assert mounts.status(prod)["dyad_service"] is None
    write(cprogs, prod / "f", FRAME, 72)
    assert reads_of(run([cprogs.reader, str(prod / "f0")]).stdout)["f0"][0] == FRAME
    got = dyad.flux_at(0, "kvs", "get", "--namespace", ns, dyad_key("f0"))
    assert got.returncode != 0  # no DYAD key written
    on = dyad.flux_at(0, "kvs", "get", "--namespace", ns, dyad_key("c0"))
    assert on.stdout.strip() == "0"  # while C DYAD's is there


def test_no_fuse_mount_left(tmp_path: Path) -> None:
    """Every test above unmounted what it mounted (this one runs last in the module)."""
    assert fuse_mounts_left(tmp_path.parent) == []

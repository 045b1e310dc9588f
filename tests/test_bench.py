"""``dyadfs bench`` runs, cleans up after itself, and writes well-formed JSON (its figures are
read by people, never asserted against a time)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dyadfs.bench import peer
from dyadfs.bench.report import peer_table

from .conftest import FUSE_OK

needs_cc = pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler (cc)")


def positive(x: object) -> bool:
    return isinstance(x, (int, float)) and x > 0 and math.isfinite(x)


@pytest.mark.mounted
@pytest.mark.skipif(not FUSE_OK, reason="needs /dev/fuse and fuse3")
def test_bench_quick_json(tmp_path: Path, state_env: dict[str, str]) -> None:
    out = tmp_path / "out.json"
    r = subprocess.run([sys.executable, "-m", "dyadfs", "bench", "--quick", "--transport", "tcp",
                        "--sizes", "1", "4", "--frames", "20", "--consumers", "3", "--names", "100",
                        "--json", str(out), "--plot", str(tmp_path / "plot.png"),
                        "--dir", str(tmp_path)],
                       capture_output=True, text=True, env=state_env, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "frame latency" in r.stdout and "MiB/s" in r.stdout
    res = json.loads(out.read_text())
    f = res["frame_latency"]
    assert f["frame_bytes"] == 5757 and f["n"] == 20
    assert all(positive(f[k]) for k in ("p50_ms", "p99_ms", "frames_per_s"))
    assert f["p99_ms"] >= f["p50_ms"]
    assert [p["size_bytes"] for p in res["pull"]] == [1 << 20, 4 << 20]
    for p in res["pull"]:
        assert all(positive(p[k]) for k in ("dyadfs_MiBps", "ucx_raw_MiBps", "local_copy_MiBps"))
    for part in ("read", "write"):
        assert positive(res[part]["size_bytes"])
        assert positive(res[part]["mount_MiBps"]) and positive(res[part]["backing_MiBps"])
    m = res["machine"]
    assert m["cores"] >= 1 and m["cpu"] and m["kernel"] and m["python"]
    assert "ucx" in m
    k = res["kvs"]["wake_latency"]
    assert positive(k["p50_ms"]) and k["n"] > 0
    assert res["transports"]["tcp"]["consumer_errors"] == 0
    assert [s["consumers"] for s in res["transports"]["tcp"]["scaling_consumers"]] == [1, 2, 3]
    names = res["transports"]["tcp"]["scaling_names"]
    assert [s["names"] for s in names] == [100]
    for s in names:
        assert all(positive(s[f"stat_{k}"]["p50_ms"]) and positive(s[f"ls_l_{k}_ms"])
                   for k in ("consumer", "producer", "plain"))
    assert len(f["samples_ms"]) == 20 and all(positive(x) for x in f["samples_ms"])
    pf = res["transports"]["tcp"]["prefetch"]
    for k in ("prefetched", "local_mount", "local_backing", "on_demand_pull"):
        assert pf[k]["n"] == 20 and positive(pf[k]["p50_ms"])
    assert positive(pf["ratio_to_local"])
    assert "--prefetch: open+read of a prefetched frame" in r.stdout
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # it removed its directories and left no mount behind
    assert not list(tmp_path.glob("dyadfs-bench-*"))
    assert str(tmp_path) not in Path("/proc/mounts").read_text()  # not another run's
    assert res["peer"]["skipped"].startswith("no --peer PREFIX given")
    assert "side by side with DYAD: skipped (no --peer PREFIX given" in r.stdout


@pytest.mark.parametrize("args, message", [(["--frames", "1"], "--frames"),
                                           (["--consumers", "0"], "--consumers"),
                                           (["--peer-frames", "1"], "--peer-frames"),
                                           (["--peer", "/nonexistent"], "lib/dyad.so")])
def test_bench_bad_option(args: list[str], message: str, state_env: dict[str, str]) -> None:
    r = subprocess.run([sys.executable, "-m", "dyadfs", "bench", *args], capture_output=True,
                       text=True, env=state_env, timeout=60)
    assert r.returncode != 0 and message in r.stderr and "Traceback" not in r.stderr


# -- the side-by-side rows (--peer) --------------------------------------------------------------
TINY = peer.PeerPlan(frames=8, sizes=[100_000, 1 << 20], files=2)


def _check_column(col: dict[str, object], plan: peer.PeerPlan) -> None:
    assert "error" not in col, col
    f = col["frame_latency"]
    assert isinstance(f, dict) and f["n"] == plan.frames and f["content_checked"] == plan.frames
    # a frame can be had before the producer's close() has returned: p50 may be < 0, not p99
    assert math.isfinite(f["p50_ms"]) and positive(f["p99_ms"]) and f["p99_ms"] >= f["p50_ms"]
    for rows in (col["open_read"], col["write"]):
        assert isinstance(rows, list)
        assert [r["size_bytes"] for r in rows] == plan.sizes
        assert all(positive(r["median_ms"]) for r in rows)
    assert isinstance(col["open_read"], list)
    assert all(r["content_checked"] == plan.files for r in col["open_read"])


@needs_cc
def test_peer_clients_check_content(tmp_path: Path) -> None:
    """The consumer program refuses a file that is not what the producer wrote: the wrong
    file's bytes, a short file, an empty placeholder (what DYAD leaves on a failed fetch)."""
    clients = peer.compile_clients(tmp_path)
    d, other = tmp_path / "d", tmp_path / "other"
    d.mkdir()
    other.mkdir()
    reads, writes = peer.bulk_figures(peer.Side(d, d, tmp_path), clients, [70_000], 3)
    assert reads[0]["content_checked"] == 3 and positive(writes[0]["median_ms"])
    # the same names, but the files are each other's (swapped), short and empty
    for name, data in (("bulk70000-0", (d / "bulk70000-1").read_bytes()),
                       ("bulk70000-1", (d / "bulk70000-1").read_bytes()[:-1]),
                       ("bulk70000-2", b"")):
        (other / name).write_bytes(data)
    cons = peer._start_consumer(peer.Side(d, other, tmp_path), clients, 70_000, peer.SEED + 1,
                                [f"bulk70000-{i}" for i in range(3)])
    with pytest.raises(peer.PeerError, match=r"3 of 3 files read, 3 wrong"):
        peer._reads(cons.finish(30), 3, 70_000, "the consumer")


@pytest.mark.mounted
@pytest.mark.skipif(not FUSE_OK, reason="needs /dev/fuse and fuse3")
@needs_cc
def test_peer_dyadfs_side(state_env: dict[str, str]) -> None:
    """The C-client rows on dyadfs alone (no DYAD): numbers, every byte checked, DYAD's columns
    skipped with the reason, nothing left mounted."""
    def peer_mounts() -> set[str]:
        return {line for line in Path("/proc/mounts").read_text().splitlines()
                if "dyadfs-peer-" in line}

    before, mounted_before = set(Path("/dev/shm").glob("dyadfs-peer-*")), peer_mounts()
    res = peer.peer_figures(None, state_env, TINY, ["local", "tcp"])
    cols = res["columns"]
    assert set(cols) == {"dyad_ucx", "dyad_flux_rpc", "dyadfs_local", "dyadfs_tcp"}
    assert cols["dyad_ucx"]["skipped"] == peer.NO_PEER
    _check_column(cols["dyadfs_local"], TINY)
    _check_column(cols["dyadfs_tcp"], TINY)
    table = peer_table(res)
    assert "| dyadfs, defaults (same host) | dyadfs, tcp (--same-host off) |" in table
    assert " ms |" in table and "skipped" in table
    assert peer_mounts() <= mounted_before  # another run's may be there
    assert set(Path("/dev/shm").glob("dyadfs-peer-*")) <= before  # removed its directories


def _dyad_prefix() -> Path | None:
    p = Path(os.environ.get("DYAD_PREFIX", "/opt/dyad"))
    ok = all((p / f).is_file() for f in ("lib/dyad.so", "lib/libdyad_wrapper.so"))
    return p if ok and shutil.which("flux") else None


@pytest.mark.mounted
@pytest.mark.flux
@pytest.mark.skipif(not FUSE_OK, reason="needs /dev/fuse and fuse3")
@pytest.mark.skipif(_dyad_prefix() is None, reason="needs DYAD installed (DYAD_PREFIX or "
                    "/opt/dyad with lib/dyad.so, lib/libdyad_wrapper.so) and flux on PATH")
@needs_cc
def test_peer_with_dyad(state_env: dict[str, str]) -> None:
    """Both of DYAD's DTLs and dyadfs run the same C clients; every column has numbers and
    every file DYAD delivered had the producer's bytes."""
    prefix = _dyad_prefix()
    assert prefix is not None
    res = peer.peer_figures(prefix, state_env, TINY, ["tcp"])
    for col in res["columns"].values():
        _check_column(col, TINY)
    table = peer_table(res)
    assert "failed" not in table and "skipped" not in table and "x best" in table

"""``dyadfs bench`` runs, cleans up after itself, and writes well-formed JSON (its figures are
read by people, never asserted against a time)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import FUSE_OK

pytestmark = [pytest.mark.mounted,
              pytest.mark.skipif(not FUSE_OK, reason="needs /dev/fuse and fuse3")]


def positive(x: object) -> bool:
    return isinstance(x, (int, float)) and x > 0 and math.isfinite(x)


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
    assert "dyadfs-bench" not in Path("/proc/mounts").read_text()


@pytest.mark.parametrize("args, message", [(["--frames", "1"], "--frames"),
                                           (["--consumers", "0"], "--consumers")])
def test_bench_bad_option(args: list[str], message: str, state_env: dict[str, str]) -> None:
    r = subprocess.run([sys.executable, "-m", "dyadfs", "bench", *args], capture_output=True,
                       text=True, env=state_env, timeout=60)
    assert r.returncode != 0 and message in r.stderr and "Traceback" not in r.stderr

"""A dyadfs daemon runs beside the simulation for hours: idle, it must cost no measurable CPU,
also while a consumer waits on a frame that is not published yet (read from /proc, as ps does).
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from .conftest import Mounts, wait_for

pytestmark = pytest.mark.mounted
WINDOW = 5.0


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_share(pids: list[int]) -> list[float]:
    before = [cpu_seconds(p) for p in pids]
    t0 = time.monotonic()
    time.sleep(WINDOW)  # measuring over a window, not synchronising
    elapsed = time.monotonic() - t0
    return [(cpu_seconds(p) - b) / elapsed for p, b in zip(pids, before, strict=True)]


@pytest.mark.parametrize("transport", ["ucx", "tcp"])
def test_idle_and_waiting_mounts_cost_under_one_percent(tmp_path: Path, mounts: Mounts,
                                                        transport: str) -> None:
    prod = mounts.mount(tmp_path / "p", "--role", "producer", "--namespace", "idle",
                        "--transport", transport)
    cons = mounts.mount(tmp_path / "c", "--role", "consumer", "--namespace", "idle",
                        "--transport", transport)
    (prod / "warm").write_bytes(b"x" * 100_000)  # one pull first: UCX endpoints come and go
    assert (cons / "warm").read_bytes() == b"x" * 100_000
    pids = [mounts.status(prod)["pid"], mounts.status(cons)["pid"]]
    idle = cpu_share(pids)
    waiter = subprocess.Popen(["cat", str(cons / "group0/a4md_chunk0.dat")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: mounts.status(cons)["waiting"] == 1, 20, "the consumer to wait")
        waiting = cpu_share(pids)
    finally:
        waiter.kill()
        waiter.wait()
    print(f"{transport}: idle {idle}, with a consumer waiting {waiting} (share of one core)")
    assert max(idle) < 0.01, f"idle mounts use {idle} of a core"
    assert max(waiting) < 0.01, f"mounts with a waiting consumer use {waiting} of a core"

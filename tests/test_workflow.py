"""The seed notebook's workflow, run by the example scripts exactly as a user runs them."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from .conftest import FUSE_OK, is_fuse_mount

pytestmark = [pytest.mark.mounted,
              pytest.mark.skipif(not FUSE_OK, reason="needs /dev/fuse and fuse3")]
EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "md_workflow"
sys.path.insert(0, str(EXAMPLES))
from frames import make_frame  # noqa: E402


def expected_frames(n: int, atoms: int, seed: int = 42) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [make_frame(i, atoms, rng) for i in range(n)]


def consumer_hashes(out: str) -> list[str]:
    return [line.rsplit("sha256 ", 1)[1] for line in out.splitlines()
            if line.startswith("consumer: frame")]


def test_shared_storage_scenario(tmp_path: Path, state_env: dict[str, str]) -> None:
    shared = tmp_path / "md_shared"
    env = {**state_env, "DYADFS": f"{sys.executable} -m dyadfs", "SHARED_DIR": str(shared)}
    r = subprocess.run(["bash", str(EXAMPLES / "run_shared.sh")], capture_output=True,
                       text=True, env=env, timeout=300)
    try:
        assert r.returncode == 0, r.stdout + r.stderr
    finally:
        if is_fuse_mount(shared):
            subprocess.run(["fusermount3", "-uz", str(shared)])
    assert "consumer read 10 of 10 frames" in r.stdout
    want = expected_frames(10, 200)
    assert all(len(w) == 5757 for w in want)
    for i, data in enumerate(want):  # unmounted: these are the files in the directory itself
        assert (shared / "group0" / f"a4md_chunk{i}.dat").read_bytes() == data
    assert (shared.parent / "md_shared.consumer.out").exists()
    got = consumer_hashes((shared.parent / "md_shared.consumer.out").read_text())
    assert got == [hashlib.sha256(d).hexdigest()[:16] for d in want]
    assert not os.path.ismount(shared)

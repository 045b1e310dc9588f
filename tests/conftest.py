"""Fixtures: isolated state directories, and real mounts that are always unmounted.

Mounted tests start the real ``dyadfs`` command in a subprocess (as s3ql's tests do), wait for
the mount while checking the daemon is alive, unmount in teardown even after a failure, and
fail the test if the daemon logged a traceback or an unexpected error.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

FUSE_OK = os.path.exists("/dev/fuse") and shutil.which("fusermount3") is not None
needs_fuse = pytest.mark.skipif(not FUSE_OK, reason="needs /dev/fuse and fusermount3 (fuse3)")


def dyadfs_cmd(*args: str, env: dict[str, str] | None = None, check: bool = True,
               timeout: float = 90) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([sys.executable, "-m", "dyadfs", *args], capture_output=True, text=True,
                       env=env, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"dyadfs {' '.join(args)} failed ({r.returncode}):\n"
                             f"{r.stdout}\n{r.stderr}")
    return r


def wait_for(cond, timeout: float = 10.0, what: str = "condition") -> None:  # type: ignore[no-untyped-def]
    """Poll *cond* until true, at most *timeout* seconds (a bounded loop, not a sleep)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def is_fuse_mount(path: Path) -> bool:
    from dyadfs.mount import fuse_mounted
    return fuse_mounted(Path(os.path.abspath(path)))


class Mounts:
    """Starts mounts with the real CLI; tears every one of them down."""

    def __init__(self, state: Path, env: dict[str, str]) -> None:
        self.state = state
        self.env = env
        self.mounted: list[tuple[Path, list[str] | None]] = []

    def mount(self, path: Path, *opts: str, env: dict[str, str] | None = None,
              prefix: list[str] | None = None) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        log = self.state / f"log-{len(self.mounted)}-{path.name}.txt"
        cmd = [*(prefix or []), sys.executable, "-m", "dyadfs", "mount", str(path),
               "--log", str(log), *opts]
        self.mounted.append((path, prefix))
        r = subprocess.run(cmd, capture_output=True, text=True, env=env or self.env, timeout=90)
        if r.returncode != 0:
            raise AssertionError(f"mount failed: {r.stderr}\n{log.read_text() if log.exists() else ''}")
        assert is_fuse_mount(path)
        return path

    def umount(self, path: Path) -> None:
        r = subprocess.run([sys.executable, "-m", "dyadfs", "umount", str(path)],
                           capture_output=True, text=True, env=self.env, timeout=90)
        assert r.returncode == 0, r.stderr

    def status(self, path: Path) -> dict:  # type: ignore[type-arg]
        import json
        return json.loads(dyadfs_cmd("status", "--json", str(path), env=self.env).stdout)

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.state.glob("log-*")))

    def teardown(self) -> None:
        for path, _ in reversed(self.mounted):
            if is_fuse_mount(path):
                r = subprocess.run([sys.executable, "-m", "dyadfs", "umount", str(path)],
                                   capture_output=True, text=True, env=self.env, timeout=90)
                if r.returncode != 0 and is_fuse_mount(path):
                    subprocess.run(["fusermount3", "-uz", str(path)], capture_output=True)
        # A daemon whose mount is gone but which did not exit is a bug; never leave it running.
        for info in (self.state / "mounts").glob("*.json") if (self.state / "mounts").exists() \
                else []:
            try:
                import json
                pid = json.loads(info.read_text())["pid"]
                os.kill(pid, signal.SIGKILL)
            except (OSError, ValueError, KeyError):
                pass


@pytest.fixture
def state_env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["DYADFS_STATE_DIR"] = str(tmp_path / "state")
    env.pop("FLUX_URI", None)
    for k in list(env):
        if k.startswith("DYAD_") or (k.startswith("DYADFS_") and k != "DYADFS_STATE_DIR"):
            del env[k]
    return env


@pytest.fixture
def mounts(tmp_path: Path, state_env: dict[str, str]) -> Iterator[Mounts]:
    if not FUSE_OK:
        pytest.skip("needs /dev/fuse and fusermount3 (fuse3)")
    m = Mounts(Path(state_env["DYADFS_STATE_DIR"]), state_env)
    m.state.mkdir(parents=True, exist_ok=True)
    try:
        yield m
    finally:
        m.teardown()
    logs = m.logs()
    bad = [ln for ln in logs.splitlines() if "Traceback" in ln or "unexpected error" in ln]
    assert not bad, "the daemon logged errors:\n" + logs


def run(cmd: list[str] | str, timeout: float = 60, check: bool = True,
        **kw) -> subprocess.CompletedProcess[bytes]:  # type: ignore[no-untyped-def]
    """Run an unmodified program."""
    r = subprocess.run(cmd, capture_output=True, timeout=timeout, shell=isinstance(cmd, str), **kw)
    if check and r.returncode != 0:
        raise AssertionError(f"{cmd} failed ({r.returncode}): {r.stderr.decode(errors='replace')}")
    return r

"""Real mounts for the bench and the tests: started with the real ``dyadfs mount`` command in
subprocesses (as a user starts them), always unmounted at the end, whatever happened.

The tests' fixture (tests/conftest.py) extends :class:`Mounts` with what only tests need (Flux
instances, log checks); ``dyadfs bench`` uses it as it is.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from .. import config
from ..errors import UsageError
from ..mount import info_path, query_socket
from ..mountinfo import fuse_mounted

TIMEOUT = 90.0


class Mounts:
    """Mounts started with the real CLI; :meth:`close` tears every one of them down.

    *state* is the mounts' ``DYADFS_STATE_DIR`` (their embedded KVS, records and logs)."""

    def __init__(self, state: Path, env: dict[str, str]) -> None:
        self.state = state
        self.env = {**env, "DYADFS_STATE_DIR": str(state)}
        self.mounted: list[Path] = []

    def options(self, path: Path, opts: tuple[str, ...]) -> tuple[list[str], dict[str, str]]:
        """The command-line options and environment of a mount (subclasses add to them)."""
        return list(opts), self.env

    def mount(self, path: Path, *opts: str, env: dict[str, str] | None = None,
              prefix: list[str] | None = None) -> Path:
        """Mount *path* with *opts*; returns once it is mounted (or raises with its log)."""
        path.mkdir(parents=True, exist_ok=True)
        self.state.mkdir(mode=0o700, parents=True, exist_ok=True)
        log = self.state / f"log-{len(self.mounted)}-{path.name}.txt"
        args, env = self.options(path, opts) if env is None else (list(opts), env)
        cmd = [*(prefix or []), sys.executable, "-m", "dyadfs", "mount", str(path),
               "--log", str(log), *args]
        self.mounted.append(path)
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=TIMEOUT)
        if r.returncode != 0:
            logged = log.read_text(errors="replace") if log.exists() else ""
            raise UsageError(f"cannot mount {path}: {r.stderr.strip()}\n{logged}")
        if not fuse_mounted(Path(os.path.abspath(path))):
            raise UsageError(f"{path}: dyadfs mount returned but nothing is mounted")
        return path

    def umount(self, path: Path) -> None:
        r = subprocess.run([sys.executable, "-m", "dyadfs", "umount", str(path)],
                           capture_output=True, text=True, env=self.env, timeout=TIMEOUT)
        if r.returncode != 0:
            raise UsageError(f"cannot unmount {path}: {r.stderr.strip()}")

    def control(self, path: Path, request: dict[str, Any] | None = None,
                timeout: float = 30.0) -> dict[str, Any]:
        """A request to the daemon of the mount at *path* (default: its status)."""
        cfg = config.build(path, {}, env=self.env)
        try:
            info = json.loads(info_path(cfg).read_text())
        except (OSError, ValueError):
            raise UsageError(f"{path}: not a running dyadfs mount") from None
        return query_socket(info["socket"], timeout, request)

    def status(self, path: Path) -> dict[str, Any]:
        return self.control(path)

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.state.glob("log-*")))

    def close(self) -> None:
        """Unmount everything (lazily if it must), and kill any daemon left behind: a daemon
        whose mount is gone but which did not exit is a bug, never to be left running."""
        for path in reversed(self.mounted):
            if fuse_mounted(Path(os.path.abspath(path))):
                try:
                    self.umount(path)
                except (UsageError, subprocess.TimeoutExpired):
                    pass
                if fuse_mounted(Path(os.path.abspath(path))):
                    subprocess.run(["fusermount3", "-uz", str(path)], capture_output=True)
        self.mounted.clear()
        records = self.state / "mounts"
        for info in records.glob("*.json") if records.exists() else []:
            try:
                os.kill(int(json.loads(info.read_text())["pid"]), signal.SIGKILL)
            except (OSError, ValueError, KeyError):
                pass

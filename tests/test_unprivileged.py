"""An unprivileged user whose /dev/fuse cannot be opened gets one line that says what to check.

HPC users are never root. The test needs root only to arrange the situation without touching
the machine: in a private mount namespace it hides /dev/fuse behind a root-owned 0600 file, then
drops to an ordinary user and runs ``dyadfs mount`` with the code under test.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

DYADFS_PKG = Path(__file__).resolve().parent.parent / "dyadfs"
# An interpreter with dyadfs's dependencies that another user can run: pyenv's Python under
# /root is not; .ci/install makes this venv on the system Python.
CI_VENV_PYTHON = Path("/opt/dyadfs-venv/bin/python")


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A directory other users can enter (pytest's own lives under a 0700 directory)."""
    path = Path(tempfile.mkdtemp(prefix="dyadfs-unpriv-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _user() -> pwd.struct_passwd:
    for name in ("dyadfs-ci", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    pytest.skip("no unprivileged user (dyadfs-ci or nobody) to run as")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: it hides /dev/fuse from another user "
                    "in a private mount namespace")
@pytest.mark.skipif(shutil.which("unshare") is None or shutil.which("setpriv") is None,
                    reason="needs unshare and setpriv (util-linux)")
@pytest.mark.skipif(not CI_VENV_PYTHON.exists(),
                    reason=f"needs {CI_VENV_PYTHON}, a Python another user can run "
                    "(made by .ci/install)")
def test_unusable_dev_fuse_is_one_clear_line(shared_tmp: Path) -> None:
    tmp_path = shared_tmp
    user = _user()
    code = tmp_path / "code"
    shutil.copytree(DYADFS_PKG, code / "dyadfs",
                    ignore=shutil.ignore_patterns("__pycache__"))
    home = tmp_path / "home"
    mp = home / "mp"
    mp.mkdir(parents=True)
    for p in (home, mp):
        os.chown(p, user.pw_uid, user.pw_gid)
    for root, dirs, files in os.walk(code):
        for n in [*dirs, *files]:
            os.chmod(os.path.join(root, n), 0o755)
    hidden = tmp_path / "no-fuse"
    hidden.write_bytes(b"")
    hidden.chmod(0o600)
    env = ["env", "-i", f"HOME={home}", "PATH=/usr/bin:/bin", f"PYTHONPATH={code}",
           f"DYADFS_STATE_DIR={home / 'state'}"]
    script = ('mount --bind "$1" /dev/fuse && shift && exec "$@"')
    r = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
         str(hidden), "setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}",
         "--clear-groups", *env, str(CI_VENV_PYTHON), "-m", "dyadfs", "mount", str(mp),
         "--role", "producer", "--transport", "tcp", "--namespace", "unpriv"],
        capture_output=True, text=True, timeout=60, cwd=home)
    lines = r.stderr.splitlines()
    assert r.returncode == 1, r.stderr
    assert len(lines) == 1, r.stderr
    assert "/dev/fuse" in lines[0] and "fusermount3" in lines[0], r.stderr
    assert "Traceback" not in r.stderr and "+---" not in r.stderr
    assert not os.path.ismount(mp)
    assert str(code) in subprocess.run(  # the code under test ran, not an installed copy
        ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups",
         *env, str(CI_VENV_PYTHON), "-c", "import dyadfs; print(dyadfs.__file__)"],
        capture_output=True, text=True, timeout=60, cwd=home).stdout

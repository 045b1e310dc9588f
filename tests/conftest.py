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

from dyadfs.bench import harness
from dyadfs.mountinfo import fuse_mounted


def _fuse_usable() -> bool:
    """/dev/fuse opens read-write for this user (an unprivileged user needs mode 0666) and
    fusermount3 is there."""
    if shutil.which("fusermount3") is None:
        return False
    try:
        os.close(os.open("/dev/fuse", os.O_RDWR))
    except OSError:
        return False
    return True


FUSE_OK = _fuse_usable()
FUSE_SKIP = ("needs /dev/fuse readable and writable by this user and fusermount3 (fuse3; "
             "see ls -l /dev/fuse)")
needs_fuse = pytest.mark.skipif(not FUSE_OK, reason=FUSE_SKIP)
ROOT = os.geteuid() == 0


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Unprivileged, the tests that need root skip, and say so (``-ra`` prints the reason)."""
    if ROOT:
        return
    skip = pytest.mark.skip(reason="needs root: network namespaces (ip netns add) are "
                            "root's; run as root to emulate several nodes")
    for item in items:
        if item.get_closest_marker("netns") is not None:
            item.add_marker(skip)


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
    return fuse_mounted(Path(os.path.abspath(path)))


class FluxInstance:
    """A real ``flux start --test-size=2`` for the whole session: two brokers on this machine."""

    def __init__(self, workdir: Path) -> None:
        uris = workdir / "uris"
        script = (f"printenv FLUX_URI > {uris}.tmp && flux exec -r 1 printenv FLUX_URI >> "
                  f"{uris}.tmp && mv {uris}.tmp {uris} && exec sleep 7200")
        env = {k: v for k, v in os.environ.items() if k != "FLUX_URI"}
        self.proc = subprocess.Popen(["flux", "start", "--test-size=2", "bash", "-c", script],
                                     start_new_session=True, env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: uris.exists() or self.proc.poll() is not None, 120, "flux start")
        if not uris.exists():
            raise RuntimeError("flux start --test-size=2 failed")
        self.uris = uris.read_text().split()

    def env(self, rank: int = 0) -> dict[str, str]:
        return {**os.environ, "FLUX_URI": self.uris[rank]}

    def flux(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["flux", *args], capture_output=True, text=True,
                              env=self.env(), timeout=60)

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(30)
        except (OSError, subprocess.TimeoutExpired):
            os.killpg(self.proc.pid, signal.SIGKILL)


def same_host_or_network(args: list[str]) -> list[str]:
    """Every mount of a test runs on this one host, where pulls would all take the same-host
    path (transport/local.py). A test that names a network transport gets it
    (``--same-host off``); ``--transport local`` means the default: same host, on."""
    if "--transport" not in args or "--same-host" in args:
        return args
    i = args.index("--transport")
    if args[i + 1] == "local":
        return args[:i] + args[i + 2:]
    return [*args, "--same-host", "off"]


class Mounts(harness.Mounts):
    """The shared harness's mounts, plus the tests' Flux instance: with one, mounts use the Flux
    KVS, consumers on the second broker and everything else on the first (two "nodes")."""

    def __init__(self, state: Path, env: dict[str, str],
                 flux: FluxInstance | None = None) -> None:
        super().__init__(state, env)
        self.flux = flux
        self.tag = os.urandom(4).hex()

    def ns(self, name: str) -> str:
        """The namespace a test's *name* stands for: one Flux instance serves every test, so
        each test gets namespaces of its own there (a removed namespace lingers a moment)."""
        return name if self.flux is None else f"{name}-{self.tag}"

    @property
    def backend(self) -> str:
        return "local" if self.flux is None else "flux"

    def options(self, path: Path, opts: tuple[str, ...]) -> tuple[list[str], dict[str, str]]:
        args, env = same_host_or_network(list(opts)), self.env
        if self.flux is not None:
            rank = 1 if "consumer" in opts else 0
            env = {**self.env, "FLUX_URI": self.flux.uris[rank]}
            args += ["--kvs", "flux"]
            args = [self.ns(a) if i and args[i - 1] == "--namespace" else a
                    for i, a in enumerate(args)]
        return args, env

    def teardown(self) -> None:
        self.close()


@pytest.fixture
def state_env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["DYADFS_STATE_DIR"] = str(tmp_path / "state")
    env.pop("FLUX_URI", None)
    for k in list(env):
        if k.startswith("DYAD_") or (k.startswith("DYADFS_") and k != "DYADFS_STATE_DIR"):
            del env[k]
    return env


FLUX_OK = shutil.which("flux") is not None
_flux_instance: list[FluxInstance] = []


@pytest.fixture(scope="session")
def flux_instance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FluxInstance]:
    if not FLUX_OK:
        pytest.skip("no flux command: flux-core is not installed (Flux tests skipped)")
    inst = FluxInstance(tmp_path_factory.mktemp("flux"))
    try:
        yield inst
    finally:
        inst.stop()


@pytest.fixture
def kvs_backend(request: pytest.FixtureRequest) -> str:
    """Which KVS the mounts use: local, unless a test parametrizes it (``BOTH_KVS``)."""
    backend = str(getattr(request, "param", "local"))
    if backend == "flux" and not FLUX_OK:
        pytest.skip("no flux command: flux-core is not installed (Flux tests skipped)")
    return backend


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A failing test that mounted shows the end of its mounts' logs in the report: a failure
    seen once in CI then says what the daemons did."""
    outcome = yield
    rep = outcome.get_result()  # type: ignore[attr-defined]
    m = getattr(item, "funcargs", {}).get("mounts")
    if rep.failed and call.when == "call" and isinstance(m, Mounts):
        try:
            tail = "\n".join(m.logs().splitlines()[-80:])
        except OSError as e:
            tail = f"(the logs could not be read: {e})"
        rep.sections.append(("dyadfs mount logs (last 80 lines)", tail))


@pytest.fixture
def mounts(tmp_path: Path, state_env: dict[str, str], kvs_backend: str,
           request: pytest.FixtureRequest) -> Iterator[Mounts]:
    if not FUSE_OK:
        pytest.skip(FUSE_SKIP)
    flux = None
    if kvs_backend == "flux":
        flux = request.getfixturevalue("flux_instance")
    m = Mounts(Path(state_env["DYADFS_STATE_DIR"]), state_env, flux)
    m.state.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        yield m
    finally:
        m.teardown()
    logs = m.logs()
    bad = [ln for ln in logs.splitlines() if "Traceback" in ln or "unexpected error" in ln]
    assert not bad, "the daemon logged errors:\n" + logs


def kvs_get(mounts: Mounts, ns: str, key: str) -> bytes | None:
    """A key's value, read through the same KVS the mounts use."""
    import trio

    async def get() -> bytes | None:
        if mounts.flux is not None:
            os.environ["FLUX_URI"] = mounts.flux.uris[0]
            try:
                from dyadfs.kvs.flux import FluxKVS
                kvs = FluxKVS(mounts.flux.uris[0])
                return await kvs.get(mounts.ns(ns), key)
            finally:
                del os.environ["FLUX_URI"]
        from dyadfs.kvs.local import LocalKVS
        local = LocalKVS(mounts.state / "kvs.sqlite")
        try:
            return await local.get(ns, key)
        finally:
            await local.aclose()
    return trio.run(get)


BOTH_KVS = ["local", pytest.param("flux", marks=pytest.mark.flux)]


def both_kvs(request: pytest.FixtureRequest) -> str:
    """Param for a module's kvs_backend fixture: local always, flux when installed."""
    if request.param == "flux" and not FLUX_OK:
        pytest.skip("no flux command: flux-core is not installed (Flux tests skipped)")
    return str(request.param)


def run(cmd: list[str] | str, timeout: float = 60, check: bool = True,
        **kw) -> subprocess.CompletedProcess[bytes]:  # type: ignore[no-untyped-def]
    """Run an unmodified program."""
    r = subprocess.run(cmd, capture_output=True, timeout=timeout, shell=isinstance(cmd, str), **kw)
    if check and r.returncode != 0:
        raise AssertionError(f"{cmd} failed ({r.returncode}): {r.stderr.decode(errors='replace')}")
    return r


class FeedLog:
    """Collects a KVS change feed (``kvs.follow(ns, feed)``) so that a test can wait on it."""

    def __init__(self) -> None:
        import trio
        self.got: list[list[str] | None] = []
        self._event = trio.Event()

    def __call__(self, keys: list[str] | None) -> None:
        import trio
        self.got.append(keys)
        self._event.set()
        self._event = trio.Event()

    def keys(self, skip: int = 1) -> list[str]:
        return [k for batch in self.got[skip:] for k in (batch or [])]

    async def until(self, count: int, skip: int = 1) -> None:
        """Until *count* batches came, or *count* keys after the first *skip* batches."""
        import trio
        with trio.fail_after(20):
            while len(self.got) < count if skip < 0 else len(self.keys(skip)) < count:
                await self._event.wait()


# -- unmodified C programs, and small file systems that fill up --------------------------------
C_DIR = Path(__file__).parent / "c"


class CPrograms:
    """The test programs of tests/c/, compiled once per session: ``cprogs.reader`` etc."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir

    def __getattr__(self, name: str) -> str:
        path = self.bindir / name
        if not path.exists():
            raise AttributeError(name)
        return str(path)


@pytest.fixture(scope="session")
def cprogs(tmp_path_factory: pytest.TempPathFactory) -> CPrograms:
    cc = shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler (cc): the C test programs cannot be built")
    bindir = tmp_path_factory.mktemp("cbin")
    for src in sorted(C_DIR.glob("*.c")):
        r = subprocess.run([cc, "-O2", "-Wall", "-Werror", "-o", str(bindir / src.stem),
                            str(src)], capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise AssertionError(f"cc {src.name} failed:\n{r.stderr}")
    return CPrograms(bindir)


@pytest.fixture
def tmpfs(tmp_path: Path, mounts: Mounts) -> Iterator[object]:
    """``tmpfs(path, size)`` mounts a small tmpfs at *path* (root only). Teardown unmounts the
    test's FUSE mounts first (they may keep files open on it), then every tmpfs."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs (a disk that fills up) needs root")
    made: list[Path] = []

    def mount(path: Path, size: str) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs",
                        str(path)], check=True, capture_output=True, timeout=30)
        made.append(path)
        return path

    try:
        yield mount
    finally:
        mounts.teardown()
        for path in reversed(made):
            r = subprocess.run(["umount", str(path)], capture_output=True, timeout=30)
            if r.returncode != 0:
                subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


@pytest.fixture
def spawn(mounts: Mounts) -> Iterator[object]:
    """``spawn(cmd, **popen_kw)`` starts a background program (stdout and stderr piped unless
    given). Teardown kills what is still running before the mounts are unmounted: a reader
    blocked in a waiting open would keep its mount busy."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(cmd: list[str], **kw) -> subprocess.Popen[bytes]:  # type: ignore[no-untyped-def]
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        p = subprocess.Popen(cmd, start_new_session=True, **kw)
        procs.append(p)
        return p

    try:
        yield start
    finally:
        for p in procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except OSError:
                    pass
            try:
                p.communicate(timeout=15)
            except (subprocess.TimeoutExpired, ValueError):
                pass

"""The side-by-side rows (``dyadfs bench --peer PREFIX``, issue 12): the same C client programs
on DYAD (UCX and Flux RPC DTLs, two brokers of ``flux start --test-size=2``) and on two dyadfs
mounts (embedded KVS, each transport), files in /dev/shm, in one run.

The programs (``c/producer.c``, ``c/consumer.c``, shipped with the package) are compiled at
bench time with ``cc -O2``. They print CLOCK_MONOTONIC times, comparable across processes on one
host, and the consumer checks every file's bytes against the producer's pattern: a run whose
content is wrong is reported as failed, never timed.

- frame latency: the consumer is started first and waits in open(); the producer writes
  5,757 B frames one at a time, a pause between them; producer's close() returned -> the
  consumer's open() returned.
- bulk: the producer writes every file of a size (under both systems its close() returns once
  the file is published), then the consumer times open() + read to EOF of each.
- the producer's open+write+close of each file of the bulk run.

DYAD runs inside ``flux start``: this module is the driver there too (``python -m
dyadfs.bench.peer DRIVE CONFIG OUT``), so both systems are measured by the same code
(:func:`measure`). Every wait is bounded: a DYAD hang costs a bounded time and is reported.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import UsageError
from .figures import FRAME, MiB, _ms, mounts

SEED = 20261203
PAUSE_MS = 20  # between frames: the consumer is waiting again long before the next one
SETTLE = 0.5  # after the consumer said "ready", so that its first open() is waiting
MODES = {"dyad_ucx": "UCX", "dyad_flux_rpc": "FLUX_RPC"}
SHM = Path("/dev/shm")


class PeerError(Exception):
    """A column that could not be measured (a failed, hung or wrong run): reported, not raised
    out of the bench."""


@dataclass(frozen=True)
class PeerPlan:
    frames: int
    sizes: list[int]
    files: int


@dataclass(frozen=True)
class Clients:
    producer: str
    consumer: str


def check_prefix(prefix: str) -> Path:
    """A DYAD install prefix as ``--peer`` needs it, or a one-line error."""
    p = Path(prefix).resolve()
    missing = [f for f in ("lib/dyad.so", "lib/libdyad_wrapper.so") if not (p / f).is_file()]
    if missing:
        raise UsageError(f"--peer {prefix}: no {' or '.join(missing)} there (a DYAD install "
                         f"prefix, built with CMake and -DDYAD_ENABLE_UCX_DATA=ON)")
    if shutil.which("flux") is None:
        raise UsageError("--peer: no flux command on PATH (put flux-core's bin directory on "
                         "PATH)")
    return p


def compile_clients(into: Path) -> Clients:
    """The C programs, built with ``cc -O2`` into *into*."""
    cc = shutil.which("cc")
    if cc is None:
        raise UsageError("bench: the C client rows need a C compiler (cc)")
    out = {}
    with importlib.resources.as_file(importlib.resources.files(__package__) / "c") as src:
        for name in ("producer", "consumer"):
            exe = into / f"peer-{name}"
            r = subprocess.run([cc, "-O2", "-o", str(exe), str(src / f"{name}.c")],
                               capture_output=True, text=True, timeout=120)
            if r.returncode != 0:
                raise UsageError(f"bench: cannot compile {name}.c: {r.stderr.strip()}")
            out[name] = str(exe)
    return Clients(**out)


# -- running the programs -------------------------------------------------------------------------
@dataclass(frozen=True)
class Side:
    """How one system runs the programs: a command prefix for each (DYAD's LD_PRELOAD
    environment, ``flux exec -r 1`` for its consumer; none for dyadfs) and the directories."""

    prod_dir: Path
    cons_dir: Path
    scratch: Path  # a plain directory, for the consumer's sign that it is about to open
    prod_prefix: tuple[str, ...] = ()
    cons_prefix: tuple[str, ...] = ()


class _Proc:
    """A program whose output goes to files (never a pipe that could fill and stall it), so
    that every wait on it is bounded."""

    def __init__(self, cmd: list[str], what: str, out: Path) -> None:
        self.what, self.out, self.err = what, out, out.with_suffix(".err")
        with open(self.out, "wb") as o, open(self.err, "wb") as e:
            self.proc = subprocess.Popen(cmd, stdout=o, stderr=e, start_new_session=True)

    def wait_for(self, path: Path, timeout: float) -> None:
        """Until *path* exists (the program made it), while the program runs."""
        deadline = time.monotonic() + timeout
        while not path.exists():
            if self.proc.poll() is not None:
                raise PeerError(f"{self.what} ended at once ({self.proc.returncode}): "
                                f"{self._errors()}")
            if time.monotonic() > deadline:
                self.kill()
                raise PeerError(f"{self.what}: did not start in {timeout:.0f} s")
            time.sleep(0.005)

    def finish(self, timeout: float) -> list[str]:
        """Its output lines, once it ended (killed after *timeout* seconds)."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise PeerError(f"{self.what}: no end after {timeout:.0f} s (hung)") from None
        lines = self.out.read_text(errors="replace").splitlines()
        if self.proc.returncode != 0 and not lines:
            raise PeerError(f"{self.what} failed ({self.proc.returncode}): {self._errors()}")
        return lines

    def kill(self) -> None:
        with contextlib.suppress(OSError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)

    def _errors(self) -> str:
        return self.err.read_text(errors="replace").strip()[-500:] or "no message"


@dataclass(frozen=True)
class Read:
    call: int
    opened: int
    done: int
    size: int
    ok: bool


def _reads(lines: list[str], n: int, size: int, what: str) -> list[Read]:
    """The consumer's lines; a PeerError unless all *n* files were whole and right."""
    reads = [Read(int(f[1]), int(f[2]), int(f[3]), int(f[4]), f[5] == "1")
             for f in (line.split() for line in lines) if len(f) == 6]
    bad = [f"file {i}: {r.size} B{'' if r.size != size else ', wrong bytes'}"
           for i, r in enumerate(reads) if not r.ok]
    if len(reads) != n or bad:
        raise PeerError(f"{what}: {len(reads)} of {n} files read, {len(bad)} wrong (want "
                        f"{size} B each){': ' + '; '.join(bad[:3]) if bad else ''}")
    return reads


def _writes(lines: list[str], n: int, what: str) -> list[tuple[int, int]]:
    out = [(int(f[1]), int(f[2])) for f in (line.split() for line in lines) if len(f) == 3]
    if len(out) != n:
        raise PeerError(f"{what}: {len(out)} of {n} files written")
    return out


def _run_producer(side: Side, clients: Clients, size: int, seed: int, pause_ms: int,
                  names: list[str], timeout: float) -> list[tuple[int, int]]:
    prod = _Proc([*side.prod_prefix, clients.producer, str(size), str(seed), str(pause_ms),
                  *(str(side.prod_dir / n) for n in names)], "the producer",
                 side.scratch / f"producer-{names[0]}-{seed}.out")
    return _writes(prod.finish(timeout), len(names), "the producer")


def _start_consumer(side: Side, clients: Clients, size: int, seed: int,
                    names: list[str]) -> _Proc:
    ready = side.scratch / f"ready-{names[0]}-{seed}"
    cons = _Proc([*side.cons_prefix, clients.consumer, str(size), str(seed), str(ready),
                  *(str(side.cons_dir / n) for n in names)], "the consumer",
                 side.scratch / f"consumer-{names[0]}-{seed}.out")
    cons.wait_for(ready, 120)
    return cons


def frame_figure(side: Side, clients: Clients, n: int, seed: int = SEED) -> dict[str, Any]:
    """Producer's close() returned -> the waiting consumer's open() returned, per frame."""
    names = [f"frame{i}" for i in range(n)]
    cons = _start_consumer(side, clients, FRAME, seed, names)
    try:
        time.sleep(SETTLE)
        closes = _run_producer(side, clients, FRAME, seed, PAUSE_MS, names,
                               60 + n * (PAUSE_MS / 1e3 + 1))
        reads = _reads(cons.finish(60), n, FRAME, "the frame consumer")
    finally:
        cons.kill()
    lat = [(r.opened - c[1]) / 1e9 for r, c in zip(reads, closes, strict=True)]
    return {**_ms(lat), "content_checked": sum(r.ok for r in reads),
            "samples_ms": [round(x * 1e3, 3) for x in lat]}


def bulk_figures(side: Side, clients: Clients, sizes: list[int], files: int,
                 seed: int = SEED) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Per size: the consumer's open+read to EOF of published files, and the producer's
    open+write+close of them (medians)."""
    reads, writes = [], []
    for k, size in enumerate(sizes):
        names = [f"bulk{size}-{i}" for i in range(files)]
        budget = 60 + files * (1 + size / (10 * MiB))
        w = _run_producer(side, clients, size, seed + 1 + k, 0, names, budget)
        cons = _start_consumer(side, clients, size, seed + 1 + k, names)
        try:
            r = _reads(cons.finish(budget), files, size, f"the {size} B consumer")
        finally:
            cons.kill()
        reads.append({"size_bytes": size, "files": files, "content_checked": sum(
            x.ok for x in r), "median_ms": round(
            statistics.median((x.done - x.call) / 1e6 for x in r), 3)})
        writes.append({"size_bytes": size, "files": files, "median_ms": round(
            statistics.median((b - a) / 1e6 for a, b in w), 3),
            # the first file of a producer process: DYAD sets itself up there
            "first_ms": round((w[0][1] - w[0][0]) / 1e6, 3)})
    return reads, writes


def measure(side: Side, clients: Clients, plan: PeerPlan) -> dict[str, Any]:
    """Every peer figure on one system (the same code for DYAD and dyadfs)."""
    frames = frame_figure(side, clients, plan.frames)
    reads, writes = bulk_figures(side, clients, plan.sizes, plan.files)
    return {"frame_latency": frames, "open_read": reads, "write": writes}


# -- dyadfs ---------------------------------------------------------------------------------------
def dyadfs_column(env: dict[str, str], transport: str, clients: Clients, plan: PeerPlan,
                  root: Path) -> dict[str, Any]:
    """Two mounts (producer, consumer) of the bench's harness, default options but the
    transport's (run.transport_options: "local" is the default, the others pull over the
    network with --same-host off), backing directories under *root*."""
    from .run import transport_options

    root.mkdir()
    with mounts(root, env) as m:
        ns = ["--namespace", f"peer-{transport}-{os.getpid()}", *transport_options(transport)]
        prod, _ = m.mount_named("prod", "--role", "producer", *ns)
        cons, _ = m.mount_named("cons", "--role", "consumer", *ns)
        return measure(Side(prod, cons, root), clients, plan)


# -- DYAD -----------------------------------------------------------------------------------------
def _dyad_budget(plan: PeerPlan) -> float:
    """The longest a whole DYAD column may take before ``flux start`` is ended."""
    return 180 + plan.frames * 2 + plan.files * sum(2 + s / (5 * MiB) for s in plan.sizes)


def dyad_column(prefix: Path, mode: str, clients: Clients, plan: PeerPlan, root: Path,
                env: dict[str, str]) -> dict[str, Any]:
    """One DTL: ``flux start --test-size=2`` running this module's driver (:func:`_drive`)."""
    root.mkdir()
    cfg = {"prefix": str(prefix), "mode": mode, "clients": asdict(clients),
           "plan": asdict(plan), "prod": str(root / "prod"), "cons": str(root / "cons"),
           "namespace": f"dyadfs_peer_{mode.lower()}_{os.getpid()}"}
    (root / "config.json").write_text(json.dumps(cfg))
    out, log = root / "result.json", root / "flux.log"
    package_parent = str(Path(__file__).resolve().parents[2])
    fenv = {k: v for k, v in env.items() if not k.startswith(("FLUX_", "DYAD_"))}
    fenv["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent,
                                                     env.get("PYTHONPATH")) if p)
    budget = _dyad_budget(plan)
    with open(log, "wb") as logf:
        proc = subprocess.Popen(["flux", "start", "--test-size=2", sys.executable, "-m",
                                 __name__, "DRIVE", str(root / "config.json"), str(out)],
                                env=fenv, stdout=logf, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            proc.wait(budget)
        except subprocess.TimeoutExpired:
            _end_group(proc)
            return {"error": f"DYAD {mode}: no result in {budget:.0f} s (hung); ended "
                             f"flux start"}
        finally:
            _end_group(proc)
    try:
        res: dict[str, Any] = json.loads(out.read_text())
    except (OSError, ValueError):
        tail = log.read_text(errors="replace").strip()[-600:]
        return {"error": f"DYAD {mode}: flux start exited {proc.returncode} with no result: "
                         f"{tail}"}
    return res


def _end_group(proc: subprocess.Popen[bytes]) -> None:
    """End ``flux start`` and what it started: TERM (the brokers end their subprocesses),
    then KILL."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 30.0), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(wait)
            return


def _flux(*args: str, timeout: float = 60) -> None:
    try:
        r = subprocess.run(["flux", *args], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise PeerError(f"flux {' '.join(args)}: no end after {timeout:.0f} s") from None
    if r.returncode != 0:
        raise PeerError(f"flux {' '.join(args)} failed: {r.stderr.strip()[-400:]}")


def _drive(config: Path, out: Path) -> int:
    """Inside ``flux start --test-size=2``, on rank 0: DYAD's module on both brokers serving
    the producer's directory, the producer here and the consumer on rank 1."""
    cfg = json.loads(config.read_text())
    prefix, mode, ns = Path(cfg["prefix"]), cfg["mode"], cfg["namespace"]
    prod, cons = Path(cfg["prod"]), Path(cfg["cons"])
    prod.mkdir(parents=True, exist_ok=True)
    cons.mkdir(parents=True, exist_ok=True)  # DYAD's consumer directory must exist
    common = (f"LD_PRELOAD={prefix / 'lib/libdyad_wrapper.so'}", f"DYAD_KVS_NAMESPACE={ns}",
              f"DYAD_DTL_MODE={mode}")
    side = Side(prod, cons, config.parent, ("env", *common, f"DYAD_PATH_PRODUCER={prod}"),
                ("flux", "exec", "-r", "1", "env", *common, f"DYAD_PATH_CONSUMER={cons}"))
    try:
        _flux("kvs", "namespace", "create", ns)
        # the module's mode must match the clients' DYAD_DTL_MODE (else hangs or crashes)
        _flux("exec", "-r", "all", "flux", "module", "load", str(prefix / "lib/dyad.so"),
              f"--mode={mode}", str(prod))
        res = measure(side, Clients(**cfg["clients"]), PeerPlan(**cfg["plan"]))
    except PeerError as e:
        res = {"error": f"DYAD {mode}: {e}"}
    out.write_text(json.dumps(res))
    with contextlib.suppress(PeerError):
        _flux("exec", "-r", "all", "flux", "module", "remove", "dyad", timeout=30)
    return 0


# -- the rows -------------------------------------------------------------------------------------
NO_PEER = ("no --peer PREFIX given: the side-by-side rows need a DYAD install (lib/dyad.so, "
           "lib/libdyad_wrapper.so) and flux-core's flux on PATH")


def peer_figures(prefix: Path | None, env: dict[str, str], plan: PeerPlan,
                 transports: list[str]) -> dict[str, Any]:
    """The columns: DYAD's two DTLs (when *prefix*; else skipped, with the reason), then
    dyadfs over each of *transports*. A column that fails holds its error."""
    res: dict[str, Any] = {"frame_bytes": FRAME, "frames": plan.frames, "files": plan.files,
                           "sizes": plan.sizes, "pause_ms": PAUSE_MS, "columns": {}}
    cols = res["columns"]
    base = Path(tempfile.mkdtemp(prefix="dyadfs-peer-", dir=SHM if SHM.is_dir() else None))
    try:
        clients = compile_clients(base)
        for key, mode in MODES.items():
            cols[key] = ({"skipped": NO_PEER} if prefix is None
                         else dyad_column(prefix, mode, clients, plan, base / key, env))
        for t in transports:
            try:
                cols[f"dyadfs_{t}"] = dyadfs_column(env, t, clients, plan, base / f"dyadfs-{t}")
            except PeerError as e:
                cols[f"dyadfs_{t}"] = {"error": f"dyadfs {t}: {e}"}
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return res


if __name__ == "__main__" and sys.argv[1:2] == ["DRIVE"]:
    sys.exit(_drive(Path(sys.argv[2]), Path(sys.argv[3])))

"""The bench's measurements: each function measures one figure and its baseline, in the same
run, on mounts of the harness. Nothing here is asserted: the bench reports.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import UsageError
from . import harness

MiB = 1 << 20
FRAME = 5757


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


def _ms(seconds: list[float]) -> dict[str, float]:
    return {"p50_ms": round(_pct(seconds, 50) * 1e3, 3),
            "p99_ms": round(_pct(seconds, 99) * 1e3, 3), "n": len(seconds)}


def _mibps(size: int, seconds: float) -> float:
    return round(size / MiB / seconds, 1) if seconds > 0 else float("inf")


def machine_info() -> dict[str, Any]:
    cpu = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    ucx = None
    with contextlib.suppress(Exception):
        import importlib.util
        if importlib.util.find_spec("ucxx") is not None:
            out = subprocess.run([sys.executable, "-c", "import ucxx; print('.'.join(map(str, "
                                  "ucxx.get_ucx_version())))"], capture_output=True, text=True,
                                 timeout=60)
            ucx = out.stdout.strip() or None
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_GiB": round(mem / 2**30, 1),
            "kernel": platform.release(), "python": platform.python_version(), "ucx": ucx,
            "dyadfs": __version__, "when": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


class Mounts(harness.Mounts):
    """The bench's mounts: each over a backing directory of its own, made beside it under
    *root*, so that the backing can be read directly as a baseline."""

    def __init__(self, root: Path, env: dict[str, str]) -> None:
        super().__init__(Path(env["DYADFS_STATE_DIR"]), env)
        self.root = root

    def mount_named(self, name: str, *opts: str) -> tuple[Path, Path]:
        mp, backing = self.root / name, self.root / f"{name}.backing"
        backing.mkdir()
        self.mount(mp, "--backing", str(backing), *opts)
        return mp, backing


@contextlib.contextmanager
def mounts(root: Path, env: dict[str, str]) -> Iterator[Mounts]:
    m = Mounts(root, env)
    try:
        yield m
    finally:
        m.close()


def bench_kvs(root: Path, env: dict[str, str], n: int) -> dict[str, Any]:
    db = root / "kvsbench.sqlite"
    waiter = textwrap.dedent(f"""
        import json, resource, sys, time, trio
        from dyadfs.kvs.local import LocalKVS
        from dyadfs.errors import WaitTimeout
        async def main():
            kvs = LocalKVS({str(db)!r})
            woke = []
            async with trio.open_nursery() as nursery:
                await nursery.start(kvs.run)
                print("ready", flush=True)
                for i in range({n}):
                    await kvs.wait("b", f"k{{i}}", timeout=30)
                    woke.append(time.monotonic_ns())
                r0 = resource.getrusage(resource.RUSAGE_SELF)
                try:
                    await kvs.wait("b", "never", timeout=2.0)
                except WaitTimeout:
                    pass
                r1 = resource.getrusage(resource.RUSAGE_SELF)
                nursery.cancel_scope.cancel()
            cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
            print(json.dumps({{"woke": woke, "idle_cpu": cpu / 2.0}}), flush=True)
        trio.run(main)
    """)
    proc = subprocess.Popen([sys.executable, "-c", waiter], stdout=subprocess.PIPE, text=True,
                            env=env)
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "ready":
        raise UsageError("bench: the KVS waiter did not start")
    import trio

    from ..kvs.local import LocalKVS

    async def commit_all() -> list[int]:
        kvs = LocalKVS(db)
        starts = []
        try:
            for i in range(n):
                await trio.sleep(0.004)  # the waiter is blocked again by then
                starts.append(time.monotonic_ns())
                await kvs.commit("b", {f"k{i}": b"1"})
        finally:
            await kvs.aclose()
        return starts

    starts = trio.run(commit_all)
    out, _ = proc.communicate(timeout=120)
    data = json.loads(out.strip().splitlines()[-1])
    lat = [(w - s) / 1e9 for w, s in zip(data["woke"], starts, strict=True)]
    return {"wake_latency": _ms(lat), "idle_waiter_cpu_share": round(data["idle_cpu"], 5)}


# -- metadata -------------------------------------------------------------------------------------
def _time_each(fn: Any, n: int) -> list[float]:
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        fn(i)
        out.append(time.perf_counter() - t0)
    return out


def bench_metadata(prod: Path, backing: Path, n: int) -> dict[str, Any]:
    res: dict[str, Any] = {}
    for label, base in (("mount", prod), ("backing", backing)):
        d = base / f"meta-{label}"
        d.mkdir()

        def create(i: int, d: Path = d) -> None:
            os.close(os.open(d / f"f{i}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))

        res[f"create_close_{label}"] = _ms(_time_each(create, n))
        target = d / "f0"
        res[f"stat_{label}"] = _ms(_time_each(lambda i, t=target: os.stat(t), n))
    return res


def _ls_l(d: Path) -> float:
    """Seconds for what ``ls -l`` does: list the directory, lstat every entry."""
    t0 = time.perf_counter()
    with os.scandir(d) as it:
        for entry in it:
            entry.stat(follow_symlinks=False)
    return time.perf_counter() - t0


def bench_names(prod: Path, prod_backing: Path, cons: Path, counts: list[int],
                samples: int = 200) -> list[dict[str, Any]]:
    """Lookups and listings against the namespace's size: *n* names published in one directory
    (beside the others made before), then, on the consumer (published, not pulled), stat of
    names of it and ``ls -l`` of it, beside the same on the producer mount and on its backing
    directory (a plain directory)."""
    out = []
    for n in counts:
        d = f"names-{n}"
        (prod / d).mkdir()
        for i in range(n):
            os.close(os.open(prod / d / f"f{i}", os.O_WRONLY | os.O_CREAT, 0o644))
        step = max(1, n // samples)
        names = [f"f{i}" for i in range(0, n, step)][:samples]
        row: dict[str, Any] = {"names": n}
        for label, base in (("consumer", cons), ("producer", prod), ("plain", prod_backing)):
            paths = [base / d / name for name in names]
            stats = _time_each(lambda i, ps=paths: os.lstat(ps[i]), len(paths))
            row[f"stat_{label}"] = _ms(stats)
            row[f"ls_l_{label}_ms"] = round(min(_ls_l(base / d) for _ in range(2)) * 1e3, 2)
        out.append(row)
    return out


# -- frames ---------------------------------------------------------------------------------------
def _write_frame(path: Path, data: bytes) -> float:
    """Write a frame (unbuffered: the bytes go at write()); return when close() was called.

    Latencies count from the call, not the return: the publication happens inside close(), and
    a consumer may have the frame before the producer's close() has returned."""
    f = open(path, "wb", buffering=0)
    try:
        f.write(data)
    finally:
        called = time.perf_counter()
        f.close()
    return called


def frame_latency(prod: Path, cons: Path, n: int, subdir: str) -> dict[str, Any]:
    """Producer calls close() -> consumer open+read done, the consumer already waiting."""
    data = os.urandom(FRAME)
    done: dict[int, float] = {}
    errors: list[BaseException] = []

    def consumer() -> None:
        try:
            for i in range(n):
                with open(cons / subdir / f"f{i}", "rb") as f:
                    if f.read() != data:
                        raise ValueError(f"frame {i} differs")
                done[i] = time.perf_counter()
        except BaseException as e:  # reported below
            errors.append(e)

    t = threading.Thread(target=consumer, daemon=True)
    t.start()
    time.sleep(0.05)
    if prod != cons or not (prod / subdir).exists():
        (prod / subdir).mkdir(exist_ok=True)
    closes: list[float] = []
    for i in range(n):
        time.sleep(0.003)  # the consumer has opened frame i and waits
        closes.append(_write_frame(prod / subdir / f"f{i}", data))
        deadline = time.monotonic() + 60
        while i not in done and not errors and time.monotonic() < deadline:
            time.sleep(0.0001)
    t.join(60)
    if errors or len(done) != n:
        raise UsageError(f"bench: frame latency run failed: {errors[:1] or 'timeout'}")
    lat = [done[i] - closes[i] for i in range(n)]
    return {**_ms(lat), "samples_ms": [round(x * 1e3, 3) for x in lat]}


def frames_per_second(prods: Path, conss: list[Path], n: int, subdir: str) -> dict[str, Any]:
    """The producer writes n frames back to back; every consumer reads them all in order."""
    data = os.urandom(FRAME)
    done: dict[tuple[int, int], float] = {}
    errors: list[BaseException] = []

    def consumer(k: int, cons: Path) -> None:
        try:
            for i in range(n):
                with open(cons / subdir / f"f{i}", "rb") as f:
                    if len(f.read()) != FRAME:
                        raise ValueError("short frame")
                done[(k, i)] = time.perf_counter()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=consumer, args=(k, c), daemon=True)
               for k, c in enumerate(conss)]
    for t in threads:
        t.start()
    time.sleep(0.1)
    (prods / subdir).mkdir()
    closes = []
    t0 = time.perf_counter()
    for i in range(n):
        closes.append(_write_frame(prods / subdir / f"f{i}", data))
    for t in threads:
        t.join(600)
    if errors or len(done) != n * len(conss):
        raise UsageError(f"bench: frames run failed: {errors[:1] or 'timeout'}")
    end = max(done.values())
    lat = [done[(k, i)] - closes[i] for k in range(len(conss)) for i in range(n)]
    return {"frames": n, "consumers": len(conss),
            "frames_per_s": round(n / (end - t0), 1),
            "frames_delivered_per_s": round(n * len(conss) / (end - t0), 1), **_ms(lat)}


def plain_frame_latency(root: Path, n: int) -> dict[str, Any]:
    """Baseline: write+close a frame in a plain directory, then open+read it: no dyadfs."""
    d = root / "plain-frames"
    d.mkdir()
    data = os.urandom(FRAME)
    lat = []
    for i in range(n):
        with open(d / f"f{i}", "wb") as f:
            f.write(data)
        t0 = time.perf_counter()
        with open(d / f"f{i}", "rb") as f:
            f.read()
        lat.append(time.perf_counter() - t0)
    return _ms(lat)


# -- bulk -----------------------------------------------------------------------------------------
def _write_file(path: Path, size: int) -> None:
    block = os.urandom(min(size, MiB)) if size else b""
    with open(path, "wb") as f:
        left = size
        while left > 0:
            f.write(block[:left])
            left -= len(block)


def _read_all(path: Path) -> int:
    n = 0
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(MiB)
        while k := f.readinto(buf):
            n += k
    return n


def bench_pull(m: Mounts, prod: Path, prod_backing: Path, cons: Path, sizes: list[int],
               reps: int, owner: str) -> list[dict[str, Any]]:
    out = []
    (prod / "pull").mkdir()
    for size in sizes:
        r = reps if size <= 64 * MiB else 1
        dy, raw, local = [], [], []
        for rep in range(r):
            name = f"pull/s{size}-{rep}"
            _write_file(prod / name, size)
            t0 = time.perf_counter()
            got = _read_all(cons / name)
            dy.append(time.perf_counter() - t0)
            if got != size:
                raise UsageError(f"bench: pulled {got} of {size} bytes")
            ans = m.control(cons, {"cmd": "raw", "owner": owner, "size": size}, timeout=300)
            if "error" in ans:
                raise UsageError(f"bench: raw transfer failed: {ans['error']}")
            raw.append(float(ans["seconds"]))
            t0 = time.perf_counter()
            shutil.copyfile(prod_backing / name, m.root / "copy.tmp")
            local.append(time.perf_counter() - t0)
            (m.root / "copy.tmp").unlink()
        out.append({"size_bytes": size,
                    "dyadfs_MiBps": _mibps(size, statistics.median(dy)),
                    "ucx_raw_MiBps": _mibps(size, statistics.median(raw)),
                    "local_copy_MiBps": _mibps(size, statistics.median(local)),
                    "dyadfs_ms": round(statistics.median(dy) * 1e3, 2)})
    return out


def bench_read(cons: Path, cons_backing: Path, name: str, size: int) -> dict[str, Any]:
    _read_all(cons / name)  # pulled and warm
    res: dict[str, Any] = {"size_bytes": size}
    for label, path in (("mount", cons / name), ("backing", cons_backing / name)):
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            _read_all(path)
            times.append(time.perf_counter() - t0)
        res[f"{label}_MiBps"] = _mibps(size, min(times))
    return res


def bench_write(prod: Path, prod_backing: Path, size: int, count: int) -> dict[str, Any]:
    """write+close of *count* files through the mount and on the backing, interleaved file by
    file (the order alternating), so that both see the same page-cache and writeback state:
    this machine's own write speed drifts by 3x within a minute."""
    res: dict[str, Any] = {"size_bytes": size, "files": count}
    dirs = {"mount": prod / f"write-{size}-mount",
            "backing": prod_backing / f"write-{size}-backing"}
    spent = dict.fromkeys(dirs, 0.0)
    for d in dirs.values():
        d.mkdir()
    for i in range(count):
        for label in (("mount", "backing") if i % 2 == 0 else ("backing", "mount")):
            t0 = time.perf_counter()
            _write_file(dirs[label] / f"w{i}", size)
            spent[label] += time.perf_counter() - t0
    for label, seconds in spent.items():
        res[f"{label}_MiBps"] = _mibps(size * count, seconds)
    return res


def _open_read_times(paths: list[Path]) -> list[float]:
    out = []
    for path in paths:
        t0 = time.perf_counter()
        with open(path, "rb") as f:
            f.read()
        out.append(time.perf_counter() - t0)
    return out


def bench_prefetch(m: Mounts, ns: list[str], n: int) -> dict[str, Any]:
    """open+read of published frames on a --prefetch mount, beside the open+read of a local
    file through the same mount (and on its backing), and an on-demand pull.

    A namespace of its own, so that the prefetcher has only these frames to pull."""
    own = [a + "-prefetch" if i and ns[i - 1] == "--namespace" else a for i, a in enumerate(ns)]
    prod, _ = m.mount_named("pfprod", "--role", "producer", *own)
    pf, pf_backing = m.mount_named("pf", "--role", "consumer", "--prefetch", *own)
    cons, _ = m.mount_named("pfcons", "--role", "consumer", *own)
    (prod / "pf").mkdir()
    data = os.urandom(FRAME)
    for i in range(n):
        (prod / "pf" / f"f{i}").write_bytes(data)
    names = [Path("pf") / f"f{i}" for i in range(n)]
    deadline = time.monotonic() + 120
    while not all((pf_backing / p).exists() for p in names) or m.control(pf)["pulling"]:
        if time.monotonic() > deadline:
            raise UsageError("bench: the prefetching mount did not pull every frame in 120 s")
        time.sleep(0.01)
    # The baseline: files of the same size that were never opened through the mount either,
    # but are local (written straight into its backing); both opened in turns, so that both
    # see the same machine (this one's speed drifts).
    (pf_backing / "local").mkdir()
    for i in range(n):
        (pf_backing / "local" / f"f{i}").write_bytes(data)
    first: list[float] = []
    again: list[float] = []
    for i in range(n):
        pair = [(first, pf / names[i]), (again, pf / "local" / f"f{i}")]
        for out, path in (pair if i % 2 == 0 else pair[::-1]):
            out.extend(_open_read_times([path]))
    backing = _open_read_times([pf_backing / p for p in names])
    pulled = _open_read_times([cons / p for p in names])  # no prefetch: pulled at the open
    return {"frame_bytes": FRAME, "prefetched": _ms(first), "local_mount": _ms(again),
            "local_backing": _ms(backing), "on_demand_pull": _ms(pulled),
            "ratio_to_local": round(_pct(first, 50) / _pct(again, 50), 2)}


def bench_kvs_compare(base: Path, env: dict[str, str], transport: str,
                      nlat: int) -> dict[str, Any]:
    """Under Flux: frame latency and a 16 MiB pull on the Flux KVS beside the embedded one."""
    out: dict[str, Any] = {}
    for kvs in ("local", "flux"):
        root = base / f"kvs-{kvs}"
        root.mkdir()
        with mounts(root, env) as m:
            ns = ["--namespace", f"bench-kvs-{kvs}-{os.getpid()}", "--transport", transport,
                  "--kvs", kvs]
            prod, prod_b = m.mount_named("prod", "--role", "producer", *ns)
            cons, _ = m.mount_named("cons", "--role", "consumer", *ns)
            owner = m.control(prod)["mount_id"]
            lat = frame_latency(prod, cons, nlat, "lat")
            pull = bench_pull(m, prod, prod_b, cons, [16 * MiB], 3, owner)[0]
            out[kvs] = {"frame_latency": lat, "pull_16MiB_MiBps": pull["dyadfs_MiBps"]}
    return out


# -- the whole run --------------------------------------------------------------------------------

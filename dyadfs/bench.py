"""``dyadfs bench``: dyadfs' numbers, each beside its baseline measured in the same run.

It starts its own mounts (a producer and consumers, each over its own backing directory so the
backing can be read directly as a baseline), with its own embedded KVS, under a temporary
directory, and removes them all at the end. Nothing here is asserted: it reports.

Figures (see README, "Benchmarks"):
- kvs: waiting-lookup wake latency across processes; CPU of an idle waiter.
- metadata: create+close and stat latency through a producer mount and on its backing.
- frame_latency: producer close() to consumer open+read done, consumer already waiting, for the
  seed's 5,757 B frames (node-local pull; shared storage; a plain directory); frames per second.
- pull: open+read of a published file of each size, beside a raw transfer of the same size
  between the same two daemons (the transport's limit) and a plain local copy.
- read / write: through the mount beside the backing directory.
- scaling: frames per second and latency against the number of frames and of consumers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import __version__
from .errors import UsageError
from .mount import fuse_mounted, info_path, query_socket

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


class Mounts:
    """The bench's own mounts; all unmounted at the end, whatever happens."""

    def __init__(self, root: Path, env: dict[str, str]) -> None:
        self.root = root
        self.env = env
        self.points: list[Path] = []

    def mount(self, name: str, *opts: str) -> tuple[Path, Path]:
        mp, backing = self.root / name, self.root / f"{name}.backing"
        mp.mkdir()
        backing.mkdir()
        r = subprocess.run([sys.executable, "-m", "dyadfs", "mount", str(mp), "--backing",
                            str(backing), "--log", str(self.root / f"{name}.log"), *opts],
                           capture_output=True, text=True, env=self.env, timeout=120)
        if r.returncode != 0:
            raise UsageError(f"bench: cannot mount {name}: {r.stderr.strip()}")
        self.points.append(mp)
        return mp, backing

    def control(self, mp: Path, request: dict[str, Any] | None = None,
                timeout: float = 30) -> dict[str, Any]:
        from . import config
        cfg = config.build(mp, {}, env=self.env)
        info = json.loads(info_path(cfg).read_text())
        return query_socket(info["socket"], timeout, request)

    def close(self) -> None:
        for mp in reversed(self.points):
            if fuse_mounted(mp):
                r = subprocess.run([sys.executable, "-m", "dyadfs", "umount", str(mp)],
                                   capture_output=True, env=self.env, timeout=120)
                if r.returncode != 0:
                    subprocess.run(["fusermount3", "-uz", str(mp)], capture_output=True)
        self.points.clear()


@contextlib.contextmanager
def _mounts(root: Path, env: dict[str, str]) -> Iterator[Mounts]:
    m = Mounts(root, env)
    try:
        yield m
    finally:
        m.close()


# -- the embedded KVS ---------------------------------------------------------------------------
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

    from .kvs.local import LocalKVS

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
    prod, _ = m.mount("pfprod", "--role", "producer", *own)
    pf, pf_backing = m.mount("pf", "--role", "consumer", "--prefetch", *own)
    cons, _ = m.mount("pfcons", "--role", "consumer", *own)
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
        with _mounts(root, env) as m:
            ns = ["--namespace", f"bench-kvs-{kvs}-{os.getpid()}", "--transport", transport,
                  "--kvs", kvs]
            prod, prod_b = m.mount("prod", "--role", "producer", *ns)
            cons, _ = m.mount("cons", "--role", "consumer", *ns)
            owner = m.control(prod)["mount_id"]
            lat = frame_latency(prod, cons, nlat, "lat")
            pull = bench_pull(m, prod, prod_b, cons, [16 * MiB], 3, owner)[0]
            out[kvs] = {"frame_latency": lat, "pull_16MiB_MiBps": pull["dyadfs_MiBps"]}
    return out


# -- the whole run --------------------------------------------------------------------------------
def _consumer_counts(k: int) -> list[int]:
    """1, 2, 4, ... up to *k*, and *k* itself."""
    out, c = [], 1
    while c < k:
        out.append(c)
        c *= 2
    return [*out, k]


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    quick = bool(args.quick)
    if args.frames is not None and args.frames < 2:
        raise UsageError(f"--frames: at least 2, got {args.frames}")
    if args.consumers is not None and not 1 <= args.consumers <= 16:
        raise UsageError(f"--consumers: from 1 to 16, got {args.consumers}")
    sizes = [int(float(s) * MiB) for s in (args.sizes or ([1, 16, 64] if quick
                                                          else [1, 16, 64, 256]))]
    nlat = args.frames or (100 if quick else 300)
    transports = [args.transport] if args.transport else ["ucx", "tcp"]
    base = Path(tempfile.mkdtemp(prefix="dyadfs-bench-", dir=args.dir))
    env = dict(os.environ)
    env["DYADFS_STATE_DIR"] = str(base / "state")
    results: dict[str, Any] = {"machine": machine_info(), "quick": quick}
    try:
        results["kvs"] = bench_kvs(base, env, 100 if quick else 300)
        results["frame_latency_baselines"] = {"plain_directory": plain_frame_latency(base, nlat)}
        per: dict[str, Any] = {}
        for transport in transports:
            root = base / transport
            root.mkdir()
            with _mounts(root, env) as m:
                ns = ["--namespace", f"bench-{transport}", "--transport", transport]
                prod, prod_b = m.mount("prod", "--role", "producer", *ns)
                cons, cons_b = m.mount("cons", "--role", "consumer", *ns)
                owner = m.control(prod)["mount_id"]
                r: dict[str, Any] = {}
                lat = frame_latency(prod, cons, nlat, "lat")
                fps = frames_per_second(prod, [cons], nlat, "fps")
                r["frame_latency"] = {"frame_bytes": FRAME, **lat,
                                      "frames_per_s": fps["frames_per_s"]}
                r["pull"] = bench_pull(m, prod, prod_b, cons, sizes, 2 if quick else 3, owner)
                rsize = max(s for s in sizes if s <= 64 * MiB)
                r["read"] = bench_read(cons, cons_b, f"pull/s{rsize}-0", rsize)
                r["write"] = bench_write(prod, prod_b, 16 * MiB, 4 if quick else 16)
                r["write_1MiB"] = bench_write(prod, prod_b, MiB, 32 if quick else 128)
                r["metadata"] = bench_metadata(prod, prod_b, 200 if quick else 1000)
                r["prefetch"] = bench_prefetch(m, ns, nlat)
                scaling_frames = []
                for n in ([10, 100, 1000] if quick else [10, 100, 1000, 10000]):
                    scaling_frames.append(frames_per_second(prod, [cons], n, f"sf{n}"))
                r["scaling_frames"] = scaling_frames
                scaling_cons = []
                extra = [cons]
                for k in _consumer_counts(args.consumers or (2 if quick else 4)):
                    while len(extra) < k:
                        c, _ = m.mount(f"cons{len(extra)}", "--role", "consumer", *ns)
                        extra.append(c)
                    scaling_cons.append(frames_per_second(prod, extra[:k], 100, f"sc{k}"))
                r["scaling_consumers"] = scaling_cons
                status = m.control(cons)
                r["consumer_errors"] = status["errors"] + status["unexpected_errors"]
                per[transport] = r
            # shared storage (no copy) as the frame latency's other baseline
        root = base / "shared"
        root.mkdir()
        with _mounts(root, env) as m:
            shared = root / "shared.backing"
            prod, _ = m.mount("sprod", "--role", "producer", "--shared-storage",
                              "--namespace", "bench-shared")
            shared_backing = root / "sprod.backing"
            cmp_ = root / "scons"
            cmp_.mkdir()
            subprocess.run([sys.executable, "-m", "dyadfs", "mount", str(cmp_), "--backing",
                            str(shared_backing), "--role", "consumer", "--shared-storage",
                            "--namespace", "bench-shared", "--log", str(root / "scons.log")],
                           check=True, capture_output=True, env=env, timeout=120)
            m.points.append(cmp_)
            del shared
            results["frame_latency_baselines"]["shared_storage"] = frame_latency(
                prod, cmp_, nlat, "lat")
        results["transports"] = per
        if env.get("FLUX_URI"):
            results["kvs_compare"] = bench_kvs_compare(base, env, transports[0], nlat)
        main = per.get("ucx") or per[transports[0]]
        results["frame_latency"] = main["frame_latency"]
        results["pull"] = main["pull"]
        results["read"] = main["read"]
        results["write"] = main["write"]
        results["metadata"] = main["metadata"]
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return results


def render(res: dict[str, Any]) -> str:
    m = res["machine"]
    lines = [f"dyadfs bench on {m['cpu']}, {m['cores']} cores, {m['memory_GiB']} GiB, "
             f"Linux {m['kernel']}, Python {m['python']}, UCX {m['ucx']}"]
    k = res["kvs"]
    lines.append(f"embedded KVS: waiting lookup wakes {k['wake_latency']['p50_ms']} ms (p50) / "
                 f"{k['wake_latency']['p99_ms']} ms (p99) after the commit starts; "
                 f"idle waiter {100 * k['idle_waiter_cpu_share']:.2f}% of a core")
    b = res["frame_latency_baselines"]
    lines.append(f"frame latency baselines: plain directory open+read "
                 f"{b['plain_directory']['p50_ms']} ms p50; shared storage (wait, no copy) "
                 f"{b['shared_storage']['p50_ms']} / {b['shared_storage']['p99_ms']} ms p50/p99")
    for name, r in res["transports"].items():
        f = r["frame_latency"]
        lines.append(f"\n== transport {name}")
        lines.append(f"frame latency ({f['frame_bytes']} B, consumer waiting): "
                     f"p50 {f['p50_ms']} ms, p99 {f['p99_ms']} ms, {f['frames_per_s']} frames/s")
        lines.append(f"{'size':>8} {'dyadfs MiB/s':>13} {'raw MiB/s':>10} {'ratio':>6} "
                     f"{'local cp MiB/s':>15}")
        for p in r["pull"]:
            ratio = p["dyadfs_MiBps"] / p["ucx_raw_MiBps"] if p["ucx_raw_MiBps"] else 0
            lines.append(f"{p['size_bytes'] // MiB:>6}Mi {p['dyadfs_MiBps']:>13} "
                         f"{p['ucx_raw_MiBps']:>10} {ratio:>6.2f} {p['local_copy_MiBps']:>15}")
        pf = r["prefetch"]
        lines.append(f"--prefetch: open+read of a prefetched frame {pf['prefetched']['p50_ms']} ms "
                     f"p50 ({pf['ratio_to_local']}x a local file through the mount, "
                     f"{pf['local_mount']['p50_ms']} ms; backing {pf['local_backing']['p50_ms']}"
                     f" ms); without prefetch (pulled at the open) "
                     f"{pf['on_demand_pull']['p50_ms']} ms")
        rd, wr, w1 = r["read"], r["write"], r["write_1MiB"]
        lines.append(f"read of a pulled {rd['size_bytes'] // MiB} MiB file: mount "
                     f"{rd['mount_MiBps']} MiB/s, backing {rd['backing_MiBps']} MiB/s")
        lines.append(f"producer write+close, 16 MiB files: mount {wr['mount_MiBps']} MiB/s, "
                     f"backing {wr['backing_MiBps']} MiB/s; 1 MiB files: mount "
                     f"{w1['mount_MiBps']}, backing {w1['backing_MiBps']} MiB/s")
        md = r["metadata"]
        lines.append(f"create+close p50: mount {md['create_close_mount']['p50_ms']} ms, backing "
                     f"{md['create_close_backing']['p50_ms']} ms; stat p50: mount "
                     f"{md['stat_mount']['p50_ms']} ms, backing {md['stat_backing']['p50_ms']} ms")
        for s in r["scaling_frames"]:
            lines.append(f"  {s['frames']:>6} frames, 1 consumer: {s['frames_per_s']} frames/s, "
                         f"latency p50 {s['p50_ms']} ms p99 {s['p99_ms']} ms (back to back)")
        for s in r["scaling_consumers"]:
            lines.append(f"  100 frames, {s['consumers']} consumers: {s['frames_per_s']} frames/s"
                         f" ({s['frames_delivered_per_s']} delivered/s), p50 {s['p50_ms']} ms")
    for kvs, r in res.get("kvs_compare", {}).items():
        f = r["frame_latency"]
        lines.append(f"KVS {kvs}: frame latency p50 {f['p50_ms']} ms, p99 {f['p99_ms']} ms; "
                     f"16 MiB pull {r['pull_16MiB_MiBps']} MiB/s")
    return "\n".join(lines)


def plot(res: dict[str, Any], path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("--plot needs matplotlib: pip install 'dyadfs[plot]'") from None
    fig, (ax, lx) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, r in res["transports"].items():
        xs = [p["size_bytes"] / MiB for p in r["pull"]]
        ax.plot(xs, [p["dyadfs_MiBps"] for p in r["pull"]], "o-", label=f"dyadfs ({name})")
        ax.plot(xs, [p["ucx_raw_MiBps"] for p in r["pull"]], "x--", label=f"raw {name}")
    if res["transports"]:
        r0 = next(iter(res["transports"].values()))
        ax.plot([p["size_bytes"] / MiB for p in r0["pull"]],
                [p["local_copy_MiBps"] for p in r0["pull"]], "s:", label="local copy")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("file size (MiB)")
    ax.set_ylabel("MiB/s")
    ax.set_title("pull throughput")
    ax.legend()
    curves = {f"node-local ({n})": r["frame_latency"].get("samples_ms", [])
              for n, r in res["transports"].items()}
    curves["shared storage"] = res["frame_latency_baselines"]["shared_storage"] \
        .get("samples_ms", [])
    for label, samples in curves.items():
        if samples:
            xs = sorted(samples)
            lx.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], label=label)
    lx.set_xscale("log")
    lx.set_xlabel(f"frame latency, close() to open+read done (ms, {FRAME} B frames)")
    lx.set_ylabel("fraction of frames")
    lx.set_title("frame latency distribution")
    lx.legend()
    fig.tight_layout()
    fig.savefig(path)


def main(args: argparse.Namespace) -> int:
    res = run_bench(args)
    print(render(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    if args.plot:
        plot(res, args.plot)
    return 0

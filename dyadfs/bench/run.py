"""The whole ``dyadfs bench`` run: which figures, on which mounts, in which order."""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UsageError
from .figures import (
    FRAME,
    MiB,
    bench_kvs,
    bench_kvs_compare,
    bench_metadata,
    bench_names,
    bench_prefetch,
    bench_pull,
    bench_read,
    bench_write,
    frame_latency,
    frames_per_second,
    machine_info,
    mounts,
    plain_frame_latency,
)
from .peer import NO_PEER, PeerPlan, check_prefix, peer_figures

#: "local": the default, two mounts of one host hand files over (--same-host on); "ucx" and
#: "tcp": the network transports, as between two hosts (--same-host off)
BENCH_TRANSPORTS = ("local", "ucx", "tcp")


def transport_options(transport: str) -> list[str]:
    if transport == "local":
        return []
    return ["--transport", transport, "--same-host", "off"]


@dataclass(frozen=True)
class Plan:
    """What to measure, from the command line."""

    quick: bool
    sizes: list[int]
    frames: int
    consumers: int
    transports: list[str]
    name_counts: list[int]
    peer: Path | None
    peer_plan: PeerPlan

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Plan:
        quick = bool(args.quick)
        if args.frames is not None and args.frames < 2:
            raise UsageError(f"--frames: at least 2, got {args.frames}")
        if args.consumers is not None and not 1 <= args.consumers <= 16:
            raise UsageError(f"--consumers: from 1 to 16, got {args.consumers}")
        default_sizes = [1, 16, 64] if quick else [1, 16, 64, 256]
        for opt, n, least in (("--peer-frames", args.peer_frames, 2),
                              ("--peer-files", args.peer_files, 1)):
            if n is not None and n < least:
                raise UsageError(f"{opt}: at least {least}, got {n}")
        return cls(quick=quick,
                   sizes=[int(float(s) * MiB) for s in (args.sizes or default_sizes)],
                   frames=args.frames or (100 if quick else 300),
                   consumers=args.consumers or (2 if quick else 4),
                   transports=[args.transport] if args.transport else list(BENCH_TRANSPORTS),
                   name_counts=[int(n) for n in args.names] if getattr(args, "names", None)
                   else ([1000, 10000] if quick else [1000, 10000, 100000]),
                   peer=check_prefix(args.peer) if args.peer else None,
                   peer_plan=PeerPlan(
                       frames=args.peer_frames or 50, files=args.peer_files or 5,
                       sizes=[int(float(s) * MiB) for s in (args.peer_sizes or [1, 16, 64])]))


def _consumer_counts(k: int) -> list[int]:
    """1, 2, 4, ... up to *k*, and *k* itself."""
    out, c = [], 1
    while c < k:
        out.append(c)
        c *= 2
    return [*out, k]


def transport_figures(base: Path, env: dict[str, str], transport: str,
                      plan: Plan) -> dict[str, Any]:
    """Every node-local figure over one transport, on a producer and consumer mounts."""
    root = base / transport
    root.mkdir()
    quick = plan.quick
    with mounts(root, env) as m:
        ns = ["--namespace", f"bench-{transport}", *transport_options(transport)]
        prod, prod_b = m.mount_named("prod", "--role", "producer", *ns)
        cons, cons_b = m.mount_named("cons", "--role", "consumer", *ns)
        owner = m.control(prod)["mount_id"]
        r: dict[str, Any] = {}
        lat = frame_latency(prod, cons, plan.frames, "lat")
        fps = frames_per_second(prod, [cons], plan.frames, "fps")
        r["frame_latency"] = {"frame_bytes": FRAME, **lat, "frames_per_s": fps["frames_per_s"]}
        r["pull"] = bench_pull(m, prod, prod_b, cons, plan.sizes, 2 if quick else 3, owner)
        rsize = max(s for s in plan.sizes if s <= 64 * MiB)
        r["read"] = bench_read(cons, cons_b, f"pull/s{rsize}-0", rsize)
        r["write"] = bench_write(prod, prod_b, 16 * MiB, 4 if quick else 16)
        r["write_1MiB"] = bench_write(prod, prod_b, MiB, 32 if quick else 128)
        r["metadata"] = bench_metadata(prod, prod_b, 200 if quick else 1000)
        r["scaling_names"] = bench_names(prod, prod_b, cons, plan.name_counts)
        r["prefetch"] = bench_prefetch(m, ns, plan.frames)
        r["scaling_frames"] = [frames_per_second(prod, [cons], n, f"sf{n}")
                               for n in ([10, 100, 1000] if quick else [10, 100, 1000, 10000])]
        consumers = [cons]
        r["scaling_consumers"] = []
        for k in _consumer_counts(plan.consumers):
            while len(consumers) < k:
                c, _ = m.mount_named(f"cons{len(consumers)}", "--role", "consumer", *ns)
                consumers.append(c)
            r["scaling_consumers"].append(frames_per_second(prod, consumers[:k], 100, f"sc{k}"))
        status = m.control(cons)
        r["consumer_errors"] = status["errors"] + status["unexpected_errors"]
    return r


def shared_storage_latency(base: Path, env: dict[str, str], n: int) -> dict[str, Any]:
    """The frame latency's other baseline: two mounts over one backing (wait, no copy)."""
    root = base / "shared"
    root.mkdir()
    with mounts(root, env) as m:
        ns = ["--shared-storage", "--namespace", "bench-shared"]
        prod, backing = m.mount_named("sprod", "--role", "producer", *ns)
        cons = m.mount(root / "scons", "--backing", str(backing), "--role", "consumer", *ns)
        return frame_latency(prod, cons, n, "lat")


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    plan = Plan.from_args(args)
    base = Path(tempfile.mkdtemp(prefix="dyadfs-bench-", dir=args.dir))
    env = {**os.environ, "DYADFS_STATE_DIR": str(base / "state")}
    results: dict[str, Any] = {"machine": machine_info(), "quick": plan.quick}
    try:
        # first: the side-by-side rows on a machine not yet warmed by the rest
        results["peer"] = (peer_figures(plan.peer, env, plan.peer_plan, plan.transports)
                           if plan.peer else {"skipped": NO_PEER})
        results["kvs"] = bench_kvs(base, env, 100 if plan.quick else 300)
        results["frame_latency_baselines"] = {
            "plain_directory": plain_frame_latency(base, plan.frames)}
        per = {t: transport_figures(base, env, t, plan) for t in plan.transports}
        results["frame_latency_baselines"]["shared_storage"] = shared_storage_latency(
            base, env, plan.frames)
        results["transports"] = per
        if env.get("FLUX_URI"):
            results["kvs_compare"] = bench_kvs_compare(base, env, plan.transports[0],
                                                       plan.frames)
        main = per.get("local") or per.get("ucx") or per[plan.transports[0]]
        for part in ("frame_latency", "pull", "read", "write", "metadata"):
            results[part] = main[part]
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return results

"""The bench's report: a table of text, and a plot."""

from __future__ import annotations

from typing import Any

from ..errors import UsageError
from .figures import FRAME, MiB


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
        for s in r.get("scaling_names", []):
            lines.append(f"  {s['names']:>6} names in a directory: stat p50 consumer "
                         f"{s['stat_consumer']['p50_ms']} ms, producer "
                         f"{s['stat_producer']['p50_ms']} ms, plain {s['stat_plain']['p50_ms']} ms;"
                         f" ls -l consumer {s['ls_l_consumer_ms']} ms, producer "
                         f"{s['ls_l_producer_ms']} ms, plain {s['ls_l_plain_ms']} ms")
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
    lines.append("\n" + peer_table(res.get("peer", {"skipped": "not run"})))
    return "\n".join(lines)


PEER_NAMES = {"dyad_ucx": "DYAD, UCX DTL", "dyad_flux_rpc": "DYAD, Flux RPC DTL",
              "dyadfs_local": "dyadfs, defaults (same host)",
              "dyadfs_ucx": "dyadfs, ucx (--same-host off)",
              "dyadfs_tcp": "dyadfs, tcp (--same-host off)"}


def _peer_rows(peer: dict[str, Any]) -> list[tuple[str, Any]]:
    """(label, how to get a column's figure in ms) per row of the side-by-side table."""
    rows: list[tuple[str, Any]] = [
        (f"frame {peer['frame_bytes']:,} B: producer close returned -> waiting consumer's open "
         f"returned, {q} ({peer['frames']} frames)",
         lambda c, q=q: c["frame_latency"][f"{q}_ms"]) for q in ("p50", "p99")]
    for i, size in enumerate(peer["sizes"]):
        rows.append((f"open + read to EOF of a published {_size(size)} file (median of "
                     f"{peer['files']})", lambda c, i=i: c["open_read"][i]["median_ms"]))
    w = peer["sizes"].index(16 * MiB) if 16 * MiB in peer["sizes"] else len(peer["sizes"]) - 1
    rows.append((f"producer open+write+close of a {_size(peer['sizes'][w])} file (median of "
                 f"{peer['files']})", lambda c: c["write"][w]["median_ms"]))
    return rows


def _size(n: int) -> str:
    return f"{n / MiB:g} MiB" if n >= MiB else f"{n / 1024:g} KiB"


def peer_table(peer: dict[str, Any]) -> str:
    """The side-by-side table (markdown, for the README): the same C clients on DYAD's two DTLs
    and on dyadfs; each dyadfs figure with its ratio to DYAD's best DTL and to DYAD's UCX
    (time ratios: below 1, dyadfs is faster)."""
    if "skipped" in peer:
        return f"side by side with DYAD: skipped ({peer['skipped']})"
    cols = peer["columns"]
    out = ["same C clients, side by side (ratio: dyadfs time / DYAD's best DTL, / DYAD UCX)",
           "| figure | " + " | ".join(PEER_NAMES.get(k, k) for k in cols) + " |",
           "|---" * (len(cols) + 1) + "|"]
    for label, get in _peer_rows(peer):
        ms = {k: None if "error" in c or "skipped" in c else float(get(c))
              for k, c in cols.items()}
        dyad = [v for k, v in ms.items() if k.startswith("dyad_") and v is not None]
        cells = []
        for k, v in ms.items():
            if v is None:
                cells.append("skipped" if "skipped" in cols[k] else "failed")
                continue
            cell = f"{v:.3g} ms" if v < 100 else f"{v:.0f} ms"
            if k.startswith("dyadfs_") and dyad:
                cell += f" ({v / min(dyad):.2f}x best"
                if (ucx := ms.get("dyad_ucx")) is not None:
                    cell += f", {v / ucx:.2f}x UCX"
                cell += ")"
            cells.append(cell)
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    notes: dict[str, list[str]] = {}
    for k, c in cols.items():
        if "error" in c or "skipped" in c:
            why = c.get("error") or "skipped: " + c["skipped"]
            notes.setdefault(why, []).append(PEER_NAMES.get(k, k))
    out.extend(f"{', '.join(names)}: {why}" for why, names in notes.items())
    return "\n".join(out)


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

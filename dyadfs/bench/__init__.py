"""``dyadfs bench``: dyadfs' numbers, each beside its baseline measured in the same run.

It starts its own mounts (a producer and consumers, each over its own backing directory so the
backing can be read directly as a baseline), with its own embedded KVS, under a temporary
directory, and removes them all at the end. Nothing here is asserted: it reports.

- :mod:`.harness`: real mounts started with the real CLI, always unmounted (shared with the tests);
- :mod:`.figures`: one function per figure and its baseline;
- :mod:`.run`: which figures, in which order; :mod:`.report`: the table and the plot.

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
import json
from pathlib import Path


def main(args: argparse.Namespace) -> int:
    from .report import plot, render
    from .run import run_bench

    res = run_bench(args)
    print(render(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    if args.plot:
        plot(res, args.plot)
    return 0

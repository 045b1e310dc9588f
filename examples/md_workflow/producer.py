#!/usr/bin/env python3
"""A4MD proxy producer: writes one frame per file, each opened, written whole and closed.

Knows nothing of dyadfs: plain open/write/close into DIR/group<rank>/a4md_chunk<i>.dat.
"""

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from frames import frame_path, make_frame  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("dir")
    p.add_argument("--frames", type=int, default=10)
    p.add_argument("--atoms", type=int, default=200)
    p.add_argument("--rank", type=int, default=0)
    p.add_argument("--delay", type=float, default=0.0, help="seconds between frames")
    p.add_argument("--seed", type=int, default=42)
    a = p.parse_args()
    rng = np.random.default_rng(a.seed)
    os.makedirs(f"{a.dir}/group{a.rank}", exist_ok=True)
    for i in range(a.frames):
        data = make_frame(i, a.atoms, rng)
        with open(frame_path(a.dir, a.rank, i), "wb") as f:
            f.write(data)
        print(f"producer: wrote frame {i} ({len(data)} B)", flush=True)
        if a.delay:
            time.sleep(a.delay)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

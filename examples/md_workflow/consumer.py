#!/usr/bin/env python3
"""A4MD proxy consumer: reads frames 0..n-1 in order and analyses each.

Knows nothing of dyadfs: a plain open(path, "r"), seek to the end, tell, seek back, read whole,
as the seed's fopen/fseek/ftell/fread.
"""

import argparse
import hashlib
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from frames import frame_path, parse_frame  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("dir")
    p.add_argument("--frames", type=int, default=10)
    p.add_argument("--rank", type=int, default=0)
    a = p.parse_args()
    for i in range(a.frames):
        with open(frame_path(a.dir, a.rank, i), "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(0)
            data = f.read(size)
        header, atoms = parse_frame(data)
        centre = atoms["xyz"].mean(axis=0)
        counts = np.bincount(atoms["type"], minlength=10)
        print(f"consumer: frame {i}: {size} B, {len(atoms)} atoms, centre "
              f"({centre[0]:.3f}, {centre[1]:.3f}, {centre[2]:.3f}), types {counts.tolist()}, "
              f"sha256 {hashlib.sha256(data).hexdigest()[:16]}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

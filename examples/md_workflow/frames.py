"""The A4MD proxy's frame format: a 157-byte header, then N atoms of int32 type + 3 float64.

28*N + 157 bytes per frame, as DYAD's build of the seed notebook writes (5,757 B for 200 atoms).
"""

from __future__ import annotations

import numpy as np

HEADER_BYTES = 157
ATOM = np.dtype([("type", "<i4"), ("xyz", "<f8", (3,))])  # 28 bytes, packed


def frame_path(root: str, rank: int, index: int) -> str:
    return f"{root}/group{rank}/a4md_chunk{index}.dat"


def make_frame(index: int, natoms: int, rng: np.random.Generator) -> bytes:
    atoms = np.empty(natoms, dtype=ATOM)
    atoms["type"] = rng.integers(0, 10, natoms)
    atoms["xyz"] = rng.uniform(0.0, 2.0, (natoms, 3))
    header = f"A4MD frame={index} natoms={natoms} layout=i4,f8x3".encode()
    return header.ljust(HEADER_BYTES, b" ") + atoms.tobytes()


def parse_frame(data: bytes) -> tuple[str, np.ndarray]:
    if len(data) < HEADER_BYTES or (len(data) - HEADER_BYTES) % ATOM.itemsize:
        raise ValueError(f"not a frame: {len(data)} bytes")
    header = data[:HEADER_BYTES].decode().strip()
    return header, np.frombuffer(data, dtype=ATOM, offset=HEADER_BYTES)

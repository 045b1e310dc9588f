"""A C consumer that blocks in open() and reads to EOF gets every frame whole.

Issue "Correctness: a consumer reads exactly a published version", item 1 (2026-12-02): a C
reader that calls open() on a frame that is not published yet, then read() until it returns 0,
with no lseek or stat first, got 0 bytes for 2-8 % of 200 frames. Python's and the seed's
readers seek to the end first, which hid it. Here: 500 frames of 5,757 B, written 10-20 ms apart
by a C producer, the C reader started first; every frame's byte count and CRC must match.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from .conftest import CPrograms, Mounts
from .helpers import finish, node_local, parse_reads, parse_versions, shared_pair, waiting

pytestmark = pytest.mark.mounted

FRAMES = int(os.environ.get("DYADFS_FRAMES", "500"))
STDIO_FRAMES = 200
FRAME_SIZE = 5757
SEED = 20261202


def _stream(cprogs: CPrograms, spawn, mounts: Mounts, prod: Path, cons: Path,  # type: ignore[no-untyped-def]
            reader: str = "reader", frames: int = FRAMES) -> None:
    (prod / "group0").mkdir()
    paths = [str(cons / f"group0/a4md_chunk{i}") for i in range(frames)]
    rd = spawn([getattr(cprogs, reader), *paths])
    waiting(mounts, cons, 1)  # blocked in open() of frame 0, before group0 exists there
    wr = spawn([cprogs.writer, str(prod / "group0/a4md_chunk"), str(frames), str(FRAME_SIZE),
                str(SEED), "10", "20"])
    w_out, w_err = finish(wr, 120, "the C writer")
    assert wr.returncode == 0, w_err.decode()
    written = parse_versions(w_out)
    assert len(written) == frames
    r_out, r_err = finish(rd, 120, "the C reader")
    reads = parse_reads(r_out)
    assert len(reads) == frames, r_err.decode()[-2000:]
    wrong = [f"frame {i}: got {r.describe()}, want {size} B crc {crc:08x}"
             for i, (r, (size, crc)) in enumerate(zip(reads, written, strict=True))
             if (r.size, r.crc, r.err) != (size, crc, 0)]
    assert not wrong, f"{len(wrong)} of {frames} frames wrong:\n" + "\n".join(wrong[:20])
    assert rd.returncode == 0


@pytest.mark.parametrize("layout", ["roles", "both"])
@pytest.mark.parametrize("transport", ["ucx", "tcp", "local"])
def test_waiting_c_reader_gets_every_frame_node_local(tmp_path: Path, mounts: Mounts,
                                                      cprogs: CPrograms, spawn,  # type: ignore[no-untyped-def]
                                                      transport: str, layout: str) -> None:
    prod, cons = node_local(mounts, tmp_path, "frames", transport, layout)
    _stream(cprogs, spawn, mounts, prod, cons)


def test_waiting_c_reader_gets_every_frame_shared_storage(tmp_path: Path, mounts: Mounts,
                                                          cprogs: CPrograms, spawn) -> None:  # type: ignore[no-untyped-def]
    prod, cons, _ = shared_pair(mounts, tmp_path, "frames")
    _stream(cprogs, spawn, mounts, prod, cons)


def test_waiting_stdio_reader_gets_every_frame(tmp_path: Path, mounts: Mounts,
                                               cprogs: CPrograms, spawn) -> None:  # type: ignore[no-untyped-def]
    """The same through fopen()/fread() (stdio's buffer size, its own fstat), 200 frames."""
    prod, cons = node_local(mounts, tmp_path, "frames", "tcp")
    _stream(cprogs, spawn, mounts, prod, cons, reader="freader", frames=STDIO_FRAMES)

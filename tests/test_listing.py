"""``ls -l`` of published names on a consumer, and what the kernel caches of them.

Issue 10, item 10 (measured 2026-12-03): ``ls -l`` of a directory of 1k/10k/100k names published
elsewhere (not pulled) took 17-33x as long on the consumer as on the producer mount: the names
came with zero entry and attribute timeouts, so the kernel sent a LOOKUP and a GETATTR per name,
each a round trip through the daemon. Counted here, not timed (speed is ``dyadfs bench``'s).

The cached attributes must never hide a newer version: a reader that opens a name after a
listing cached its published size, and reads to EOF without a stat, gets the version published
since, whole.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from .conftest import CPrograms, Mounts, run
from .helpers import crc_of, node_local, parse_reads

pytestmark = pytest.mark.mounted

NAMES = 2000
MiB = 1 << 20


def _requests(mounts: Mounts, mp: Path) -> int:
    """LOOKUP and GETATTR requests the mount at *mp* answered so far."""
    s = mounts.status(mp)
    return int(s["fuse_lookups"]) + int(s["fuse_getattrs"])


def _ls_l(mounts: Mounts, mp: Path, d: str) -> tuple[dict[str, int], int]:
    """``ls -l`` of *d* in the mount *mp*: each name's size, and the requests it cost."""
    before = _requests(mounts, mp)
    out = run(["ls", "-l", str(mp / d)]).stdout.decode()
    cost = _requests(mounts, mp) - before
    sizes = {}
    for line in out.splitlines()[1:]:  # after "total N"
        fields = line.split()
        sizes[fields[-1]] = int(fields[4])
    return sizes, cost


def test_ls_l_of_published_names_costs_at_most_a_request_per_name(tmp_path: Path,
                                                                  mounts: Mounts) -> None:
    prod, cons = node_local(mounts, tmp_path, "listing", "tcp")
    (prod / "many").mkdir()
    want = {}
    for i in range(NAMES):
        (prod / "many" / f"f{i}").write_bytes(b"x" * (i % 13))
        want[f"f{i}"] = i % 13
    sizes, first = _ls_l(mounts, cons, "many")
    assert sizes == want  # the published sizes, nothing pulled
    assert first <= NAMES, f"ls -l of {NAMES} published names: {first} LOOKUP/GETATTR requests"
    sizes, second = _ls_l(mounts, cons, "many")
    assert sizes == want
    # the listing itself brings the names' attributes: only the directory is looked up again
    assert second <= 10, f"a second ls -l of {NAMES} names: {second} LOOKUP/GETATTR requests"
    assert mounts.status(cons)["pulled"] == 0


@pytest.mark.parametrize(("old", "new"), [(100, 5000), (70000, 10), (10, 0), (0, 3000),
                                          (5 * MiB, 6 * MiB + 1), (6 * MiB, 5 * MiB - 3)])
def test_a_listing_never_hides_a_newer_version(tmp_path: Path, mounts: Mounts,
                                               cprogs: CPrograms, old: int, new: int) -> None:
    """``ls -l`` caches the published size of *old*; the producer publishes *new*; a C reader
    (open, read to EOF, no stat) at once gets *new* whole (above 4 MiB: while it streams)."""
    prod, cons = node_local(mounts, tmp_path, "relist", "tcp")
    (prod / "f").write_bytes(os.urandom(old))
    sizes, _ = _ls_l(mounts, cons, ".")
    assert sizes["f"] == old
    data = os.urandom(new)
    (prod / "f").write_bytes(data)
    reads = parse_reads(run([cprogs.reader, str(cons / "f")]).stdout)
    assert [(r.size, r.crc, r.err) for r in reads] == [(new, crc_of(data), 0)]

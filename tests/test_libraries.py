"""Real I/O libraries across a producer and a consumer, the consumer started first.

h5py, netCDF4, sqlite3 and numpy memmap, each on node-local storage (a pull) and on shared
storage (a wait, no copy). The consumer process starts first and blocks in its open (sqlite3
stats the database before opening it: its consumer mount gets ``--wait-on-stat '*.db'``, so
that the stat waits while the -journal and -wal probes answer ENOENT at once). The consumer
prints what it read; the test compares it with what the producer wrote.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np
import pytest

from .conftest import Mounts, run
from .helpers import finish, node_local, shared_pair, waiting

pytestmark = pytest.mark.mounted
NS = "libs"
N = 100_000

PRODUCER = {
    "h5py": "import h5py\nwith h5py.File(PATH, 'w') as f:\n"
            "    f.create_dataset('x', data=DATA, chunks=(4096,)); f.attrs['run'] = 'r1'",
    "netCDF4": "import netCDF4\nd = netCDF4.Dataset(PATH, 'w', format='NETCDF4')\n"
               "d.createDimension('t', len(DATA))\nv = d.createVariable('x', 'f8', ('t',))\n"
               "v[:] = DATA\nd.close()",
    "sqlite3": "import sqlite3\ncon = sqlite3.connect(PATH)\n"
               "con.execute('CREATE TABLE t (i INTEGER PRIMARY KEY, x REAL)')\n"
               "con.executemany('INSERT INTO t VALUES (?, ?)', enumerate(DATA.tolist()))\n"
               "con.commit()\ncon.close()",
    "memmap": "m = np.memmap(PATH, dtype='<f8', mode='w+', shape=DATA.shape)\nm[:] = DATA\n"
              "m.flush()\ndel m",
}
CONSUMER = {
    "h5py": "import h5py\nwith h5py.File(PATH, 'r') as f:\n"
            "    assert f.attrs['run'] == 'r1'\n    got = f['x'][:]",
    "netCDF4": "import netCDF4\nd = netCDF4.Dataset(PATH, 'r')\ngot = d['x'][:].data\nd.close()",
    "sqlite3": "import sqlite3\ncon = sqlite3.connect('file:' + PATH + '?mode=ro', uri=True)\n"
               "got = np.array([x for (x,) in con.execute('SELECT x FROM t ORDER BY i')])",
    "memmap": "got = np.array(np.memmap(PATH, dtype='<f8', mode='r'))",
}
SUFFIX = {"h5py": "h5", "netCDF4": "nc", "sqlite3": "db", "memmap": "bin"}
PRELUDE = ("import sys, hashlib, numpy as np\nPATH = sys.argv[1]\n"
           f"DATA = np.arange({N}, dtype='<f8') * 0.5\n")
EPILOGUE = ("\ngot = np.asarray(got, dtype='<f8')\n"
            "print(len(got), hashlib.sha256(got.tobytes()).hexdigest())\n")


def _pair(mounts: Mounts, tmp_path: Path, storage: str,
          cons_opts: tuple[str, ...] = ()) -> tuple[Path, Path]:
    if storage == "shared":
        prod, cons, _ = shared_pair(mounts, tmp_path, NS, cons_opts=cons_opts, wait_timeout=30)
        return prod, cons
    return node_local(mounts, tmp_path, NS, "tcp", cons_opts=cons_opts, wait_timeout=30)


def _run_consumers_first(mounts: Mounts, spawn, prod: Path, cons: Path,  # type: ignore[no-untyped-def]
                         libs: list[str]) -> None:
    """Start one consumer per library, wait until all are blocked, then produce each file;
    every consumer must print the producer's data."""
    consumers = {lib: spawn([sys.executable, "-c", PRELUDE + CONSUMER[lib] + EPILOGUE,
                             str(cons / f"data.{SUFFIX[lib]}")]) for lib in libs}
    waiting(mounts, cons, len(libs))
    for lib in libs:
        run([sys.executable, "-c", PRELUDE + PRODUCER[lib], str(prod / f"data.{SUFFIX[lib]}")])
    want = np.arange(N, dtype="<f8") * 0.5
    expect = [str(N).encode(), hashlib.sha256(want.tobytes()).hexdigest().encode()]
    zeros = hashlib.sha256(bytes(8 * N)).hexdigest().encode()
    wrong = []
    for lib, proc in consumers.items():
        out, err = finish(proc, 60, f"the {lib} consumer")
        if out.split() != expect:
            what = "all zeros" if out.split()[-1:] == [zeros] else out.decode().strip()
            wrong.append(f"{lib}: read {what!r}, want {N} values of arange*0.5; "
                         f"{err.decode().strip()[-600:]}")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("storage", ["node-local", "shared"])
def test_libraries_consumers_started_first(tmp_path: Path, mounts: Mounts, spawn,  # type: ignore[no-untyped-def]
                                           storage: str) -> None:
    """h5py, netCDF4 and numpy memmap: three consumers blocked in their opens, then the
    producer writes each file (numpy memmap 'w+': see test_publication_rules, item 7)."""
    libs = [lib for lib in ("h5py", "netCDF4") if _importable(lib)] + ["memmap"]
    prod, cons = _pair(mounts, tmp_path, storage)
    _run_consumers_first(mounts, spawn, prod, cons, libs)
    if len(libs) < 3:
        pytest.skip(f"checked {libs} only: h5py or netCDF4 is not installed")


@pytest.mark.parametrize("storage", ["node-local", "shared"])
def test_sqlite3_consumer_started_first(tmp_path: Path, mounts: Mounts, spawn,  # type: ignore[no-untyped-def]
                                        storage: str) -> None:
    """sqlite3 stats the database before it opens it: the consumer mount waits on stats of
    '*.db' only (its -journal and -wal probes must answer ENOENT at once)."""
    prod, cons = _pair(mounts, tmp_path, storage, cons_opts=("--wait-on-stat", "*.db"))
    _run_consumers_first(mounts, spawn, prod, cons, ["sqlite3"])


def _importable(name: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(name) is not None

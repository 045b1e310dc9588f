"""Three emulated nodes: network namespaces joined by a bridge, each node with its own mount and
storage, one producer and two consumers; the bytes cross the veth pairs (UCX over TCP, or TCP).

The daemons enter only the network namespace (``nsenter --net``), so their FUSE mounts stay
visible to the test; they share the one embedded KVS file, as mounts on one machine do.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import Mounts, run, wait_for

pytestmark = [pytest.mark.mounted, pytest.mark.netns]
EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "md_workflow"
SUBNET = "10.213.77"
NODES = {"n1": f"{SUBNET}.1", "n2": f"{SUBNET}.2", "n3": f"{SUBNET}.3"}


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def netns() -> Iterator[dict[str, str]]:
    if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("nsenter") is None:
        pytest.skip("network namespaces need root, iproute2 and nsenter")
    tag = uuid.uuid4().hex[:6]
    names = {node: f"dyadfs-{tag}-{node}" for node in NODES}
    hub = f"dyadfs-{tag}-hub"
    made: list[str] = []
    try:
        _ip("netns", "add", hub)
        made.append(hub)
        _ip("-n", hub, "link", "add", "br0", "type", "bridge")
        _ip("-n", hub, "link", "set", "br0", "up")
        for i, (node, ns) in enumerate(names.items()):
            _ip("netns", "add", ns)
            made.append(ns)
            a, b = f"dy{tag}{i}a", f"dy{tag}{i}b"
            _ip("link", "add", a, "type", "veth", "peer", "name", b)
            _ip("link", "set", a, "netns", ns)
            _ip("link", "set", b, "netns", hub)
            _ip("-n", ns, "link", "set", a, "name", "eth0")
            _ip("-n", ns, "addr", "add", f"{NODES[node]}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", hub, "link", "set", b, "master", "br0")
            _ip("-n", hub, "link", "set", b, "up")
    except subprocess.CalledProcessError as e:
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        pytest.skip(f"cannot build network namespaces here: {e.stderr!r}")
    try:
        # the nodes reach each other across the bridge, and only there
        r = subprocess.run(["ip", "netns", "exec", names["n2"], "ping", "-c", "1", "-W", "5",
                            NODES["n1"]], capture_output=True, timeout=30)
        if r.returncode != 0 and shutil.which("ping"):
            pytest.fail(f"the emulated nodes cannot reach each other: {r.stdout!r}")
        yield names
    finally:
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def on(ns: str) -> list[str]:
    return ["nsenter", f"--net=/run/netns/{ns}"]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("transport", ["ucx", "tcp"])
def test_three_nodes_seed_workflow(tmp_path: Path, mounts: Mounts, netns: dict[str, str],
                                   transport: str) -> None:
    dirs = {node: tmp_path / node for node in NODES}
    common = ["--namespace", "netns", "--transport", transport, "--wait-timeout", "120",
              "--fetch-timeout", "30"]
    mounts.mount(dirs["n1"], "--role", "producer", "--listen", NODES["n1"], *common,
                 prefix=on(netns["n1"]))
    for node in ("n2", "n3"):
        mounts.mount(dirs[node], "--role", "consumer", "--listen", NODES[node], *common,
                     prefix=on(netns[node]))
    consumers = [subprocess.Popen([*on(netns[node]), sys.executable,
                                   str(EXAMPLES / "consumer.py"), str(dirs[node])],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for node in ("n2", "n3")]
    wait_for(lambda: all(mounts.status(dirs[n])["waiting"] == 1 for n in ("n2", "n3")), 30,
             "both consumers waiting for frame 0")
    run([*on(netns["n1"]), sys.executable, str(EXAMPLES / "producer.py"), str(dirs["n1"])])
    for c in consumers:
        out, err = c.communicate(timeout=180)
        assert c.returncode == 0, err.decode()
        assert out.decode().count("consumer: frame") == 10
    big = dirs["n1"] / "group0" / "big.bin"
    run(["dd", "if=/dev/urandom", f"of={big}", "bs=1M", "count=24", "status=none"])
    for node in ("n2", "n3"):
        for i in range(10):
            name = f"group0/a4md_chunk{i}.dat"
            assert sha(dirs[node] / name) == sha(dirs["n1"] / name)
        assert sha(dirs[node] / "group0/big.bin") == sha(big)
    prod = mounts.status(dirs["n1"])
    assert prod["served"] == 22 and prod["address"].startswith(NODES["n1"] + ":")
    for node in ("n2", "n3"):
        st = mounts.status(dirs[node])
        assert st["pulled"] == 11 and st["address"].startswith(NODES[node] + ":")
    for d in dirs.values():
        mounts.umount(d)
    for node in ("n2", "n3"):  # the pulled frames stay in each node's own directory
        assert len(list((dirs[node] / "group0").glob("a4md_chunk*.dat"))) == 10

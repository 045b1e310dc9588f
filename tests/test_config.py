from pathlib import Path

import pytest

from dyadfs import config
from dyadfs.errors import ConfigError


def test_defaults(tmp_path: Path) -> None:
    c = config.build(tmp_path, {}, env={})
    assert c.role == "both" and c.namespace == "dyadfs" and c.kvs == "local"
    assert c.wait_timeout is None and not c.shared_storage
    assert c.transport == config.default_transport()
    assert c.mountpoint == tmp_path


def test_precedence_cli_over_ours_over_dyads(tmp_path: Path) -> None:
    env = {"DYAD_KVS_NAMESPACE": "dyad", "DYADFS_NAMESPACE": "ours"}
    assert config.build(tmp_path, {}, env=env).namespace == "ours"
    assert config.build(tmp_path, {"namespace": "cli"}, env=env).namespace == "cli"
    assert config.build(tmp_path, {}, env={"DYAD_KVS_NAMESPACE": "dyad"}).namespace == "dyad"


def test_dyad_booleans_mean_set_is_on(tmp_path: Path) -> None:
    assert config.build(tmp_path, {}, env={"DYAD_SHARED_STORAGE": "0"}).shared_storage
    assert not config.build(tmp_path, {}, env={"DYADFS_SHARED_STORAGE": "0"}).shared_storage
    with pytest.raises(ConfigError, match="DYADFS_SHARED_STORAGE"):
        config.build(tmp_path, {}, env={"DYADFS_SHARED_STORAGE": "maybe"})


def test_roles_from_dyad_paths(tmp_path: Path) -> None:
    env = {"DYAD_PATH_PRODUCER": str(tmp_path)}
    assert config.build(tmp_path, {}, env=env).role == "producer"
    env = {"DYAD_PATH_CONSUMER": str(tmp_path) + "/"}
    assert config.build(tmp_path, {}, env=env).role == "consumer"
    env = {"DYAD_PATH_CONSUMER": str(tmp_path), "DYAD_PATH_PRODUCER": str(tmp_path)}
    assert config.build(tmp_path, {}, env=env).role == "both"


@pytest.mark.parametrize("opts,needle", [
    ({"role": "reader"}, "--role"),
    ({"wait_timeout": "-1"}, "--wait-timeout"),
    ({"wait_timeout": "soon"}, "--wait-timeout"),
    ({"cache_size": "lots"}, "--cache-size"),
    ({"kvs": "redis"}, "--kvs"),
    ({"namespace": "has space"}, "--namespace"),
    ({"transport": "carrier-pigeon"}, "--transport"),
])
def test_bad_options_name_themselves(tmp_path: Path, opts: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        config.build(tmp_path, opts, env={})


def test_sizes_and_flux_default(tmp_path: Path) -> None:
    assert config.parse_size("64M") == 64 << 20
    assert config.parse_size("1GiB") == 1 << 30
    assert config.parse_size("4096") == 4096
    assert config.build(tmp_path, {}, env={"FLUX_URI": "local:///x"}).kvs == "flux"
    assert config.build(tmp_path, {"kvs": "local:/x/y.db"}, env={}).kvs_path == Path("/x/y.db")
    assert config.build(tmp_path, {}, env={"DYAD_DTL_MODE": "UCX"}).transport == "ucx"
    assert config.build(tmp_path, {}, env={"DYAD_DTL_MODE": "FLUX_RPC"}).transport == "tcp"


def test_state_dir_override(tmp_path: Path) -> None:
    c = config.build(tmp_path, {}, env={"DYADFS_STATE_DIR": str(tmp_path / "s")})
    assert c.kvs_path == tmp_path / "s" / "kvs.sqlite"


def test_default_transport_is_ucx_only_with_rdma(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Without RDMA, UCX runs over TCP sockets of its own, slower than the TCP transport;
    within one host the mounts hand files over (--same-host) whatever the transport."""
    import importlib.util
    have_ucxx = importlib.util.find_spec("ucxx") is not None
    monkeypatch.setattr(config, "rdma_devices", lambda: [])
    c = config.build(tmp_path, {}, env={})
    assert (c.transport, c.transport_defaulted, c.same_host) == ("tcp", True, True)
    monkeypatch.setattr(config, "rdma_devices", lambda: ["mlx5_0"])
    c = config.build(tmp_path, {}, env={})
    assert c.transport == ("ucx" if have_ucxx else "tcp")
    c = config.build(tmp_path, {"transport": "ucx", "same_host": "off"}, env={})
    assert (c.transport, c.transport_defaulted, c.same_host) == ("ucx", False, False)

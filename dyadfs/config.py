"""Configuration: one frozen dataclass, built in one place.

Precedence, highest first: command-line options, ``DYADFS_*`` environment variables, DYAD's own
variable names (``DYAD_KVS_NAMESPACE``, ``DYAD_SHARED_STORAGE``, ...), defaults. Nothing else in
dyadfs reads ``os.environ``: modules that need a setting get it from :class:`Config`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .patterns import translate

ROLES = ("producer", "consumer", "both")
TRANSPORTS = ("ucx", "tcp")
DYAD_DTLS = ("FLUX_RPC",)  # the DYAD data transport layers dyadfs speaks (DYAD_DTL_MODE)
DEFAULT_NAMESPACE = "dyadfs"


def default_state_dir(env: Mapping[str, str] | None = None) -> Path:
    """The per-user directory holding the embedded KVS, mount records and logs."""
    env = os.environ if env is None else env
    value = env.get("DYADFS_STATE_DIR")
    if value:
        return Path(value)
    return Path(f"/tmp/dyadfs-{os.getuid()}")


@dataclass(frozen=True)
class Config:
    """Everything a mount needs to know. Built by :func:`build`; never mutated."""

    mountpoint: Path
    role: str = "both"
    namespace: str = DEFAULT_NAMESPACE
    shared_storage: bool = False
    backing: Path | None = None
    cache_size: int | None = None
    prefetch: bool = False
    wait_timeout: float | None = None
    wait_on_stat: tuple[str, ...] = ()  # globs of names whose stat waits (** : all)
    no_wait: tuple[str, ...] = ()  # globs of names that never wait (probed optional files)
    fetch_timeout: float = 10.0
    term_grace: float = 30.0  # SIGTERM: how long open writers may finish
    kvs: str = "local"
    transport: str = "ucx"
    transport_defaulted: bool = False  # not asked for: UCX if UCXX imports, else TCP
    listen: str | None = None
    verify: bool = False
    ucx_threshold: int = 4 << 20
    same_host: bool = True  # pull from a mount of this host by copy_file_range
    async_publish: bool = False
    key_depth: int = 3
    key_bins: int = 1024
    dyad_compat: bool = False  # C DYAD interop (Flux only): DYAD's keys, dyad.fetch both ways
    dyad_dtl: str = "FLUX_RPC"
    foreground: bool = False
    log: Path | None = None
    debug: bool = False
    state_dir: Path = dataclasses.field(default_factory=default_state_dir)

    @property
    def publishes(self) -> bool:
        return self.role in ("producer", "both")

    @property
    def waits(self) -> bool:
        return self.role in ("consumer", "both")

    @property
    def kvs_path(self) -> Path:
        if self.kvs.startswith("local:"):
            return Path(self.kvs[len("local:"):])
        return self.state_dir / "kvs.sqlite"


# name -> (DYADFS variable, DYAD variable or None, kind)
_FIELDS: dict[str, tuple[str, str | None, str]] = {
    "role": ("DYADFS_ROLE", None, "role"),
    "namespace": ("DYADFS_NAMESPACE", "DYAD_KVS_NAMESPACE", "namespace"),
    "shared_storage": ("DYADFS_SHARED_STORAGE", "DYAD_SHARED_STORAGE", "bool"),
    "backing": ("DYADFS_BACKING", None, "path"),
    "cache_size": ("DYADFS_CACHE_SIZE", None, "size"),
    "prefetch": ("DYADFS_PREFETCH", None, "bool"),
    "wait_timeout": ("DYADFS_WAIT_TIMEOUT", None, "seconds"),
    "wait_on_stat": ("DYADFS_WAIT_ON_STAT", None, "patterns"),
    "no_wait": ("DYADFS_NO_WAIT", None, "patterns"),
    "fetch_timeout": ("DYADFS_FETCH_TIMEOUT", None, "seconds"),
    "term_grace": ("DYADFS_TERM_GRACE", None, "seconds"),
    "kvs": ("DYADFS_KVS", None, "kvs"),
    "transport": ("DYADFS_TRANSPORT", None, "transport"),
    "listen": ("DYADFS_LISTEN", None, "str"),
    "verify": ("DYADFS_VERIFY", None, "bool"),
    "ucx_threshold": ("DYADFS_UCX_THRESHOLD", None, "size0"),
    "same_host": ("DYADFS_SAME_HOST", None, "bool"),
    "async_publish": ("DYADFS_ASYNC_PUBLISH", "DYAD_ASYNC_PUBLISH", "bool"),
    "key_depth": ("DYADFS_KEY_DEPTH", "DYAD_KEY_DEPTH", "int"),
    "key_bins": ("DYADFS_KEY_BINS", "DYAD_KEY_BINS", "posint"),
    "dyad_compat": ("DYADFS_DYAD_COMPAT", None, "bool"),
    "dyad_dtl": ("DYADFS_DYAD_DTL", "DYAD_DTL_MODE", "dtl"),
    "log": ("DYADFS_LOG", None, "path"),
    "debug": ("DYADFS_DEBUG", None, "bool"),
}

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
_NS = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


def rdma_devices() -> list[str]:
    try:
        return sorted(os.listdir("/sys/class/infiniband"))
    except OSError:
        return []


def default_transport() -> str:
    """Between hosts: UCX where it has RDMA to use (and UCXX imports), else dyadfs's own TCP.
    Without RDMA, UCX moves bytes over TCP sockets of its own, measured slower than the plain
    TCP transport at every size (README, benchmarks); within one host, mounts hand files over
    (--same-host) whatever the transport."""
    if rdma_devices() and importlib.util.find_spec("ucxx") is not None:
        return "ucx"
    return "tcp"


def parse_size(text: str) -> int:
    """``"64M"``, ``"1GiB"``, ``"4096"`` -> bytes (binary multiples)."""
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"not a size: {text!r} (e.g. 4096, 64M, 2G)")
    number, unit = float(m.group(1)), m.group(2).lower()
    return int(number * 1024 ** " kmgt".index(unit or " "))


def _bool(raw: Any, source: str) -> bool:
    if isinstance(raw, bool):
        return raw
    if source.startswith("DYAD_"):
        return True  # DYAD: set means on, whatever the value
    low = str(raw).strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ValueError(f"expected one of 1/0, true/false, yes/no, on/off, got {raw!r}")


def _choice(choices: tuple[str, ...]) -> Callable[[Any, str], str]:
    def convert(raw: Any, source: str) -> str:
        if raw not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {raw!r}")
        return str(raw)
    return convert


def _transport(raw: Any, source: str) -> str:
    return _choice(TRANSPORTS)(str(raw).lower(), source)


def _dtl(raw: Any, source: str) -> str:
    """DYAD's DTL names (DYAD_DTL_MODE: UCX, FLUX_RPC, MARGO); dyadfs speaks FLUX_RPC to DYAD.
    Another one is kept as given: the mount refuses it only if DYAD interop is on."""
    text = str(raw).strip().upper()
    if text not in ("UCX", "FLUX_RPC", "MARGO"):
        raise ValueError(f"expected FLUX_RPC (or DYAD's UCX, MARGO), got {raw!r}")
    return text


def _kvs(raw: Any, source: str) -> str:
    text = str(raw)
    if text in ("flux", "local") or (text.startswith("local:") and len(text) > 6):
        return text
    raise ValueError(f"expected local, local:PATH or flux, got {raw!r}")


def _namespace(raw: Any, source: str) -> str:
    if not _NS.match(str(raw)):
        raise ValueError(f"{raw!r} is not a valid namespace (letters, digits, _ . -; at most 128)")
    return str(raw)


def _seconds(raw: Any, source: str) -> float:
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise ValueError(f"not a number of seconds: {raw!r} (e.g. 30, 0.5)") from None
    if not value > 0:
        raise ValueError(f"must be a positive number of seconds, got {raw!r}")
    return value


def _size(positive: bool) -> Callable[[Any, str], int]:
    def convert(raw: Any, source: str) -> int:
        value = raw if isinstance(raw, int) else parse_size(str(raw))
        if positive and value <= 0:
            raise ValueError(f"must be positive, got {raw!r}")
        return value
    return convert


def _integer(positive: bool) -> Callable[[Any, str], int]:
    def convert(raw: Any, source: str) -> int:
        value = int(raw)
        if value < 0 or (positive and value == 0):
            raise ValueError(f"must be a {'positive' if positive else 'non-negative'} integer, "
                             f"got {raw!r}")
        return value
    return convert


def _patterns(raw: Any, source: str) -> tuple[str, ...]:
    """Comma-separated globs; a boolean word stands for all names or none."""
    if isinstance(raw, bool):
        return ("**",) if raw else ()
    text = str(raw).strip()
    if text.lower() in _TRUE:
        return ("**",)
    if text.lower() in _FALSE:
        return ()
    patterns = tuple(p.strip() for p in text.split(",") if p.strip())
    for p in patterns:
        try:
            re.compile(translate(p))
        except re.error as e:
            raise ValueError(f"bad pattern {p!r}: {e}") from None
    return patterns


def _path(raw: Any, source: str) -> Path:
    return Path(raw).expanduser()


def _str(raw: Any, source: str) -> str:
    return str(raw)


#: kind -> converter(raw value, where it came from); a converter raises ValueError
_CONVERTERS: dict[str, Callable[[Any, str], Any]] = {
    "bool": _bool, "role": _choice(ROLES), "transport": _transport, "kvs": _kvs,
    "namespace": _namespace, "seconds": _seconds, "size": _size(True), "size0": _size(False),
    "int": _integer(False), "posint": _integer(True), "path": _path, "str": _str,
    "patterns": _patterns, "dtl": _dtl,
}


def _convert(name: str, kind: str, raw: Any, source: str) -> Any:
    """Turn a raw option or environment value into the field's type, or raise ConfigError."""
    try:
        return _CONVERTERS[kind](raw, source)
    except ValueError as e:
        raise ConfigError(f"{source}: {e}") from None


def _option_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def build(mountpoint: str | os.PathLike[str], options: Mapping[str, Any] | None = None,
          env: Mapping[str, str] | None = None) -> Config:
    """Build the configuration of a mount of *mountpoint*.

    *options* holds command-line values (``None`` meaning "not given"); *env* defaults to the
    process environment.
    """
    env = os.environ if env is None else env
    options = options or {}
    mp = Path(os.path.abspath(os.fspath(mountpoint)))
    values: dict[str, Any] = {"mountpoint": mp, "state_dir": default_state_dir(env)}
    for name, (ours, dyads, kind) in _FIELDS.items():
        if options.get(name) is not None:
            values[name] = _convert(name, kind, options[name], _option_name(name))
        elif ours in env:
            values[name] = _convert(name, kind, env[ours], ours)
        elif dyads is not None and dyads in env:
            values[name] = _convert(name, kind, env[dyads], dyads)
    if options.get("foreground") is not None:
        values["foreground"] = bool(options["foreground"])
    if "role" not in values:
        values["role"] = _role_from_dyad(mp, env)
    if "transport" not in values:
        values["transport"] = default_transport()
        values["transport_defaulted"] = True
    if "kvs" not in values and env.get("FLUX_URI"):
        values["kvs"] = "flux"
    _dyad_interop(values)
    backing = values.get("backing")
    if backing is not None:
        values["backing"] = Path(os.path.abspath(backing))
    if values.get("prefetch"):
        if values["role"] == "producer":
            raise ConfigError("--prefetch: a producer mount pulls nothing (use --role consumer "
                              "or both)")
        if values.get("shared_storage"):
            raise ConfigError("--prefetch: with --shared-storage there is nothing to pull")
    return Config(**values)


def _dyad_interop(values: dict[str, Any]) -> None:
    """--dyad-compat: on by default with the Flux KVS (the only one C DYAD shares), and then
    only with a DTL dyadfs speaks to DYAD."""
    flux = values.get("kvs") == "flux"
    compat = values.setdefault("dyad_compat", flux)
    if not compat:
        return
    if not flux:
        raise ConfigError("--dyad-compat on: C DYAD shares only a Flux KVS (use --kvs flux, "
                          "or --dyad-compat off)")
    dtl = values.get("dyad_dtl", "FLUX_RPC")
    if dtl not in DYAD_DTLS:
        raise ConfigError(f"DYAD_DTL_MODE={dtl}: dyadfs speaks only DYAD's FLUX_RPC data "
                          "transport (set DYAD_DTL_MODE=FLUX_RPC for DYAD's clients and module "
                          "too, or mount with --dyad-compat off)")


def _role_from_dyad(mp: Path, env: Mapping[str, str]) -> str:
    """DYAD names the managed directories instead of roles: map them onto ours. DYAD resolves
    them with realpath (symlinks too), and so does this."""
    real = os.path.realpath(mp)

    def same(var: str) -> bool:
        value = env.get(var)
        return value is not None and value != "" and os.path.realpath(value) == real

    producer, consumer = same("DYAD_PATH_PRODUCER"), same("DYAD_PATH_CONSUMER")
    if producer and not consumer:
        return "producer"
    if consumer and not producer:
        return "consumer"
    return "both"

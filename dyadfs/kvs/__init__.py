"""The key-value store interface, and the registry of its backends.

Backends are registered by name and imported lazily, so that a missing optional dependency
(flux-python) costs nothing until it is asked for, and then is one clear error.
"""

from __future__ import annotations

import abc
import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import trio

from ..errors import ConfigError, WaitTimeout

if TYPE_CHECKING:
    from ..config import Config

Predicate = Callable[[bytes | None], bool]


def exists(value: bytes | None) -> bool:
    return value is not None


class KVS(abc.ABC):
    """A namespaced key-value store shared by every mount of a workflow.

    Keys are ``str`` (any bytes of a file name survive through ``surrogateescape``); values are
    ``bytes``. All methods are trio-async; a backend keeps blocking library calls off the trio
    thread.
    """

    #: the backend's name, as in ``--kvs``
    name: str = ""

    @abc.abstractmethod
    async def ensure_namespace(self, ns: str, create: bool = True) -> None:
        """Make sure *ns* exists; create it when missing and *create*, else raise KVSError."""

    @abc.abstractmethod
    async def remove_namespace(self, ns: str) -> None:
        """Remove *ns* and everything in it (a workflow's clean start); missing is fine."""

    @abc.abstractmethod
    async def namespaces(self) -> list[str]:
        """The namespaces this KVS holds."""

    @abc.abstractmethod
    async def get(self, ns: str, key: str) -> bytes | None:
        """The value of *key*, or None."""

    @abc.abstractmethod
    async def commit(self, ns: str, puts: Mapping[str, bytes | None],
                     drop: Sequence[str] = ()) -> None:
        """Set (or, for None, remove) all of *puts* in one atomic transaction.

        The directory index (:mod:`dyadfs.keys`) follows the ``files/`` keys of *puts* in the
        same transaction. *drop* names directories (paths, not keys) to take out of the index
        first: each one's entry in its parent, unless it has a record, and everything indexed
        below it (the producer removed or renamed the directory). Records are not touched by
        *drop*: the caller removes them in *puts*.
        """

    @abc.abstractmethod
    async def put_if_absent(self, ns: str, key: str, value: bytes) -> bytes:
        """Set *key* unless it exists; return the value it holds afterwards."""

    @abc.abstractmethod
    async def list_prefix(self, ns: str, prefix: str) -> dict[str, bytes]:
        """Every key starting with *prefix*, with its value."""

    @abc.abstractmethod
    async def children(self, ns: str, path: str) -> dict[str, bytes | None]:
        """The entries of directory *path* (``""``: the top) in the index: each name with the
        value of its ``files/`` record, or None for an implicit directory. The cost depends
        on the entries of *path*, not on what else the namespace holds."""

    @abc.abstractmethod
    async def is_dir(self, ns: str, path: str) -> bool:
        """Whether *path* is a directory in the index (something was published below it, and
        it was not dropped since): one point read."""

    @abc.abstractmethod
    async def wait_until(self, ns: str, key: str, pred: Predicate,
                         timeout: float | None) -> bytes | None:
        """Wait until *pred* holds for the value of *key* (None: absent); return that value.

        Raises :class:`WaitTimeout` after *timeout* seconds (None: wait forever). Cancellable
        through trio: a cancelled wait leaves nothing behind.
        """

    @abc.abstractmethod
    async def follow(self, ns: str, on_change: Callable[[list[str] | None], None]) -> None:
        """Call *on_change* with the ``files/`` keys of *ns* that commits change, in commit
        order, from now until cancelled (a key may come more than once). ``None`` means
        "anything may have changed": the follower rescans (at the start, and when it fell
        behind what the backend keeps)."""

    async def wait(self, ns: str, key: str, timeout: float | None) -> bytes:
        """Wait until *key* exists (DYAD's ``FLUX_KVS_WAITCREATE``)."""
        value = await self.wait_until(ns, key, exists, timeout)
        assert value is not None
        return value

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Background work (change notification); started in the mount's nursery."""
        task_status.started()

    async def aclose(self) -> None:  # noqa: B027 - optional for a backend
        """Release everything; idempotent."""


def timeout_error(ns: str, key: str, timeout: float | None) -> WaitTimeout:
    return WaitTimeout(f"no publication of {key!r} in namespace {ns!r} after {timeout} s")


_BACKENDS = {
    "local": ("dyadfs.kvs.local", "LocalKVS"),
    "flux": ("dyadfs.kvs.flux", "FluxKVS"),
}


def open_kvs(config: Config) -> KVS:
    """The backend named by ``config.kvs`` (``local``, ``local:PATH`` or ``flux``)."""
    name = "local" if config.kvs.startswith("local") else config.kvs
    try:
        module_name, class_name = _BACKENDS[name]
    except KeyError:
        raise ConfigError(f"--kvs: unknown backend {config.kvs!r}") from None
    module = importlib.import_module(module_name)
    cls = getattr(module, class_name)
    kvs: KVS = cls.from_config(config)
    return kvs

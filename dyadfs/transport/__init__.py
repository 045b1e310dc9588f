"""Moving a published file's bytes from the mount that owns it to the one that reads it.

Two implementations behind one interface: ``ucx`` (UCXX: shared memory, TCP or RDMA, picked by
UCX) and ``tcp`` (trio sockets; a fallback where UCXX is missing, and a baseline). Every mount
also serves plain TCP, so a consumer can always reach an owner whatever its transport.

The protocol is the same on both (see protocol.py): a JSON request naming namespace, secret,
path and version; a JSON header (size, or an errno); the bytes; a JSON trailer (the file did not
change while it was sent; its SHA-256 when asked).
"""

from __future__ import annotations

import abc
import importlib
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import trio

from ..errors import ConfigError

if TYPE_CHECKING:
    from .protocol import Request, Served, Sink

Handler = Callable[["Request"], Awaitable["Served"]]


class Transport(abc.ABC):
    name: str = ""
    #: where this mount serves, "host:port" (None until serving)
    address: str | None = None

    @abc.abstractmethod
    async def start(self, nursery: trio.Nursery, handler: Handler, host: str) -> None:
        """Serve requests with *handler*, from a task of *nursery* that no peer can end;
        returns once listening, with :attr:`address` set. *host* is the address others reach
        this node at (--listen), and the only one served."""

    @abc.abstractmethod
    async def fetch(self, address: str, request: Request, sink: Sink) -> None:
        """Fetch *request* from *address* into *sink*; raises FetchError (or OSError)."""

    async def aclose(self) -> None:  # noqa: B027 - optional for a transport
        """Stop serving; idempotent."""


def default_host() -> str:
    """The first non-loopback IPv4 address of this node (network namespace), else loopback."""
    import fcntl
    import socket
    import struct

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                raw = fcntl.ioctl(s.fileno(), 0x8915,  # SIOCGIFADDR
                                  struct.pack("256s", name.encode()[:15]))
            except OSError:
                continue
            addr = socket.inet_ntoa(raw[20:24])
            if not addr.startswith("127."):
                return addr
    return "127.0.0.1"


_IMPLS = {"tcp": ("dyadfs.transport.tcp", "TCPTransport"),
          "ucx": ("dyadfs.transport.ucx", "UCXTransport")}


def transport_reason() -> str:
    """Why the default transport is TCP here (config.default_transport), for the log."""
    import importlib.util

    from ..config import rdma_devices

    if importlib.util.find_spec("ucxx") is None:
        return "UCXX is not installed (pip install 'dyadfs[ucx]')"
    if not rdma_devices():
        return ("no RDMA device (/sys/class/infiniband): UCX would run over TCP sockets, "
                "slower than plain TCP; --transport ucx to use it anyway")
    return "chosen"


def check_available(name: str) -> None:
    """Cheaply (without importing UCX) raise the one-line error :func:`load` would raise."""
    import importlib.util

    if name == "ucx" and importlib.util.find_spec("ucxx") is None:
        raise ConfigError("--transport ucx: UCXX is not installed; install it with "
                          "pip install 'dyadfs[ucx]' (ucxx-cu12), or use --transport tcp")


def load(name: str) -> type[Transport]:
    """The transport class *name*, or a one-line error naming the fallback."""
    module_name, class_name = _IMPLS[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        if name == "ucx":
            raise ConfigError(f"--transport ucx: UCXX cannot be imported ({e}); install it with "
                              "pip install 'dyadfs[ucx]' (ucxx-cu12), or use --transport tcp") \
                from None
        raise
    cls: type[Transport] = getattr(module, class_name)
    return cls

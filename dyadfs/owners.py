"""Whether the mount that wrote a "writing" mark can still finish it.

On shared storage a producer marks a file "writing" in the KVS before its first change and
replaces the mark with the publication at close. A mount killed (kill -9, a node lost) in
between cannot do either, and its mark would make consumers wait for ever. The rule: the mark
of mount M is *orphaned* when

- M is not in the node registry (``mounts/<id>``): it ended, or never registered;
- M's registered run started after the mark was made: M was restarted since, and the writer
  died with the run that made the mark (a mount id is stable across restarts of one mount
  point on one host, so both times come from the same clock);
- or M's TCP server refuses a connection (a killed daemon's port) or does not accept one
  within :data:`PROBE_TIMEOUT` (a lost node).

No scan of the namespace at start and no heartbeats: a mount is probed only while a consumer
waits on one of its marks, at most once per :data:`PROBE_EVERY` seconds whatever the number of
waiters (the answer is shared).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import trio

from . import keys
from .errors import KVSError
from .keys import MountRecord

if TYPE_CHECKING:
    from .kvs import KVS

log = logging.getLogger(__name__)

#: a mount's server must accept a connection within this (s)
PROBE_TIMEOUT = 2.0
#: a mount is looked at (registry read, TCP probe) at most this often (s)
PROBE_EVERY = 1.0


class Owners:
    """Looks at other mounts through the registry and their TCP servers."""

    def __init__(self, kvs: KVS, ns: str) -> None:
        self.kvs = kvs
        self.ns = ns
        self._seen: dict[str, tuple[float, MountRecord | None, str | None]] = {}

    async def gone(self, owner: str, since_ns: int) -> str | None:
        """Why mount *owner* cannot finish what it marked at *since_ns* (wall-clock
        nanoseconds), or None while it may."""
        now = trio.current_time()
        seen = self._seen.get(owner)
        if seen is None or now - seen[0] >= PROBE_EVERY:
            mrec, unreachable = await self._look(owner)
            seen = (trio.current_time(), mrec, unreachable)
            self._seen[owner] = seen
        _, mrec, unreachable = seen
        if mrec is None:
            return "it is not registered (its mount ended)"
        if mrec.started * 1e9 > since_ns:
            return f"its mount was restarted since (pid {mrec.pid})"
        return unreachable

    async def _look(self, owner: str) -> tuple[MountRecord | None, str | None]:
        key = keys.mount_key(owner)
        raw = await self.kvs.get(self.ns, key)
        if raw is None:
            return None, None
        try:
            mrec = MountRecord.decode(raw, key)
        except KVSError as e:
            log.warning("%s", e)
            return None, None
        if mrec.tcp is None:
            return mrec, None  # nothing to probe: believed alive
        return mrec, await probe(mrec.tcp)


async def probe(address: str) -> str | None:
    """None if a TCP server accepts a connection at *address* ("host:port"), else why not."""
    host, _, port = address.rpartition(":")
    with trio.move_on_after(PROBE_TIMEOUT):
        try:
            stream = await trio.open_tcp_stream(host.strip("[]"), int(port))
        except (OSError, ValueError) as e:
            return f"its server at {address} refuses connections ({e})"
        await stream.aclose()
        return None
    return f"its server at {address} does not answer"

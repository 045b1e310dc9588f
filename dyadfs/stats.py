"""What a mount counts, for ``dyadfs status`` (and the tests that read it)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Stats:
    published: int = 0
    waiting: int = 0
    waits_done: int = 0
    wait_timeouts: int = 0
    pulled: int = 0
    prefetched: int = 0
    pulling: int = 0
    bytes_pulled: int = 0
    pulled_same_host: int = 0  # of pulled: handed over by a mount of this host
    pulled_over_ucx: int = 0  # of pulled: moved by UCX (the others: TCP, or this host)
    served: int = 0
    bytes_served: int = 0
    errors: int = 0
    unexpected: int = 0
    #: FUSE requests answered, of the kinds a listing or a stat costs (what the kernel did
    #: not take from its own cache)
    fuse_lookups: int = 0
    fuse_getattrs: int = 0

"""The inode and handle tables: what the kernel knows by number.

Inodes are dyadfs' own numbers, one per (parent, name), so that names the kernel sees before
they exist in the backing (published elsewhere, or provisional) have an inode too. A node lives
while the kernel remembers it (its lookup count, see ``forget``) or a handle is open on it.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pyfuse3
from pyfuse3 import FUSEError

from .paths import join

if TYPE_CHECKING:
    from .puller import Pull

ROOT = pyfuse3.ROOT_INODE


@dataclass(eq=False)
class Node:
    ino: int
    parent: int
    name: bytes
    lookups: int = 0
    provisional: str | None = None  # "file" or "dir": the kernel knows it, the backing does not
    handles: set[int] = field(default_factory=set)
    told: tuple[int, int] | None = None  # (size, mtime) the kernel may cache, on consumer mounts


@dataclass(eq=False)
class Handle:
    fh: int
    fd: int
    node: Node
    publishes: bool  # its close publishes (a producer's handle open for writing)
    pull: Pull | None = None  # the pull this handle reads from while it is under way
    written: bool = False  # data changed since the last publication: flush publishes
    pending: bool = False  # created or truncated, not written since: release publishes
    direct: bool = False  # open for writing only: writes bypass the kernel's page cache


@dataclass(eq=False)
class DirHandle:
    node: Node
    entries: list[tuple[bytes, pyfuse3.EntryAttributes, Node]]


class Nodes:
    def __init__(self) -> None:
        self._nodes: dict[int, Node] = {ROOT: Node(ROOT, ROOT, b"", lookups=1)}
        self._names: dict[tuple[int, bytes], int] = {}
        self._next_ino = ROOT + 1
        self._handles: dict[int, Handle] = {}
        self._dirs: dict[int, DirHandle] = {}
        self._next_fh = 1

    # -- inodes ----------------------------------------------------------------------------
    def get(self, ino: int) -> Node:
        try:
            return self._nodes[ino]
        except KeyError:
            raise FUSEError(errno.ESTALE) from None

    def known(self, ino: int) -> bool:
        return ino in self._nodes

    def rel(self, node: Node) -> bytes:
        """*node*'s path relative to the managed directory."""
        parts = []
        while node.ino != ROOT:
            parts.append(node.name)
            node = self._nodes[node.parent]
        return b"/".join(reversed(parts)) or b"."

    def path_of(self, parent: Node, name: bytes) -> bytes:
        return join(self.rel(parent), name)

    def child(self, parent: Node, name: bytes) -> Node:
        """The node of *name* in *parent*, made if new (its lookup count is the caller's)."""
        ino = self._names.get((parent.ino, name))
        if ino is not None:
            return self._nodes[ino]
        node = Node(self._next_ino, parent.ino, name)
        self._next_ino += 1
        self._nodes[node.ino] = node
        self._names[(parent.ino, name)] = node.ino
        return node

    def find(self, rel: bytes) -> Node | None:
        """The node the kernel knows at *rel*, if any."""
        ino = ROOT
        for part in rel.split(b"/"):
            found = self._names.get((ino, part))
            if found is None:
                return None
            ino = found
        return self._nodes.get(ino)

    def drop_name(self, parent: int, name: bytes) -> None:
        """*name* is gone from *parent*: its node goes too, unless still referenced."""
        ino = self._names.pop((parent, name), None)
        if ino is not None:
            self._release(ino)

    def forget(self, ino: int, nlookup: int) -> None:
        node = self._nodes.get(ino)
        if node is None or ino == ROOT:
            return
        node.lookups -= nlookup
        if node.lookups <= 0 and not node.handles:
            del self._nodes[ino]
            if self._names.get((node.parent, node.name)) == ino:
                del self._names[(node.parent, node.name)]

    def remember(self, node: Node) -> None:
        """The kernel learns of *node* again (a directory listing made before it forgot it)."""
        if node.ino not in self._nodes:
            self._nodes[node.ino] = node
            self._names.setdefault((node.parent, node.name), node.ino)

    def renamed(self, p_old: Node, name_old: bytes, p_new: Node, name_new: bytes,
                exchange: bool) -> None:
        ino_old = self._names.pop((p_old.ino, name_old), None)
        ino_new = self._names.pop((p_new.ino, name_new), None)
        if ino_old is not None:
            self._names[(p_new.ino, name_new)] = ino_old
            self._nodes[ino_old].parent, self._nodes[ino_old].name = p_new.ino, name_new
        if ino_new is not None:
            if exchange:
                self._names[(p_old.ino, name_old)] = ino_new
                self._nodes[ino_new].parent, self._nodes[ino_new].name = p_old.ino, name_old
            else:
                self._release(ino_new)

    def _release(self, ino: int) -> None:
        node = self._nodes.get(ino)
        if node is not None and node.lookups <= 0 and not node.handles:
            del self._nodes[ino]

    # -- open files ------------------------------------------------------------------------
    def open_handle(self, fd: int, node: Node, publishes: bool) -> Handle:
        fh = self._next_fh
        self._next_fh += 1
        handle = Handle(fh, fd, node, publishes)
        self._handles[fh] = handle
        node.handles.add(fh)
        return handle

    def handle(self, fh: int) -> Handle:
        return self._handles[fh]

    def handle_or_none(self, fh: int | None) -> Handle | None:
        return self._handles.get(fh) if fh is not None else None

    def handles_of(self, node: Node) -> list[Handle]:
        return [self._handles[fh] for fh in node.handles]

    def close_handle(self, fh: int) -> Handle:
        """Take *fh* out of the table (its descriptor is the caller's to close)."""
        handle = self._handles.pop(fh)
        node = handle.node
        node.handles.discard(fh)
        if node.lookups <= 0 and not node.handles and node.ino in self._nodes:
            del self._nodes[node.ino]
        return handle

    def is_open(self, rel: bytes) -> bool:
        """Whether a handle is open on *rel* (pulled copies in use are never evicted)."""
        return any(self.rel(h.node) == rel for h in self._handles.values())

    # -- open directories ------------------------------------------------------------------
    def open_dir(self, node: Node,
                 entries: list[tuple[bytes, pyfuse3.EntryAttributes, Node]]) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self._dirs[fh] = DirHandle(node, entries)
        return fh

    def dir(self, fh: int) -> DirHandle:
        return self._dirs[fh]

    def close_dir(self, fh: int) -> None:
        del self._dirs[fh]

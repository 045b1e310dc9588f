"""The inode and handle tables: what the kernel knows by number.

A name present in the backing directory is known by the backing file's identity (its
``st_dev``/``st_ino``, as libfuse's ``passthrough_hp`` does): all hard links of a file are one
node, with one inode number, one set of cached attributes and one page cache, whatever name they
were reached by. A pulled copy replaced by a newer version is a new backing file, hence a new
node: descriptors open on the old version keep reading the old bytes, from their own page cache.

A name the backing does not have (published elsewhere, or a reader's provisional entry) gets a
node with no backing identity; when the file arrives (a pull installs it) that same node takes
the file's identity, so the kernel's view of the name does not change under its readers.

A node lives while the kernel remembers it (its lookup count, see ``forget``) or a handle is
open on it. When a backing file is removed through this mount, its identity is dropped from the
table as soon as no name of it is left, so a new file that reuses the inode number is a new
node.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pyfuse3
from pyfuse3 import FUSEError

from .paths import join

if TYPE_CHECKING:
    from .puller import Pull

ROOT = pyfuse3.ROOT_INODE

Key = tuple[int, int]  # the backing file's (st_dev, st_ino)
Name = tuple[int, bytes]  # (parent inode, name)


def key_of(st: os.stat_result) -> Key:
    return st.st_dev, st.st_ino


@dataclass(eq=False)
class Node:
    ino: int
    parent: int  # the name it was last reached by: (parent, name)
    name: bytes
    key: Key | None = None  # None: not in the backing (published elsewhere, or provisional)
    links: set[Name] = field(default_factory=set)  # every name it has, hard links included
    lookups: int = 0
    provisional: str | None = None  # "file" or "dir": the kernel knows it, the backing does not
    handles: set[int] = field(default_factory=set)
    told: tuple[int, int] | None = None  # (size, mtime) the kernel may cache, on consumer mounts
    published: bool = False  # absent, shown as a published name (not provisional)
    awaited: bool = False  # provisional file whose GETATTR waits for it (--wait-on-stat)
    #: called when the name gets a file of its own here (created, renamed onto): a stat
    #: waiting on this provisional node ends
    waker: Callable[[], None] | None = None


@dataclass(eq=False)
class Handle:
    fh: int
    fd: int
    node: Node
    flags: int  # the open flags
    publishes: bool  # its close publishes (a producer's handle open for writing)
    pull: Pull | None = None  # the pull this handle reads from while it is under way
    written: bool = False  # data changed since the last publication: flush publishes
    pending: bool = False  # created or truncated, not written since: release publishes
    direct: bool = False  # FOPEN_DIRECT_IO: reads and writes bypass the kernel's page cache
    own: bool = True  # its bytes are its node's file (else: a newer version, see fs.open)
    marked: bool = False  # shared storage: the file was marked "writing" for this handle
    opened: tuple[int, int, int] | None = None  # shared storage reader: (size, mtime, ctime)


@dataclass(eq=False)
class DirHandle:
    node: Node
    entries: list[tuple[bytes, pyfuse3.EntryAttributes, Node]]


class Nodes:
    def __init__(self) -> None:
        root = Node(ROOT, ROOT, b"", lookups=1)
        self._nodes: dict[int, Node] = {ROOT: root}
        self._names: dict[Name, int] = {}
        self._keys: dict[Key, int] = {}
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

    def rel(self, node: Node) -> bytes:
        """*node*'s path relative to the managed directory (by the name it was last reached by,
        or, once that name is gone, by another of its names)."""
        parts = []
        while node.ino != ROOT:
            parts.append(node.name)
            node = self._nodes[node.parent]
        return b"/".join(reversed(parts)) or b"."

    def path_of(self, parent: Node, name: bytes) -> bytes:
        return join(self.rel(parent), name)

    def at(self, parent: Node, name: bytes) -> Node | None:
        """The node the table holds for *name* in *parent*, if any."""
        ino = self._names.get((parent.ino, name))
        return None if ino is None else self._nodes.get(ino)

    def present(self, parent: Node, name: bytes, st: os.stat_result) -> Node:
        """The node of *name* in *parent*, which the backing has with attributes *st*."""
        key = key_of(st)
        ino = self._keys.get(key)
        here = self.at(parent, name)
        if ino is not None:
            node = self._nodes[ino]
        elif here is not None and here.key is None:
            node = here  # a provisional name became a real file: the kernel's node stays
            self._adopt(node, key)
        else:
            node = self._new(parent.ino, name)
            self._adopt(node, key)
        if here is not None and here is not node:
            self._unname(here, (parent.ino, name))  # replaced behind the kernel's back
        if here is not None and here.waker is not None:
            here.waker()
        self._name(node, parent.ino, name)
        node.provisional = None
        node.awaited = False
        return node

    def absent(self, parent: Node, name: bytes, kind: str) -> Node:
        """The node of *name* in *parent*, which the backing does not have: published elsewhere
        or provisional (*kind*: "file" or "dir")."""
        here = self.at(parent, name)
        if here is not None and here.key is None:
            node = here
        else:
            if here is not None:
                self._unname(here, (parent.ino, name))  # its file is gone
            node = self._new(parent.ino, name)
            self._name(node, parent.ino, name)
        node.provisional = node.provisional or kind
        return node

    def adopt(self, node: Node, st: os.stat_result) -> None:
        """*node* (provisional) reads the file of *st* (a pull's): it is that file from now on."""
        if node.key is None and key_of(st) not in self._keys:
            self._adopt(node, key_of(st))

    def _new(self, parent: int, name: bytes) -> Node:
        node = Node(self._next_ino, parent, name)
        self._next_ino += 1
        self._nodes[node.ino] = node
        return node

    def _adopt(self, node: Node, key: Key) -> None:
        node.key = key
        self._keys[key] = node.ino

    def _name(self, node: Node, parent: int, name: bytes) -> None:
        self._names[(parent, name)] = node.ino
        node.links.add((parent, name))
        node.parent, node.name = parent, name

    def _unname(self, node: Node, name: Name) -> None:
        """*node* is no longer reachable by *name*."""
        if self._names.get(name) == node.ino:
            del self._names[name]
        node.links.discard(name)
        if node.links:
            node.parent, node.name = next(iter(node.links))
        elif node.key is not None and self._keys.get(node.key) == node.ino:
            # no name of the file is left through this mount: its backing inode number may be
            # reused by a new file, which must be a new node
            del self._keys[node.key]
        self._release(node)

    def drop_name(self, parent: int, name: bytes) -> None:
        """*name* is gone from *parent* (unlinked or removed)."""
        ino = self._names.get((parent, name))
        if ino is not None:
            self._unname(self._nodes[ino], (parent, name))

    def forget(self, ino: int, nlookup: int) -> None:
        node = self._nodes.get(ino)
        if node is None or ino == ROOT:
            return
        node.lookups -= nlookup
        self._release(node)

    def _release(self, node: Node) -> None:
        """Drop *node* from the table once neither the kernel nor a handle refers to it."""
        if node.lookups > 0 or node.handles or node.ino == ROOT:
            return
        self._nodes.pop(node.ino, None)
        for name in node.links:
            if self._names.get(name) == node.ino:
                del self._names[name]
        node.links.clear()
        if node.key is not None and self._keys.get(node.key) == node.ino:
            del self._keys[node.key]

    def remember(self, node: Node) -> None:
        """The kernel learns of *node* again (a directory listing made before it forgot it)."""
        if node.ino not in self._nodes:
            self._nodes[node.ino] = node
            self._name(node, node.parent, node.name)
            if node.key is not None:
                self._keys.setdefault(node.key, node.ino)

    def renamed(self, p_old: Node, name_old: bytes, p_new: Node, name_new: bytes,
                exchange: bool) -> None:
        moved = self.at(p_old, name_old)
        there = self.at(p_new, name_new)
        if moved is not None:
            self._unname_only(moved, (p_old.ino, name_old))
        if there is not None:
            self._unname_only(there, (p_new.ino, name_new))
            if there.waker is not None:
                there.waker()
        if moved is not None:
            self._name(moved, p_new.ino, name_new)
        if there is not None:
            if exchange:
                self._name(there, p_old.ino, name_old)
            else:
                self._unname(there, (p_new.ino, name_new))

    def _unname_only(self, node: Node, name: Name) -> None:
        if self._names.get(name) == node.ino:
            del self._names[name]
        node.links.discard(name)

    # -- open files ------------------------------------------------------------------------
    def open_handle(self, fd: int, node: Node, flags: int, publishes: bool) -> Handle:
        fh = self._next_fh
        self._next_fh += 1
        handle = Handle(fh, fd, node, flags, publishes)
        self._handles[fh] = handle
        node.handles.add(fh)
        return handle

    def handle(self, fh: int) -> Handle:
        return self._handles[fh]

    def handle_or_none(self, fh: int | None) -> Handle | None:
        return self._handles.get(fh) if fh is not None else None

    def handles_of(self, node: Node) -> list[Handle]:
        return [self._handles[fh] for fh in node.handles]

    def rels(self, node: Node) -> list[bytes]:
        """Every name of *node* (hard links), the one it was last reached by first."""
        out = [self.rel(node)]
        for parent, name in node.links:
            if (parent, name) != (node.parent, node.name) and parent in self._nodes:
                out.append(join(self.rel(self._nodes[parent]), name))
        return out

    def close_handle(self, fh: int) -> Handle:
        """Take *fh* out of the table (its descriptor is the caller's to close)."""
        handle = self._handles.pop(fh)
        handle.node.handles.discard(fh)
        self._release(handle.node)
        return handle

    def writers(self) -> int:
        """How many handles are open for writing."""
        return sum(1 for h in self._handles.values() if h.flags & os.O_ACCMODE != os.O_RDONLY)

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

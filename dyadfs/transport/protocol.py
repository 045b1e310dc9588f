"""The fetch protocol's messages, and the serving side's checks.

A fetch names a published path and version. Everything else is refused and logged: an
unpublished path, ``..`` or an absolute path, a symlink anywhere on the way, a version that is
not the published one, a wrong secret, a malformed message. Paths are resolved component by
component with ``O_NOFOLLOW`` under the backing directory's descriptor, so nothing outside it can
be reached.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import json
import logging
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import FetchError

log = logging.getLogger(__name__)

#: the longest request, header or trailer either side accepts; a peer announcing more is dropped
#: before anything is allocated for it
MAX_MESSAGE = 64 * 1024
#: the serving side reads (UCX) or sends (TCP) a file this much at a time, and asks
#: ``Served.changed`` between two of them
CHUNK = 4 * 1024 * 1024


@dataclass(frozen=True)
class Request:
    ns: str
    secret: str
    path: bytes
    version: int
    verify: bool = False
    raw: int = 0  # dyadfs bench: send this many bytes from memory instead of a file
    #: the local transport: a file of at most this many bytes may come in the answer itself
    inline: int = 0

    def encode(self) -> bytes:
        d = {"op": "fetch", "ns": self.ns, "secret": self.secret, "path": self.path.hex(),
             "version": self.version, "verify": self.verify, "raw": self.raw}
        if self.inline:
            d["inline"] = self.inline
        return json.dumps(d).encode()

    @classmethod
    def decode(cls, raw: bytes) -> Request:
        try:
            d = json.loads(raw)
            if not isinstance(d, dict) or d.get("op") != "fetch":
                raise ValueError("not a fetch")
            return cls(ns=str(d["ns"]), secret=str(d["secret"]), path=bytes.fromhex(d["path"]),
                       version=int(d["version"]), verify=bool(d.get("verify", False)),
                       raw=int(d.get("raw", 0)), inline=int(d.get("inline", 0)))
        except (ValueError, KeyError, TypeError, OverflowError) as e:  # 1e999 is valid JSON
            raise FetchError(f"malformed request: {e}", errno.EINVAL) from None


def header(size: int | None = None, err: int | None = None, message: str = "",
           inline: bool = False) -> bytes:
    if err is not None:
        return json.dumps({"ok": False, "errno": err, "error": message}).encode()
    if inline:
        return json.dumps({"ok": True, "size": size, "inline": True}).encode()
    return json.dumps({"ok": True, "size": size}).encode()


def is_inline(raw: bytes) -> bool:
    """Whether a header (already accepted by parse_header) says the bytes follow it."""
    return bool(json.loads(raw).get("inline"))


def parse_header(raw: bytes) -> int:
    """The size announced by a header; raises FetchError for a refusal."""
    try:
        d = json.loads(raw)
        if d.get("ok"):
            size = int(d["size"])
            if size < 0:
                raise ValueError("negative size")
            return size
        err, msg = int(d.get("errno", errno.EIO)), str(d.get("error", ""))
    except (ValueError, KeyError, TypeError, AttributeError, OverflowError):
        raise FetchError("malformed answer from the owner") from None
    raise FetchError(f"the owner refused: {msg}", err)


def trailer(ok: bool, sha256: str | None, message: str = "") -> bytes:
    return json.dumps({"ok": ok, "sha256": sha256, "error": message}).encode()


def parse_trailer(raw: bytes) -> str | None:
    try:
        d = json.loads(raw)
        ok, sha, msg = bool(d["ok"]), d.get("sha256"), str(d.get("error", ""))
    except (ValueError, KeyError, TypeError, AttributeError):
        raise FetchError("malformed trailer from the owner") from None
    if not ok:
        raise FetchError(f"the owner aborted the transfer: {msg}")
    return None if sha is None else str(sha)


def unchanged() -> str | None:
    """The default ``Served.changed``: nothing says the file changed."""
    return None


@dataclass
class Served:
    """An open file the transport sends, then closes; or a refusal.

    ``changed`` is the caller's say on whether the version being sent is still the published
    one: both transports call it on the trio thread after reading each chunk of at most CHUNK
    bytes and before sending the next, and once more before the trailer. A reason string
    aborts the transfer (the trailer says why, or the connection is closed if the bytes
    already announced cannot be completed).
    """

    fd: int = -1
    size: int = 0
    err: int | None = None
    message: str = ""
    verify: bool = False
    _st: os.stat_result | None = None
    #: asked after each chunk read from the file (before the next is sent), and at the end:
    #: None while the file still holds the requested version, else why not (abort)
    changed: Callable[[], str | None] = unchanged

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def check_unchanged(self) -> str | None:
        """After sending: None if the file is as it was, else why not."""
        st = os.fstat(self.fd)
        assert self._st is not None
        if (st.st_size, st.st_mtime_ns) != (self._st.st_size, self._st.st_mtime_ns):
            return "the file changed while it was sent"
        return None

    def digest(self) -> str | None:
        if not self.verify:
            return None
        h = hashlib.sha256()
        off = 0
        while off < self.size:
            data = os.pread(self.fd, CHUNK, off)
            if not data:
                break
            h.update(data)
            off += len(data)
        return h.hexdigest()


def refuse(err: int, message: str, req: Request | None = None) -> Served:
    log.warning("refused fetch%s: %s", "" if req is None else f" of {req.path!r}", message)
    return Served(err=err, message=message)


def open_beneath(root_fd: int, rel: bytes) -> int:
    """Open *rel* below *root_fd* for reading, refusing ``..``, absolute paths and symlinks."""
    if not rel or rel.startswith(b"/") or b"\0" in rel:
        raise FetchError(f"bad path {rel!r}", errno.EPERM)
    parts = rel.split(b"/")
    if any(p in (b"", b".", b"..") for p in parts):
        raise FetchError(f"bad path {rel!r}", errno.EPERM)
    fd = os.dup(root_fd)
    try:
        for part in parts[:-1]:
            nfd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = nfd
        file_fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=fd)
    except OSError as e:
        if e.errno == errno.ELOOP or e.errno == errno.ENOTDIR:
            raise FetchError(f"symlink or non-directory on the path {rel!r}", errno.EPERM) \
                from None
        raise
    finally:
        os.close(fd)
    if not stat.S_ISREG(os.fstat(file_fd).st_mode):
        os.close(file_fd)
        raise FetchError(f"not a regular file: {rel!r}", errno.EPERM)
    return file_fd


def check_secret(req: Request, ns: str, secret: Callable[[], str | None]) -> str | None:
    if req.ns != ns:
        return f"namespace {req.ns!r} is not served here"
    want = secret()
    if want is None or not hmac.compare_digest(req.secret.encode(), want.encode()):
        return "wrong secret"
    return None


class Sink:
    """Where a transport writes fetched bytes: a file descriptor (-1: discard them, a raw
    transfer), and progress callbacks.

    A transport writes through a shared map of ``fd`` only when ``preallocated`` says the
    caller reserved the blocks (``fallocate``) after ``on_size``: a map of a sparse file on a
    full disk answers a write with SIGBUS, which kills the daemon. Otherwise it writes with
    ``pwrite``/``splice``, whose ENOSPC ends the fetch with a FetchError carrying that errno.
    """

    def __init__(self, fd: int, on_size: Callable[[int], None],
                 on_progress: Callable[[int], None], preallocated: bool = False) -> None:
        self.fd = fd
        self.on_size = on_size
        self.on_progress = on_progress
        #: the file's blocks are allocated (fallocate) by on_size: writing through a map of it
        #: cannot fail for want of space (else a full disk would be a SIGBUS)
        self.preallocated = preallocated
        self.sha256: str | None = None


def write_error(e: OSError) -> FetchError:
    """A failed write of the destination (ENOSPC, EDQUOT, EIO): the fetch ends with its errno."""
    return FetchError(f"writing the pulled copy failed: {e.strerror or e}", e.errno or errno.EIO)

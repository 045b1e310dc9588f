"""Error classes. Each carries the errno a FUSE handler answers with, or is a user error."""

from __future__ import annotations

import errno


class DyadfsError(Exception):
    """An expected failure in the file system; ``errno`` is what the caller of the syscall sees."""

    errno: int = errno.EIO

    def __init__(self, message: str, err: int | None = None) -> None:
        super().__init__(message)
        if err is not None:
            self.errno = err


class ConfigError(Exception):
    """A wrong or missing setting: reported as one line naming it, exit code 2."""


class UsageError(Exception):
    """A command used on something it cannot act on (a missing DIR, not mounted, ...): exit 1."""


class KVSError(DyadfsError):
    """The KVS failed, or holds a value this version cannot read."""


class WaitTimeout(DyadfsError):
    errno = errno.ETIMEDOUT


class FetchError(DyadfsError):
    """A pull failed (owner gone, transfer cut, verification failed)."""

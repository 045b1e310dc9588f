"""The control socket of a mount: ``dyadfs status`` and ``dyadfs bench``'s raw transfers.

One JSON request line, one JSON answer line per connection, on an AF_UNIX socket in the state
directory (mode 0700). Whoever connects is served in a task of the server's own nursery: junk,
a reset, a slow or silent peer, a line that never ends, or a flood of connections cost that
connection an error answer (or nothing), never the mount (see ``transport.tcp.serve_listener``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from .errors import DyadfsError, UsageError
from .transport.tcp import serve_listener

if TYPE_CHECKING:
    from .mount import Mount

#: the longest request line read; the rest of a longer one is not read
MAX_LINE = 4096
#: a request line must arrive within this, and the answer leave within this (s)
REQUEST_TIMEOUT = 5.0
#: a raw transfer (dyadfs bench) may take this long (s)
RAW_TIMEOUT = 300.0
#: connections answered at once; beyond that, new ones are closed at once
MAX_CONNECTIONS = 64


async def _serve_control(mount: Mount, *,
                         task_status: trio.TaskStatus[Path] = trio.TASK_STATUS_IGNORED) -> None:
    """Answer ``dyadfs status``: a JSON line for every connection."""
    from .mount import _unlink, info_path  # mount.py imports this module

    path = info_path(mount.config).with_suffix(".sock")
    if len(os.fsencode(str(path))) > 100:  # AF_UNIX paths end at 108 bytes
        digest = hashlib.sha1(os.fsencode(str(path))).hexdigest()[:16]
        path = Path(f"/tmp/dyadfs-sock-{os.getuid()}") / f"{digest}.sock"
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    _unlink(path)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with sock:
        await sock.bind(str(path))
        sock.listen(16)
        task_status.started(path)

        async def handle(conn: trio.socket.SocketType, peer: str) -> None:
            await _control_request(mount, conn)

        await serve_listener(sock, handle, what="control socket",
                             max_connections=MAX_CONNECTIONS)


async def _read_line(conn: trio.socket.SocketType) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        if len(data) >= MAX_LINE:
            raise ValueError(f"request longer than {MAX_LINE} bytes")
        chunk = await conn.recv(MAX_LINE - len(data))
        if not chunk:
            break
        data += chunk
    return data


async def _control_request(mount: Mount, conn: trio.socket.SocketType) -> None:
    """One JSON request line, one JSON answer line: status, or a raw transfer (bench)."""
    with conn:
        try:
            with trio.fail_after(REQUEST_TIMEOUT):
                data = await _read_line(conn)
            request = json.loads(data or b"{}")
            if not isinstance(request, dict):
                raise ValueError("the request is not a JSON object")
            if request.get("cmd", "status") == "raw":
                if mount.puller is None:
                    raise UsageError("this mount does not pull (shared storage)")
                with trio.fail_after(RAW_TIMEOUT):
                    seconds = await mount.puller.raw_fetch(str(request["owner"]),
                                                           int(request["size"]))
                answer: dict[str, Any] = {"seconds": seconds}
            else:
                answer = mount.status()
        # OverflowError: {"size": 1e999} is valid JSON
        except (trio.TooSlowError, ValueError, KeyError, TypeError, OverflowError, UsageError,
                OSError, DyadfsError) as e:
            answer = {"error": str(e) or type(e).__name__}
        with trio.move_on_after(REQUEST_TIMEOUT), contextlib.suppress(OSError):
            await conn.send((json.dumps(answer) + "\n").encode())


def query_socket(path: str, timeout: float,
                 request: dict[str, Any] | None = None) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(path)
            s.sendall((json.dumps(request or {"cmd": "status"}) + "\n").encode())
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        except OSError as e:
            raise UsageError(f"cannot reach the daemon at {path}: {e.strerror or e}") from None
    try:
        result: dict[str, Any] = json.loads(data)
    except ValueError:
        raise UsageError(f"the daemon at {path} sent no status") from None
    return result

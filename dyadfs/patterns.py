"""Glob patterns over paths relative to the managed directory (``--wait-on-stat PATTERN``).

``*`` matches within one path component, ``?`` one character of it, ``[...]`` a class, and a
``**`` component any number of components (none included). As in ``.gitignore``: a pattern with
no ``/`` matches a name at any depth (``*.h5`` matches ``run1/out.h5``); a pattern with a ``/``
is anchored at the managed directory (``group*/**``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable


def _component(part: str) -> str:
    out, i = [], 0
    while i < len(part):
        c = part[i]
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            end = part.find("]", i + 2 if i + 1 < len(part) and part[i + 1] in "!^" else i + 1)
            if end < 0:
                out.append(re.escape(c))
            else:
                body = part[i + 1:end]
                if body[:1] in ("!", "^"):
                    body = "^" + body[1:]
                out.append("[" + body.replace("\\", "\\\\") + "]")
                i = end
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


def translate(pattern: str) -> str:
    """A regular expression matching exactly the relative paths *pattern* matches."""
    anchored = "/" in pattern.strip("/") or pattern.startswith("/")
    parts = [p for p in pattern.strip("/").split("/") if p]
    body = ""
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if part == "**":
            body += ".*" if last else "(?:[^/]+/)*"
        else:
            body += _component(part) + ("" if last else "/")
    prefix = "" if anchored else "(?:[^/]+/)*"
    return f"(?s:{prefix}{body})\\Z"


def matcher(patterns: Iterable[str]) -> Callable[[bytes], bool]:
    """A test of relative paths (bytes) against any of *patterns*."""
    regexes = [re.compile(translate(p)) for p in patterns if p]
    if not regexes:
        return lambda rel: False

    def matches(rel: bytes) -> bool:
        text = os.fsdecode(rel)
        return any(r.match(text) for r in regexes)
    return matches

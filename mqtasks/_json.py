"""A JSON nesting bound shared by every layer, checked before a JSON decoder recurses.

:mod:`mqtasks.serialization` checks task bodies with it (and re-exports it);
the Redis transport checks the JSON metadata of its own list elements, which
it parses before any message exists. It lives down here, with no mqtasks
imports, because a transport may not import the serialization layer above it.
"""

from __future__ import annotations

import re

__all__ = ["json_depth_exceeds"]

# A JSON string, escapes included: its brackets are text, not nesting.
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\[\s\S][^"\\]*)*"')
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def json_depth_exceeds(data: bytes, limit: int) -> bool:
    """Return whether the JSON text ``data`` nests arrays and objects deeper than ``limit``.

    The ``json`` module has no depth option: its C decoder recurses once per
    level and stops only at the interpreter's recursion limit, which a program
    may have raised far enough to overflow the C stack. This scan is iterative
    and linear: it drops strings (their brackets are text), keeps only the
    brackets and tracks the depth. On text that is not valid JSON the answer
    may be off, but the decoder then refuses the text within ``limit`` levels
    anyway, since both read strings the same way up to the first error.
    """
    if data.count(b"[") + data.count(b"{") <= limit:
        return False  # cannot nest deeper than it has brackets
    brackets = _JSON_STRING.sub(b"", data).translate(None, _NOT_BRACKETS)
    depth = 0
    for byte in brackets:
        if byte == 0x5B or byte == 0x7B:  # [ {
            depth += 1
            if depth > limit:
                return True
        else:
            depth -= 1
    return False

"""AMQP topic routing: which binding patterns a routing key matches.

Words are separated by ``.``; in a pattern, ``*`` stands for exactly one word
and ``#`` for zero or more. This is the reference implementation: ``memory://``
routes with it, and the Lua matcher of ``redis://`` is tested against it.
RabbitMQ matches on the broker with the same rules (a key ``""`` has no word;
``"a."`` has two, the second empty).
"""

from __future__ import annotations

import re

__all__ = ["MAX_LENGTH", "check_exchange", "check_key", "check_pattern", "topic_matches"]

#: Longest pattern or routing key, in UTF-8 bytes (an AMQP short string).
MAX_LENGTH = 255


def _words(text: str) -> list[str]:
    return text.split(".") if text else []


def topic_matches(pattern: str, key: str) -> bool:
    """Return whether routing key ``key`` matches binding ``pattern``.

    ``*`` and ``#`` are wildcards only as whole words of ``pattern``; anywhere
    else (and anywhere in ``key``) they are ordinary characters.

    Args:
        pattern: A binding pattern such as ``order.*`` or ``order.#``.
        key: A routing key such as ``order.created``.
    """
    pwords = _words(pattern)
    size = len(pwords)
    # states[i]: the pattern's first i words match the key's words read so far.
    states = _closure({0}, pwords)
    for word in _words(key):
        following: set[int] = set()
        for i in states:
            if i == size:
                continue
            wanted = pwords[i]
            if wanted == "#":
                following.add(i)  # '#' takes this word and may take more
            elif wanted == "*" or wanted == word:
                following.add(i + 1)
        if not following:
            return False
        states = _closure(following, pwords)
    return size in states


def _closure(states: set[int], pwords: list[str]) -> set[int]:
    """Add the states reached by letting each '#' stand for no word."""
    found = set(states)
    for i in range(len(pwords)):
        if i in found and pwords[i] == "#":
            found.add(i + 1)
    return found


def check_pattern(pattern: str) -> str:
    """Return ``pattern`` if it is a usable binding pattern.

    Raises:
        ValueError: It is empty, longer than 255 UTF-8 bytes, has an empty word
            (``a..b``, a leading or trailing ``.``), a wildcard inside a word
            (``order*``), or a control character.
    """
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(
            f"Binding pattern {pattern!r} is empty: give words separated by '.', "
            "such as 'order.created', 'order.*' or 'order.#'."
        )
    _check_text("Binding pattern", pattern)
    for word in pattern.split("."):
        if not word:
            raise ValueError(
                f"Binding pattern {pattern!r} has an empty word (a leading, trailing or "
                "doubled '.'); words are separated by single dots, such as 'order.*'."
            )
        if word not in ("*", "#") and ("*" in word or "#" in word):
            raise ValueError(
                f"Binding pattern {pattern!r}: {word!r} mixes a wildcard with other "
                "characters; '*' (one word) and '#' (any number of words) stand alone "
                "between dots, such as 'order.*' or 'order.#'."
            )
    return pattern


def check_key(key: str) -> str:
    """Return routing key ``key`` if a broker can route it.

    Raises:
        ValueError: It is not a string, is longer than 255 UTF-8 bytes, or has a
            control character.
    """
    if not isinstance(key, str):
        raise ValueError(f"Routing key {key!r} must be a string.")
    _check_text("Routing key", key)
    return key


#: What RabbitMQ accepts in an exchange name.
_EXCHANGE_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,127}")


def check_exchange(name: str) -> str:
    """Return exchange name ``name`` if every broker accepts it.

    Raises:
        ValueError: It is empty (the default exchange routes by queue name, not
            by topic), longer than 127 characters, has a character other than
            letters, digits, ``-``, ``_``, ``.`` and ``:``, or starts with
            ``amq.`` (reserved by RabbitMQ).
    """
    if not isinstance(name, str) or not _EXCHANGE_NAME.fullmatch(name):
        raise ValueError(
            f"Exchange name {name!r} must be 1 to 127 letters, digits, '-', '_', '.' or ':'."
        )
    if name.startswith("amq."):
        raise ValueError(f"Exchange name {name!r}: names starting 'amq.' are reserved by RabbitMQ.")
    return name


def _check_text(what: str, text: str) -> None:
    if len(text.encode("utf-8", "surrogatepass")) > MAX_LENGTH:
        raise ValueError(f"{what} {text[:40]!r}... is longer than {MAX_LENGTH} bytes (UTF-8).")
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise ValueError(f"{what} {text!r} contains a control character.")

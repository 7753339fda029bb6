"""AMQP topic matching (``mqtasks.transport.topic``): the table of cases the
Redis Lua matcher is also checked against, and the pattern checks."""

from __future__ import annotations

import itertools
import re

import pytest

from mqtasks.transport.topic import check_exchange, check_key, check_pattern, topic_matches

#: (pattern, routing key, matches) as RabbitMQ's topic exchange routes them.
CASES: list[tuple[str, str, bool]] = [
    ("order.created", "order.created", True),
    ("order.created", "order.updated", False),
    ("order.created", "order", False),
    ("order.created", "order.created.eu", False),
    ("order.*", "order.created", True),
    ("order.*", "order", False),
    ("order.*", "order.created.eu", False),
    ("order.*", "order.", True),  # an empty word is a word
    ("*.created", "order.created", True),
    ("*.created", "created", False),
    ("*", "order", True),
    ("*", "", False),
    ("*", "a.b", False),
    ("*.*", "a.b", True),
    ("*.*", "a", False),
    ("order.#", "order", True),
    ("order.#", "order.created", True),
    ("order.#", "order.created.eu", True),
    ("order.#", "orders.created", False),
    ("order.#", "", False),
    ("#", "", True),
    ("#", "a", True),
    ("#", "a.b.c", True),
    ("#.created", "created", True),
    ("#.created", "order.created", True),
    ("#.created", "a.b.created", True),
    ("#.created", "order.created.eu", False),
    ("a.#.z", "a.z", True),
    ("a.#.z", "a.b.z", True),
    ("a.#.z", "a.b.c.z", True),
    ("a.#.z", "a.b.c", False),
    ("a.#.z", "a.z.z", True),
    ("a.*.#", "a", False),
    ("a.*.#", "a.b", True),
    ("a.*.#", "a.b.c.d", True),
    ("#.*", "", False),
    ("#.*", "a", True),
    ("#.*", "a.b", True),
    ("#.#", "", True),
    ("#.#", "a.b", True),
    ("*.#.*", "a", False),
    ("*.#.*", "a.b", True),
    ("*.#.*", "a.b.c", True),
    ("#.b.#", "b", True),
    ("#.b.#", "a.b.c", True),
    ("#.b.#", "a.c", False),
    ("a.b", "a.*", False),  # a wildcard in a key is an ordinary word
    ("a.*", "a.*", True),
    ("a.#", "a.#", True),
    ("order*", "order1", False),  # not a wildcard inside a word
    ("order*", "order*", True),
    ("é.*", "é.ü", True),
    ("a b.*", "a b.c", True),
]


@pytest.mark.parametrize(("pattern", "key", "expected"), CASES)
def test_topic_matches_the_table(pattern: str, key: str, expected: bool) -> None:
    assert topic_matches(pattern, key) is expected


def _reference(pattern: str, key: str) -> bool:
    """A second, independent matcher: a regular expression over the key's words,
    each written with a dot after it, so that wildcards cover whole words."""
    regex = ""
    for word in pattern.split(".") if pattern else []:
        if word == "#":
            regex += r"(?:[^.]*\.)*"
        elif word == "*":
            regex += r"[^.]*\."
        else:
            regex += re.escape(word) + r"\."
    text = "".join(w + "." for w in (key.split(".") if key else []))
    return re.fullmatch(regex, text) is not None


def test_topic_matches_agrees_with_a_regex_on_every_small_combination() -> None:
    """Patterns and keys of up to four words over a small alphabet, exhaustively."""
    pattern_words = ["a", "b", "*", "#"]
    key_words = ["a", "b", ""]
    patterns = [
        ".".join(ws) for n in range(1, 5) for ws in itertools.product(pattern_words, repeat=n)
    ]
    keys = [""] + [
        ".".join(ws) for n in range(1, 5) for ws in itertools.product(key_words, repeat=n)
    ]
    checked = 0
    for pattern in patterns:
        for key in keys:
            assert topic_matches(pattern, key) is _reference(pattern, key), (pattern, key)
            checked += 1
    assert checked > 10_000


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ("", "empty"),
        ("a..b", "empty word"),
        (".a", "empty word"),
        ("a.", "empty word"),
        ("order*", "mixes a wildcard"),
        ("#order", "mixes a wildcard"),
        ("a.b*c", "mixes a wildcard"),
        ("a\nb", "control character"),
        ("x" * 256, "longer than 255"),
    ],
)
def test_check_pattern_refuses_with_a_reason(pattern: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_pattern(pattern)


@pytest.mark.parametrize("pattern", ["a", "a.b", "*", "#", "a.*.#", "#.x", "é.*", "x" * 255])
def test_check_pattern_accepts_usable_patterns(pattern: str) -> None:
    assert check_pattern(pattern) == pattern


def test_check_key_accepts_any_short_text_and_refuses_the_rest() -> None:
    assert check_key("") == ""
    assert check_key("order.created") == "order.created"
    with pytest.raises(ValueError, match="longer than 255"):
        check_key("é" * 128)
    with pytest.raises(ValueError, match="control character"):
        check_key("a\x00b")


@pytest.mark.parametrize("name", ["", "a b", "x" * 128, "amq.topic", "ev/ents"])
def test_check_exchange_refuses_names_a_broker_would(name: str) -> None:
    with pytest.raises(ValueError, match="Exchange name"):
        check_exchange(name)

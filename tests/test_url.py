"""mask_url: a broker URL shown with its password masked, rebuilt from its parts."""

from __future__ import annotations

import pytest

from mqtasks._url import mask_url


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        # The query string is dropped: it may carry a password of its own.
        ("redis://localhost:6379/0?password=hunter22", "redis://localhost:6379/0"),
        ("postgresql://app:pw@/db?host=/run/pg&password=x", "postgresql://app:**@/db"),
        ("amqp://U:P@Rabbit.Example:5672/v%2Fh?ssl=1", "amqp://U:**@rabbit.example:5672/v/h"),
        # A user without a password keeps its name; an empty user info goes.
        ("amqp://user@h//", "amqp://user@h//"),
        ("amqp://:@h//", "amqp://h//"),
        ("amqps://u%3Ax:p@h:5671/%2F", "amqps://u%3Ax:**@h:5671//"),
        # A password holding ':' or '@' is masked whole.
        ("amqp://u:p:q@h//", "amqp://u:**@h//"),
        ("amqp://u:p@h@i//", "amqp://u:**@i//"),
        ("amqp://h", "amqp://h/"),
        ("memory://", "memory:///"),
        ("sqs://AKID:SECRETKEY@", "sqs://AKID:**@/"),
    ],
)
def test_a_url_is_shown_without_its_password_or_query(url: str, shown: str) -> None:
    assert mask_url(url) == shown


def test_a_url_whose_port_is_not_a_number_still_has_its_password_masked() -> None:
    # The URL cannot be rebuilt from its parts; the password is masked in place.
    assert mask_url("amqp://u:Secret-pw@h:abc//") == "amqp://u:**@h:abc//"
    assert mask_url("amqp://u:Secret-pw@h:99999//") == "amqp://u:**@h:99999//"

"""Settings: defaults, the environment, precedence and validation."""

from __future__ import annotations

import pytest

from mqtasks import App, ConfigurationError, Settings


def test_defaults_are_the_documented_ones() -> None:
    s = Settings()
    assert s.broker_url == "memory://"
    assert s.max_message_size == 1024 * 1024
    assert s.queue_type == "quorum"
    assert s.effective_prefetch == 2 * s.concurrency


def test_environment_is_read_with_types() -> None:
    env = {
        "MQTASKS_BROKER_URL": "redis://127.0.0.1:6379/3",
        "MQTASKS_PUBLISH_TIMEOUT": "2.5",
        "MQTASKS_CONCURRENCY": "3",
        "MQTASKS_PREFETCH": "7",
    }
    s = Settings.from_env(env)
    assert (s.broker_url, s.publish_timeout, s.concurrency, s.prefetch) == (
        "redis://127.0.0.1:6379/3",
        2.5,
        3,
        7,
    )


def test_explicit_arguments_beat_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MQTASKS_BROKER_URL", "redis://127.0.0.1:6379/3")
    monkeypatch.setenv("MQTASKS_DEFAULT_QUEUE", "from-env")
    app = App("x", broker="memory://")
    assert app.settings.broker_url == "memory://"
    assert app.settings.default_queue == "from-env"


def test_broker_url_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MQTASKS_BROKER_URL", "redis://127.0.0.1:6379/4")
    assert App("x").settings.broker_url == "redis://127.0.0.1:6379/4"


def test_a_malformed_variable_names_itself() -> None:
    with pytest.raises(ConfigurationError, match="MQTASKS_CONCURRENCY='many'"):
        Settings.from_env({"MQTASKS_CONCURRENCY": "many"})


@pytest.mark.parametrize(
    "field",
    [
        {"max_message_size": 0},
        {"publish_timeout": 0},
        {"concurrency": 0},
        {"prefetch": 0},
        {"queue_type": "stream"},
        {"publish_retries": -1},
    ],
)
def test_impossible_values_are_refused(field: dict[str, object]) -> None:
    with pytest.raises(ConfigurationError):
        Settings(**field)  # type: ignore[arg-type]


def test_repr_masks_the_password() -> None:
    s = Settings(broker_url="amqp://user:s3cret-pw@127.0.0.1//")
    assert "s3cret-pw" not in repr(s)
    assert "s3cret-pw" not in repr(App("x", broker="amqp://user:s3cret-pw@127.0.0.1//"))

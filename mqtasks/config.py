"""Settings: every documented default in one frozen dataclass."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

from ._url import mask_url
from .exceptions import ConfigurationError

__all__ = ["DEFAULT_BROKER_URL", "QueueType", "Settings", "mask_url"]

#: The broker used when neither an argument nor ``MQTASKS_BROKER_URL`` names one.
DEFAULT_BROKER_URL = "memory://"

#: RabbitMQ queue types mqtasks declares.
QueueType = Literal["quorum", "classic"]

_ENV_PREFIX = "MQTASKS_"


@dataclass(frozen=True)
class Settings:
    """Everything an :class:`~mqtasks.App` and its worker are configured with.

    Build one from arguments, or with :meth:`from_env` (reads ``MQTASKS_*`` once).
    Precedence, most specific first: worker CLI flags, explicit arguments,
    the environment, these defaults.
    """

    #: Broker URL; the scheme picks the transport (amqp, amqps, redis, rediss, memory).
    broker_url: str = DEFAULT_BROKER_URL
    #: Queue a task goes to when it names none.
    default_queue: str = "default"
    #: RabbitMQ queue type of declared queues; ignored by other transports.
    queue_type: QueueType = "quorum"
    #: Largest message body accepted at publish and at consume, in bytes.
    max_message_size: int = 1024 * 1024
    #: Seconds ``delay()`` may take in all, retries and the broker's confirm included.
    publish_timeout: float = 10.0
    #: Reconnect attempts of a publish during a broker outage before PublishError.
    publish_retries: int = 3
    #: Connections (and producers) kept for publishing; callers beyond it wait.
    publish_pool_size: int = 10
    #: AMQP heartbeat of worker connections, seconds (0 disables, not advised).
    heartbeat: float = 10.0
    #: Seconds to wait for the broker when connecting.
    connect_timeout: float = 5.0
    #: Worker threads per worker process.
    concurrency: int = 8
    #: Messages a worker process may hold unacknowledged; ``None`` means 2 x concurrency.
    prefetch: int | None = None
    #: Seconds a stopping worker lets running tasks finish before it gives up on them.
    shutdown_timeout: float = 30.0
    #: Extra kombu transport options (for example Redis ``visibility_timeout``).
    transport_options: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    def __post_init__(self) -> None:
        if self.max_message_size <= 0:
            raise ConfigurationError("max_message_size must be a positive number of bytes.")
        if self.publish_timeout <= 0:
            raise ConfigurationError("publish_timeout must be positive seconds.")
        if self.publish_retries < 0:
            raise ConfigurationError("publish_retries cannot be negative.")
        if self.publish_pool_size < 1:
            raise ConfigurationError("publish_pool_size must be at least 1.")
        if self.concurrency < 1:
            raise ConfigurationError("concurrency must be at least 1 thread.")
        if self.prefetch is not None and self.prefetch < 1:
            raise ConfigurationError("prefetch must be at least 1.")
        if self.queue_type not in ("quorum", "classic"):
            raise ConfigurationError(
                f"queue_type must be 'quorum' or 'classic', not {self.queue_type!r}."
            )
        if self.heartbeat < 0 or self.shutdown_timeout < 0:
            raise ConfigurationError("heartbeat and shutdown_timeout cannot be negative.")
        object.__setattr__(
            self, "transport_options", MappingProxyType(dict(self.transport_options))
        )

    @property
    def effective_prefetch(self) -> int:
        """The prefetch the worker uses: the setting, or twice the concurrency."""
        return self.prefetch if self.prefetch is not None else 2 * self.concurrency

    def replace(self, **changes: Any) -> Settings:
        """Return a copy with ``changes`` applied (``None`` values are ignored)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Build settings from ``MQTASKS_*`` variables, then apply ``overrides``.

        Args:
            environ: The environment to read; ``os.environ`` by default.
            overrides: Explicit values; they win over the environment (``None`` is ignored).

        Raises:
            ConfigurationError: A variable holds a value of the wrong type.
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name == "transport_options":
                continue
            raw = env.get(_ENV_PREFIX + f.name.upper())
            if raw is None or raw == "":
                continue
            values[f.name] = _parse(f.name, raw, cls._kind(f.name))
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    @staticmethod
    def _kind(name: str) -> type:
        default = {f.name: f.default for f in dataclasses.fields(Settings)}[name]
        if name == "prefetch":
            return int
        return type(default)

    def __repr__(self) -> str:
        return f"Settings(broker_url={mask_url(self.broker_url)!r}, default_queue={self.default_queue!r})"


def _parse(name: str, raw: str, kind: type) -> Any:
    try:
        if kind is int:
            return int(raw)
        if kind is float:
            return float(raw)
    except ValueError as exc:
        var = _ENV_PREFIX + name.upper()
        raise ConfigurationError(f"{var}={raw!r} is not a valid {kind.__name__}.") from exc
    return raw

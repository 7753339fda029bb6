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
from .transport.tls import TLSOptions
from .transport.topic import check_exchange

__all__ = [
    "DEFAULT_BROKER_URL",
    "Durability",
    "LogFormat",
    "QueueType",
    "Settings",
    "TLSOptions",
    "mask_url",
]

#: The broker used when neither an argument nor ``MQTASKS_BROKER_URL`` names one.
DEFAULT_BROKER_URL = "memory://"

#: RabbitMQ queue types mqtasks declares.
QueueType = Literal["quorum", "classic"]

#: Log output of ``mqtasks worker``: ``auto`` is console on a terminal, JSON otherwise.
LogFormat = Literal["auto", "console", "json"]

#: What ``delay()`` waits for on Redis: ``local`` the primary's reply, ``replicated``
#: also one replica's (``WAIT 1``).
Durability = Literal["local", "replicated"]

#: Broker URL schemes whose transport honours ``durability="replicated"``.
_REPLICATED_SCHEMES = ("redis", "rediss", "redis+sentinel", "rediss+sentinel")

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
    #: What a publish waits for on Redis (``redis://``, ``redis+sentinel://``):
    #: ``local``, the primary's reply; ``replicated``, also ``WAIT 1`` reporting that
    #: a replica holds the message (else PublishError within ``publish_timeout``), so
    #: that a failover cannot drop it. Other brokers refuse ``replicated``: on
    #: RabbitMQ, quorum queues with publisher confirms already wait for a majority.
    #: ``MQTASKS_DURABILITY``.
    durability: Durability = "local"
    #: Reconnect attempts of a publish during a broker outage before PublishError.
    publish_retries: int = 3
    #: Connections (and producers) kept for publishing where a pool is used (Redis,
    #: amqps://, RabbitMQ without confirms); callers beyond it wait. Confirmed
    #: publishing on amqp:// shares one connection per process instead.
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
    #: Most deliveries of a message whose task keeps killing its worker: past it the
    #: worker dead-letters the message (reason ``delivery_limit``) instead of running
    #: it again. For queues whose ``QueueSpec`` sets none; ``0`` or ``None``: no limit.
    #: Counted on ``redis://``, ``memory://`` and RabbitMQ (quorum and classic queues).
    delivery_limit: int | None = 20
    #: Extra kombu transport options (for example Redis ``visibility_timeout``).
    transport_options: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    #: TLS of ``amqps://`` and ``rediss://`` connections: CA file, client certificate,
    #: verification (on unless ``verify=False``). ``MQTASKS_TLS_CA_FILE``,
    #: ``MQTASKS_TLS_CERT_FILE``, ``MQTASKS_TLS_KEY_FILE``, ``MQTASKS_TLS_VERIFY``.
    tls: TLSOptions = field(default_factory=TLSOptions)
    #: Where StatsD metrics go, ``statsd://host:port/prefix``; ``None``: no metrics.
    statsd_url: str | None = None
    #: OpenTelemetry spans and trace propagation, active once a tracer provider is set.
    tracing: bool = True
    #: Log output of ``mqtasks worker`` when ``--log-format`` is not given.
    log_format: LogFormat = "auto"
    #: Include task arguments in ``task.received`` log events (they may hold personal data).
    log_task_args: bool = False
    #: Where task results go (``redis://``, ``postgresql://``, ``memory://``); ``None``:
    #: no result backend, so ``get()`` raises and workers store nothing.
    backend_url: str | None = None
    #: What the result backend puts in front of its keys (Redis keys, PostgreSQL
    #: rows), so that apps sharing a store keep apart; ``None``: the backend's default.
    backend_key_prefix: str | None = None
    #: Seconds a stored result is kept (from when it was stored).
    result_expires: float = 86400.0
    #: The topic exchange ``app.emit()`` publishes events to and ``@app.on`` binds
    #: subscriber queues on (declared durable where it is first used).
    events_exchange: str = "mqtasks.events"
    #: The exchange broadcast tasks (``@app.task(broadcast=True)``) are published to and
    #: each worker's broadcast queue is bound on; apps that share one share their calls.
    broadcast_exchange: str = "mqtasks.broadcast"
    #: Ordered tasks: seconds a worker's lease on a partition lasts unless renewed
    #: (renewed every third of it); a crashed worker's partitions move after it.
    ordering_lease_ttl: float = 10.0
    #: Ordered tasks: seconds a worker waits for a key's missing sequence numbers
    #: before it skips them and runs the next one it has.
    ordering_gap_timeout: float = 5.0
    #: Ordered tasks: seconds a key's sequence counter and halt mark are kept in the backend.
    ordering_state_ttl: float = 30 * 86400.0
    #: Ordered tasks: seconds a worker waits before it consumes a partition taken from a
    #: worker that did not give it up (crashed, cut off), so that the messages that worker
    #: held come back first. ``None``: the broker's own recovery time (Redis restores a
    #: dead consumer's messages after its liveness timeout and sweep; RabbitMQ at once).
    ordering_takeover_delay: float | None = None
    #: Seconds a task may run before :exc:`~mqtasks.SoftTimeLimitExceeded` is raised in
    #: it, for tasks that set no ``soft_time_limit``; ``None``: no limit.
    soft_time_limit: float | None = None
    #: Seconds a task may run before the worker stops it and dead-letters its message
    #: (reason ``time_limit``), for tasks that set no ``time_limit``; ``None``: no limit.
    time_limit: float | None = None
    #: Threads past their hard time limit (which Python cannot stop) a worker process
    #: tolerates; past it, the process finishes its other tasks and exits, and its
    #: supervisor starts a fresh one.
    max_abandoned_threads: int = 4
    #: ``async def`` tasks: seconds a task may hold the worker's event loop (for
    #: example with ``time.sleep``) before a ``task.loop_blocked`` warning names it.
    loop_block_threshold: float = 0.5
    #: Seconds a revocation is kept (a revoked task arriving later is still not run).
    revoke_expires: float = 86400.0
    #: RabbitMQ management plugin's HTTP API, where ``mqtasks status`` reads unacked
    #: messages, lag and rates (``http://host:15672``; the broker URL's credentials
    #: unless it has its own). ``None``: the broker's host on port 15672; ``"off"``:
    #: never asked (those columns then show as unknown).
    rabbitmq_management_url: str | None = None

    def __post_init__(self) -> None:
        if not (
            self.ordering_lease_ttl > 0
            and self.ordering_gap_timeout >= 0
            and (self.ordering_takeover_delay is None or self.ordering_takeover_delay >= 0)
            and self.ordering_state_ttl > 0
        ):
            raise ConfigurationError(
                "ordering_lease_ttl and ordering_state_ttl must be positive seconds, "
                "ordering_gap_timeout and ordering_takeover_delay zero or more."
            )
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
        self._check_durability()
        if self.queue_type not in ("quorum", "classic"):
            raise ConfigurationError(
                f"queue_type must be 'quorum' or 'classic', not {self.queue_type!r}."
            )
        if self.heartbeat < 0 or self.shutdown_timeout < 0:
            raise ConfigurationError("heartbeat and shutdown_timeout cannot be negative.")
        if self.delivery_limit is not None and (
            isinstance(self.delivery_limit, bool)
            or not isinstance(self.delivery_limit, int)
            or self.delivery_limit < 0
        ):
            raise ConfigurationError(
                "delivery_limit must be a number of deliveries (at least 1), or 0 or None "
                f"for no limit; not {self.delivery_limit!r}."
            )
        if not self.result_expires > 0:
            raise ConfigurationError("result_expires must be positive seconds.")
        if not self.revoke_expires > 0:
            raise ConfigurationError("revoke_expires must be positive seconds.")
        for name in ("soft_time_limit", "time_limit"):
            limit = getattr(self, name)
            if limit is not None and not limit > 0:
                raise ConfigurationError(f"{name} must be positive seconds, or None for no limit.")
        if (
            self.soft_time_limit is not None
            and self.time_limit is not None
            and self.soft_time_limit > self.time_limit
        ):
            raise ConfigurationError(
                f"soft_time_limit ({self.soft_time_limit:g} s) is above time_limit "
                f"({self.time_limit:g} s): the task would be stopped before it is warned. "
                "Set the soft limit below the hard one."
            )
        if self.max_abandoned_threads < 0:
            raise ConfigurationError("max_abandoned_threads cannot be negative.")
        if not self.loop_block_threshold > 0:
            raise ConfigurationError("loop_block_threshold must be positive seconds.")
        for name in ("events_exchange", "broadcast_exchange"):
            try:
                check_exchange(getattr(self, name))
            except ValueError as exc:
                raise ConfigurationError(f"{name}: {exc}") from None
        if self.events_exchange == self.broadcast_exchange:
            raise ConfigurationError(
                f"events_exchange and broadcast_exchange are both {self.events_exchange!r}: "
                "events use a topic exchange and broadcast calls a fanout by task name, so "
                "they need an exchange each. Give them different names."
            )
        if self.log_format not in ("auto", "console", "json"):
            raise ConfigurationError(
                f"log_format must be 'auto', 'console' or 'json', not {self.log_format!r}."
            )
        object.__setattr__(
            self, "transport_options", MappingProxyType(dict(self.transport_options))
        )
        if not isinstance(self.tls, TLSOptions):
            raise ConfigurationError(
                f"tls must be a mqtasks.TLSOptions, not {type(self.tls).__name__}: "
                "tls=TLSOptions(ca_file=..., cert_file=..., key_file=..., verify=True)."
            )

    def _check_durability(self) -> None:
        if self.durability not in ("local", "replicated"):
            raise ConfigurationError(
                f"durability must be 'local' or 'replicated', not {self.durability!r}."
            )
        scheme = self.broker_url.split("://", 1)[0].lower() if "://" in self.broker_url else ""
        if self.durability == "replicated" and scheme not in _REPLICATED_SCHEMES:
            raise ConfigurationError(
                f"durability='replicated' waits for a Redis replica (WAIT), and the broker "
                f"{mask_url(self.broker_url)} is not served by the redis:// transport. On RabbitMQ "
                "use quorum queues (queue_type='quorum', the default), whose publisher confirms "
                "wait for a majority of nodes; on Redis use redis:// or redis+sentinel:// "
                "(redis+kombu:// cannot wait for replicas); otherwise set durability='local'."
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
        tls = TLSOptions.from_env(env)
        if tls is not None:
            values["tls"] = tls
        for f in dataclasses.fields(cls):
            if f.name in ("transport_options", "tls"):
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
        if name in ("prefetch", "delivery_limit"):
            return int
        if name in ("ordering_takeover_delay", "soft_time_limit", "time_limit"):
            return float
        if name in ("statsd_url", "backend_url", "backend_key_prefix", "rabbitmq_management_url"):
            return str
        return type(default)

    def __repr__(self) -> str:
        backend = (
            "" if self.backend_url is None else f", backend_url={mask_url(self.backend_url)!r}"
        )
        return (
            f"Settings(broker_url={mask_url(self.broker_url)!r}{backend}, "
            f"default_queue={self.default_queue!r})"
        )


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def _parse(name: str, raw: str, kind: type) -> Any:
    if kind is bool:
        if raw.strip().lower() in _TRUE:
            return True
        if raw.strip().lower() in _FALSE:
            return False
        var = _ENV_PREFIX + name.upper()
        raise ConfigurationError(
            f"{var}={raw!r} is not a boolean (true/false, 1/0, yes/no, on/off)."
        )
    try:
        if kind is int:
            return int(raw)
        if kind is float:
            return float(raw)
    except ValueError as exc:
        var = _ENV_PREFIX + name.upper()
        raise ConfigurationError(f"{var}={raw!r} is not a valid {kind.__name__}.") from exc
    return raw

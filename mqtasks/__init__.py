"""mqtasks: a task queue on kombu with reliability and observability built in."""

from __future__ import annotations

from .app import App
from .batch_task import BatchTask
from .canvas import GroupHandle, Signature, chain, chord, group
from .config import Settings
from .events import EventHandle, Subscription, current_event
from .exceptions import (
    BackendError,
    BatchFailures,
    BulkPublishError,
    ConfigurationError,
    ConnectionFailed,
    DecodeError,
    DuplicateTask,
    EncodeError,
    MQTasksError,
    PublishError,
    PublishNacked,
    Reject,
    ResultTimeout,
    Retry,
    SoftTimeLimitExceeded,
    TaskFailed,
    TaskNotRegistered,
    TaskTerminated,
    TimeLimitExceeded,
    TransportError,
    UnknownTransport,
    Unroutable,
)
from .flow import CircuitBreaker
from .message import Message, current_message
from .middleware import (
    Middleware,
    OpenTelemetryTracing,
    Results,
    StatsdMetrics,
    StructlogContext,
)
from .retry import RetryPolicy
from .streams import StreamSpec
from .task import Task, TaskHandle
from .transport import QueueSpec
from .worker import Worker

__version__ = "0.1.0"

__all__ = [
    "App",
    "BackendError",
    "BatchFailures",
    "BatchTask",
    "BulkPublishError",
    "CircuitBreaker",
    "ConfigurationError",
    "ConnectionFailed",
    "DecodeError",
    "DuplicateTask",
    "EncodeError",
    "EventHandle",
    "GroupHandle",
    "MQTasksError",
    "Message",
    "Middleware",
    "OpenTelemetryTracing",
    "PublishError",
    "PublishNacked",
    "QueueSpec",
    "Reject",
    "ResultTimeout",
    "Results",
    "Retry",
    "RetryPolicy",
    "Settings",
    "Signature",
    "SoftTimeLimitExceeded",
    "StatsdMetrics",
    "StreamSpec",
    "StructlogContext",
    "Subscription",
    "Task",
    "TaskFailed",
    "TaskHandle",
    "TaskNotRegistered",
    "TaskTerminated",
    "TimeLimitExceeded",
    "TransportError",
    "UnknownTransport",
    "Unroutable",
    "Worker",
    "__version__",
    "chain",
    "chord",
    "current_event",
    "current_message",
    "group",
]

"""mqtasks: a task queue on kombu with reliability and observability built in."""

from __future__ import annotations

from .app import App
from .config import Settings
from .exceptions import (
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
    Retry,
    TaskNotRegistered,
    TransportError,
    UnknownTransport,
    Unroutable,
)
from .message import Message, current_message
from .middleware import Middleware, OpenTelemetryTracing, StatsdMetrics, StructlogContext
from .retry import RetryPolicy
from .task import Task, TaskHandle
from .transport import QueueSpec
from .worker import Worker

__version__ = "0.1.0"

__all__ = [
    "App",
    "BulkPublishError",
    "ConfigurationError",
    "ConnectionFailed",
    "DecodeError",
    "DuplicateTask",
    "EncodeError",
    "MQTasksError",
    "Message",
    "Middleware",
    "OpenTelemetryTracing",
    "PublishError",
    "PublishNacked",
    "QueueSpec",
    "Reject",
    "Retry",
    "RetryPolicy",
    "Settings",
    "StatsdMetrics",
    "StructlogContext",
    "Task",
    "TaskHandle",
    "TaskNotRegistered",
    "TransportError",
    "UnknownTransport",
    "Unroutable",
    "Worker",
    "__version__",
    "current_message",
]

"""Middleware: the hook interface and its runner, retries, results, idempotency, the
observability middleware and the default stack."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import Middleware, overriding
from .circuits import Circuits
from .idempotency import Idempotency, with_idempotency
from .limits import Limits
from .log_context import StructlogContext
from .otel import OpenTelemetryTracing
from .results import Results, current_outcome, with_results
from .retries import Retries, with_retries
from .statsd import StatsdMetrics

if TYPE_CHECKING:
    from ..app import App
    from ..config import Settings

__all__ = [
    "DEFAULT_MIDDLEWARE",
    "Circuits",
    "Idempotency",
    "Limits",
    "Middleware",
    "OpenTelemetryTracing",
    "Results",
    "Retries",
    "StatsdMetrics",
    "StructlogContext",
    "current_outcome",
    "default_middleware",
    "overriding",
    "with_flow_control",
    "with_idempotency",
    "with_results",
    "with_retries",
]

#: Middleware classes of the default stack, in order. Tracing comes first so
#: that its span encloses what the others do; each class's
#: :meth:`~mqtasks.middleware.base.Middleware.from_settings` decides whether it
#: is installed.
DEFAULT_MIDDLEWARE: tuple[type[Middleware], ...] = (
    OpenTelemetryTracing,
    StructlogContext,
    StatsdMetrics,
)


def default_middleware(settings: Settings) -> list[Middleware]:
    """Return the stack an :class:`~mqtasks.App` installs when given no ``middleware``.

    With the default settings: :class:`OpenTelemetryTracing` (recording once a
    tracer provider is set) and :class:`StructlogContext`; with ``statsd_url``
    set, also :class:`StatsdMetrics`. Every worker also runs :class:`Retries`,
    whatever the stack (see :func:`with_retries`), and, when the app has a
    result backend, :class:`Results` before it (see :func:`with_results`). Add your own on top with
    ``App(..., middleware=[*default_middleware(settings), Mine()])`` or
    ``app.middleware.append(Mine())``.

    Raises:
        ConfigurationError: A setting a middleware cannot use (a bad ``statsd_url``).
    """
    stack = [cls.from_settings(settings) for cls in DEFAULT_MIDDLEWARE]
    return [mw for mw in stack if mw is not None]


def with_flow_control(middleware: list[Middleware], app: App) -> list[Middleware]:
    """Return ``middleware`` with the flow control ``app``'s tasks declare at the end:
    :class:`Circuits` (tasks with a ``circuit``), then :class:`Limits` (a rate or
    concurrency limit), each unless the app installs one itself.

    A worker runs this stack, then :class:`Idempotency`, Workflow, :class:`Results`
    and :class:`Retries`: a task the flow control defers is never marked started,
    and its limits and circuit see the outcome after the retry decision.
    """
    stack = list(middleware)
    for cls in (Circuits, Limits):
        if any(isinstance(mw, cls) for mw in stack):
            continue
        added = cls.for_app(app)
        if added is not None:
            stack.append(added)
    return stack

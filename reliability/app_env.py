"""Scenario apps other than :mod:`reliability.tasks`: their settings from the
environment the harness sets, and switching a run over to one.

:mod:`reliability.event_tasks` and :mod:`reliability.ordering_tasks` build their
apps with :func:`app_options` (see :mod:`reliability.tasks` for the variables);
their scenarios move a run onto them with :func:`use_app`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from mqtasks import App
from mqtasks.transport import QueueSpec

from .tasks import DEFAULT_QUEUE

if TYPE_CHECKING:
    from .run import Run

__all__ = ["app_options", "lazy_app", "queue_spec", "run_queue", "use_app"]


def run_queue(env: Mapping[str, str]) -> str:
    """The run's work queue."""
    return env.get("RELIABILITY_QUEUE") or DEFAULT_QUEUE


def queue_spec(env: Mapping[str, str], name: str) -> QueueSpec:
    """The spec of queue ``name``, with the run's delivery limit."""
    limit = env.get("RELIABILITY_DELIVERY_LIMIT")
    return QueueSpec(name, delivery_limit=int(limit) if limit else None)


def app_options(env: Mapping[str, str]) -> dict[str, Any]:
    """``App`` keyword arguments: broker, queue type, timeouts, the run's queue as the
    default, transport options, and a result backend where one is configured."""
    options: dict[str, Any] = {
        "broker": env.get("MQTASKS_BROKER_URL"),
        "queue_type": env.get("MQTASKS_QUEUE_TYPE"),
        "publish_timeout": float(env.get("MQTASKS_PUBLISH_TIMEOUT") or 10.0),
        "heartbeat": float(env.get("MQTASKS_HEARTBEAT") or 10.0),
        "default_queue": run_queue(env),
        "transport_options": json.loads(env.get("RELIABILITY_TRANSPORT_OPTIONS") or "{}"),
    }
    if env.get("MQTASKS_BACKEND_URL"):
        options["backend"] = env["MQTASKS_BACKEND_URL"]
    if env.get("MQTASKS_BACKEND_KEY_PREFIX"):
        options["backend_key_prefix"] = env["MQTASKS_BACKEND_KEY_PREFIX"]
    return options


def use_app(
    run: Run, module: str, build: Callable[[dict[str, str]], App], env: Mapping[str, str]
) -> None:
    """Move ``run`` onto the app of ``module`` (built by ``build``), with ``env`` added to
    the environment of the harness's app and of the workers (``-A module``)."""
    run.env.update(env)
    run.pool.env.update(env)
    run.pool.argv = [module if a == "reliability.tasks" else a for a in run.pool.argv]
    run.app.close()
    run.app = build(run.env)


def lazy_app(module: str, build: Callable[[], App]) -> Callable[[str], Any]:
    """Return a module ``__getattr__`` that gives ``app``, built by ``build`` on first use.

    ``-A <module>`` loads ``app``; the registry imports every scenario module for
    its names, and building nothing then keeps that import free of side effects.
    """
    built: list[App] = []

    def getattr_(name: str) -> Any:
        if name == "app":
            if not built:
                built.append(build())
            return built[0]
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return getattr_

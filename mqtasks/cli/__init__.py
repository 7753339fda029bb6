"""The ``mqtasks`` command line: ``mqtasks worker -A myapp``.

This package holds the click group, the ``-A`` option every command shares
and what the commands need to load an app; each command lives in a module of
its own (``mqtasks.cli.worker``, ``mqtasks.cli.dlq``,
``mqtasks.cli.status``, ``mqtasks.cli.result``, ``mqtasks.cli.backend``,
``mqtasks.cli.declare``, ``mqtasks.cli.revoke``, ``mqtasks.cli.beat``). What a signal does to a running worker, and the
``--processes`` supervisor, are in :mod:`mqtasks.process`.
"""

from __future__ import annotations

import os
import sys
import traceback
import types
from collections.abc import Callable
from typing import Any

import click

from .. import __version__
from .. import logging as logs
from .._importing import import_object
from .._url import redact
from ..app import App
from ..exceptions import MQTasksError
from ..process import RET_ERROR, RET_FORCED, RET_OK, RET_TIMEOUT

__all__ = [
    "RET_ERROR",
    "RET_FORCED",
    "RET_OK",
    "RET_TIMEOUT",
    "configure_logging",
    "load_app",
    "log_options",
    "main",
]

# The -A/--app option every command takes, passed to it as ``app_path``; each
# command module decorates its commands with it. Commands load the app with
# load_app() when they need it, so that what must come first (a --yes check,
# signal handlers) still can.
app_option = click.option(
    "-A", "--app", "app_path", required=True, help="The app: module[:attribute]."
)


def log_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add ``--log-level`` and ``--log-format`` (passed as ``log_level``, ``log_format``)."""
    command = click.option(
        "--log-format",
        type=click.Choice(["auto", "console", "json"]),
        default=None,
        help="json: one object per line; auto: console on a terminal, JSON otherwise "
        "(default: the log_format setting, MQTASKS_LOG_FORMAT, else auto).",
    )(command)
    return click.option(
        "--log-level",
        type=click.Choice(logs.LOG_LEVELS, case_sensitive=False),
        default="info",
        show_default=True,
        help="The lowest level logged.",
    )(command)


def configure_logging(level: str, fmt: str) -> str:
    """Set up structured logging to stderr (see :func:`mqtasks.logging.configure_logging`).

    Returns the format used. Raises ``click.UsageError`` for an unknown level or
    format (``MQTASKS_LOG_FORMAT`` included), so that the command exits with 2.
    """
    try:
        return logs.configure_logging(level, fmt)
    except MQTasksError as exc:
        raise click.UsageError(str(exc)) from exc


def load_app(path: str) -> App:
    """Import the app named by ``-A``: ``module``, ``module:attr`` or ``module:factory()``.

    Only a trailing ``()`` calls anything: ``-A myapp:create_app()`` calls the
    factory; ``-A myapp:main`` must name an :class:`~mqtasks.app.App` and is
    never called. Raises ``click.UsageError`` (exit code 2) when nothing
    importable there is an app.
    """
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    call = path.endswith("()")
    target = path[:-2] if call else path
    try:
        obj = import_object(target)
    except MQTasksError as exc:
        raise click.UsageError(str(exc)) from exc
    if isinstance(obj, types.ModuleType):
        candidate = getattr(obj, "app", None)
        if isinstance(candidate, App):
            return candidate
        apps = [v for v in vars(obj).values() if isinstance(v, App)]
        if len(apps) == 1:
            return apps[0]
        raise click.UsageError(
            f"Module {path!r} has {'no' if not apps else 'several'} mqtasks App; "
            f"name one with -A {path}:<attribute>."
        )
    if call:
        if not callable(obj):
            raise click.UsageError(f"{target!r} is a {type(obj).__name__}, not callable.")
        obj = obj()
    if not isinstance(obj, App):
        hint = " (to call an app factory, write -A module:factory())" if callable(obj) else ""
        raise click.UsageError(f"{path!r} is a {type(obj).__name__}, not an mqtasks App{hint}.")
    return obj


def table(rows: list[list[str]], header: list[str]) -> str:
    """Lay out ``rows`` under ``header`` in left-aligned columns, two spaces apart."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]
    return "\n".join(lines)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mqtasks")
def cli() -> None:
    """mqtasks: run and inspect task workers."""


def main() -> None:
    """Entry point of the ``mqtasks`` console script."""
    try:
        cli(prog_name="mqtasks")
    except Exception:
        # Not a usage or broker error (those are reported by click): print the
        # traceback, chained causes included, with passwords masked.
        sys.stderr.write(redact(traceback.format_exc()))
        sys.exit(RET_ERROR)


# Each command module registers its commands on ``cli`` when imported. They
# come last because they use the names above; the order does not matter, click
# lists commands alphabetically.
from . import (  # noqa: E402, F401
    backend,
    beat,
    circuit,
    dashboard,
    declare,
    dlq,
    inspect,
    result,
    revoke,
    status,
    stream,
    worker,
)

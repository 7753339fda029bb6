"""``package.module:attribute`` lookup, for the ``-A`` option of every ``mqtasks`` command.

Kept apart from the command line so that the lookup and its errors (a
:class:`~mqtasks.exceptions.ConfigurationError` saying what was not found)
need no click.
"""

from __future__ import annotations

import importlib
from typing import Any

from .exceptions import ConfigurationError

__all__ = ["import_object"]


def import_object(path: str, *, default_attr: str | None = None) -> Any:
    """Import ``module`` or ``module:attr`` (``attr`` may be dotted).

    Args:
        path: ``"myapp"``, ``"myapp.tasks:app"`` or ``"myapp:factory.app"``.
        default_attr: Attribute to take when ``path`` names only a module.

    Raises:
        ConfigurationError: The module cannot be imported or lacks the attribute.
    """
    module_name, _, attr = path.partition(":")
    if not module_name:
        raise ConfigurationError(
            f"Cannot import {path!r}: expected 'module' or 'module:attribute'."
        )
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise ConfigurationError(
                f"Cannot import module {module_name!r}: {exc}. "
                "Is it on sys.path (run from the project directory)?"
            ) from exc
        raise
    attr = attr or (default_attr or "")
    for part in filter(None, attr.split(".")):
        try:
            obj = getattr(obj, part)
        except AttributeError as exc:
            raise ConfigurationError(f"Module {module_name!r} has no attribute {attr!r}.") from exc
    return obj

"""The web dashboard: queues, workers, tasks, dead letters, schedules and circuits in a browser.

An optional extra (``pip install "mqtasks[dashboard]"``): Starlette serves
server-rendered Jinja2 pages with a little hand-written JavaScript for the live
charts, all from this package (no build step, nothing from a CDN). Run it with
``mqtasks dashboard -A myapp``, or mount the ASGI app yourself::

    from mqtasks.dashboard import create_app

    asgi = create_app(app, auth=("admin", "s3cret"))

Safe by default: the command binds to 127.0.0.1, actions are POSTs checked for
a CSRF token, ``read_only`` refuses them, and passwords are masked in every page.
"""

from __future__ import annotations

from ..exceptions import ConfigurationError

#: What to run when the extra is missing.
INSTALL_HINT = 'pip install "mqtasks[dashboard]"'

try:
    import jinja2  # noqa: F401 - only checking that the extra is installed
    import python_multipart  # noqa: F401 - Starlette parses the action forms with it
    import starlette  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ConfigurationError(
        f"The mqtasks dashboard needs Starlette, Jinja2 and python-multipart: {INSTALL_HINT}."
    ) from exc

from .app import create_app  # noqa: E402 - after the check that names the extra

__all__ = ["INSTALL_HINT", "create_app"]

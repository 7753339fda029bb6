"""``mqtasks backend``: commands about an app's result backend (``migrate``).

Backends that keep a schema (``postgresql://``) create it on first use; ``mqtasks
backend migrate`` creates it ahead, from a deploy script, with the app's own
backend URL.
"""

from __future__ import annotations

import click

from ..config import mask_url
from ..exceptions import ConfigurationError, MQTasksError
from . import app_option, cli, load_app

__all__ = ["BACKEND_EPILOG", "backend", "migrate"]

#: The end of ``mqtasks backend migrate --help``: examples and exit codes.
BACKEND_EPILOG = """\b
Examples:
  mqtasks backend migrate -A myapp   # create the PostgreSQL tables now

\b
Exit codes:
  0  done (or nothing to do: Redis and memory:// keep no schema)
  1  the backend is unreachable or refused
  2  bad command line, including -A naming no app, or an app without a
     (usable) backend URL
"""


@cli.group()
def backend() -> None:
    """Manage the app's result backend."""


@backend.command(epilog=BACKEND_EPILOG)
@app_option
def migrate(app_path: str) -> None:
    """Create the tables the result backend needs (PostgreSQL); print what was done."""
    app = load_app(app_path)
    if not app.has_backend:
        raise click.UsageError(
            f"App {app.name!r} has no result backend: "
            "App(..., backend='postgresql://...') or MQTASKS_BACKEND_URL."
        )
    url = mask_url(app.settings.backend_url or "")
    try:
        done = app.backend.migrate()
    except ConfigurationError as exc:
        raise click.UsageError(str(exc)) from exc
    except MQTasksError as exc:
        message = str(exc) if url in str(exc) else f"{exc} (backend {url})"
        raise click.ClickException(message) from exc
    finally:
        app.close()
    if not done:
        click.echo(f"{url}: nothing to migrate (this backend keeps no schema).")
        return
    click.echo(f"{url}:")
    for line in done:
        click.echo(f"  {line}")

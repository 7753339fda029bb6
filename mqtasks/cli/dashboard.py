"""``mqtasks dashboard``: serve the web dashboard of an app (the ``dashboard`` extra).

The command checks that the bind is safe and serves; the pages are
:mod:`mqtasks.dashboard`'s. Starlette, Jinja2 and uvicorn are imported only
inside the command, so the rest of the CLI works without the extra.
"""

from __future__ import annotations

import ipaddress
import os
import signal
from types import FrameType

import click

from ..config import mask_url
from ..exceptions import ConfigurationError
from . import app_option, cli, configure_logging, load_app, log_options

__all__ = ["AUTH_ENV", "DASHBOARD_EPILOG", "dashboard", "is_loopback"]

#: The environment variable that may hold ``user:password`` instead of ``--auth``.
AUTH_ENV = "MQTASKS_DASHBOARD_AUTH"

#: The end of ``mqtasks dashboard --help``: examples, safety and exit codes.
DASHBOARD_EPILOG = """\b
Examples:
  mqtasks dashboard -A myapp                      # http://127.0.0.1:5555
  mqtasks dashboard -A myapp --port 8080 --read-only
  MQTASKS_DASHBOARD_AUTH=ops:s3cret mqtasks dashboard -A myapp --host 0.0.0.0

\b
Safety: it binds to 127.0.0.1 unless told otherwise; any other address needs
--auth (HTTP basic auth) or --read-only. Actions (replaying and purging dead
letters) are POSTs with a CSRF token and a confirmation step; --read-only
refuses them. Passwords of broker and backend URLs never appear in a page.
Put it behind a TLS-terminating proxy when it leaves the machine.

\b
Exit codes:
  0  stopped (Ctrl-C or SIGTERM)
  1  the server could not start (the port is taken, say)
  2  bad command line: -A naming no app, a bad --auth, an unsafe bind, or the
     dashboard extra missing (pip install "mqtasks[dashboard]")
"""


def _exit_cleanly(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@cli.command(epilog=DASHBOARD_EPILOG)
@app_option
@click.option("--host", default="127.0.0.1", show_default=True, help="The address to bind.")
@click.option(
    "--port", type=click.IntRange(0, 65535), default=5555, show_default=True, help="The port."
)
@click.option(
    "--auth",
    envvar=AUTH_ENV,
    default=None,
    metavar="USER:PASSWORD",
    help=f"Require HTTP basic auth with these credentials (or ${AUTH_ENV}).",
)
@click.option("--read-only", is_flag=True, help="Show, never act: replay and purge are refused.")
@log_options
def dashboard(
    app_path: str,
    host: str,
    port: int,
    auth: str | None,
    read_only: bool,
    log_level: str,
    log_format: str | None,
) -> None:
    """Serve the web dashboard: queues, workers, tasks, dead letters, schedules, circuits."""
    configure_logging(log_level, log_format or os.environ.get("MQTASKS_LOG_FORMAT") or "auto")
    credentials: tuple[str, str] | None = None
    if auth is not None:
        user, sep, password = auth.partition(":")
        if not sep or not user or not password:
            raise click.UsageError(
                f"--auth (or ${AUTH_ENV}) must be USER:PASSWORD, both non-empty."
            )
        credentials = (user, password)
    if not is_loopback(host) and credentials is None and not read_only:
        raise click.UsageError(
            f"Binding to {host} opens the dashboard to other machines: "
            f"give --auth USER:PASSWORD (or ${AUTH_ENV}), or --read-only."
        )
    try:
        import uvicorn

        from ..dashboard import create_app
        from ..dashboard.security import LOOPBACK_HOSTS
    except ImportError as exc:
        raise click.UsageError(
            f'The dashboard needs its extra ({exc.name} is missing): pip install "mqtasks[dashboard]".'
        ) from exc
    except ConfigurationError as exc:
        raise click.UsageError(str(exc)) from exc
    app = load_app(app_path)
    mode = " (read-only)" if read_only else ""
    click.echo(
        f"mqtasks dashboard of {app.name!r} (broker {mask_url(app.settings.broker_url)}) "
        f"on http://{host}:{port}{mode}",
        err=True,
    )
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then raises the signal again
    # for the handler that was there before it: this one makes that a clean exit.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _exit_cleanly)
    try:
        uvicorn.run(
            create_app(
                app,
                read_only=read_only,
                auth=credentials,
                allowed_hosts=[*LOOPBACK_HOSTS, host] if is_loopback(host) else None,
            ),
            host=host,
            port=port,
            log_level="warning",
            access_log=False,
        )
    finally:
        app.close()

"""The dashboard's ASGI app: :func:`create_app`, its shared state and the read-only pages.

The pages that change something (dead-letter replay and purge) are in
:mod:`mqtasks.dashboard.actions`; the guards in :mod:`mqtasks.dashboard.security`.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import jinja2
import structlog
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates
from starlette.types import Receive, Scope, Send

from .. import __version__
from .._url import mask_url, redact
from ..control import HeartbeatMonitor
from ..exceptions import MQTasksError
from ..middleware.prometheus import metrics_asgi_app
from . import data
from .jobs import Jobs
from .sampler import DEFAULT_SAMPLE_INTERVAL, QueueSampler, RecentTasks, note_active
from .security import AllowedHosts, BasicAuth, CsrfCookie, CsrfTokens

if TYPE_CHECKING:
    from ..app import App

__all__ = ["Dashboard", "create_app"]

logger = structlog.get_logger("mqtasks.dashboard")

_HERE = Path(__file__).parent

#: The pages in the navigation bar: (path, title).
NAV = [
    ("/queues", "Queues"),
    ("/workers", "Workers"),
    ("/tasks", "Tasks"),
    ("/dead", "Dead letters"),
    ("/schedules", "Schedules"),
    ("/circuits", "Circuits"),
]


def _finalize(value: Any) -> Any:
    # Every string a template prints passes through redact(): a password that
    # reached an error message or a traceback is masked in the page too.
    return redact(value) if isinstance(value, str) else value


class Dashboard:
    """What the dashboard's pages share: the app, the samples, the jobs, the guards.

    Args:
        app: The app to show.
        read_only: Refuse every action.
        sample_interval: Seconds between two samples of the queues.
    """

    def __init__(self, app: App, *, read_only: bool, sample_interval: float) -> None:
        self.app = app
        self.read_only = read_only
        #: Held around broker and backend calls: the pages and the sampler share the app.
        self.lock = threading.Lock()
        self.recent = RecentTasks()
        self.jobs = Jobs()
        self.tokens = CsrfTokens()
        self.monitor: HeartbeatMonitor | None = None
        #: Why there are no heartbeats to show, if there are none.
        self.no_heartbeats: str | None = None
        self.sampler = QueueSampler(
            app, self.lock, interval=sample_interval, on_sample=self._note_workers
        )
        env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(_HERE / "templates"),
            autoescape=True,
            finalize=_finalize,
            undefined=jinja2.StrictUndefined,
        )
        env.filters["seconds"] = data.seconds
        env.filters["rate"] = data.rate
        self.templates = Jinja2Templates(env=env)

    def _note_workers(self) -> None:
        if self.monitor is not None:
            for view in self.monitor.workers():
                note_active(self.recent, view.heartbeat.active)

    @contextlib.asynccontextmanager
    async def lifespan(self, _: Starlette) -> AsyncIterator[None]:
        """Start sampling (and listening to heartbeats) while the server runs."""
        self.start()
        try:
            yield
        finally:
            self.stop()

    def start(self) -> None:
        """Start following the workers' heartbeats, and sampling the queues."""
        try:
            monitor = HeartbeatMonitor(self.app)
            monitor.start()
        except MQTasksError as exc:  # the other pages work without heartbeats
            self.no_heartbeats = redact(str(exc))
            logger.warning("dashboard.heartbeats_unavailable", error=self.no_heartbeats)
        else:
            self.monitor = monitor
        self.sampler.start()

    def stop(self) -> None:
        """Stop sampling and listening."""
        self.sampler.stop()
        if self.monitor is not None:
            self.monitor.stop()

    # -- rendering ---------------------------------------------------------------------

    def render(
        self, request: Request, name: str, context: dict[str, Any], status_code: int = 200
    ) -> Response:
        """Render template ``name`` with the context every page needs."""
        settings = self.app.settings
        base = {
            "root": request.scope.get("root_path", ""),
            "app_name": self.app.name,
            "broker": mask_url(settings.broker_url),
            "backend": mask_url(settings.backend_url) if settings.backend_url else None,
            "read_only": self.read_only,
            "csrf_token": request.scope.get("state", {}).get("csrf_token", ""),
            "nav": NAV,
            "version": __version__,
            "active": "",
        }
        return self.templates.TemplateResponse(
            request, name, {**base, **context}, status_code=status_code
        )

    def error(self, request: Request, message: str, status_code: int = 503) -> Response:
        """Render the error page with ``message`` (masked)."""
        return self.render(
            request, "error.html", {"message": redact(message)}, status_code=status_code
        )

    def known_queue(self, name: str) -> bool:
        """Whether ``name`` is a queue the dashboard shows (the app's task queues)."""
        return name in self.sampler.queues or name in self.app.task_queues()

    # -- read-only pages ---------------------------------------------------------------

    def index(self, request: Request) -> Response:
        return RedirectResponse(request.scope.get("root_path", "") + "/queues", status_code=307)

    def queues_page(self, request: Request) -> Response:
        statuses, error = self.sampler.latest()
        return self.render(
            request,
            "queues.html",
            {
                "active": "/queues",
                "statuses": statuses,
                "error": error,
                "interval_ms": int(self.sampler.interval * 1000),
            },
        )

    def queues_json(self, request: Request) -> Response:
        statuses, error = self.sampler.latest()
        if not statuses and error is None:
            self.sampler.sample()
            statuses, error = self.sampler.latest()
        return JSONResponse(
            {
                "broker": mask_url(self.app.settings.broker_url),
                "error": error,
                "interval": self.sampler.interval,
                "sampled_at": statuses[0].sampled_at.isoformat() if statuses else None,
                "queues": [s.to_dict() for s in statuses],
                "history": self.sampler.history(),
            }
        )

    def _workers(self) -> list[dict[str, Any]] | None:
        if self.monitor is None:
            return None
        return data.worker_rows(self.monitor.workers())

    def workers_page(self, request: Request) -> Response:
        return self.render(
            request,
            "workers.html",
            {"active": "/workers", "workers": self._workers(), "why": self.no_heartbeats},
        )

    def workers_json(self, request: Request) -> Response:
        rows = self._workers()
        return JSONResponse(
            {"available": rows is not None, "error": self.no_heartbeats, "workers": rows or []}
        )

    def tasks_page(self, request: Request) -> Response:
        task_id = request.query_params.get("id", "").strip()
        if task_id:
            return RedirectResponse(
                request.scope.get("root_path", "") + "/tasks/" + _quote(task_id), status_code=303
            )
        if not self.app.has_backend:
            return self.render(
                request, "tasks.html", {"active": "/tasks", "rows": [], "note": data.NO_BACKEND}
            )
        try:
            with self.lock:
                rows = data.task_outcomes(self.app, self.recent.items())
        except MQTasksError as exc:
            return self.error(request, f"The result backend could not be read: {exc}")
        return self.render(request, "tasks.html", {"active": "/tasks", "rows": rows, "note": None})

    def task_page(self, request: Request) -> Response:
        task_id = request.path_params["task_id"]
        if not self.app.has_backend:
            return self.render(
                request,
                "task.html",
                {"active": "/tasks", "task_id": task_id, "detail": None, "note": data.NO_BACKEND},
            )
        try:
            with self.lock:
                detail = data.task_detail(self.app, task_id)
        except (MQTasksError, ValueError) as exc:
            return self.error(request, f"The result backend could not be read: {exc}")
        self.recent.add(task_id, detail["task"] if detail else None)
        note = None if detail else "Nothing is stored for this id (yet): PENDING."
        return self.render(
            request,
            "task.html",
            {"active": "/tasks", "task_id": task_id, "detail": detail, "note": note},
        )

    def schedules_page(self, request: Request) -> Response:
        with self.lock:
            rows, note = data.schedules(self.app)
        return self.render(
            request, "schedules.html", {"active": "/schedules", "rows": rows, "note": note}
        )

    def circuits_page(self, request: Request) -> Response:
        with self.lock:
            rows, note = data.circuits(self.app)
        return self.render(
            request, "circuits.html", {"active": "/circuits", "rows": rows, "note": note}
        )

    def routes(self) -> list[BaseRoute]:
        """The dashboard's routes (the actions' from :mod:`~mqtasks.dashboard.actions`)."""
        from .actions import action_routes

        return [
            Route("/", self.index),
            Route("/queues", self.queues_page),
            Route("/api/queues", self.queues_json),
            Route("/workers", self.workers_page),
            Route("/api/workers", self.workers_json),
            Route("/tasks", self.tasks_page),
            Route("/tasks/{task_id:path}", self.task_page),
            Route("/schedules", self.schedules_page),
            Route("/circuits", self.circuits_page),
            *action_routes(self),
            Route("/metrics", _Asgi(metrics_asgi_app())),
            Mount("/static", StaticFiles(directory=_HERE / "static"), name="static"),
        ]


class _Asgi:
    """An ASGI app as a route's endpoint (a plain function would be taken for a handler)."""

    def __init__(self, app: Callable[..., Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


def _quote(text: str) -> str:
    return quote(text, safe="")


def create_app(
    app: App,
    *,
    read_only: bool = False,
    auth: tuple[str, str] | None = None,
    sample_interval: float = DEFAULT_SAMPLE_INTERVAL,
    allowed_hosts: Sequence[str] | None = None,
) -> Starlette:
    """Return the dashboard of ``app`` as an ASGI app (serve it with uvicorn).

    Args:
        app: The app to show.
        read_only: Refuse every action (replay, purge) with 403; hide their buttons.
        auth: ``(user, password)``: every request needs these HTTP basic-auth
            credentials.
        sample_interval: Seconds between two samples of the queues for the live
            charts (which keep the last 15 minutes).
        allowed_hosts: Answer only requests whose ``Host`` header names one of
            these (400 otherwise); any host when None. ``mqtasks dashboard``
            bound to a loopback address allows only the loopback names, which
            stops DNS-rebinding pages from reaching it.
    """
    dashboard = Dashboard(app, read_only=read_only, sample_interval=sample_interval)
    middleware = [Middleware(CsrfCookie, tokens=dashboard.tokens)]
    if auth is not None:
        middleware.insert(0, Middleware(BasicAuth, user=auth[0], password=auth[1]))
    if allowed_hosts is not None:
        middleware.insert(0, Middleware(AllowedHosts, hosts=tuple(allowed_hosts)))
    asgi = Starlette(routes=dashboard.routes(), middleware=middleware, lifespan=dashboard.lifespan)
    asgi.state.dashboard = dashboard
    return asgi

"""The dead-letter pages: browse and show entries, and replay or purge them.

An action takes three steps: a GET shows what it will do and asks to confirm
(a form carrying the CSRF token); the POST checks the token, refuses in
read-only mode, and starts a job; the job's page shows its progress.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from ..dlq import DeadLetter, list_dead_letters, purge_dead_letters, replay_dead_letters
from ..exceptions import MQTasksError
from ..transport.base import dead_letter_spec
from . import data
from .jobs import Work
from .security import CSRF_COOKIE, CSRF_FIELD, same_origin

if TYPE_CHECKING:
    from .app import Dashboard

__all__ = ["BROWSE_LIMIT", "SHOW_SCAN_LIMIT", "action_routes"]

#: Entries a queue's dead-letter page lists.
BROWSE_LIMIT = 100
#: Most entries read while looking for one id.
SHOW_SCAN_LIMIT = 10_000


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


class DeadLetterPages:
    """The dead-letter pages and actions of one dashboard."""

    def __init__(self, dashboard: Dashboard) -> None:
        self.d = dashboard

    # -- reading -----------------------------------------------------------------------

    def _queue(self, request: Request) -> str | None:
        queue = str(request.path_params["queue"])
        return queue if self.d.known_queue(queue) else None

    def _count(self, queue: str) -> int:
        app = self.d.app
        spec = dead_letter_spec(app.queue(queue))
        with self.d.lock:
            return app.transport.message_counts([spec]).get(spec.name, 0)

    def overview(self, request: Request) -> Response:
        statuses, error = self.d.sampler.latest()
        rows = [{"queue": s.queue, "dead": s.dead_lettered, "exists": s.exists} for s in statuses]
        return self.d.render(
            request, "dead.html", {"active": "/dead", "rows": rows, "error": error}
        )

    def browse(self, request: Request) -> Response:
        queue = self._queue(request)
        if queue is None:
            return self.d.error(request, "No such queue of this app.", status_code=404)
        try:
            with self.d.lock:
                entries = list_dead_letters(self.d.app, queue, limit=BROWSE_LIMIT)
        except MQTasksError as exc:
            return self.d.error(request, f"The dead letters could not be read: {exc}")
        for entry in entries:
            self.d.recent.add(entry.id, entry.task)
        return self.d.render(
            request,
            "dead_queue.html",
            {
                "active": "/dead",
                "queue": queue,
                "entries": [data.dead_letter_row(e) for e in entries],
                "limit": BROWSE_LIMIT,
            },
        )

    def _find(self, queue: str, entry_id: str) -> DeadLetter | None:
        with self.d.lock:
            for entry in list_dead_letters(self.d.app, queue, limit=SHOW_SCAN_LIMIT):
                if entry.id == entry_id:
                    return entry
        return None

    def show(self, request: Request) -> Response:
        queue = self._queue(request)
        if queue is None:
            return self.d.error(request, "No such queue of this app.", status_code=404)
        entry_id = str(request.path_params["entry_id"])
        try:
            entry = self._find(queue, entry_id)
        except MQTasksError as exc:
            return self.d.error(request, f"The dead letters could not be read: {exc}")
        if entry is None:
            return self.d.error(
                request, f"No dead letter {entry_id!r} in {queue}.", status_code=404
            )
        document = entry.to_dict()
        headers = {
            k: v for k, v in sorted(document["headers"].items()) if k != "mqtasks-death-traceback"
        }
        return self.d.render(
            request,
            "dead_entry.html",
            {"active": "/dead", "queue": queue, "entry": document, "headers": headers},
        )

    # -- confirming and acting ---------------------------------------------------------

    def confirm(self, request: Request) -> Response:
        queue = self._queue(request)
        if queue is None:
            return self.d.error(request, "No such queue of this app.", status_code=404)
        if self.d.read_only:
            return self.d.error(request, "The dashboard is read-only.", status_code=403)
        action = "replay" if request.url.path.endswith("/replay") else "purge"
        ids = [i for i in request.query_params.getlist("id") if i]
        try:
            count = len(ids) if ids else self._count(queue)
        except MQTasksError as exc:
            return self.d.error(request, f"The dead letters could not be counted: {exc}")
        if action == "replay":
            what = f"Replay {_plural(count, 'dead letter')} of {queue}"
            detail = (
                "Each is sent back to the queue as a first attempt, and removed from "
                "the dead-letter queue once the broker confirmed it."
            )
        else:
            what = f"Purge {_plural(count, 'dead letter')} of {queue}"
            detail = "Every entry of the dead-letter queue is deleted, for good."
        return self.d.render(
            request,
            "confirm.html",
            {
                "active": "/dead",
                "queue": queue,
                "action": action,
                "what": what,
                "detail": detail,
                "ids": ids,
                "count": count,
            },
        )

    async def _checked(self, request: Request) -> tuple[Response | None, str, Any]:
        """Check a POST: read-only mode, origin, CSRF token, queue; return (refusal, queue, form)."""
        if self.d.read_only:
            return PlainTextResponse("The dashboard is read-only.", status_code=403), "", None
        if not same_origin(request.headers):
            return PlainTextResponse("Cross-origin request refused.", status_code=403), "", None
        form = await request.form()
        submitted = form.get(CSRF_FIELD)
        if not self.d.tokens.check(
            request.cookies.get(CSRF_COOKIE), submitted if isinstance(submitted, str) else None
        ):
            return PlainTextResponse("Missing or invalid CSRF token.", status_code=403), "", None
        queue = self._queue(request)
        if queue is None:
            return PlainTextResponse("No such queue of this app.", status_code=404), "", None
        return None, queue, form

    def _start(
        self, request: Request, queue: str, title: str, total: int | None, work: Work
    ) -> Response:
        job = self.d.jobs.start(title, self._back(request, queue), total, work)
        return RedirectResponse(self._job_url(request, job.id), status_code=303)

    async def replay(self, request: Request) -> Response:
        refusal, queue, form = await self._checked(request)
        if refusal is not None:
            return refusal
        ids = [str(i) for i in form.getlist("id") if i]
        try:
            total = len(ids) if ids else await run_in_threadpool(self._count, queue)
        except MQTasksError:
            total = None
        app, lock, recent = self.d.app, self.d.lock, self.d.recent

        def replayed(entry: DeadLetter, progress: Callable[[], None]) -> None:
            recent.add(entry.id, entry.task)  # the tasks page follows what was replayed
            progress()

        def work(progress: Callable[[], None]) -> int:
            with lock:
                return replay_dead_letters(
                    app, queue, ids=ids or None, on_replayed=lambda e: replayed(e, progress)
                )

        count = "the dead letters" if total is None else _plural(total, "dead letter")
        return self._start(request, queue, f"Replay {count} of {queue}", total, work)

    async def purge(self, request: Request) -> Response:
        refusal, queue, _ = await self._checked(request)
        if refusal is not None:
            return refusal
        app, lock = self.d.app, self.d.lock

        def work(progress: Callable[[], None]) -> int:
            with lock:
                return purge_dead_letters(app, queue)

        return self._start(request, queue, f"Purge the dead letters of {queue}", None, work)

    def _back(self, request: Request, queue: str) -> str:
        return f"{request.scope.get('root_path', '')}/dead/{quote(queue, safe='')}"

    def _job_url(self, request: Request, job_id: str) -> str:
        return f"{request.scope.get('root_path', '')}/jobs/{job_id}"

    # -- jobs --------------------------------------------------------------------------

    def job_page(self, request: Request) -> Response:
        job = self.d.jobs.get(str(request.path_params["job_id"]))
        if job is None:
            return self.d.error(request, "No such job (the dashboard keeps the last 50).", 404)
        return self.d.render(request, "job.html", {"active": "/dead", "job": job.to_dict()})

    def job_json(self, request: Request) -> Response:
        job = self.d.jobs.get(str(request.path_params["job_id"]))
        if job is None:
            return JSONResponse({"error": "no such job"}, status_code=404)
        return JSONResponse(job.to_dict())


def action_routes(dashboard: Dashboard) -> list[BaseRoute]:
    """The dead-letter and job routes of ``dashboard``."""
    pages = DeadLetterPages(dashboard)
    return [
        Route("/dead", pages.overview),
        Route("/dead/{queue}", pages.browse),
        Route("/dead/{queue}/entry/{entry_id:path}", pages.show),
        Route("/dead/{queue}/replay", pages.confirm, methods=["GET"]),
        Route("/dead/{queue}/replay", pages.replay, methods=["POST"]),
        Route("/dead/{queue}/purge", pages.confirm, methods=["GET"]),
        Route("/dead/{queue}/purge", pages.purge, methods=["POST"]),
        Route("/jobs/{job_id}", pages.job_page),
        Route("/api/jobs/{job_id}", pages.job_json),
    ]

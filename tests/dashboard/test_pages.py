"""The dashboard's pages and JSON endpoints, on the memory broker, through Starlette's client."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest

from mqtasks import App, CircuitBreaker
from mqtasks.control_agent import ControlAgent
from mqtasks.dashboard.data import seconds
from mqtasks.testing import drain, running_worker
from tests._helpers.wait import WAIT, wait_for
from tests.dashboard.support import TestClient, csrf_token, sample

Client = Callable[..., TestClient]


def _failing_app(make_app: Callable[..., App], message: str = "boom", **overrides: object) -> App:
    """An app with a task ``fail`` that always raises ``message``, and ``add``."""
    app = make_app(**overrides)

    @app.task(name="fail", max_retries=0)
    def fail() -> None:
        raise ValueError(message)

    @app.task(name="add")
    def add(x: int, y: int) -> int:
        return x + y

    return app


def _dead_letter(app: App) -> str:
    """Run ``fail`` once on a worker; return the id of its dead letter."""
    handle = app.tasks["fail"].delay()
    with running_worker(app) as worker:
        drain(worker, raise_errors=False)
    assert [e.id for e in app.dead_letters()] == [handle.id]
    return handle.id


@pytest.mark.parametrize(
    ("path", "text"),
    [
        ("/queues", "Last 15 minutes"),
        ("/workers", "Workers"),
        ("/tasks", "Recently seen"),
        ("/dead", "Dead letters"),
        ("/schedules", "every 60s"),
        ("/circuits", "payments"),
    ],
)
def test_pages_render(
    make_app: Callable[..., App], client_for: Client, path: str, text: str
) -> None:
    app = make_app(backend="memory://", circuits=[CircuitBreaker("payments")])
    app.periodic(every=60, name="tick")(lambda: None)

    @app.task
    def add(x: int, y: int) -> int:
        return x + y

    client = client_for(app)
    client.get(f"/tasks/{add.delay(1, 2).id}")  # a task seen, so "Recently seen" has a row
    response = client.get(path)
    assert response.status_code == 200
    assert text in response.text
    assert 'class="current"' in response.text


def test_root_redirects_to_queues(make_app: Callable[..., App], client_for: Client) -> None:
    response = client_for(make_app()).get("/", follow_redirects=False)
    assert response.status_code == 307
    assert response.headers["location"] == "/queues"


def test_queue_json_reports_depths_and_history(
    make_app: Callable[..., App], client_for: Client
) -> None:
    app = _failing_app(make_app)
    client = client_for(app)
    queue = app.settings.default_queue
    for i in range(3):
        app.tasks["add"].delay(i, i)
    sample(client)
    document = client.get("/api/queues").json()
    (status,) = (q for q in document["queues"] if q["queue"] == queue)
    assert status["ready"] == 3
    # The first sample came before the queue existed: a gap in the chart, then 3.
    assert document["history"]["series"][queue]["ready"] == [None, 3]
    assert len(document["history"]["t"]) == 2
    assert document["broker"] == "memory:///"


def test_queues_page_shows_counts(make_app: Callable[..., App], client_for: Client) -> None:
    app = _failing_app(make_app)
    app.tasks["add"].delay(1, 2)
    client = client_for(app)
    page = client.get("/queues").text
    assert f'<tr data-queue="{app.settings.default_queue}">' in page
    assert '<td class="num" data-field="ready">1</td>' in page
    for field in ("lag", "ready_rate", "error_rate", "ack_rate"):
        assert f'data-field="{field}"' in page


def test_dead_letter_is_listed_and_shown_with_traceback(
    make_app: Callable[..., App], client_for: Client
) -> None:
    app = _failing_app(make_app, "the disk is full")
    entry_id = _dead_letter(app)
    client = client_for(app)
    queue = app.settings.default_queue
    listing = client.get(f"/dead/{queue}").text
    assert entry_id in listing
    assert "ValueError: the disk is full" in listing
    entry = client.get(f"/dead/{queue}/entry/{entry_id}").text
    assert "Traceback (most recent call last)" in entry
    assert "max_retries_exceeded" in entry


def test_unknown_queue_is_not_found(make_app: Callable[..., App], client_for: Client) -> None:
    client = client_for(_failing_app(make_app))
    assert client.get("/dead/not-a-queue-of-the-app").status_code == 404
    assert client.get("/dead/not-a-queue-of-the-app/replay").status_code == 404


def test_replay_asks_to_confirm_then_replays_with_progress(
    make_app: Callable[..., App], client_for: Client
) -> None:
    app = _failing_app(make_app, backend="memory://")
    entry_id = _dead_letter(app)
    client = client_for(app)
    queue = app.settings.default_queue

    # Given the confirmation page, when its form is posted, then a job replays the entry.
    confirm = client.get(f"/dead/{queue}/replay", params={"id": entry_id})
    assert "Replay 1 dead letter of" in confirm.text
    assert app.dead_letters() != []  # showing the confirmation did nothing
    response = client.post(
        f"/dead/{queue}/replay",
        data={"csrf_token": csrf_token(confirm.text), "id": entry_id},
        follow_redirects=False,
    )
    assert response.status_code == 303
    job_url = response.headers["location"]
    job = wait_for(
        lambda: (j := client.get(f"/api{job_url}").json())["state"] != "running" and j,
        "the replay job to end",
    )
    assert job == {**job, "state": "done", "done": 1, "total": 1, "result": 1}
    assert app.dead_letters() == []
    assert app.status([queue])[0].ready == 1
    assert "Replay 1 dead letter of" in client.get(job_url).text
    assert entry_id in client.get("/tasks").text  # followed on the tasks page


def test_purge_deletes_every_dead_letter(make_app: Callable[..., App], client_for: Client) -> None:
    app = _failing_app(make_app)
    _dead_letter(app)
    client = client_for(app)
    queue = app.settings.default_queue
    confirm = client.get(f"/dead/{queue}/purge")
    assert "Purge 1 dead letter of" in confirm.text
    response = client.post(f"/dead/{queue}/purge", data={"csrf_token": csrf_token(confirm.text)})
    assert response.status_code == 200  # the job page, after the redirect
    wait_for(lambda: app.dead_letters() == [], "the purge")


@pytest.mark.parametrize(
    "token",
    [None, "", "forged.0000", "cookie-of-another-dashboard"],
)
def test_action_without_valid_csrf_token_is_refused(
    make_app: Callable[..., App], client_for: Client, token: str | None
) -> None:
    app = _failing_app(make_app)
    _dead_letter(app)
    client = client_for(app)
    queue = app.settings.default_queue
    client.get("/queues")  # the browser has its cookie
    if token == "cookie-of-another-dashboard":
        other = client_for(make_app())
        other.get("/queues")
        token = other.cookies["mqtasks_csrf"]  # well-formed, signed by the other one's key
    data = {} if token is None else {"csrf_token": token}
    response = client.post(f"/dead/{queue}/purge", data=data)
    assert response.status_code == 403
    assert "CSRF" in response.text
    assert len(app.dead_letters()) == 1


def test_action_without_the_cookie_is_refused(
    make_app: Callable[..., App], client_for: Client
) -> None:
    app = _failing_app(make_app)
    _dead_letter(app)
    client = client_for(app)
    queue = app.settings.default_queue
    token = csrf_token(client.get(f"/dead/{queue}/purge").text)
    client.cookies.clear()  # a forged form from another site: the token, not the cookie
    response = client.post(f"/dead/{queue}/purge", data={"csrf_token": token})
    assert response.status_code == 403
    assert len(app.dead_letters()) == 1


def test_cross_origin_action_is_refused(make_app: Callable[..., App], client_for: Client) -> None:
    app = _failing_app(make_app)
    _dead_letter(app)
    client = client_for(app)
    queue = app.settings.default_queue
    token = csrf_token(client.get(f"/dead/{queue}/purge").text)
    response = client.post(
        f"/dead/{queue}/purge",
        data={"csrf_token": token},
        headers={"Origin": "http://evil.example"},
    )
    assert response.status_code == 403
    assert len(app.dead_letters()) == 1


def test_read_only_refuses_actions_and_hides_them(
    make_app: Callable[..., App], client_for: Client
) -> None:
    app = _failing_app(make_app)
    _dead_letter(app)
    client = client_for(app, read_only=True)
    queue = app.settings.default_queue
    listing = client.get(f"/dead/{queue}").text
    assert "read-only" in listing
    assert "Replay" not in listing and "Purge all" not in listing
    assert client.get(f"/dead/{queue}/purge").status_code == 403
    token = client.cookies["mqtasks_csrf"]
    for action in ("replay", "purge"):
        response = client.post(f"/dead/{queue}/{action}", data={"csrf_token": token})
        assert response.status_code == 403
        assert "read-only" in response.text
    assert len(app.dead_letters()) == 1


def test_auth_is_required_when_set(make_app: Callable[..., App], client_for: Client) -> None:
    client = client_for(make_app(), auth=("ops", "s3cret:pw"))
    for path in ("/queues", "/api/queues", "/static/dashboard.css", "/dead"):
        response = client.get(path)
        assert response.status_code == 401
        assert response.headers["www-authenticate"].startswith("Basic")
    assert client.get("/queues", auth=("ops", "wrong")).status_code == 401
    assert client.get("/queues", auth=("other", "s3cret:pw")).status_code == 401
    assert client.get("/queues", headers={"Authorization": "Basic !!!"}).status_code == 401
    assert client.get("/queues", auth=("ops", "s3cret:pw")).status_code == 200


def test_post_without_credentials_is_refused_before_anything(
    make_app: Callable[..., App], client_for: Client
) -> None:
    app = _failing_app(make_app)
    _dead_letter(app)
    client = client_for(app, auth=("ops", "s3cret"))
    queue = app.settings.default_queue
    token = csrf_token(client.get(f"/dead/{queue}/purge", auth=("ops", "s3cret")).text)
    response = client.post(f"/dead/{queue}/purge", data={"csrf_token": token})
    assert response.status_code == 401
    assert len(app.dead_letters()) == 1


def test_passwords_never_appear_in_a_page(make_app: Callable[..., App], client_for: Client) -> None:
    # The broker cannot be reached: its URL (with a password) ends up in the error.
    app = make_app("amqp://ops:hunter2secret@127.0.0.1:1//", connect_timeout=0.5, publish_retries=0)
    client = client_for(app)
    sample(client)
    pages = [client.get(p).text for p in ("/queues", "/api/queues", "/dead", "/workers")]
    assert "amqp://ops:**@127.0.0.1:1//" in pages[0]
    assert "could not" in pages[0].lower() or "refused" in pages[0].lower()
    for page in pages:
        assert "hunter2secret" not in page


def test_password_in_a_dead_letter_is_masked(
    make_app: Callable[..., App], client_for: Client
) -> None:
    app = _failing_app(make_app, "cannot reach redis://:topsecretpass@db:6379/0")
    entry_id = _dead_letter(app)
    client = client_for(app)
    queue = app.settings.default_queue
    for path in (f"/dead/{queue}", f"/dead/{queue}/entry/{entry_id}"):
        page = client.get(path).text
        assert "redis://:**@db:6379/0" in page
        assert "topsecretpass" not in page


def test_html_is_escaped(make_app: Callable[..., App], client_for: Client) -> None:
    app = _failing_app(make_app, "<script>alert('x')</script>")
    entry_id = _dead_letter(app)
    client = client_for(app)
    page = client.get(f"/dead/{app.settings.default_queue}/entry/{entry_id}").text
    assert "<script>alert" not in page
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in page


def test_tasks_without_backend_say_what_is_needed(
    make_app: Callable[..., App], client_for: Client
) -> None:
    client = client_for(make_app())
    for path in ("/tasks", "/tasks/some-id"):
        assert "This needs a result backend" in client.get(path).text


def test_task_detail_shows_the_stored_outcome(
    make_app: Callable[..., App], client_for: Client
) -> None:
    app = _failing_app(make_app, "no such user", backend="memory://")
    good = app.tasks["add"].delay(2, 3)
    bad = app.tasks["fail"].delay()
    with running_worker(app) as worker:
        drain(worker, raise_errors=False)
    client = client_for(app)
    page = client.get(f"/tasks/{good.id}").text
    assert "SUCCEEDED" in page and '<pre class="value">5</pre>' in page
    page = client.get(f"/tasks/{bad.id}").text
    assert "DEAD_LETTERED" in page and "ValueError: no such user" in page
    assert "Traceback" in page
    recent = client.get("/tasks").text
    assert good.id in recent and bad.id in recent
    assert (
        client.get("/tasks", params={"id": good.id}, follow_redirects=False).headers["location"]
        == f"/tasks/{good.id}"
    )
    assert "PENDING" in client.get("/tasks/never-sent").text


def test_schedules_without_backend_show_next_runs(
    make_app: Callable[..., App], client_for: Client
) -> None:
    app = make_app()
    app.periodic(every=30, name="heartbeat-ping")(lambda: None)
    page = client_for(app).get("/schedules").text
    assert "heartbeat-ping" in page and "every 30s" in page
    assert "needs a result backend" in page


def test_circuits_show_state(make_app: Callable[..., App], client_for: Client) -> None:
    from mqtasks.middleware.circuits import open_circuit

    app = make_app(backend="memory://", circuits=[CircuitBreaker("payments")])
    open_circuit(app, "payments")
    page = client_for(app).get("/circuits").text
    assert '<span class="state open">open</span> (forced)' in page


def test_workers_page_lists_workers_and_their_active_tasks(
    make_app: Callable[..., App], client_for: Client
) -> None:
    app = make_app()
    started, release = threading.Event(), threading.Event()

    @app.task(name="slow")
    def slow() -> None:
        started.set()
        release.wait(WAIT)

    client = client_for(app)
    assert "No worker has sent a heartbeat yet" in client.get("/workers").text
    handle = slow.delay()
    with running_worker(app) as worker:
        agent = ControlAgent(worker, interval=0.2)
        agent.start()
        try:
            assert started.wait(WAIT)

            def listed() -> dict[str, Any] | None:
                rows = client.get("/api/workers").json()["workers"]
                # The busy count and the active list are read one after the other
                # for a heartbeat: wait for one that shows both.
                return rows[0] if rows and rows[0]["active"] and rows[0]["busy"] else None

            row = wait_for(listed, "the worker and its task on the workers page")
            assert row["worker_id"] == agent.worker_id
            assert row["active"][0]["id"] == handle.id and row["busy"] == 1
            page = client.get("/workers").text
            assert agent.worker_id in page and "live" in page and f">slow {handle.id}<" in page
        finally:
            release.set()
            agent.stop()


def test_workers_page_says_why_there_are_no_heartbeats(
    make_app: Callable[..., App], client_for: Client
) -> None:
    # redis+kombu:// carries no heartbeats; the page says so, the others work.
    client = client_for(
        make_app("redis+kombu://127.0.0.1:1/0", connect_timeout=0.5, publish_retries=0)
    )
    assert client.get("/api/workers").json()["available"] is False
    page = client.get("/workers").text
    assert 'id="needs-heartbeats"' in page and "redis+kombu" in page


def test_metrics_are_served_for_prometheus(
    make_app: Callable[..., App], client_for: Client
) -> None:
    client = client_for(make_app(), auth=("ops", "s3cret"))
    assert client.get("/metrics").status_code == 401
    response = client.get("/metrics", auth=("ops", "s3cret"))
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert "# TYPE " in response.text


def test_only_allowed_hosts_are_answered(make_app: Callable[..., App], client_for: Client) -> None:
    """A DNS-rebinding page (another site's name resolving to 127.0.0.1) gets 400."""
    client = client_for(make_app(), allowed_hosts=["127.0.0.1", "localhost", "::1"])
    for host in ("127.0.0.1:5555", "localhost", "[::1]:5555", "LOCALHOST:80"):
        assert client.get("/queues", headers={"Host": host}).status_code == 200
    for host in ("evil.example:5555", "127.0.0.1.evil.example", ""):
        response = client.get("/queues", headers={"Host": host})
        assert response.status_code == 400


@pytest.mark.parametrize(
    ("value", "text"),
    [(None, "-"), (0.0, "0.0 s"), (4.24, "4.2 s"), (185.0, "3m05s"), (7620.0, "2h07m")],
)
def test_durations_read_as_on_the_page(value: float | None, text: str) -> None:
    assert seconds(value) == text

"""What a process imports: mqtasks pulls in an integration only when it can matter.

Every worker process holds what it imports, once per process; these tests run a
fresh interpreter, so that what the test process imported does not count.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: A W3C trace context, as a traced service upstream would send it.
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
UPSTREAM_SPAN_ID = "00f067aa0ba902b7"

#: Publishes ``imports.parent`` with an upstream trace context; the task publishes
#: ``imports.child``; a worker runs both. Prints what the child's message carried
#: and which integrations were imported, before the worker ran and at the end.
SCRIPT = textwrap.dedent(
    f"""
    import json, sys
    from mqtasks import Middleware
    from mqtasks.middleware import OpenTelemetryTracing
    from mqtasks.testing import drain, memory_app, reset, running_worker

    def loaded():
        names = ("opentelemetry", "tenacity", "kombu")
        return sorted(n for n in names if n in sys.modules)

    class Headers(Middleware):
        def __init__(self):
            self.seen = {{}}

        def before_process(self, worker, message):
            self.seen[message.task] = dict(message.headers)

    headers = Headers()
    app = memory_app("imports", backend=None)
    app.middleware.append(headers)
    assert any(isinstance(m, OpenTelemetryTracing) for m in app.middleware)

    @app.task(name="imports.child")
    def child():
        pass

    @app.task(name="imports.parent")
    def parent():
        child.delay()

    at_import = loaded()
    parent.apply_async(headers={{"traceparent": "00-{TRACE_ID}-{UPSTREAM_SPAN_ID}-01"}})
    before_worker = loaded()
    try:
        with running_worker(app) as worker:
            drain(worker)
    finally:
        reset(app)
    print(json.dumps({{
        "at_import": at_import,
        "before_worker": before_worker,
        "at_end": loaded(),
        "child_traceparent": headers.seen["imports.child"].get("traceparent"),
    }}))
    """
)


def run_script(**env: str) -> dict[str, object]:
    """Run :data:`SCRIPT` in a fresh interpreter with ``env`` added; return what it printed."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    environ.update(env)
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        cwd=ROOT,
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    result: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def test_a_process_that_never_imports_opentelemetry_runs_tasks_without_it() -> None:
    # Given an app with tracing in its default stack, and no tracer provider anywhere
    # When it publishes a task that carries an upstream trace context, and a worker runs it
    seen = run_script()
    # Then the OpenTelemetry API is never imported: no provider could have been set,
    # so without one the middleware would add nothing (and adds nothing)
    assert "opentelemetry" not in seen["at_end"]  # type: ignore[operator]
    assert seen["child_traceparent"] is None
    # Nor tenacity: no task failed, so no retry policy was asked for a delay
    assert "tenacity" not in seen["at_end"]  # type: ignore[operator]


def test_a_provider_named_in_the_environment_traces_what_the_task_publishes() -> None:
    # Given a tracer provider named by the environment only: the app never imports the API
    seen = run_script(OTEL_PYTHON_TRACER_PROVIDER="sdk_tracer_provider")
    assert "opentelemetry" not in seen["at_import"]  # type: ignore[operator]
    # When a task with an upstream trace context publishes another one
    # Then the middleware imports the API at the first publish and the child is in the same trace
    assert "opentelemetry" in seen["before_worker"]  # type: ignore[operator]
    traceparent = seen["child_traceparent"]
    assert isinstance(traceparent, str)
    version, trace_id, span_id, flags = traceparent.split("-")
    assert (version, trace_id, flags) == ("00", TRACE_ID, "01")
    assert span_id != UPSTREAM_SPAN_ID  # the child's parent is the span of the task's run


def test_importing_mqtasks_imports_neither_opentelemetry_nor_kombu() -> None:
    """Only a transport needs kombu; only a tracer provider needs the OpenTelemetry API."""
    code = (
        "import sys, mqtasks; "
        "print(sorted(n for n in ('opentelemetry', 'kombu') if n in sys.modules))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if not k.startswith("OTEL_")},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def imported_after(code: str, names: tuple[str, ...]) -> list[str]:
    """Which of ``names`` a fresh interpreter has imported after running ``code``."""
    probe = f"{code}\nimport sys\nprint(sorted(n for n in {names!r} if n in sys.modules))"
    proc = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if not k.startswith("OTEL_")},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    found: list[str] = json.loads(proc.stdout.strip().replace("'", '"'))
    return found


def test_a_redis_transport_imports_neither_kombu_nor_py_amqp() -> None:
    """redis:// speaks to Redis with redis-py; kombu is for the transports built on it."""
    code = (
        "from mqtasks.transport import resolve\n"
        "from mqtasks.transport.redis import RedisTransport\n"
        "assert isinstance(resolve('redis://127.0.0.1:1/0'), RedisTransport)"
    )
    assert imported_after(code, ("kombu", "amqp")) == []
    # While the AMQP transport still gets its guards
    amqp = "from mqtasks.transport.amqp import AmqpTransport"
    assert imported_after(amqp, ("kombu", "amqp")) == ["amqp", "kombu"]


def test_the_supervise_program_imports_only_the_standard_library() -> None:
    """It runs with ``-I -S``: nothing installed is on its path, mqtasks included."""
    from mqtasks import _supervise

    tree = ast.parse(Path(_supervise.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "a relative import would import the mqtasks package"
            imported.add((node.module or "").split(".")[0])
    assert imported, "no imports found"
    assert imported - {"__future__"} <= set(sys.stdlib_module_names), imported

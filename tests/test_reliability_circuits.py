"""The circuit scenario's judgement (S20): failed runs, runs while open, probes and the
times to open and close; checked on fabricated ledgers and worker logs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from reliability.circuits import circuit_events, circuit_figures
from reliability.ledger import Event


def ran(task_id: str, start: float, done: float | None, attempt: int = 1) -> list[Event]:
    out = [Event("start", task_id, start, attempt=attempt)]
    if done is not None:
        out.append(Event("done", task_id, done, attempt=attempt))
    return out


def log(t: float, event: str, reason: str | None = None) -> dict[str, Any]:
    return {"t": t, "event": event, "reason": reason, "file": "worker-1.log"}


def outage_log() -> list[dict[str, Any]]:
    """Down at 10, opened at 10.2, probe at 12.2 fails, probe at 14.3 succeeds (up at 14)."""
    return [
        log(10.2, "circuit.opened", "failures"),
        log(12.2, "circuit.half_open"),
        log(12.25, "circuit.opened", "probe_failed"),
        log(14.3, "circuit.half_open"),
        log(14.32, "circuit.closed", "probe_succeeded"),
        {"event": "deferred", "by_reason": {"circuit_open": 40, "circuit_half_open": 3}},
    ]


def test_an_outage_handled_by_the_circuit() -> None:
    events = [
        *ran("a", 10.05, None),
        *ran("a", 14.5, 14.51, attempt=2),  # failed before the trip, ran after the close
        *ran("b", 12.21, None),
        *ran("b", 14.6, 14.61, attempt=2),  # the failed probe
        *ran("c", 14.3, 14.31),  # the probe that closed it
        *ran("d", 9.0, 9.01),
    ]
    f = circuit_figures(events, outage_log(), down_at=10.0, up_at=14.0)
    assert f["failed_runs"] == 2
    assert f["failed_during_open"] == 0
    assert f["opened"] == {"failures": 1, "probe_failed": 1}
    assert f["half_open"] == 2 and f["closed"] == {"probe_succeeded": 1}
    assert f["opened_after_s"] == 0.2 and f["closed_after_s"] == 0.32
    assert f["two_probes_in_a_row"] == 0
    assert f["deferred"] == {"circuit_open": 40, "circuit_half_open": 3}
    assert f["max_attempt"] == 2


def test_a_run_that_fails_while_the_circuit_is_open_is_counted() -> None:
    # Task e started at 11.0, inside the open period 10.2-12.2, and failed
    events = [*ran("e", 11.0, None), *ran("e", 15.0, 15.1, attempt=2)]
    f = circuit_figures(events, outage_log(), down_at=10.0, up_at=14.0)
    assert f["failed_during_open"] == 1
    # A run inside the period that finished (a task of another circuit...) is not a failure
    f = circuit_figures(ran("f", 11.0, 11.1), outage_log(), down_at=10.0, up_at=14.0)
    assert f["failed_during_open"] == 0


def test_two_probes_without_an_outcome_and_a_circuit_that_never_opened() -> None:
    twice = [log(10.2, "circuit.opened", "failures"), log(12.2, "circuit.half_open")]
    twice += [log(12.3, "circuit.half_open"), log(12.4, "circuit.closed", "probe_succeeded")]
    f = circuit_figures([], twice, down_at=10.0, up_at=12.0)
    assert f["two_probes_in_a_row"] == 1
    f = circuit_figures(ran("a", 10.1, None), [], down_at=10.0, up_at=12.0)
    assert f["opened"] == {} and f["opened_after_s"] is None and f["closed_after_s"] is None
    assert f["failed_runs"] == 1 and f["deferred"] == {}


def test_circuit_events_are_read_from_the_worker_logs(tmp_path: Path) -> None:
    lines = [
        {"event": "worker.started", "timestamp": "2026-01-01T00:00:00Z"},
        {"event": "circuit.opened", "reason": "failures", "timestamp": "2026-01-01T00:00:02Z"},
        {"event": "task.deferred", "reason": "circuit_open", "timestamp": "2026-01-01T00:00:03Z"},
        {"event": "task.deferred", "reason": "circuit_open", "timestamp": "2026-01-01T00:00:03Z"},
        {
            "event": "circuit.closed",
            "reason": "probe_succeeded",
            "timestamp": "2026-01-01T00:00:01Z",
        },
    ]
    text = "\n".join(json.dumps(x) for x in lines) + "\nnot json {\n"
    (tmp_path / "worker-1.log").write_text(text)
    found = circuit_events(tmp_path)
    assert [(x["event"], x.get("reason")) for x in found] == [
        ("circuit.closed", "probe_succeeded"),  # oldest first
        ("circuit.opened", "failures"),
        ("deferred", None),
    ]
    assert found[-1]["by_reason"] == {"circuit_open": 2}
    assert found[1]["t"] - found[0]["t"] == 1.0

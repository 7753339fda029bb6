"""The reliability harness's ledger: synthetic ledgers in, the protocol's figures out."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from reliability.ledger import Event, LedgerWriter, classify, percentile, read_ledger


def ev(kind: str, task_id: str, t: float = 0.0, **kw: object) -> Event:
    return Event(kind, task_id, t, **kw)  # type: ignore[arg-type]


def published(task_id: str, t: float = 0.0) -> list[Event]:
    return [ev("intent", task_id, t), ev("confirmed", task_id, t + 0.001)]


def ran(task_id: str, t: float = 1.0, attempt: int = 1) -> list[Event]:
    return [
        ev("start", task_id, t, attempt=attempt),
        ev("done", task_id, t + 0.01, attempt=attempt),
    ]


def test_confirmed_id_never_executed_nor_dead_is_lost() -> None:
    events = [*published("a"), *ran("a"), *published("b")]

    c = classify(events)

    assert c.lost == 1
    assert c.samples["lost"] == ["b"]
    assert c.executed == 1


def test_started_but_not_done_counts_as_lost() -> None:
    """A start without a done is no execution: the task may have died half-way."""
    events = [*published("a"), ev("start", "a", 1.0, attempt=1)]

    assert classify(events).lost == 1


def test_dead_lettered_id_is_not_lost_and_is_counted_by_reason() -> None:
    events = [
        *published("a"),
        *published("b"),
        *published("c"),
        ev("dead", "a", 2.0, attempt=4, info={"reason": "max_retries_exceeded"}),
        ev("dead", "b", 2.0, info={"reason": "delivery_limit"}),
        ev("dead", "c", 2.0, info={"reason": "delivery_limit"}),
        ev("dead", "c", 2.5, info={"reason": "delivery_limit"}),
    ]

    c = classify(events)

    assert c.lost == 0
    assert c.dead_lettered == {"max_retries_exceeded": 1, "delivery_limit": 2}
    assert c.dead_duplicates == 1
    assert c.dead_total == 3


def test_duplicates_count_ids_not_executions() -> None:
    events = [*published("a"), *ran("a", 1.0), *ran("a", 2.0), *ran("a", 3.0), *published("b")]
    events += ran("b")

    c = classify(events)

    assert c.executed == 2
    assert c.executed_more_than_once == 1
    assert c.started_more_than_once == 1
    assert c.dones == 4
    assert c.samples["executed_more_than_once"] == ["a"]


def test_execution_of_an_id_never_sent_is_unexpected() -> None:
    events = [*published("a"), *ran("a"), *ran("ghost"), ev("dead", "phantom", 3.0)]

    c = classify(events)

    assert c.unexpected == 2
    assert c.samples["unexpected"] == ["ghost", "phantom"]
    assert c.lost == 0


def test_failed_publish_that_ran_anyway_is_recovered_not_lost() -> None:
    """Jepsen's 'recovered': delay() raised, yet the broker had the message."""
    events = [ev("intent", "a"), ev("failed", "a", 0.5), *ran("a"), ev("intent", "b")]
    events.append(ev("failed", "b", 0.5))

    c = classify(events)

    assert (c.publish_failed, c.recovered, c.lost, c.confirmed) == (2, 1, 0, 0)


def test_unconfirmed_unexecuted_id_is_not_lost() -> None:
    """Only a confirmed id can be lost: an intent alone promised nothing."""
    assert classify([ev("intent", "a")]).lost == 0


def test_executed_and_dead_is_reported() -> None:
    events = [*published("a"), *ran("a"), ev("dead", "a", 5.0, info={"reason": "delivery_limit"})]

    c = classify(events)

    assert c.done_and_dead == 1
    assert c.lost == 0


def test_e2e_is_first_start_minus_intent() -> None:
    events = [ev("intent", "a", 10.0), ev("start", "a", 10.2), ev("start", "a", 15.0)]
    events += [ev("intent", "b", 10.0), ev("start", "b", 10.1)]

    c = classify(events)

    assert c.e2e_ms["p50"] == pytest.approx(100.0)
    assert c.e2e_ms["p99"] == pytest.approx(200.0)


def test_percentile_nearest_rank() -> None:
    assert percentile([], 50) is None
    assert percentile([3, 1, 2], 50) == 2
    assert percentile(range(1, 101), 99) == 99
    assert percentile(range(1, 1001), 99.9) == 999
    with pytest.raises(ValueError, match="0 to 100"):
        percentile([1], 101)


def test_event_rejects_unknown_kind_and_empty_id() -> None:
    with pytest.raises(ValueError, match="Unknown ledger event kind 'finished'"):
        Event("finished", "a", 0.0)
    with pytest.raises(ValueError, match="needs a task id"):
        Event("start", "", 0.0)


def test_writer_lines_round_trip_through_read_ledger(tmp_path: Path) -> None:
    with LedgerWriter(tmp_path / "p.jsonl", fsync=False) as w:
        w.record("intent", "a", t=1.0)
        w.record("dead", "a", attempt=4, t=2.0, reason="max_retries_exceeded")

    events, torn = read_ledger(tmp_path)

    assert torn == 0
    assert [(e.kind, e.id, e.t) for e in events] == [("intent", "a", 1.0), ("dead", "a", 2.0)]
    assert events[1].attempt == 4
    assert events[1].info == {"reason": "max_retries_exceeded"}
    assert events[1].pid == os.getpid()


def test_torn_last_line_is_skipped_and_counted(tmp_path: Path) -> None:
    with LedgerWriter(tmp_path / "w.jsonl", fsync=False) as w:
        w.record("start", "a", attempt=1, t=1.0)
    with (tmp_path / "w.jsonl").open("ab") as f:
        f.write(b'{"k":"done","id":"a","t":1.')  # the process died mid-write

    events, torn = read_ledger(tmp_path)

    assert torn == 1
    assert [e.kind for e in events] == ["start"]


def test_ledger_survives_sigkill_of_the_writer(tmp_path: Path) -> None:
    """Every line a killed process wrote before the kill is there afterwards."""
    code = (
        "import os, signal, sys\n"
        "from reliability.ledger import LedgerWriter\n"
        "w = LedgerWriter(sys.argv[1])\n"
        "for i in range(50):\n"
        "    w.record('start', f'id-{i}', attempt=1)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "k.jsonl")],
        cwd=Path(__file__).resolve().parents[1],
        check=False,
    )
    assert proc.returncode == -signal.SIGKILL

    events, torn = read_ledger(tmp_path)

    assert (len(events), torn) == (50, 0)

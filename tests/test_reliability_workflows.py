"""The chord scenario's judgement (S16): callback completions, values and dead members,
read from ledger events as the task bodies write them; and the ledger tail its kills aim by."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from reliability.ledger import Event, LedgerWriter
from reliability.workflow_tasks import CALLBACK, MEMBER, ledger_key, member_key
from reliability.workflows import CHORD_SIZE, ChordPlan, LedgerTail, chord_figures


def plan(key: str, values: tuple[int, ...] = (1, 2, 3)) -> ChordPlan:
    return ChordPlan(key, values, tuple(0.0 for _ in values), 0.0)


def callback(kind: str, key: str, t: float, **info: Any) -> Event:
    return Event(kind, key, t, attempt=0, pid=1, info={"task": CALLBACK, **info})


def ran(key: str, values: tuple[int, ...] = (1, 2, 3), t: float = 1.0) -> list[Event]:
    return [callback("start", key, t), callback("done", key, t + 0.1, values=list(values))]


def test_a_callback_completed_twice_is_counted_and_not_as_never() -> None:
    f = chord_figures([plan("c1"), plan("c2")], [*ran("c1"), *ran("c1", t=2.0), *ran("c2")])
    assert f.completed_more_than_once == ["c1"]
    assert f.started_more_than_once == ["c1"]
    assert f.never_completed == []
    assert (f.starts, f.dones) == (3, 3)


def test_a_callback_killed_mid_run_counts_as_restarted_not_as_completed_twice() -> None:
    events = [callback("start", "c1", 1.0), *ran("c1", t=2.0)]
    f = chord_figures([plan("c1")], events)
    assert f.started_more_than_once == ["c1"]
    assert f.completed_more_than_once == []
    assert f.never_completed == []


def test_a_callback_only_started_never_completed() -> None:
    f = chord_figures([plan("c1"), plan("c2")], [callback("start", "c1", 1.0), *ran("c2")])
    assert f.never_completed == ["c1"]


def test_values_in_another_order_than_the_header_are_wrong() -> None:
    f = chord_figures([plan("c1"), plan("c2")], [*ran("c1", values=(2, 1, 3)), *ran("c2")])
    assert f.wrong_values == ["c1"]


def test_a_dead_member_excuses_the_missing_callback_and_forbids_a_run() -> None:
    dead = Event("dead", member_key("c1", 2), 1.0, info={"task": MEMBER, "reason": "x"})
    f = chord_figures([plan("c1"), plan("c2")], [dead, *ran("c2")])
    assert f.with_dead_member == ["c1"]
    assert f.never_completed == []
    assert f.after_dead_member == []
    f = chord_figures([plan("c1")], [dead, *ran("c1")])
    assert f.after_dead_member == ["c1"]


def test_chords_not_published_are_not_judged() -> None:
    f = chord_figures([plan("c2")], [*ran("c2")])
    assert f.to_dict()["published"] == 1
    assert f.never_completed == []


def test_ledger_key_of_dead_letters() -> None:
    assert ledger_key(MEMBER, [member_key("c1", 0), 5, 1.0]) == "c1.m0"
    assert ledger_key(CALLBACK, [[1, 2], "c1", 1.0]) == "c1"
    assert ledger_key(CALLBACK, [[1, 2]]) is None
    assert ledger_key(MEMBER, [7]) is None


def test_ledger_tail_reads_new_lines_only_and_sees_the_member_completing_a_chord(
    tmp_path: Path,
) -> None:
    w = LedgerWriter(tmp_path / "worker-1.jsonl", fsync=False)
    pid = os.getpid()
    tail = LedgerTail(tmp_path)
    keys = [member_key("c1", i) for i in range(CHORD_SIZE)]
    for key in keys[:-1]:
        w.record("start", key, task=MEMBER)
        w.record("done", key, task=MEMBER)
    w.record("start", keys[-1], task=MEMBER)
    running = tail.poll({pid})
    assert running[pid].id == keys[-1]
    assert tail.completions == []
    assert tail.poll({pid + 1}) == {}  # a process no longer alive runs nothing
    w.record("done", keys[-1], task=MEMBER)
    w.record("done", keys[0], task=MEMBER)  # a member that ran twice counts once
    assert tail.poll({pid}) == {}
    assert [e.id for e in tail.completions] == [keys[-1]]
    last = tail.last(pid)
    assert last is not None and last.id == keys[0]
    w.close()

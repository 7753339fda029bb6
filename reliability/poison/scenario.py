"""S7 on the harness's brokers: every poison kind dead-lettered with its reason,
never run, the good tasks between them all executed, worker memory bounded, no
body in the logs and no class module imported.

The workers are real processes: their peak RSS is read from ``/proc`` around
each phase (every kind but the 20 MiB bodies, then the 20 MiB bodies spaced
by good tasks) and their memory maps are searched for the modules poison names.
"""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path
from typing import Any

from mqtasks.exceptions import MQTasksError
from mqtasks.transport.base import dead_letter_spec

from ..harness import Harness
from ..ledger import classify
from ..profiles import BrokerProfile
from ..run import Run
from .kinds import CLASS_MODULES
from .workload import PoisonWorkload, interleaved, spaced

__all__ = ["s7"]

#: Good tasks between two 20 MiB bodies: a prefetch window (4) taken from a
#: backlog then holds one of them at most (a worker waiting on an empty queue may
#: still take the next one while its task thread dead-letters the last).
BIG_BODY_GAP = 10


def _status_kib(pid: int, field_name: str) -> int | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    found = re.search(rf"^{field_name}:\s+(\d+) kB", text, re.MULTILINE)
    return int(found.group(1)) if found else None


def _reset_peak(pid: int) -> bool:
    """Set the peak RSS (VmHWM) of ``pid`` to its current RSS (Linux ``clear_refs`` 5)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _mapped_modules(pid: int) -> list[str]:
    """Which of :data:`CLASS_MODULES` process ``pid`` has loaded (its memory map)."""
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return []
    return [m for m in CLASS_MODULES if f"/{m}." in maps]


class _RssSampler:
    """Samples the workers' RSS every 0.2 s and keeps the maximum per phase and pid."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.phase = "baseline"
        self.peaks: dict[str, dict[int, float]] = {}
        self.timeline: list[tuple[float, dict[int, float]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="s7-rss", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _loop(self) -> None:
        last = 0.0
        while not self._stop.wait(0.2):
            rss = {int(s["pid"]): float(s["rss_mib"]) for s in self.run.pool.stats()}
            peaks = self.peaks.setdefault(self.phase, {})
            for pid, v in rss.items():
                peaks[pid] = max(peaks.get(pid, 0.0), v)
            if time.monotonic() - last >= 1.0:
                last = time.monotonic()
                self.timeline.append((self.run.rel(), rss))


def _wait_settled(run: Run, good: set[str], dead: int, timeout: float) -> float | None:
    """Wait until the ``good`` ids are done and the DLQ holds ``dead`` entries
    (or, the work queue empty, has stopped growing for 3 s: a poison message that
    is not dead-lettered is judged later); return the seconds it took (None on timeout)."""
    spec = run.app.queue(run.queue)
    dead_spec = dead_letter_spec(spec)
    t0 = time.monotonic()
    last, since = -1, t0
    while time.monotonic() - t0 < timeout:
        done = {e.id for e in run.events() if e.kind == "done"}
        try:
            counts = run.app.transport.message_counts([spec, dead_spec])
        except MQTasksError:
            counts = {}
        ready, in_dlq = counts.get(spec.name, -1), counts.get(dead_spec.name, 0)
        if in_dlq != last:
            last, since = in_dlq, time.monotonic()
        stalled = ready == 0 and time.monotonic() - since >= 3.0
        if good <= done and (in_dlq >= dead or stalled):
            return round(time.monotonic() - t0, 2)
        time.sleep(0.2)
    run.notes.append(f"phase not settled after {timeout:.0f} s")
    return None


def _peaks(run: Run, reset: bool) -> dict[int, float]:
    """Each worker's peak RSS in MiB since the last reset (VmHWM); reset it again if asked."""
    out: dict[int, float] = {}
    for pid in run.pool.pids().values():
        hwm = _status_kib(pid, "VmHWM")
        if hwm is not None:
            out[pid] = round(hwm / 1024, 1)
        if reset:
            _reset_peak(pid)
    return out


def _rss_check(
    run: Run,
    name: str,
    baseline: dict[int, float],
    hwm: dict[int, float],
    sampled: dict[int, float],
    bound: float,
    what: str,
) -> None:
    growth = {
        pid: round(max(hwm.get(pid, 0.0), sampled.get(pid, 0.0)) - base, 1)
        for pid, base in baseline.items()
    }
    run.check(
        name,
        bool(growth) and all(g < bound for g in growth.values()),
        growth,
        f"peak RSS < baseline + {bound:.0f} MiB per worker ({what})",
    )


def s7(h: Harness, broker: BrokerProfile) -> dict[str, Any]:
    """Poison messages: every kind dead-lettered with its reason, never run, the
    good tasks between them all executed, worker memory bounded, no body logged."""
    with h.run("S7", broker) as run:
        started = time.time()
        n_good = h.profile.n(1000)
        n_kind = h.profile.n(100)
        workload = PoisonWorkload(
            run.app, run.queue, run.ledger_dir, n_kind=n_kind, new_id=run.new_id, marker_dir=run.dir
        )
        run.publisher = workload.publisher
        try:
            return _s7_run(run, workload, n_good, started)
        finally:
            workload.close()


def _s7_run(run: Run, workload: PoisonWorkload, n_good: int, started: float) -> dict[str, Any]:
    n_kind = workload.n_kind
    big = [p for p in workload.plan if p.variant == "20MiB"]
    light = [p for p in workload.plan if p.variant != "20MiB"]
    warm = min(10, n_good)
    n_big_good = min(BIG_BODY_GAP * len(big), (n_good - warm) // 2)
    jobs = workload.good_jobs(n_good, run.rng)
    warm_jobs, jobs_b, jobs_a = (
        jobs[:warm],
        jobs[warm : warm + n_big_good],
        jobs[warm + n_big_good :],
    )
    run.pool.start()
    time.sleep(1.5)
    sampler = _RssSampler(run)
    sampler.start()
    try:
        # Baseline: workers at rest after a few good tasks.
        workload.send(warm_jobs)
        _wait_settled(run, {str(j.args[0]) for j in warm_jobs}, 0, 60)
        time.sleep(0.5)
        baseline: dict[int, float] = {}
        for pid in run.pool.pids().values():
            rss = _status_kib(pid, "VmRSS")
            if rss is not None:
                baseline[pid] = round(rss / 1024, 1)
        resets = [_reset_peak(pid) for pid in baseline]
        if not all(resets):
            run.notes.append("peak RSS could not be reset (clear_refs): peaks are lifetime peaks")
        imported_before = {pid: _mapped_modules(pid) for pid in baseline}
        # Phase A: every kind but the 20 MiB bodies, shuffled among good tasks.
        sampler.phase = "A"
        t_a = time.time()
        workload.send(interleaved(light, jobs_a, run.rng))
        run.extra["phase_a_publish_s"] = round(time.time() - t_a, 1)
        settled_a = _wait_settled(
            run, {str(j.args[0]) for j in [*warm_jobs, *jobs_a]}, len(light), 120
        )
        hwm_a = _peaks(run, reset=True)
        # Phase B: the 20 MiB bodies, each followed by its share of good tasks.
        sampler.phase = "B"
        t_b = time.time()
        workload.send(spaced(big, jobs_b))
        run.extra["phase_b_publish_s"] = round(time.time() - t_b, 1)
        settled_b = _wait_settled(run, set(workload.good), len(workload.plan), 180)
        hwm_b = _peaks(run, reset=False)
        sampler.phase = "end"
        # j and the oversized argument: delay() itself must refuse.
        unroutable = workload.unroutable(n_kind)
        oversized = workload.oversized(n_kind)
        ok = run.wait_quiescent(120)
    finally:
        sampler.stop()
    imported_after = {pid: _mapped_modules(pid) for pid in run.pool.pids().values()}
    run.check("quiescent", ok, ok, "within 120 s")
    run.extra["settle_s"] = {"A": settled_a, "B": settled_b}
    run.extra["dlq"] = workload.record_dead_letters(run.ledger)
    run.extra["headers_cut_to_fit"] = {
        k: {"header": key, "length": length} for k, (key, length) in workload.injector.cut.items()
    }
    events = run.events()
    c = classify(events)
    run.standard_checks(c, dead=None)
    workload.judge(
        run,
        events,
        c,
        unroutable=unroutable,
        oversized=oversized,
        expect_unroutable=not (run.is_redis or run.is_postgres),
    )
    # Worker processes: no crash, memory bounded, no body in the logs, nothing imported.
    exits = [{"slot": e.slot, "pid": e.pid, "code": e.code} for e in run.pool.exits]
    run.check("worker_crashes", not exits, len(exits), "0 worker exits during the run")
    run.extra["rss_mib"] = {
        "baseline": baseline,
        "hwm_a": hwm_a,
        "hwm_b": hwm_b,
        "sampled_max": sampler.peaks,
        "timeline": sampler.timeline[-120:],
    }
    _rss_check(
        run,
        "rss_g_i",
        baseline,
        hwm_a,
        sampler.peaks.get("A", {}),
        64.0,
        "every kind but the 20 MiB bodies, g and i included",
    )
    _rss_check(
        run,
        "rss_20mib",
        baseline,
        hwm_b,
        sampler.peaks.get("B", {}),
        128.0,
        f"{len(big)} bodies of 20 MiB",
    )
    bodies_logged = run.log_count(workload.marker)
    run.check("no_body_in_logs", bodies_logged == 0, bodies_logged, "0 lines with a poison body")
    run.check(
        "class_not_imported",
        not any(imported_before.values()) and not any(imported_after.values()),
        {"before": imported_before, "after": imported_after},
        f"{', '.join(CLASS_MODULES)} never loaded by a worker (named by b and h)",
    )
    run.extra["poison_per_kind"] = n_kind
    run.extra["good"] = len(workload.good)
    run.extra["big_body_gap"] = len(jobs_b) // max(1, len(big))
    _notes(run, workload)
    return run.result(c, started=started)


def _notes(run: Run, workload: PoisonWorkload) -> None:
    cut = workload.injector.cut
    if cut:
        lengths = sorted({length for _, length in cut.values()})
        run.notes.append(
            "h/1MiB-value: RabbitMQ carries all headers in one frame (frame_max 131072), so "
            f"a 1 MiB header cannot be published; the value sent is the longest the broker "
            f"takes ({lengths} characters)."
        )
    by_body = run.extra.get("dlq", {}).get("recorded_by_body_id", {})
    if by_body:
        run.notes.append(
            f"dead-letter entries without the message id, matched by the id in the body: "
            f"{by_body} (a message sent without an id; on Redis, metadata over 1 MiB is "
            "refused before its id is read)."
        )
    if run.is_postgres:
        run.notes.append(
            "j: a postgresql:// queue is its rows in one table, so delay() to a deleted "
            "queue succeeds (the row waits for a consumer of that queue); reported as "
            "unroutable_delay, not a criterion here, as on Redis."
        )
    if run.is_redis:
        run.notes.append(
            "j: Redis has no routing and no mandatory flag, so delay() to a deleted queue "
            "succeeds (the message waits in a list nobody consumes); reported as "
            "unroutable_delay, not a criterion here (docs/guide/transports.rst says so)."
        )
    run.notes.append(
        f"The 20 MiB bodies are spaced by {BIG_BODY_GAP} good tasks: a prefetch window "
        "taken from a backlog holds one of them at most."
    )
    failed = {ch["check"] for ch in run.checks if not ch["ok"]}
    if run.is_redis and "rss_20mib" in failed:
        run.notes.append(
            "rss_20mib on Redis: a worker holds a 20 MiB message as its list element plus "
            "a copy of the body (40 MiB), builds a third copy to dead-letter it, and "
            "redis-py's pure-Python parser needs about 3 x the element while reading one; "
            "a worker whose I/O thread takes the next 20 MiB element while its task "
            "thread dead-letters the last one goes past +128 MiB (with glibc's heap growth)."
        )


# -- S15: memory:// in process ------------------------------------------------------

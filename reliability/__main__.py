"""``python -m reliability``: run the fault-injection protocol and report.

Runs the negative controls first (the harness must see loss where there is
loss), then the scenarios; prints one JSON object per scenario run and a
summary table, writes both to the results file, and exits 1 if any pass
criterion failed (2 if a negative control showed no loss).
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import click

from .harness import Harness
from .profiles import (
    BROKER_PROFILES,
    CLUSTER_PROFILES,
    ON_REQUEST,
    PROFILES,
    RABBIT_PROFILES,
    SENTINEL_PROFILES,
    BrokerProfile,
)
from .report import summary_table
from .scenarios import SCENARIOS, Scenario

#: Exit code: every criterion passed.
RET_OK = 0
#: Exit code: a scenario's pass criterion failed (or it crashed).
RET_FAILED = 1
#: Exit code: a negative control showed no loss, so the harness cannot be trusted.
RET_HARNESS_BROKEN = 2


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--profile", type=click.Choice(sorted(PROFILES)), default="ci", show_default=True)
@click.option(
    "--scenario",
    "scenarios",
    multiple=True,
    type=click.Choice(sorted(SCENARIOS), case_sensitive=False),
    help="Run only these (repeatable); the negative controls always run first unless --no-controls.",
)
@click.option(
    "--broker",
    "brokers",
    multiple=True,
    type=click.Choice(["rabbitmq", "redis", "memory", "cluster", "sentinel", *BROKER_PROFILES]),
    help="Only these brokers: rabbitmq (RQ, RC), redis (RD, RV), memory (MEM), or a profile "
    "name; cluster (KQ, KC) and sentinel (SR, SP) run only when named here.",
)
@click.option("--seed", type=int, default=None, help="Re-use a seed printed by an earlier run.")
@click.option("--no-controls", is_flag=True, help="Skip N1-N3 (for re-running one scenario).")
@click.option(
    "--results",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="JSON lines file for the results (default: build/reliability-<profile>-<time>.jsonl).",
)
@click.option("--keep", is_flag=True, help="Keep the work directory (ledgers, worker logs).")
@click.option(
    "--lanes",
    type=click.IntRange(1, 2),
    default=None,
    help="2: run the RabbitMQ and the Redis scenarios side by side (default for ci); "
    "1: one at a time (default for release).",
)
def main(
    profile: str,
    scenarios: tuple[str, ...],
    brokers: tuple[str, ...],
    seed: int | None,
    no_controls: bool,
    results: Path | None,
    keep: bool,
    lanes: int | None,
) -> None:
    """Run the reliability fault-injection protocol on brokers the harness starts itself."""
    prof = PROFILES[profile]
    lanes = lanes or (2 if profile == "ci" else 1)
    seed = seed if seed is not None else random.randrange(2**31)
    wanted = {s.upper() for s in scenarios}
    allowed = _broker_filter(brokers, named=bool(wanted))
    selected = [
        s
        for s in SCENARIOS.values()
        if (s.negative and not no_controls)
        or (not s.negative and (not wanted or s.name.upper() in wanted))
        or (s.negative and s.name.upper() in wanted)
    ]
    results = (
        results or Path("build") / f"reliability-{profile}-{time.strftime('%Y%m%dT%H%M%S')}.jsonl"
    )
    results.parent.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="mqtasks-rel-"))
    os.chmod(workdir, 0o755)  # the RabbitMQ node runs as another user below it
    click.echo(
        f"reliability: profile={profile} seed={seed} lanes={lanes} workdir={workdir} "
        f"results={results}",
        err=True,
    )
    signal.signal(signal.SIGTERM, _interrupt)
    harness = Harness(workdir, prof, seed)
    rows: list[dict[str, Any]] = []
    code = RET_OK
    t_start = time.monotonic()
    try:
        with results.open("w") as out:
            runs: list[Pair] = [
                (scenario, broker)
                for scenario in selected
                for broker in scenario.brokers
                if broker in allowed
            ]
            lock = threading.Lock()

            def record(scenario: Scenario, row: dict[str, Any]) -> None:
                nonlocal code
                row["versions"] = harness.versions()
                line = json.dumps(row, default=str)
                with lock:
                    click.echo(line)
                    out.write(line + "\n")
                    out.flush()
                    rows.append(row)
                    if row.get("status") == "failed":
                        code = max(code, RET_HARNESS_BROKEN if scenario.negative else RET_FAILED)

            for phase in _phases(runs, lanes):
                _run_phase(harness, phase, record)
            bad = harness.loopback_violations()
            if bad:
                click.echo(f"listening beyond loopback: {bad}", err=True)
                code = max(code, RET_FAILED)
            total = time.monotonic() - t_start
            table = summary_table(rows, profile=profile, seed=seed, total_s=total)
            out.write(
                json.dumps({"summary": table, "total_s": round(total, 1), "seed": seed}) + "\n"
            )
        click.echo(table)
    except KeyboardInterrupt:
        click.echo("interrupted: cleaning up", err=True)
        code = 130
    finally:
        harness.close()
        if not keep:
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)
    sys.exit(code)


Pair = tuple[Scenario, BrokerProfile]

#: Scenarios never run side by side with the other lane: S12 loads both cores
#: (throughput and soak figures), and S8's pass criterion is a schedule (each
#: retry gap within +20 % + 100 ms), which a neighbour's worker restarts and
#: fsyncs on two shared cores can stretch by more than that.
EXCLUSIVE = frozenset({"S8", "S12"})


def _phases(runs: list[Pair], lanes: int) -> list[list[list[Pair]]]:
    """Group runs into phases of lanes; lanes of a phase run at the same time.

    Negative controls come first and alone (the protocol: a harness that cannot
    see loss proves nothing, so they are judged before anything else). With two
    lanes, the RabbitMQ runs and the other runs (Redis, memory) go side by side:
    each lane only ever touches its own brokers, and most scenarios spend their
    time waiting for faults, delays and quiescence rather than on the CPU. The
    timed scenarios (:data:`EXCLUSIVE`) run last, one at a time, so their
    figures are their own.
    """
    controls = [r for r in runs if r[0].negative]
    exclusive = [r for r in runs if not r[0].negative and r[0].name in EXCLUSIVE]
    rest = [r for r in runs if not r[0].negative and r[0].name not in EXCLUSIVE]
    phases: list[list[list[Pair]]] = []
    if controls:
        phases.append([controls])
    if lanes == 1:
        if rest:
            phases.append([rest])
    else:
        rabbit = [r for r in rest if r[1] in RABBIT_PROFILES]
        other = [r for r in rest if r[1] not in RABBIT_PROFILES]
        phases.append([lane for lane in (rabbit, other) if lane])
    if exclusive:
        phases.append([exclusive])
    return [p for p in phases if p]


def _run_phase(
    harness: Harness, phase: list[list[Pair]], record: Callable[[Scenario, dict[str, Any]], None]
) -> None:
    """Run the lanes of one phase, each in its own thread (the first in this one)."""

    def lane(runs: list[Pair]) -> None:
        for scenario, broker in runs:
            record(scenario, _run_one(harness, scenario.name, broker))

    threads = [threading.Thread(target=lane, args=(r,), daemon=True) for r in phase[1:]]
    for t in threads:
        t.start()
    lane(phase[0])
    for t in threads:
        while t.is_alive():  # a timed join keeps Ctrl-C and SIGTERM working
            t.join(1.0)


def _broker_filter(brokers: tuple[str, ...], *, named: bool = False) -> set[str]:
    """The profiles to run on; the on-request ones only if asked for by
    ``--broker`` or by naming scenarios with ``--scenario``."""
    if not brokers:
        every = {str(b) for b in BROKER_PROFILES}
        return every if named else every - ON_REQUEST
    groups = {
        "rabbitmq": {"RQ", "RC"},
        "redis": {"RD", "RV"},
        "memory": {"MEM"},
        "cluster": set(CLUSTER_PROFILES),
        "sentinel": set(SENTINEL_PROFILES),
    }
    allowed: set[str] = set()
    for b in brokers:
        allowed |= groups.get(b, {b})
    return allowed


def _run_one(harness: Harness, name: str, broker: str) -> dict[str, Any]:
    scenario = SCENARIOS[name]
    if scenario.fn is None:
        return {"scenario": name, "broker": broker, "status": "not_implemented", "passed": None}
    click.echo(f"-- {name} on {broker}: {scenario.title}", err=True)
    try:
        row = scenario.fn(harness, broker)  # type: ignore[arg-type]
    except KeyboardInterrupt:
        raise
    except Exception as exc:
        return {
            "scenario": name,
            "broker": broker,
            "status": "failed",
            "passed": False,
            "error": f"{type(exc).__name__}: {exc}",
            "traceback": traceback.format_exc()[-4000:],
        }
    if row.get("status") != "pending":  # pending: the broker lacks a feature the scenario needs
        row["status"] = "passed" if row.get("passed") else "failed"
    return row


if __name__ == "__main__":  # pragma: no cover
    main()

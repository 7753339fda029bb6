"""The benchmark suite's summary: medians over rounds, and the Markdown tables."""

from __future__ import annotations

import statistics
from typing import Any

# -- summary ---------------------------------------------------------------------------------

#: key, label, higher is better, format
METRICS: list[tuple[str, str, bool, str]] = [
    ("publish_per_s", "publish/s, one-thread loop, no worker", True, "{:,.0f}"),
    (
        "publish_block_loop_per_s",
        "publish/s, one-thread loop in a block (mqtasks), no worker",
        True,
        "{:,.0f}",
    ),
    ("publish_confirm_per_s", "publish/s, kombu with a confirm per message", True, "{:,.0f}"),
    (
        "publish_threads_per_s",
        "publish/s, {publishers} threads, each call confirmed (mqtasks)",
        True,
        "{:,.0f}",
    ),
    ("publish_bulk_per_s", "publish/s, bulk call, each batch confirmed (mqtasks)", True, "{:,.0f}"),
    ("drain_per_s", "drain/s", True, "{:,.0f}"),
    (
        "pipeline1_per_s",
        "pipeline/s, one-thread loop (1 publisher, a call per task)",
        True,
        "{:,.0f}",
    ),
    (
        "pipeline_per_s",
        "pipeline/s, {publishers} publisher threads, a call per task",
        True,
        "{:,.0f}",
    ),
    ("pipeline_bulk_per_s", "pipeline/s, bulk publish from 1 thread (see below)", True, "{:,.0f}"),
    ("pipeline_best_per_s", "pipeline/s, the best of these three ways", True, "{:,.0f}"),
    (
        "pipeline_block_loop_per_s",
        "pipeline/s, one-thread loop in a block (mqtasks)",
        True,
        "{:,.0f}",
    ),
    ("idle_latency_ms.p50", "latency idle p50 ms", False, "{:.2f}"),
    ("idle_latency_ms.p95", "latency idle p95 ms", False, "{:.2f}"),
    ("idle_latency_ms.p99", "latency idle p99 ms", False, "{:.2f}"),
    ("load_latency_ms.p50", "latency at 70% p50 ms", False, "{:.2f}"),
    ("load_latency_ms.p95", "latency at 70% p95 ms", False, "{:.2f}"),
    ("load_latency_ms.p99", "latency at 70% p99 ms", False, "{:.2f}"),
    ("worker_rss_mib", "worker peak RSS MiB", False, "{:.1f}"),
    ("worker_cpu_us_per_task", "worker CPU µs/task (drain)", False, "{:,.0f}"),
    ("redis_cmds_per_task", "Redis cmds/task (drain, whole server)", False, "{:.1f}"),
]


def _get(d: dict[str, Any], key: str) -> float | None:
    for part in key.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d if isinstance(d, (int, float)) else None  # type: ignore[return-value]


def summarise(
    rounds: list[dict[str, Any]], brokers: list[str], systems: list[str]
) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for broker in brokers:
        b: dict[str, Any] = {}
        for name in systems:
            rs = [r for r in rounds if r["broker"] == broker and r["system"] == name]
            if not rs:
                continue
            s: dict[str, Any] = {
                "rounds": len(rs),
                "problems": sum(len(r["problems"]) for r in rs),
                "block": any(r.get("block") for r in rs),
            }
            for key, *_ in METRICS:
                values = [v for v in (_get(r, key) for r in rs) if v is not None]
                if values:
                    s[key] = {
                        "median": statistics.median(values),
                        "min": min(values),
                        "max": max(values),
                    }
            b[name] = s
        summary[broker] = b
    return summary


def _cell(stat: dict[str, float] | None, fmt: str, spread: bool) -> str:
    if not stat:
        return "n/a"
    text = fmt.format(stat["median"])
    if spread and stat["min"] != stat["max"]:
        text += f" ({fmt.format(stat['min'])}-{fmt.format(stat['max'])})"
    return text


def markdown(summary: dict[str, Any], header: str, publishers: int) -> str:
    lines = [header, ""]
    for broker, systems in summary.items():
        names = list(systems)
        if not names:
            continue
        lines.append(f"### {'RabbitMQ' if broker == 'amqp' else 'Redis'} ({broker})")
        lines.append("")
        lines.append("Median over the rounds (min-max).")
        lines.append("")
        lines.append("| metric | " + " | ".join(names) + " |")
        lines.append("|---|" + "---:|" * len(names))
        for key, label, _, fmt in METRICS:
            cells = [_cell(systems[n].get(key), fmt, True) for n in names]
            if all(c == "n/a" for c in cells):
                continue
            lines.append(f"| {label.format(publishers=publishers)} | " + " | ".join(cells) + " |")
        bad = [f"{n}: {systems[n]['problems']}" for n in names if systems[n]["problems"]]
        if bad:
            lines.append("")
            lines.append("Rounds with problems (see the JSON): " + ", ".join(bad))
        mq = [n for n in names if n.startswith("mqtasks")]
        peers = [n for n in names if not n.startswith("mqtasks")]
        lines.extend(_loop_table(systems, names, mq, peers))
        if mq and peers:
            lines.append("")
            lines.append(
                "Ratios of medians, mqtasks / peer (rates: above 1 is better for mqtasks; "
                "latency, RSS, CPU, commands: below 1 is better for mqtasks)."
            )
            lines.append("")
            cols = [(m, p) for m in mq for p in peers]
            lines.append("| metric | " + " | ".join(f"{m} / {p}" for m, p in cols) + " |")
            lines.append("|---|" + "---:|" * len(cols))
            for key, label, _, _ in METRICS:
                if key == "publish_confirm_per_s":
                    # mqtasks' confirmed publish against kombu's confirmed publish.
                    row = []
                    for m, p in cols:
                        a = systems[m].get("publish_per_s")
                        c = systems[p].get(key)
                        row.append(f"{a['median'] / c['median']:.2f}" if a and c else "n/a")
                    if any(x != "n/a" for x in row):
                        lines.append(
                            "| publish/s vs kombu with a confirm per message | "
                            + " | ".join(row)
                            + " |"
                        )
                    continue
                row = []
                for m, p in cols:
                    a, c = systems[m].get(key), systems[p].get(key)
                    row.append(
                        f"{a['median'] / c['median']:.2f}" if a and c and c["median"] else "n/a"
                    )
                if any(x != "n/a" for x in row):
                    lines.append(
                        f"| {label.format(publishers=publishers)} | " + " | ".join(row) + " |"
                    )
        confirmed = [n for n in mq if systems[n].get("publish_threads_per_s")]
        if confirmed:
            lines.append("")
            lines.append(
                "Confirmed publishing: the rate of each way over the one-confirm-per-message "
                "rate (mqtasks' own 1-thread `delay()`, and plain kombu's where it ran)."
            )
            lines.append("")
            lines.append("| system, way | publish/s | / 1 thread | / kombu confirm per message |")
            lines.append("|---|---:|---:|---:|")
            kombu = systems.get("kombu", {}).get("publish_confirm_per_s")
            for n in confirmed:
                one = systems[n].get("publish_per_s")
                for key in ("publish_threads_per_s", "publish_bulk_per_s"):
                    stat = systems[n].get(key)
                    if not stat:
                        continue
                    way = f"{publishers} threads" if key == "publish_threads_per_s" else "bulk"
                    vs_one = f"{stat['median'] / one['median']:.2f}" if one else "n/a"
                    vs_kombu = f"{stat['median'] / kombu['median']:.2f}" if kombu else "n/a"
                    lines.append(
                        f"| {n}, {way} | {_cell(stat, '{:,.0f}', True)} | {vs_one} | {vs_kombu} |"
                    )
        if "mqtasks" in systems and "mqtasks-observed" in systems:
            lines.extend(
                _observed_table(systems["mqtasks"], systems["mqtasks-observed"], publishers)
            )
        lines.append("")
    return "\n".join(lines)


#: The rows of the one-thread loop table: key, label, and the peers' key it is set against
#: (a block's loop against the peer's plain loop: the peers have no block).
LOOP_ROWS: list[tuple[str, str, str]] = [
    ("publish_per_s", "publish/s, no worker running", "publish_per_s"),
    ("publish_block_loop_per_s", "publish/s, in a block, no worker running", "publish_per_s"),
    ("pipeline1_per_s", "pipeline (publish while a worker runs), end to end/s", "pipeline1_per_s"),
    ("pipeline_block_loop_per_s", "pipeline, in a block, end to end/s", "pipeline1_per_s"),
]


def _loop_table(
    systems: dict[str, Any], names: list[str], mq: list[str], peers: list[str]
) -> list[str]:
    """Lines of the table of one thread publishing in a plain loop, and its ratios."""
    lines = [
        "",
        "One thread calling `delay()` / `send()` / `publish()` in a plain loop, as a script "
        'enqueueing a backlog or a request handler does; "in a block" is the same loop '
        "inside `with app.publishing():` (mqtasks only; its confirms are awaited together "
        "at the block's end).",
        "",
        "| one-thread loop | " + " | ".join(names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    for key, label, _ in LOOP_ROWS:
        cells = []
        for n in names:
            in_block = key.startswith(("publish_block", "pipeline_block"))
            if in_block and n.startswith("mqtasks") and not systems[n].get("block"):
                cells.append("n/a (no `App.publishing()`)")
                continue
            cells.append(_cell(systems[n].get(key), "{:,.0f}", True))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    cols = [(m, p) for m in mq for p in peers]
    if cols:
        lines += [
            "",
            "| ratio, mqtasks / peer's plain loop | "
            + " | ".join(f"{m} / {p}" for m, p in cols)
            + " |",
            "|---|" + "---:|" * len(cols),
        ]
        for key, label, peer_key in LOOP_ROWS:
            row = []
            for m, p in cols:
                a, c = systems[m].get(key), systems[p].get(peer_key)
                row.append(f"{a['median'] / c['median']:.2f}" if a and c else "n/a")
            lines.append(f"| {label} | " + " | ".join(row) + " |")
        if "kombu" in peers:
            row = []
            kombu = systems["kombu"].get("publish_confirm_per_s")
            for m, p in cols:
                a = systems[m].get("publish_per_s")
                ok = a and kombu and p == "kombu"
                row.append(f"{a['median'] / kombu['median']:.2f}" if ok else "")
            if kombu:
                lines.append(
                    "| publish/s, no worker, against kombu with a confirm per message | "
                    + " | ".join(row)
                    + " |"
                )
    return lines


#: The rows of the "Observability on" table: key, label, a rate (the cost is 1 - ratio).
OBSERVED_ROWS = [
    ("publish_per_s", "publish/s (1 thread, each call confirmed on RabbitMQ)", True),
    ("drain_per_s", "drain/s", True),
    ("pipeline1_per_s", "pipeline/s, 1 publisher thread", True),
    ("pipeline_per_s", "pipeline/s, {publishers} publisher threads", True),
    ("pipeline_bulk_per_s", "pipeline/s, bulk publish", True),
    ("pipeline_best_per_s", "pipeline/s, the best of these three ways", True),
    ("publish_block_loop_per_s", "publish/s, one-thread loop in a block", True),
    ("pipeline_block_loop_per_s", "pipeline/s, one-thread loop in a block", True),
    ("worker_cpu_us_per_task", "worker CPU µs/task (drain)", False),
    ("idle_latency_ms.p50", "latency idle p50 ms", False),
    ("idle_latency_ms.p99", "latency idle p99 ms", False),
]


def _observed_table(base: dict[str, Any], observed: dict[str, Any], publishers: int) -> list[str]:
    """Lines of the table setting mqtasks with observability on against its defaults."""
    lines = [
        "",
        "Observability on: `mqtasks-observed` (every span recorded, JSON logs, StatsD) "
        "against `mqtasks` (the defaults: log context, no tracer provider, no StatsD), "
        "medians; the cost is the share of throughput lost.",
        "",
        "| metric | mqtasks | mqtasks-observed | observed / mqtasks | cost |",
        "|---|---:|---:|---:|---:|",
    ]
    for key, label, rate in OBSERVED_ROWS:
        a, b = base.get(key), observed.get(key)
        if not a or not b:
            continue
        fmt = "{:,.0f}" if rate or "cpu" in key else "{:.2f}"
        ratio = b["median"] / a["median"] if a["median"] else 0.0
        cost = f"{1 - ratio:.0%}" if rate and ratio else ""
        lines.append(
            f"| {label.format(publishers=publishers)} | {_cell(a, fmt, True)} | "
            f"{_cell(b, fmt, True)} | {ratio:.2f} | {cost} |"
        )
    return lines

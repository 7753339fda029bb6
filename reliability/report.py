"""The summary table printed after a harness run (markdown, for docs/reliability.md)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["summary_table"]

COLUMNS = (
    "scenario",
    "broker",
    "status",
    "sent",
    "confirmed",
    "publish_failed",
    "executed",
    "dup",
    "restarted",
    "dead",
    "lost",
    "unexpected",
    "recovery_s",
    "e2e p50/p99 ms",
    "failed checks",
)


def _cell(row: dict[str, Any], column: str) -> str:
    if column == "dup":
        value: Any = row.get("executed_more_than_once")
    elif column == "restarted":
        value = row.get("started_more_than_once")
    elif column == "dead":
        dead = row.get("dead_lettered") or {}
        value = ", ".join(f"{k} {v}" for k, v in sorted(dead.items())) or (
            "0" if "sent" in row else ""
        )
    elif column == "recovery_s":
        rec = [f.get("recovery_s") for f in row.get("faults") or [] if "recovery_s" in f]
        value = "max " + str(max((r for r in rec if r is not None), default="-")) if rec else ""
        if any(r is None for r in rec):
            value += " (some never)"
    elif column == "e2e p50/p99 ms":
        e2e = row.get("e2e_ms") or {}
        value = f"{e2e.get('p50')}/{e2e.get('p99')}" if e2e else ""
    elif column == "failed checks":
        value = ", ".join(c["check"] for c in row.get("checks") or [] if not c["ok"])
        if row.get("error"):
            value = row["error"][:80]
    else:
        value = row.get(column)
    return "" if value is None else str(value)


def summary_table(
    rows: Sequence[dict[str, Any]], *, profile: str, seed: int, total_s: float
) -> str:
    """Return a markdown table with one line per scenario run."""
    lines = [
        f"profile {profile}, seed {seed}, {total_s / 60:.1f} min",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join(" --- " for _ in COLUMNS) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row, c).replace("|", "/") for c in COLUMNS) + " |")
    return "\n".join(lines)

"""The reliability fault-injection harness: ``python -m reliability --profile ci``.

It starts brokers of its own on loopback ports (never the shared ones), runs
workers as supervised OS processes, injects faults (worker kills, broker
restarts and freezes, cut and black-holed connections), keeps a ledger of every
task outside the broker and classifies every task id as executed, duplicated,
dead-lettered or **lost**, as the protocol in ``docs/reliability.md`` describes.
"""

from __future__ import annotations

__all__: list[str] = []

"""Flow control: rate and concurrency limits across workers, circuit breakers, batches.

Declared on the task (``@app.task(rate_limit="100/s", concurrency_limit=5,
circuit="payments", batch_size=100)``) and kept across every worker through
the result backend. See the flow-control guide.
"""

from __future__ import annotations

from .circuit import CircuitBreaker
from .options import FlowOptions, Rate, flow_options, parse_rate

__all__ = ["CircuitBreaker", "FlowOptions", "Rate", "flow_options", "parse_rate"]

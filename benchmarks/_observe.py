"""What "observability on" means in the benchmarks, shared by ``observability.py`` and ``suite.py``.

* traces: the OpenTelemetry SDK's ``TracerProvider`` with a ``BatchSpanProcessor``
  whose exporter counts the spans and drops them (no collector runs here);
* metrics: :class:`~mqtasks.middleware.StatsdMetrics` sending to a UDP socket on
  127.0.0.1, read by a separate process (:class:`StatsdSink`), so that reading the
  packets costs the measured process nothing;
* logs: :class:`~mqtasks.middleware.StructlogContext`, with JSON lines to a file
  (configured by the caller: ``configure_logging`` or ``--log-format json``).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

from mqtasks import OpenTelemetryTracing, StatsdMetrics, StructlogContext

# A StatsD stand-in in its own process: prints its port, counts datagrams until stdin
# closes, then prints the count.
_UDP_SINK = """
import select, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1], flush=True)
n = 0
while True:
    ready, _, _ = select.select([s, sys.stdin], [], [])
    if s in ready:
        s.recv(65535)
        n += 1
    if sys.stdin in ready and not sys.stdin.readline():
        break
print(n, flush=True)
"""


class DroppingExporter(SpanExporter):
    """Counts the spans the BatchSpanProcessor hands over, and drops them."""

    def __init__(self) -> None:
        self.spans = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.spans += len(spans)
        return SpanExportResult.SUCCESS


class StatsdSink:
    """A UDP socket on 127.0.0.1 in a child process, counting the datagrams it receives."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _UDP_SINK],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        self.port = int(self.proc.stdout.readline())

    def url(self, prefix: str = "bench") -> str:
        """The ``statsd://`` URL of the sink."""
        return f"statsd://127.0.0.1:{self.port}/{prefix}"

    def close(self) -> int:
        """Stop the sink; return how many datagrams it received."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.close()
        count = int(self.proc.stdout.readline() or 0)
        self.proc.wait(10)
        return count


def tracer_provider(sample: float = 1.0) -> tuple[TracerProvider, DroppingExporter]:
    """An SDK tracer provider recording ``sample`` of the traces, batching them to a drop."""
    exporter = DroppingExporter()
    provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(sample)))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider, exporter


def observed_middleware(
    provider: TracerProvider | None, statsd_url: str | None, *, logs: bool = True
) -> list[Any]:
    """The middleware stack with each part given: traces, log context, StatsD metrics."""
    stack: list[Any] = []
    if provider is not None:
        stack.append(OpenTelemetryTracing(provider))
    if logs:
        stack.append(StructlogContext())
    if statsd_url:
        stack.append(StatsdMetrics(statsd_url))
    return stack

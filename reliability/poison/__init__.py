"""S7: poison messages, injected past mqtasks' producer.

* :mod:`~reliability.poison.kinds`: the kinds a to i of the protocol and how to
  build one message of each;
* :mod:`~reliability.poison.injector`: publishing one past the producer (raw
  kombu, or the Redis list element format);
* :mod:`~reliability.poison.workload`: poison of every kind among good tasks,
  and the criteria the outcome is judged by (shared with S15 on ``memory://``);
* :mod:`~reliability.poison.scenario`: S7 itself, with real worker processes,
  their memory and their logs.
"""

from __future__ import annotations

__all__: list[str] = []

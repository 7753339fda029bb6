"""S13 (transport security) and S14 (credential redaction).

* :mod:`~reliability.security.probes`: one publish or one worker process in
  isolation, with its logs captured and passwords kept out of the result;
* :mod:`~reliability.security.tls`: S13, TLS brokers of the scenario's own and
  the matrix of verified, refused and opted-out connections;
* :mod:`~reliability.security.redaction`: S14, counting broker passwords in
  everything a user could see.
"""

from __future__ import annotations

__all__: list[str] = []

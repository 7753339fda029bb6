"""Delays held by Redis (``redis://``): ``python -m benchmarks.delays --broker redis``.

Kept for its old command line; every option of :mod:`benchmarks.delays` applies.

    python -m benchmarks.redis_delays --short 200 --held 20000
"""

from __future__ import annotations

import sys

from benchmarks.delays import main

if __name__ == "__main__":
    main(["--broker", "redis", *sys.argv[1:]])

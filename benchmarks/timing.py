"""The one timing helper the benchmark scripts share (run them as ``python benchmarks/<script>.py``)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def median_seconds(call: Callable[[], object], repeats: int, synchronize: Callable[[], None] = lambda: None) -> float:
    """Median wall time of ``repeats`` calls; ``synchronize`` runs before and after each (``torch.cuda.synchronize``
    on a GPU, so that queued kernels are counted)."""
    times = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        call()
        synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)

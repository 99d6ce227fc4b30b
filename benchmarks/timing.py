"""Side-by-side timing for the benchmarks: medians of round-robin repeats, so machine noise hits every variant."""

from __future__ import annotations

import statistics
import time
from typing import Callable


def interleaved(fns: dict[str, Callable[[], object]], repeats: int,
                clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Median time of each function over `repeats` rounds (one warm-up call each first). `clock`: time.perf_counter
    (wall) or time.process_time (CPU time of this process, steadier on a shared machine). CUDA work is synchronised
    before each reading."""
    import torch

    def sync() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for k, fn in fns.items():
            sync()
            t0 = clock()
            fn()
            sync()
            times[k].append(clock() - t0)
    return {k: statistics.median(v) for k, v in times.items()}

"""Threads of a stub: fixed pools, and cancellation asked at a bounded rate.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor


def worker_pool(workers: int, name: str) -> ThreadPoolExecutor:
    """A thread pool whose `workers` threads all start now. A pool otherwise adds threads as load
    rises, so a stub's thread count would depend on the traffic it has seen; fixed from the start,
    a thread that leaks stands out."""
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)
    started = threading.Barrier(workers)  # each task holds its thread until all have one
    for task in [pool.submit(started.wait) for _ in range(workers)]:
        task.result()
    return pool

class CancelPoll:
    """`is_cancelled()` asked at most once per `period` seconds; the answer is kept in between.

    Each call of a response sender's `is_cancelled` is a round trip between the stub and the
    server (~0.1 ms here); asked for every token, that was 5% of a batch-8 decode step. Like the
    tensorrtllm backend's `cancellation_check_period_ms`, a cancellation is seen within one
    period; the first check comes one period after the request arrived.
    """

    def __init__(self, is_cancelled, period: float, clock=time.monotonic):
        self.is_cancelled, self.period, self.clock = is_cancelled, period, clock
        self.last = clock()
        self.cancelled = False

    def __call__(self) -> bool:
        if not self.cancelled:
            now = self.clock()
            if now - self.last >= self.period:
                self.last = now
                self.cancelled = bool(self.is_cancelled())
        return self.cancelled

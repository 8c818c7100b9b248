"""Figures drawn in a worker process while the report's next probes run.

Matplotlib's layout and PNG encoding are about a third of the report's time on a small model, and
the probes keep one core busy: one worker process (started with the first job; its imports
overlap the next probes) renders each result's figures as soon as the result exists. The worker is spawned,
not forked (torch's thread pools do not survive a fork), ignores Ctrl-C (the main process stops
it and cleans up), and reports how long each job took, so the report can say what ran
overlapped. `FigurePool(enabled=False)` renders in the calling process instead, same interface.
"""
from __future__ import annotations

import multiprocessing
import signal
import time
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any, Callable, Dict, List, Tuple


def _init_worker() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C reaches the whole process group: the main process handles it
    import matplotlib

    matplotlib.use("Agg")
    import torch

    torch.set_num_threads(1)


def _timed(fn: Callable, args: Tuple) -> Tuple[Any, float]:
    t0 = time.perf_counter()
    return fn(*args), time.perf_counter() - t0


class FigurePool:
    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self._pool = None                      # started with the first job: a run with no figures spawns nothing
        self.seconds: Dict[str, float] = {}    # phase -> seconds the worker spent on it
        self._pending: List[Tuple[str, Future]] = []

    def submit(self, phase: str, fn: Callable, *args) -> Future:
        """fn(*args) in the worker (fn and args picklable); its Future holds fn's value."""
        if self.enabled and self._pool is None:
            self._pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_init_worker)
        if self._pool is None:
            future: Future = Future()
            try:
                future.set_result(_timed(fn, args))
            except Exception as e:  # noqa: BLE001 - raised again by result(), as the worker's would be
                future.set_exception(e)
        else:
            future = self._pool.submit(_timed, fn, args)
        self._pending.append((phase, future))
        return future

    @staticmethod
    def value(future: Future) -> Any:
        return future.result()[0]

    def wait(self) -> None:
        """Wait for every job; record their times; raise the first job's error."""
        for phase, future in self._pending:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + future.result()[1]
        self._pending.clear()

    def close(self) -> None:
        """Stop the worker: queued jobs are cancelled, a running one finishes (call before removing
        the folder it writes into). The pool takes no more jobs."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self.enabled = False

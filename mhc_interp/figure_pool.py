"""Figures drawn in a worker process while the report's next probes run.

Matplotlib's layout and PNG encoding are about a third of the report's time on a small model, and
the probes keep one core busy: one worker process renders each result's figures as soon as the
result exists. It is started by the first job or by `start()` (the report calls it before its
probes, so the worker's imports overlap them), spawned, not forked (torch's thread pools do not
survive a fork), ignores Ctrl-C (the main process stops it and cleans up), and reports how long
each job took, so the report can say what ran overlapped. At `wait()` the jobs the worker has not
started are drawn in the calling process meanwhile: two renderers for the tail.
`FigurePool(enabled=False)` renders in the calling process instead, same interface.
"""

from __future__ import annotations

import atexit
import importlib
import multiprocessing
import os
import signal
import time
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any, Callable, Dict, List, Sequence, Tuple


def _init_worker(preload: Sequence[str]) -> None:
    signal.signal(
        signal.SIGINT, signal.SIG_IGN
    )  # Ctrl-C reaches the whole process group: the main process handles it
    # once the worker loop has returned, exit without the interpreter's teardown of torch and
    # matplotlib (~0.6 s that close() would wait for): results went through a synchronous pipe and
    # every figure file is closed
    atexit.register(os._exit, 0)
    import matplotlib

    matplotlib.use("Agg")
    import torch

    torch.set_num_threads(1)
    for module in ("matplotlib.pyplot", *preload):  # imported while idle, not by the first job
        importlib.import_module(module)


def _timed(fn: Callable, args: Tuple) -> Tuple[Any, float]:
    t0 = time.perf_counter()
    return fn(*args), time.perf_counter() - t0


def _run_into(future: Future, fn: Callable, args: Tuple) -> None:
    """fn(*args) here, timed, its value (or error, raised again by result()) into `future`."""
    try:
        future.set_result(_timed(fn, args))
    except Exception as e:  # noqa: BLE001 - raised again by result(), as the worker's would be
        future.set_exception(e)


class FigurePool:
    def __init__(self, enabled: bool = True, preload: Sequence[str] = ()):
        self.enabled = enabled
        self.preload = tuple(preload)  # modules the worker imports when it starts
        self._pool = None  # started by start() or the first job: a run with no figures spawns nothing
        self.seconds: Dict[
            str, float
        ] = {}  # phase -> seconds spent on it (worker or, at the tail, this process)
        self._jobs: List[Tuple[str, Future, Callable, Tuple]] = []
        self._drawn_here: Dict[
            Future, Future
        ] = {}  # a job wait() took back from the worker -> its result here

    def start(self) -> None:
        """Spawn the worker now (if enabled and not running), so its imports overlap what follows."""
        if self.enabled and self._pool is None:
            self._pool = ProcessPoolExecutor(
                max_workers=1,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_worker,
                initargs=(self.preload,),
            )

    def submit(self, phase: str, fn: Callable, *args) -> Future:
        """fn(*args) in the worker (fn and args picklable); `value(future)` is fn's value."""
        self.start()
        if self._pool is None:
            future: Future = Future()
            _run_into(future, fn, args)
        else:
            future = self._pool.submit(_timed, fn, args)
        self._jobs.append((phase, future, fn, args))
        return future

    def value(self, future: Future) -> Any:
        return self._drawn_here.get(future, future).result()[0]

    def wait(self) -> None:
        """Wait for every job, drawing here the queued ones the worker has not started (latest
        first); record their times; raise the first job's error."""
        for _, future, fn, args in reversed(self._jobs):
            if future.cancel():  # not started (a finished or running job, or one drawn here, refuses)
                self._drawn_here[future] = Future()
                _run_into(self._drawn_here[future], fn, args)
        for phase, future, _, _ in self._jobs:
            here = future in self._drawn_here
            phase += " (drawn in the main process)" if here else ""
            self.seconds[phase] = (
                self.seconds.get(phase, 0.0) + self._drawn_here.get(future, future).result()[1]
            )
        self._jobs.clear()

    def close(self) -> None:
        """Stop the worker: queued jobs are cancelled, a running one finishes (call before removing
        the folder it writes into). The pool takes no more jobs."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self.enabled = False

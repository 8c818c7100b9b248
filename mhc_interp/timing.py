"""Wall time per named phase, accumulated: where a report (or any run) spends its time.

    timer = PhaseTimer()
    with timer("cka: update"):
        ...
    timer.rows()   # [(phase, seconds, share of the total)], slowest first

Host wall time: on a GPU a phase that only queues kernels is charged to the next phase that waits
for them (pass `sync=torch.cuda.synchronize` to charge each phase its own kernels, at the price
of a sync per phase).
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable, Dict, Iterator, List, Optional, Tuple


class PhaseTimer:
    def __init__(self, sync: Optional[Callable[[], None]] = None):
        self.seconds: Dict[str, float] = {}
        self.sync = sync
        self._started = time.perf_counter()

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        if self.sync:
            self.sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.sync:
                self.sync()
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - t0

    def total(self) -> float:
        """Wall time since the timer was made (phases may not cover all of it)."""
        return time.perf_counter() - self._started

    def rows(self) -> List[Tuple[str, float, float]]:
        """(phase, seconds, fraction of the total wall time), slowest first, plus an "other" row for
        the time no phase covered."""
        total = self.total()
        rows = sorted(self.seconds.items(), key=lambda kv: -kv[1])
        rows.append(("other (not in a named phase)", max(0.0, total - sum(self.seconds.values()))))
        return [(name, s, s / total if total > 0 else 0.0) for name, s in rows]


def maybe(timer: Optional[PhaseTimer], phase: str):
    """`timer(phase)`, or nothing when no timer is given."""
    return timer(phase) if timer is not None else contextlib.nullcontext()

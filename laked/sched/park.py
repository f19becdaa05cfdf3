"""Parked BE atoms: wait on the GPU for the next LC request, not on the host.

When the next BE op will not fit before a predicted LC arrival, BE used to
hold on the host until the arrival passed.  A training job's issuer is
only about 1.3x faster than the GPU at 400 us atoms, and beside gemm LC it
held about 1 ms of every 4.8 ms step, time it could not issue in.

So the atom is parked instead: its stream waits (cuStreamWaitValue32, GEQ)
until the LC tenant's request counter reaches the awaited request, which
the LC stream writes after the request's work (``mark``).  The issuer
goes on queueing atoms behind it, up to the pacer's depth, and the GPU
starts them the moment LC ends.  The counters live in pinned host memory
like the gates (gate.py), so the host can always let a wait go: a thread
stores the awaited value once the arrival is ``hold_us`` overdue (the
prediction was wrong), so a request that never comes costs BE that long,
never a hang.  Counters compare as wrapping 32-bit numbers, as the GPU's
GEQ does.  (Measured on an H200: the issuer then has time to spare, but BE's
throughput beside LC moved within the noise, 0.75 vs 0.76 of solo: what
BE loses is GPU time before each LC request, which parking does not fill.)
"""
from __future__ import annotations

import heapq
import logging
import threading
import time
from typing import Any

from .gate import SLOTS, pinned_words
from .partition import _driver

log = logging.getLogger("laked.sched.park")

MASK = 0xFFFFFFFF


def past(n: int) -> int:
    """A counter value every wait for requests up to ``n`` (and well beyond) passes."""
    return (n + 0x40000000) & MASK


def behind(have: int, want: int) -> bool:
    """``have`` < ``want`` as wrapping 32-bit counters (the GPU's GEQ test)."""
    return ((have - want) & MASK) >= 0x80000000


class Deadlines:
    """Parked waits by the host time they are let go (pure, host-tested)."""

    def __init__(self) -> None:
        self._h: list[tuple[float, int, int]] = []

    def push(self, at: float, slot: int, want: int) -> None:
        heapq.heappush(self._h, (at, slot, want))

    def next_in(self, now: float) -> float | None:
        """Seconds to the earliest deadline (<= 0: due), None: nothing parked."""
        return self._h[0][0] - now if self._h else None

    def pop_due(self, now: float) -> list[tuple[int, int]]:
        out = []
        while self._h and self._h[0][0] <= now:
            _, slot, want = heapq.heappop(self._h)
            out.append((slot, want))
        return out

    def drop(self, slot: int) -> None:
        self._h = [d for d in self._h if d[1] != slot]
        heapq.heapify(self._h)

    def __len__(self) -> int:
        return len(self._h)


class Parks:
    """Per-LC-tenant request counters and the BE waits parked on them."""

    def __init__(self) -> None:
        cu = self.cu = _driver()
        self._host, self.base, self.counts = pinned_words(cu, SLOTS, "parks")
        self._geq = int(cu.CUstreamWaitValue_flags.CU_STREAM_WAIT_VALUE_GEQ)
        self._free = list(range(SLOTS - 1, -1, -1))
        self._cv = threading.Condition()
        self._due = Deadlines()
        self._stop = False
        self.parked = 0           # atoms parked
        self.released = 0         # ... let go by the host (request not done by the deadline)
        self._th = threading.Thread(target=self._run, name="laked-park", daemon=True)
        self._th.start()

    def slot(self) -> tuple[int, int]:
        """A counter for a new LC tenant: (slot, the value its requests count on from)."""
        with self._cv:
            if not self._free:
                raise RuntimeError(f"all {SLOTS} park counters are taken")
            s = self._free.pop()
        return s, int(self.counts[s])

    def release(self, slot: int, last: int) -> None:
        """The tenant leaves: every atom parked on it goes now."""
        with self._cv:
            self._due.drop(slot)
            self.counts[slot] = past(last)
            self._free.append(slot)

    def mark(self, stream: int, slot: int, n: int) -> None:
        """Queue "request ``n`` done" on the LC stream, after its work."""
        err, = self.cu.cuStreamWriteValue32(stream, self.base + 4 * slot, n, 0)
        if int(err):        # parked atoms wait until their deadline instead
            log.warning("cuStreamWriteValue32 (park mark) failed with CUresult %d", int(err))

    def pending(self, slot: int, want: int) -> bool:
        return behind(int(self.counts[slot]), want)

    def park(self, stream: int, slot: int, want: int, deadline: float) -> bool:
        """Queue on ``stream`` a wait until request ``want`` is done, let go by
        the host at ``deadline`` (perf_counter) at the latest.  False: not
        queued (the caller holds on the host instead)."""
        err, = self.cu.cuStreamWaitValue32(stream, self.base + 4 * slot, want, self._geq)
        if int(err):
            log.warning("cuStreamWaitValue32 (park) failed with CUresult %d", int(err))
            return False
        with self._cv:
            self._due.push(deadline, slot, want)
            self.parked += 1
            self._cv.notify()
        return True

    def _run(self) -> None:
        """Let overdue waits go by host store (no driver call: no stall holds it)."""
        with self._cv:
            while not self._stop:
                wait = self._due.next_in(time.perf_counter())
                if wait is None or wait > 0:
                    self._cv.wait(wait)
                    continue
                for slot, want in self._due.pop_due(time.perf_counter()):
                    if self.pending(slot, want):
                        self.counts[slot] = want
                        self.released += 1

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._th.join(2)
        for s in range(SLOTS):          # nothing may stay parked on freed memory
            self.counts[s] = past(int(self.counts[s]))
        self.cu.cuMemFreeHost(self._host)

    def stats(self) -> dict[str, Any]:
        return {"parked": self.parked, "released_by_host": self.released}

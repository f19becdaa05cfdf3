"""LC requests' host paths go before BE jobs' Python: the GIL, scheduled.

laked runs hosted BE jobs on its own threads, so an LC request's Python
(its arrival, its launch, its return once the GPU is done) competes with
theirs for the GIL.  A job that issues many small ops wants the GIL nearly
all the time: a training step sends every op through the atomizer's
dispatch mode, on its own thread (and on autograd's, without
``inline_backward``).  The LC thread then waits a switch interval or more
at each GIL handover, and every driver call it makes is one.  On an H200,
the slowest 1 % of gemm LC requests beside training spent 0.53 ms between
arrival and issue; the middle half spent 0.05 ms.

So while an LC request is in its host path, BE threads wait at their next
op (``pause``) instead of running Python.  The host path is two spans: the
request's arrival until its work is queued, and a little before its GPU
work is predicted to end until the request returns.  In between, while the
GPU runs LC, BE's threads issue as before.  An LC tenant's INFER batch
(tenancy.py) is host path from start to end: its GPU work is tens of
microseconds among copies and driver calls.  A BE thread waits at most
``CAP_S`` each time (a wrong prediction, a stuck request), and it waits at
the top of an op, holding none of the arbiter's locks.  Pure Python, so
host-tested.
"""
from __future__ import annotations

import threading
import time
from typing import Any

INF = float("inf")
CAP_S = 0.002        # a BE thread waits at most this long per op
EMA = 0.2            # weight of the newest GPU wait in its average
WAIT_X = 0.9         # BE yields from this share of the average wait, less the lead


class Wakeable(threading.Condition):
    """A condition that counts its sleepers, so a wake with none costs nothing:
    Python's notify_all cost LC's thread ~1 us a call even with no waiter.
    The count changes under the condition's lock, as waits do."""

    def __init__(self, lock: Any = None) -> None:
        super().__init__(lock)
        self.sleepers = 0

    def wait(self, timeout: float | None = None) -> bool:
        self.sleepers += 1
        try:
            return super().wait(timeout)
        finally:
            self.sleepers -= 1

    def wake_all(self) -> None:
        """notify_all, if anyone sleeps (the lock held, as for notify_all)."""
        if self.sleepers:
            self.notify_all()


class HostFirst:
    """Holds BE threads' Python while LC requests run their host paths."""

    def __init__(self) -> None:
        self._lock = threading.Lock()     # taken bare where the condition's methods cost
        self._cond = Wakeable(self._lock)
        self._at: dict[int, float] = {}   # LC request (its key) -> host time BE yields from
        self.after = INF                  # BE yields from this host time (perf_counter) on
        self.users = 0                    # BE threads that may pause: none, nothing to hold
        self.waits = 0                    # BE threads' waits ...
        self.wait_s = 0.0                 # ... and their time

    # hold and release sit on every LC request, run on caches the BE job's
    # Python has just swept: the fewest frames they can (a hold through the
    # condition's methods and a scan of every hold took 8 us cold on the
    # dev host, 5 us this way)
    def hold(self, key: int, lead_s: float, at: float = 0.0) -> None:
        """BE yields to request ``key`` from host time ``at`` on (0: now).
        ``lead_s`` 0: the knob is off, nothing is held; nor with no ``users``
        (a BE job that starts meanwhile is held from the next request on)."""
        if not lead_s or not self.users:
            return
        with self._lock:
            self._at[key] = at
            if at <= self.after:
                self.after = at         # earlier than every hold: no waiter has to move
                return
            was = self.after
            self.after = min(self._at.values())
            if self.after > was:
                # only a hold that moved later lets BE go: another request's
                # earlier hold keeps its waiters asleep (a wake takes the GIL)
                self._cond.wake_all()

    def hold_near_end(self, key: int, lead_s: float, queued: float, avg_wait_s: float) -> None:
        """BE yields to request ``key`` from ``lead_s`` before its GPU work,
        queued at host time ``queued``, is predicted to end."""
        self.hold(key, lead_s, queued + max(0.0, WAIT_X * avg_wait_s - lead_s))

    def release(self, key: int) -> None:
        """Request ``key``'s host path is over: BE goes on."""
        with self._lock:
            at = self._at
            if at.pop(key, None) is not None:
                self.after = min(at.values()) if at else INF
                self._cond.wake_all()

    def pause(self) -> None:
        """A BE thread between ops: wait while an LC request's host path runs."""
        t0 = time.perf_counter()
        if t0 < self.after:
            return
        end = t0 + CAP_S
        with self._cond:
            while True:
                now = time.perf_counter()
                if now >= end or now < self.after:
                    break
                self._cond.wait(end - now)     # woken when a hold ends or moves later
            self.waits += 1
            self.wait_s += time.perf_counter() - t0

    @property
    def _sleepers(self) -> int:
        """BE threads waiting now (a hold or release with none wakes no one)."""
        return self._cond.sleepers

    def stats(self) -> dict[str, float]:
        return {"host_first_waits": self.waits, "host_first_wait_s": round(self.wait_s, 6)}


def next_wait(avg: float, seen: float) -> float:
    """The average GPU wait of an LC tenant's requests, with ``seen`` added."""
    return seen if not avg else (1 - EMA) * avg + EMA * seen

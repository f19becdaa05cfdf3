"""The arbiter: LC tenants keep their tail, BE tenants take what is idle.

LC work runs at the highest stream priority on the whole GPU.  BE work is
issued by the scheduler, one atom at a time, with at most ``depth`` atoms
queued on the GPU, so an arriving LC request waits behind at most about
one atom.  The atom size and the BE partition adapt:

- *idle* (no LC request running, and the next one, predicted from the
  mean inter-arrival time, is more than ``lead_s`` away): BE atoms run on
  the whole GPU and are as large as fits before that prediction (at most
  ``idle_rows``; few, large launches cost little chunking), two queued;
- *contended* (an LC request running, or expected within ``lead_s``): BE
  atoms are ``busy_rows`` rows on the partition that leaves LC its quota,
  one queued.
A prediction two inter-arrival times overdue is dropped (LC went quiet).

Per-tenant latency and throughput are kept for ``laked status``/``top``.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from .atoms import RowOp
from .partition import Partition, Partitions

log = logging.getLogger("laked.sched")

YIELD_S = 20e-6      # how long the BE issuer sleeps while it waits


@dataclass
class Tenant:
    name: str
    cls: str                         # "LC" or "BE"
    quota_sms: int
    priority: int = 0
    latencies: collections.deque[float] = field(
        default_factory=lambda: collections.deque(maxlen=10000))
    atoms: int = 0
    rows: int = 0

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.latencies)
        pick = (lambda q: lat[min(len(lat) - 1, int(len(lat) * q))] * 1e3) if lat else None
        return {"class": self.cls, "quota_sms": self.quota_sms, "requests": len(lat),
                "p50_ms": pick(0.5) if lat else None, "p99_ms": pick(0.99) if lat else None,
                "atoms": self.atoms, "rows": self.rows}


@dataclass
class Knobs:
    """Defaults: the best measured point (docs/benchmarks.md, sched sweep)."""
    busy_rows: int = 0               # atom rows while LC runs (0: BE pauses)
    idle_rows: int = 8192            # atom rows at most while the GPU is BE's alone
    depth: int = 1                   # BE atoms queued while contended
    idle_depth: int = 2              # ... and while idle
    lead_s: float = 0.0012           # contended this long before a predicted LC
    soon_rows: int = 384             # >0: in the lead window, atoms this small on the
                                     # whole GPU instead of the busy rule


class Scheduler:
    def __init__(self, parts: Partitions, lc_quota_sms: int, knobs: Knobs | None = None) -> None:
        import torch
        self.torch = torch
        self.parts = parts
        self.knobs = knobs or Knobs()
        lc_units = min(parts.units_for(lc_quota_sms), parts.n_units - 1)
        self.full: Partition = parts.full()
        self.be_busy: Partition = parts.get(lc_units, parts.n_units, True)
        _, lo, hi = parts.cu.cuCtxGetStreamPriorityRange()
        self.lc_stream = self.full.torch_stream(int(hi))        # greatest priority
        self.be_full_stream = self.full.torch_stream(int(lo))
        self.be_busy_stream = self.be_busy.torch_stream(int(lo))
        self.tenants: dict[str, Tenant] = {}
        self._lc_active = 0
        self._lc_last_start = 0.0
        self._lc_gap = 0.0               # EWMA of LC inter-arrival, seconds
        self._lock = threading.Lock()
        self._inflight: collections.deque[Any] = collections.deque()
        self._row_s = 0.0                # BE seconds per row on the whole GPU
        log.info("scheduler: LC quota %d SMs; BE busy partition %s (%d SMs)",
                 lc_quota_sms, self.be_busy.name, self.be_busy.sms)

    def tenant(self, name: str, cls: str, quota_sms: int, priority: int = 0) -> Tenant:
        t = self.tenants.get(name)
        if t is None:
            t = self.tenants[name] = Tenant(name, cls, quota_sms, priority)
        return t

    # -- LC side ---------------------------------------------------------------------
    def lc_begin(self) -> None:
        now = time.perf_counter()
        with self._lock:
            if self._lc_last_start:
                gap = now - self._lc_last_start
                self._lc_gap = gap if not self._lc_gap else 0.8 * self._lc_gap + 0.2 * gap
            self._lc_last_start = now
            self._lc_active += 1

    def lc_end(self) -> None:
        with self._lock:
            self._lc_active -= 1

    def run_lc(self, tenant: Tenant, work: Callable[[], None]) -> float:
        """Run one LC request on the LC stream and wait for it; returns seconds."""
        t0 = time.perf_counter()
        self.lc_begin()
        try:
            with self.torch.cuda.stream(self.lc_stream):
                work()
            self.lc_stream.synchronize()
        finally:
            self.lc_end()
        dt = time.perf_counter() - t0
        tenant.latencies.append(dt)
        return dt

    def state(self) -> tuple[str, float]:
        """("lc" | "soon" | "idle", seconds until LC work is expected; inf if not).

        "soon" is within ``lead_s`` of the predicted arrival; a prediction two
        inter-arrival times overdue is dropped (LC went quiet).
        """
        with self._lock:
            if self._lc_active:
                return "lc", 0.0
            gap, last = self._lc_gap, self._lc_last_start
        if not gap:
            return "idle", float("inf")
        until = last + gap - time.perf_counter()
        if until < -2 * gap:
            return "idle", float("inf")
        return ("soon" if until < self.knobs.lead_s else "idle"), until

    def _idle_rows(self, room: float) -> int:
        k = self.knobs
        if room == float("inf") or not self._row_s:
            return k.idle_rows
        fit = int((room - k.lead_s) / self._row_s)
        return max(k.busy_rows, min(k.idle_rows, fit))

    # -- BE side -----------------------------------------------------------------------
    def _wait_depth(self, depth: int) -> None:
        while len(self._inflight) >= depth:
            start, end, rows, full = self._inflight[0]
            if not end.query():
                # an atom is 100s of us; a real sleep hands the GIL to LC's
                # launching thread (sleep(0) re-takes it before they can)
                time.sleep(YIELD_S)
                continue
            self._inflight.popleft()
            if full:    # learn the whole GPU's time per row
                row_s = start.elapsed_time(end) / 1e3 / rows
                self._row_s = row_s if not self._row_s else 0.8 * self._row_s + 0.2 * row_s

    def run_be(self, tenant: Tenant, ops: Iterator[RowOp], stop: threading.Event) -> None:
        """Issue BE ops atom by atom until ``ops`` ends or ``stop`` is set."""
        for op in ops:
            while not op.finished:
                if stop.is_set():
                    return
                st, room = self.state()
                busy = st != "idle"
                self._wait_depth(self.knobs.depth if busy else self.knobs.idle_depth)
                st, room = self.state()
                busy = st != "idle"
                soon = st == "soon" and self.knobs.soon_rows > 0
                if busy and not soon and not self.knobs.busy_rows:
                    time.sleep(YIELD_S)     # paused: LC has the whole GPU
                    continue
                if soon:                # tiny atoms: an arriving LC waits little
                    stream, rows = self.be_full_stream, self.knobs.soon_rows
                elif busy:
                    stream, rows = self.be_busy_stream, self.knobs.busy_rows
                else:
                    stream, rows = self.be_full_stream, self._idle_rows(room)
                start = self.torch.cuda.Event(enable_timing=True)
                end = self.torch.cuda.Event(enable_timing=True)
                with self.torch.cuda.stream(stream):
                    start.record(stream)
                    i0, i1 = op.next_atom(rows)
                    end.record(stream)
                self._inflight.append((start, end, i1 - i0, stream is self.be_full_stream))
                tenant.atoms += 1
                tenant.rows += i1 - i0
        self.drain()

    def drain(self) -> None:
        while self._inflight:
            self._inflight.popleft()[1].synchronize()

    def status(self) -> dict[str, Any]:
        return {"total_sms": self.parts.total_sms, "be_busy_sms": self.be_busy.sms,
                "knobs": vars(self.knobs),
                "tenants": {n: t.summary() for n, t in self.tenants.items()}}

"""A best-effort tenant's pacer: its GPU work as atoms, gated and sized.

Everything a BE tenant launches through laked goes through its pacer:
split ops piece by piece (``run_split``), other ops grouped into atoms of
about the arbiter's budget (``run_op``).  At every atom boundary the pacer
closes the previous atom with an event, asks the arbiter for the next
atom's budget and stream (waiting while ``depth`` atoms are already in
flight, or holding while an LC request is about to arrive), and queues the
gate waits that keep the atom from starting while LC work runs.

Seconds per row of each split op are learned from timed atoms that ran
with no LC request beside them, on the whole GPU; so is the GPU time of
ops run whole over their FLOP or byte estimate (``learn_whole``), per op
and shape, since BE plans the room before LC's next request with it.  A
small op past the budget joins the atom before it (``join_small``): a
boundary costs the issuer more than the op's GPU time.  A pointwise op
that would run whole but does not fit the room before LC's next predicted
request is cut so its first piece fills that room (``fill_pointwise``).
The host time its atoms take to issue, per GPU second (``issue_x``), tells
the planner whether the issuer may sleep behind a parked atom (``park_one``)
and how long its atoms are beside LC (``light_atom_us``).
"""
from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch

from .blas import set_sm_target, sm_target_set
from .fast import Events, raw_stream
from .opmode import WHOLE_X, Split

if TYPE_CHECKING:
    from .arbiter import GpuArbiter, GpuTenant

SMALL_S = 20e-6      # ops estimated below this run without an atom boundary
RATE_X = 4.0         # learned seconds per row stay within this factor of the guess
MAX_SCALES = 1024    # learned op keys kept (a job with ever-new shapes starts over)
JOIN_X = 0.25        # an op this share of a budget may join an atom past it (to WHOLE_X)
FILL_S = 100e-6      # fill_pointwise: a shorter room is not worth a cut
FILL_X = 0.8         # ... nor one the op nearly fits (the cut would leave a sliver)
ISSUE_MAX = 4.0      # an atom's issue share counts up to this (a job paused is not issuing)
ISSUE_DECAY = 0.9    # issue_x's memory: about the last ten atoms
# -1 outside a backward; a torch without it: always "inside" (streams stay put)
_graph_task = getattr(torch._C, "_current_graph_task_id", lambda: 0)


@dataclass(slots=True)
class _Atom:
    end: Any                     # driver event after the atom
    est_s: float
    timing: tuple[Any, int, float] | None   # a split piece: (cost key, rows, guess or 0)
    lc_seq: int
    kind: str
    gap_s: float = 0.0           # be_duty's idle time queued after it
    start: Any = None            # event after its gate waits (trace, learning)
    host: float = 0.0            # host time it was queued (trace)
    whole: tuple[Any, float] | None = None    # (cost key, raw estimate): ops run whole


class Pacer:
    def __init__(self, arb: "GpuArbiter", t: "GpuTenant",
                 stream_for: Callable[[str], Any]) -> None:
        self.arb = arb
        self.t = t
        self.stream_for = stream_for             # "full"/"comp" -> torch stream
        self.owner = threading.get_ident()
        self.lock = threading.RLock()
        self.inflight: collections.deque[_Atom] = collections.deque()
        self.rates: dict[tuple[Any, ...], float] = {}
        # measured / estimated time of atoms of ops run whole, by the op
        # that opened the atom (FLOP and byte guesses miss by a steady factor)
        self.scales: dict[tuple[Any, ...], float] = {}
        self.kind = "full"
        self.dev = arb.dev
        # blocking-sync events: an issuer waiting for room sleeps in the
        # driver, without the GIL, rather than spinning or polling for it
        self.ev = Events(timing=False, blocking=True)
        self.tev = Events(timing=True, blocking=True)
        self._open = False
        self._est = 0.0
        self._budget = 0.0
        self._room = 0.0
        self._timing: tuple[Any, int, float] | None = None
        self._seq = 0
        self._recent = False                     # the open atom runs beside active LC
        self.gap_s = 0.0                         # GPU time BE left idle (be_duty)
        self.compute_s = 0.0                     # estimated time in FLOP-bound ops
        self.memory_s = 0.0                      # ... and in byte-bound ops
        self.wait_depth_s = 0.0                  # issuer time spent waiting for room
        self.hold_s = 0.0                        # ... holding for a predicted LC
        self.lc_wait_s = 0.0                     # ... waiting while LC runs
        self.boundary_s = 0.0                    # ... at atom boundaries, waits included
        # host and GPU seconds of its recent atoms (issue_x)
        self._issue_host = 0.0
        self._issue_gpu = 0.0
        self._opened = 0.0
        self.parked: tuple[int, int] | None = None   # (counter, request) an atom waits for
        # diagnostics (GpuArbiter.trace_start): each atom's GPU span, from
        # events timed against ``trace_ref``: (start, end, host time queued,
        # estimated seconds)
        self.trace: list[tuple[float, float, float, float]] | None = None
        self.trace_ref: Any = None
        self._start: Any = None
        self._host = 0.0
        self._whole: tuple[Any, ...] | None = None   # the open atom's cost key ...
        self._raw = 0.0                                # ... and its ops' raw estimates
        self._scale = 1.0

    # -- what the atomizers call ----------------------------------------------------
    def budget_hint(self) -> float:
        """The atom budget the next boundary will most likely give."""
        return self.arb.budget_hint(self.issue_x)

    def run_op(self, func: Callable[..., Any], args: Any, kwargs: dict[str, Any],
               est_s: float) -> Any:
        """``func(*args, **kwargs)`` in the open atom, or in a new one when it
        would overrun the budget (called per op: no closure is built for it)."""
        if est_s < SMALL_S:
            # a few microseconds of GPU work: not worth a gate wait and an
            # event (the Python cost would exceed it); it joins whatever atom
            # is queued on this stream
            self._est += est_s
            self.memory_s += est_s
            return func(*args, **kwargs)
        with self.lock:
            # an op joining the open atom takes its opener's learned scale:
            # the atom is timed and learned as one
            est = est_s * self._scale
            if not self._open or (self._est + est > self._budget and not self._joins(est)):
                est = self._open_whole(func, args, est_s)
            out = func(*args, **kwargs)
            self._est += est
            self._raw += est_s
            self.memory_s += est
            return out

    def _joins(self, est: float) -> bool:
        """A small op past the budget joins the open atom (a boundary costs the
        issuer more than the op's GPU time), within the room before LC."""
        return (self.arb.knobs.join_small and est <= JOIN_X * self._budget
                and self._est + est <= min(WHOLE_X * self._budget, self._room))

    def _scale_of(self, func: Any, args: Any) -> tuple[tuple[Any, ...] | None, float]:
        """An op run whole's learned-scale key and scale (None, 1: not learning)."""
        if not self.arb.knobs.learn_whole:
            return None, 1.0
        key = (id(func), args[0].shape if args and isinstance(args[0], torch.Tensor) else None)
        return key, self.scales.get(key, 1.0)

    def _open_whole(self, func: Any, args: Any, est_s: float) -> float:
        """Open an atom for an op run whole; its estimate, as learned so far."""
        key, scale = self._scale_of(func, args)
        self._boundary(est_s * scale, timed=key is not None)
        self._whole, self._raw, self._scale = key, 0.0, scale
        return est_s * scale

    def fill_s(self, func: Any, args: Any, est_s: float) -> float:
        """``fill_pointwise``: the op's seconds (as learned) when it would run
        whole but does not fit the room before LC's next predicted request
        while a cut of FILL_S or more does; 0 otherwise.  A pointwise op's
        time goes with its bytes, so a piece sized to the room ends in it;
        parked whole, the op left the GPU idle for that room (about half an
        op a request beside a memory-bound job)."""
        if est_s < FILL_S or not self.arb.knobs.fill_pointwise:
            return 0.0          # cheap first: every pointwise op comes here
        with self.lock:
            need = est_s * self._scale_of(func, args)[1]
            room = self.arb.room_hint(self)
            return need if FILL_S <= room <= FILL_X * need else 0.0

    def run_split(self, plan: Split, whole_s: float = 0.0) -> None:
        """``plan`` piece by piece; ``whole_s``: the op's seconds as learned
        run whole (fill_s), which sizes its pieces instead of a piece rate."""
        with self.lock:
            # rows cost more on fewer SMs (be_sms): rates are learned per kind
            per_row = whole_s / plan.rows if whole_s else (
                self.rates.get((self.kind, plan.key)) or
                self.rates.get(("full", plan.key), plan.est_row_s))
            i = 0
            while i < plan.rows:
                self._boundary(timed=True)
                left = plan.rows - i
                if self._budget == float("inf"):
                    n = left
                else:
                    n = max(1, min(left, int(self._budget / per_row)))
                    if left - n < n // 4:        # no sliver of an atom at the end
                        n = left
                plan.piece(i, i + n)
                self._timing = ((self.kind, plan.key), n,
                                plan.est_row_s if plan.guessed else 0.0)
                self._est = n * per_row
                if plan.key[0] == "pw":
                    self.memory_s += self._est
                else:
                    self.compute_s += self._est
                i += n
            self._budget = 0.0       # the next op starts a fresh atom

    # -- atoms ------------------------------------------------------------------------
    def _boundary(self, need_s: float = 0.0, timed: bool = False) -> None:
        t0 = time.perf_counter()
        if self._open:
            self._close(t0)
        plan = self.arb.be_plan(self, need_s)
        slots = plan.slots
        if plan.kind != self.kind:
            # not inside a backward (inline_backward): autograd's engine sets
            # each node's stream back after it, so a move would not stay
            if threading.get_ident() == self.owner and _graph_task() < 0:
                new = self.stream_for(plan.kind)
                new.wait_stream(torch.cuda.current_stream())    # keep the job's order
                torch.cuda.set_stream(new)
                self.kind = plan.kind
            else:
                # autograd's thread, or a backward: its stream is not ours to
                # move, so the atom waits for every LC tenant wherever it runs
                slots = self.arb.lc_slots()
        stream = raw_stream(self.dev)
        if self.arb.knobs.be_sms or sm_target_set():
            # cuBLAS plans for every SM unless told: on be_sms's partition
            # its persistent GEMMs would run in two waves
            sms = 0
            if self.arb.knobs.be_sms:
                cap = self.arb.cap_partition()
                if stream == int(cap.stream(self.arb.prio_lo)):
                    sms = cap.sms
            set_sm_target(sms)
        if plan.park is not None:
            slot, want, deadline = plan.park
            if self.arb.parks.park(stream, slot, want, deadline):
                self.parked = (slot, want)
        self.arb.gates.wait(stream, slots)
        if timed or self.trace is not None:
            self._start = self.tev.record(stream)
            self._host = time.perf_counter() if self.trace is not None else 0.0
        self._open = True
        self._est = 0.0
        self._budget = plan.budget_s
        self._room = plan.room_s
        self._recent = plan.recent
        self._seq = self.arb.lc_seq
        self.t.atoms += 1
        self._opened = time.perf_counter()
        self.boundary_s += self._opened - t0

    def _close(self, now: float) -> None:
        """Queue the open atom's end; ``now``: the host time it closes (issue_x)."""
        if self._est > 0:
            host = min(now - self._opened, ISSUE_MAX * self._est)
            self._issue_host = ISSUE_DECAY * self._issue_host + host
            self._issue_gpu = ISSUE_DECAY * self._issue_gpu + self._est
        stream = raw_stream(self.dev)
        gap = 0.0
        duty = self.arb.gov.duty if self._recent else 1.0
        if duty < 1.0 and self._est > 0:
            # the GPU's power limit sets its clock: BE idle for a share of
            # the time leaves LC's requests a higher clock.  One thread
            # spins on BE's stream, so LC loses no SMs to the gap; the end
            # event comes after it, so the room BE plans with counts it.
            gap = self._est * (1.0 / duty - 1.0)
            # the spin kernel counts SM cycles: at the clock last read (a
            # duty under 1 comes from a reading, so there is one)
            torch.cuda._sleep(int(gap * self.arb.gov.mhz * 1e6))
            self.gap_s += gap
        start, self._start = self._start, None
        # the GPU reached an atom's start before all of it was queued: its
        # time counts the issuer's too, and rates learned from such atoms
        # diverge (smaller pieces, more issuer time per row)
        ahead = start is not None and not self.tev.done(start)
        timing = self._timing
        if timing is not None and not ahead:
            timing = (timing[0], 0, timing[2])
        whole = (self._whole, self._raw) if self._whole is not None and ahead else None
        end = (self.tev if start is not None else self.ev).record(stream)
        self.inflight.append(_Atom(end, self._est, timing, self._seq, self.kind, gap,
                                   start, self._host, whole))
        self._timing = None
        self._whole = None
        self._open = False

    @property
    def issue_x(self) -> float:
        """Host seconds per GPU second while its recent atoms were open: how
        fast the issuer refills the GPU after an LC request (``park_one``).
        Weighted by the atoms' size, since the slivers before LC cost as much
        to issue as whole atoms; heavy (1) until measured."""
        return self._issue_host / self._issue_gpu if self._issue_gpu else 1.0

    def queued_s(self) -> float:
        """Estimated GPU time of the atoms not yet finished (and their gaps)."""
        # a copy first: a trace's reap on another thread may retire atoms
        return (sum(a.est_s + a.gap_s for a in list(self.inflight)) +
                (self._est if self._open else 0.0))

    def reap(self) -> None:
        """Retire finished atoms; learn from the ones that ran undisturbed."""
        while self.inflight and self.ev.done(self.inflight[0].end):
            a = self.inflight.popleft()
            spent = a.est_s
            undisturbed = (a.lc_seq == self.arb.lc_seq and not self.arb.lc_active
                           and a.kind != "comp" and not a.gap_s)
            if a.start is not None:
                if a.timing is not None:
                    key, rows, guess = a.timing
                    spent = self.tev.elapsed_s(a.start, a.end) - a.gap_s
                    if undisturbed and rows and spent > 0:
                        self.rates[key] = self._learn(self.rates.get(key), spent / rows, guess)
                if a.whole is not None and undisturbed and a.whole[1] > 0:
                    spent = self.tev.elapsed_s(a.start, a.end)
                    key, raw = a.whole
                    if len(self.scales) >= MAX_SCALES and key not in self.scales:
                        self.scales.clear()
                    self.scales[key] = self._learn(self.scales.get(key), spent / raw, 1.0)
                if self.trace is not None and a.host:
                    self.trace.append((self.tev.elapsed_s(self.trace_ref, a.start),
                                       self.tev.elapsed_s(self.trace_ref, a.end), a.host,
                                       a.est_s))
                self.tev.put(a.start)
            (self.tev if a.start is not None else self.ev).put(a.end)
            self.t.busy_s += spent

    @staticmethod
    def _learn(old: float | None, r: float, guess: float) -> float:
        """A moving average of ``r``; within RATE_X of ``guess`` when there is
        one: one bad reading must not cut an op into slivers."""
        if guess:
            r = min(max(r, guess / RATE_X), guess * RATE_X)
        return r if old is None else 0.7 * old + 0.3 * r

    def wait_depth(self, depth: int, lc_wait: Callable[[], bool] | None = None) -> None:
        """Wait until fewer than ``depth`` atoms are in flight.  The wait is on
        the oldest atom's event: a polling issuer took the GIL from LC's
        threads at every wake, about every 70 us.  While ``lc_wait`` finds LC
        work running it waits instead (returning True): the oldest atom may sit
        at that request's gate, and a request stuck behind it is found there."""
        self.reap()
        if len(self.inflight) < depth:
            return
        t0 = time.perf_counter()
        while len(self.inflight) >= depth:
            if lc_wait is None or not lc_wait():
                self.ev.wait(self.inflight[0].end)
            self.reap()
        self.wait_depth_s += time.perf_counter() - t0

    def drain(self) -> None:
        with self.lock:
            if self._open:
                self._close(time.perf_counter())
            while self.inflight:
                self.ev.wait(self.inflight[0].end)
                self.reap()

    def close(self) -> None:
        self.drain()
        self.ev.close()
        self.tev.close()

    def sensitivity(self) -> float:
        """Share of the time in FLOP-bound ops: the clock sensitivity estimate."""
        total = self.compute_s + self.memory_s
        return self.compute_s / total if total else 1.0

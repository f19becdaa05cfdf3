"""The GPU arbiter (LithOS-style): LC tenants keep their tail, BE takes the rest.

- **Partitions.**  Green contexts from one split of the device's SMs
  (``partition.py``).  An LC tenant runs on the whole GPU at the greatest
  stream priority, or, once right-sized, on the smallest partition whose
  predicted latency is within ``slip`` of the whole GPU's.  BE tenants run
  on the whole GPU at the lowest priority, and on the complement of the
  right-sized LC partitions while such LC work runs or is due (with
  ``be_sms``, on only that many SMs while any LC tenant is active).
- **Gates and atoms.**  LC requests shut their tenant's gate on the GPU for
  exactly as long as their work runs (``gate.py``); every BE atom waits for
  the gates first, so LC waits for at most the BE atom already running.
  BE atoms are about ``atom_us`` long while LC tenants are active (large,
  ``idle_atom_us``, when no LC request came for ``quiet_s``), sized to end
  before the next LC arrival (predicted from each LC tenant's rhythm,
  less ``lead_us`` for host jitter), and held when even a small atom
  would not fit, until LC comes or is ``hold_us`` overdue (``plan.py``);
  by default not on the host: the atom is parked on the GPU behind the
  LC request and the issuer goes on (``park.py``).  An issuer that must
  wait sleeps (on its oldest atom's event, or until an LC request ends):
  one that polled took the GIL from LC's threads at every wake.
  Torch work is cut by the op-level atomizer (``opmode.py``), row ops by
  ``run_be``.
- **The GIL.**  While an LC request runs its host path (arrival to launch,
  and from ``host_first_us`` before its predicted end to its return; an
  LC tenant's INFER batch throughout), BE threads wait at their next op
  (``hostfirst.py``).
- **Kernel and cu* tenants.**  Work the GPU executor launches on raw
  streams (lake_infer GPU batches and kernel cu* sessions, as the tenant
  ``kernel``; user clients' cu* sessions, as the client's tenant) is bound
  to its tenant through ``tenancy()`` (``tenancy.py``): an LC tenant's
  launches shut a gate per stream (and, with ``park_raw``, count on its
  request counter, so BE parks behind them too), a BE tenant's launches
  wait for the LC gates.
  Such work runs on the whole GPU and is not right-sized.
- **Right-sizing.**  Per LC tenant, l(t) = m/t + b is fitted from its
  requests on the whole GPU and one probe on its quota's partition
  (``rightsize.py``); every request is predicted first and misses (off by
  more than 50 us) are counted for ``laked status``.
- **Energy and power advice.**  NVML's energy counter is sampled and split
  between tenants by their device time; the DVFS model gives an
  advise-only clock (``power.py``).  Nothing here changes a GPU setting.
"""
from __future__ import annotations

import contextlib
import importlib
import logging
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, TypeVar

import torch

from ..tenants import LC, TenantSpec
from . import power
from .atoms import RowOp
from .blas import set_sm_target, sm_target_set
from .base import Arbiter, Tenancy, TenantState
from .gate import Gates
from .governor import Governor, target_mhz
from .hostfirst import HostFirst, Wakeable, next_wait
from .knobs import Knobs
from .opmode import AtomizeMode, Split
from .fast import Events, ensure_ctx, ensure_thread, raw_stream, set_primary, using
from .pacer import Pacer
from .park import MASK, Parks
from .partition import Partition, Partitions, check
from .plan import INF, Ask, LcView, Plan, atom_s, decide, next_due, stuck
from .rightsize import KernelModel
from .tenancy import GpuTenancy

log = logging.getLogger("laked.sched")

T = TypeVar("T")

HOLD_POLL_S = 2e-3      # a held BE issuer looks again this often (LC's end wakes it sooner)
MIN_WAIT_S = 20e-6


@dataclass(slots=True)
class _Trace:
    """A trace in progress (GpuArbiter.trace_start): its events, their zero,
    and each LC request's (start, end) events."""
    ev: Events
    ref: Any
    lc: list[tuple[Any, Any]] = field(default_factory=list)


@dataclass
class GpuTenant(TenantState):
    slot: int = -1                        # LC: its gate
    stream: Any = None                    # LC: torch stream it runs on
    partition: Partition | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    active: int = 0
    last_start: float = 0.0
    last_end: float = 0.0
    gap: float = 0.0                      # EWMA of inter-arrival, seconds
    due: float = 0.0                      # predicted next arrival (host clock)
    model: KernelModel | None = None      # LC: right-sizing and prediction
    probed: bool = False
    allow_partition: bool = True          # False: work the partition cannot hold (graphs)
    pacer: Pacer | None = None            # BE
    events: Events | None = None          # LC: the event after each request
    stream_slots: dict[int, int] = field(default_factory=dict)  # LC raw streams' gates
    pass_slot: int = -1                   # LC: its request counter (park.py); -2: none left
    pass_n: int = 0                       # ... the number of its last request
    gpu_wait: float = 0.0                 # LC: average wait from its work queued to done
    opened_early: int = 0                 # LC: its gates opened early (plan.stuck)

    def gate_slots(self) -> list[int]:
        """Every gate BE must wait for on this LC tenant's behalf."""
        return [self.slot, *self.stream_slots.values()]

    @property
    def is_lc(self) -> bool:
        return self.spec.cls == LC


class GpuArbiter(Arbiter):
    device = "cuda"

    def __init__(self, knobs: Knobs | dict[str, Any] | None = None, device: int = 0) -> None:
        super().__init__()
        self.knobs = knobs if isinstance(knobs, Knobs) else Knobs.from_dict(knobs)
        # an LC request's thread must get the GIL quickly from BE issuers
        sys.setswitchinterval(self.knobs.gil_switch_us / 1e6)
        torch.cuda.set_device(device)
        torch.zeros(1, device="cuda")             # the primary context exists first
        # The first dispatch mode imports torch._dynamo (seconds, GIL held):
        # pay it here, not in the middle of a BE job beside LC work.
        importlib.import_module("torch._dynamo")
        self.dev = device
        self.parts = Partitions(device)
        cu = self.parts.cu
        self._primary = check(cu.cuDevicePrimaryCtxRetain(self.parts.dev), "retain")
        check(cu.cuCtxSetCurrent(self._primary), "cuCtxSetCurrent")   # not a green one
        set_primary(self._primary)
        self.full = self.parts.full()
        _, lo, hi = self.parts.cu.cuCtxGetStreamPriorityRange()
        self.prio_lo, self.prio_hi = int(lo), int(hi)
        self.gates = Gates(self.knobs.gate_timeout_ms / 1e3)
        self.parks = Parks()
        self._lc: tuple[GpuTenant, ...] | None = None   # lc_tenants(), until tenants change
        self.be_tenants = 0                       # BE tenants now (_tenants_changed)
        self.lc_seq = 0                           # bumped by every LC request start
        self.lc_active = 0
        self.last_lc = 0.0                        # host time the last LC request ended
        # diagnostics (scripts/bench/timeline_be.py): every BE plan decision
        self.plan_log: list[tuple[float, float, float, float, Any]] | None = None
        # ... and every LC arrival: (host time, the arrival predicted for it)
        self.arrive_log: list[tuple[float, float]] | None = None
        # ... and each LC request's GPU span, as events (trace_start)
        self._trace: _Trace | None = None
        self._lock = threading.Lock()
        # BE's Python waits while an LC request's host path runs (hostfirst.py)
        self.host_first = HostFirst()
        # BE issuers holding for LC sleep on this until a request ends (a
        # polling issuer would take the GIL from LC's threads every wake)
        self._lc_ended = Wakeable(self._lock)
        self._leaves = 0
        # a held issuer and the watchdog's scan may find one stall together
        self._unstick_lock = threading.Lock()
        self.gates.on_scan = self._unstick_scan
        self._energy_stop = threading.Event()
        self.idle_energy_j = 0.0
        self.nvml: power.Nvml | None = None
        self._clocks: list[int] = []
        try:
            self.nvml = power.Nvml(device)
            self._clocks = self.nvml.supported_graphics_mhz()
        except Exception as e:  # noqa: BLE001 - NVML is optional: energy just stays 0
            log.info("no NVML energy counter: %s", e)
        self._energy = threading.Thread(target=self._sample_energy, name="laked-energy",
                                        daemon=True)
        self._energy.start()
        self.gov = Governor(self.knobs.be_duty, target_mhz(self._clocks, self.knobs.clock_slip))
        self._clock = threading.Thread(target=self._govern, name="laked-clock", daemon=True)
        if self.gov.target_mhz and self.nvml is not None:
            self._clock.start()
        self._reserve()
        self._warm_up()
        log.info("GPU arbiter: %d SMs in %d units of %d; knobs %s", self.parts.total_sms,
                 self.parts.n_units, self.parts.unit, vars(self.knobs))

    def _reserve(self) -> None:
        """Leave memory cached in torch's allocator: a real cudaMalloc while a
        BE stream waits at a shut gate can stall inside the driver (see
        gate.py), so steady-state allocations should come from the cache."""
        mb = self.knobs.reserve_mb
        if mb:
            big = torch.empty(mb << 20, dtype=torch.uint8, device="cuda")
            small = [torch.empty(1 << 16, dtype=torch.uint8, device="cuda") for _ in range(64)]
            del big, small

    def _warm_up(self) -> None:
        """Run each atomizer path once: first uses import and build things
        (meta kernels, cuBLAS/cuDNN handles on these streams) that would
        otherwise stall the first BE job beside LC work."""
        t = self.add_tenant(TenantSpec("laked-warmup", "BE", 0, kind="job"))
        try:
            lin = torch.nn.Linear(256, 256).cuda()
            conv = torch.nn.Conv2d(4, 8, 3).cuda()
            x = torch.randn(512, 256, device="cuda", requires_grad=True)
            with self.be(t):
                lin(x).relu().sum().backward()
                conv(torch.randn(4, 4, 16, 16, device="cuda")).mean()
                torch.bmm(torch.randn(2, 8, 8, device="cuda"), torch.randn(2, 8, 8, device="cuda"))
                y = torch.randn(1 << 22, device="cuda")
                torch.mul(y, 2.0, out=y)
                y.add_(1.0)
                (y * 2).sum()
            torch.cuda.synchronize()
        finally:
            self.remove_tenant(t)

    # -- tenants ----------------------------------------------------------------------
    def _new_state(self, spec: TenantSpec) -> TenantState:
        t = GpuTenant(spec, sms=self.parts.total_sms)
        if t.is_lc:
            t.slot = self.gates.slot()
            t.stream = torch.cuda.Stream(priority=self.prio_hi)
            t.events = Events(timing=False)
            t.model = KernelModel(spec.name)
        else:
            full = self.full.torch_stream(self.prio_lo)
            t.pacer = Pacer(self, t, lambda kind: full if kind == "full" else
                            self._cap_stream() if kind == "cap" else self._comp_stream())
        return t

    def add_tenant(self, spec: TenantSpec) -> TenantState:
        t = super().add_tenant(spec)
        self._tenants_changed()
        return t

    def remove_tenant(self, t: TenantState) -> None:
        super().remove_tenant(t)
        self._tenants_changed()
        assert isinstance(t, GpuTenant)
        if t.pacer is not None:
            t.pacer.close()
        slots = set(t.stream_slots.values()) - {t.slot}
        t.stream_slots.clear()
        if t.slot >= 0:
            if t.stream is not None:
                t.stream.synchronize()
            slots.add(t.slot)
            t.slot = -1
        for s in slots:
            self.gates.release(s)       # a host store: cannot fail
        if t.pass_slot >= 0:
            self.parks.release(t.pass_slot, t.pass_n)
            t.pass_slot = -1

    def _tenants_changed(self) -> None:
        with self._tlock:
            self._lc = None
            be = [t for t in self.tenants.values() if isinstance(t, GpuTenant) and not t.is_lc]
            # BE tenants of any kind, whose work LC's gates hold back (none:
            # raw LC work goes ungated, tenancy.py) ...
            self.be_tenants = len(be)
            # ... and BE jobs' threads, which pause for LC's host paths (none: no hold)
            self.host_first.users = sum(t.pacer is not None for t in be)

    def lc_tenants(self) -> tuple[GpuTenant, ...]:
        """The LC tenants (every BE plan asks: kept until a tenant comes or goes)."""
        lc = self._lc
        if lc is None:
            with self._tlock:      # built and dropped under one lock: never stale
                lc = self._lc = tuple(t for t in self.tenants.values()
                                      if isinstance(t, GpuTenant) and t.is_lc and t.slot >= 0)
        return lc

    def lc_slots(self) -> list[int]:
        return [s for t in self.lc_tenants() for s in t.gate_slots()]

    def tenancy(self, t: TenantState) -> Tenancy:
        return GpuTenancy(self, t)

    def _comp_stream(self) -> Any:
        """BE's stream on the SMs no right-sized LC tenant uses."""
        lc_units = max((t.partition.units[1] for t in self.lc_tenants() if t.partition),
                       default=0)
        p = self.parts.get(min(lc_units, self.parts.n_units - 1), self.parts.n_units, True)
        return p.torch_stream(self.prio_lo)

    def cap_partition(self) -> Partition:
        """BE's partition while LC is active: the last ``be_sms`` SMs (at least one unit)."""
        return self.parts.tail(self.knobs.be_sms)

    def _cap_stream(self) -> Any:
        return self.cap_partition().torch_stream(self.prio_lo)

    # -- LC ---------------------------------------------------------------------------
    def _arrive(self, t: GpuTenant, now: float) -> None:
        self._predict(t, now)
        t.active += 1
        with self._lock:
            self.lc_active += 1
            self.lc_seq += 1

    def _predict(self, t: GpuTenant, now: float) -> None:
        """Feed ``t``'s arrival at ``now`` to the predictor that sizes BE atoms."""
        if self.arrive_log is not None:
            self.arrive_log.append((now, t.due))
        if t.last_start:
            gap = now - t.last_start
            t.gap = gap if not t.gap else 0.8 * t.gap + 0.2 * gap
            t.due = next_due(t.due, now, t.gap)
        t.last_start = now

    def _leave(self, t: GpuTenant) -> None:
        t.active -= 1
        t.last_end = self.last_lc = time.perf_counter()
        with self._lock:
            self.lc_active -= 1
            self._leaves += 1
            self._lc_ended.wake_all()

    def _next_request(self, t: GpuTenant) -> int:
        """Number ``t``'s next request on its counter (BE parks on it, park.py);
        -1: no counter is left, so BE holds on the host for this tenant."""
        if t.pass_slot == -1:
            try:
                t.pass_slot, t.pass_n = self.parks.slot()
            except RuntimeError as e:
                t.pass_slot = -2
                log.warning("%s: %s; BE holds on the host before its requests", t.name, e)
        if t.pass_slot < 0:
            return -1
        t.pass_n = (t.pass_n + 1) & MASK
        return t.pass_n

    def _mark(self, t: GpuTenant, stream: int, n: int) -> None:
        """Queue on ``stream``, after request ``n``'s work, that it is done."""
        if n >= 0:
            self.parks.mark(stream, t.pass_slot, n)

    def run_lc(self, t: TenantState, fn: Callable[[], T], items: int = 1) -> T:
        """One LC request: ``fn`` issues it on the tenant's stream; returns when done."""
        assert isinstance(t, GpuTenant) and t.is_lc
        ensure_ctx()
        with t.lock:                        # one request of a tenant at a time: one gate
            # BE's Python waits (hostfirst.py) from here; inline, not a context
            # manager's generator, as it runs on every request (tenancy's _Batch)
            key, lead = threading.get_ident(), self.knobs.host_first_us / 1e6
            self.host_first.hold(key, lead)
            try:
                return self._request(t, fn, items, key, lead)
            finally:
                self.host_first.release(key)

    def _request(self, t: GpuTenant, fn: Callable[[], T], items: int, key: int,
                 lead: float) -> T:
        """run_lc's request, with BE's Python held from its arrival (key, lead)."""
        sms = self._place(t)
        ensure_thread(t.stream)
        t0 = time.perf_counter()
        n = self._next_request(t)           # before _arrive: BE parks on the next one
        self._arrive(t, t0)
        stream, cs = t.stream, t.stream.cuda_stream
        tr = self._trace
        done = None
        try:
            # the last request's open has run: its end event was waited for
            self.gates.close_now(t.slot)
            if tr is not None:
                tr.lc.append((tr.ev.record(cs), None))
            try:
                with using(stream, self.dev):
                    out = fn()
            finally:
                self.gates.open(t.slot, cs)
                self._mark(t, cs, n)
                if tr is not None:
                    tr.lc[-1] = (tr.lc[-1][0], tr.ev.record(cs))
                done = t.events.record(cs)
            # BE's Python runs while the GPU does, until just before it is done
            queued = time.perf_counter()
            self.host_first.hold_near_end(key, lead, queued, t.gpu_wait)
            t.events.wait(done)
            t.gpu_wait = next_wait(t.gpu_wait, time.perf_counter() - queued)
            t.events.put(done)
        except Exception:
            t.errors += 1
            if done is not None:
                # the next request's close_now must not race this open
                with contextlib.suppress(RuntimeError):
                    t.events.wait(done)
                t.events.put(done)
            raise
        finally:
            self._leave(t)
        dt = time.perf_counter() - t0
        t.record(dt, items)
        if t.model is not None:
            t.model.observe(sms, dt)        # predicted first: misses are counted
        return out

    def _place(self, t: GpuTenant) -> int:
        """The SMs this request runs on: whole GPU, the probe, or the right size."""
        k = self.knobs
        if not (k.rightsize and t.allow_partition) or t.model is None:
            return t.sms
        if not t.probed and t.requests >= k.probe_after:
            quota = t.spec.quota_sms or self.parts.total_sms // 2
            units = min(self.parts.units_for(quota), self.parts.n_units - 1)
            self._move(t, units)
            t.probed = True
            log.info("right-sizing %s: probe on %d SMs", t.name, t.sms)
            return t.sms
        if t.probed and t.model.fitted and t.requests == k.probe_after + 1:
            offers = sorted({self.parts.get(0, u).sms for u in range(1, self.parts.n_units)}
                            | {self.parts.total_sms})
            best = t.model.right_size(offers, k.slip)
            if best >= self.parts.total_sms:
                self._move(t, None)
            else:
                self._move(t, self.parts.units_for(best))
            log.info("right-sized %s to %d SMs (fit m=%.1f us*SM b=%.1f us)", t.name,
                     t.sms, t.model.m * 1e6, t.model.b * 1e6)
        return t.sms

    def _move(self, t: GpuTenant, units: int | None) -> None:
        if units is None:
            t.partition, t.sms = None, self.parts.total_sms
            t.stream = torch.cuda.Stream(priority=self.prio_hi)
        else:
            t.partition = self.parts.get(0, units)
            t.sms = t.partition.sms
            t.stream = t.partition.torch_stream(self.prio_hi)

    # -- BE ---------------------------------------------------------------------------
    def _lc_view(self, ts: tuple[GpuTenant, ...], now: float) -> LcView:
        """What LC tenants ``ts`` are doing, and when the next one is due."""
        v = LcView()
        lead = self.knobs.lead_us / 1e6
        for i, t in enumerate(ts):
            if t.active:
                v.recent = True
                if t.partition is None:
                    v.run_full = True
                else:
                    v.run_part = True
                continue
            if not t.last_start or now - max(t.last_start, t.last_end) > self.knobs.quiet_s:
                continue
            v.recent = True
            if t.due:
                until = t.due - lead - now
                if until > -2 * t.gap and until < v.until_s:
                    v.until_s, v.until_part, v.until_i = until, t.partition is not None, i
        return v

    def lc_recent(self) -> bool:
        """An LC request runs, or one ended within ``quiet_s`` (no waiting)."""
        return bool(self.lc_active) or (time.perf_counter() - self.last_lc < self.knobs.quiet_s
                                        and bool(self.lc_tenants()))

    def _parked(self, p: Pacer) -> bool:
        """An atom of ``p`` still waits on the GPU for an LC request."""
        if p.parked is not None and not self.parks.pending(*p.parked):
            p.parked = None             # LC passed it (or the host let it go)
        return p.parked is not None

    def room_hint(self, p: Pacer) -> float:
        """The room before the next predicted LC arrival on the whole GPU, less
        ``p``'s queue (no waiting); inf when no such arrival bounds BE's next atom."""
        ts = self.lc_tenants()
        if not ts or self._parked(p):
            return INF          # its next atom goes after LC's request anyway
        v = self._lc_view(ts, time.perf_counter())
        if not v.recent or v.run_full or v.run_part or v.until_part:
            return INF
        p.reap()
        return v.until_s - p.queued_s()

    def budget_hint(self, issue_x: float = 1.0) -> float:
        """Cheap guess of the next atom budget of an issuer of weight
        ``issue_x`` (no waiting, no holds)."""
        if self.lc_recent():
            return atom_s(self.knobs, issue_x)
        return self.knobs.idle_atom_us / 1e6

    def be_plan(self, p: Pacer, need_s: float = 0.0) -> Plan:
        """The next atom's budget, stream and gates (waits for room, holds before
        LC); ``need_s``: the smallest atom that is of use (an unsplittable op)."""
        k = self.knobs
        seq0 = self.lc_seq
        while True:
            p.wait_depth(k.depth, self._wait_lc)
            leaves = self._leaves
            now = time.perf_counter()
            ts = self.lc_tenants()          # one snapshot per plan
            v = self._lc_view(ts, now)
            ask = Ask(p.queued_s(), bool(p.inflight), need_s, self.lc_seq != seq0,
                      self._parked(p), p.issue_x)
            got = decide(v, ask, k)
            if self.plan_log is not None:
                self.plan_log.append((now, v.until_s, ask.queued_s, need_s, got))
            park = None
            if got is not None and got[0] == "park":
                park = self._park_on(ts, v)
                got = None if park is None else ("full", got[1])
            if got is not None:
                kind, budget = got
                if kind == "full" and v.recent and 0 < k.be_sms < self.parts.total_sms:
                    # fewer SMs draw less power: the clock LC's requests find
                    # stays higher (a GEMM loop on every SM runs it ~20 % down)
                    kind = "cap"
                slots = [s for t in ts if kind == "full" or t.partition is None
                         for s in t.gate_slots()]
                return Plan(budget, kind, slots, park, v.recent, v.until_s - ask.queued_s)
            # LC runs or is due: sleep until a request ends, or until the
            # prediction is hold_us overdue (then decide() lets BE go)
            wait = HOLD_POLL_S if v.run_full else v.until_s + k.hold_us / 1e6
            self._sleep_past(leaves, min(max(wait, MIN_WAIT_S), HOLD_POLL_S))
            if not v.run_full:
                p.hold_s += time.perf_counter() - now
            else:
                p.lc_wait_s += time.perf_counter() - now
                self._unstick(ts)

    def _wait_lc(self) -> bool:
        """A BE issuer with no room: while an LC request runs on the whole GPU,
        sleep until one ends (HOLD_POLL_S at most) and look for a stuck one
        (its queue's oldest atom may wait at the request's gate, so the
        atom's event would not end before the watchdog).  False: none runs."""
        leaves = self._leaves
        ts = self.lc_tenants()
        if not self._lc_view(ts, time.perf_counter()).run_full:
            return False
        self._sleep_past(leaves, HOLD_POLL_S)
        self._unstick(ts)
        return True

    def _sleep_past(self, leaves: int, timeout_s: float) -> None:
        """Sleep until an LC request ends after the ``leaves``-th one did, or
        ``timeout_s`` (a polling issuer would take the GIL at every wake)."""
        with self._lc_ended:
            if self._leaves == leaves:
                self._lc_ended.wait(timeout_s)

    def _unstick(self, ts: tuple[GpuTenant, ...], stacks: bool = False) -> None:
        """Open the gates of LC requests stuck behind a BE gate wait (plan.stuck).
        Such a request's work stays queued until its gate opens (gate.py); the
        watchdog would open it after gate_timeout_ms, while BE, which this
        issuer is, waits for the request all that time.  One caller at a
        time, so a stall is opened, counted and logged once (the watchdog's
        thread stacks take long enough for an issuer to find it too)."""
        with self._unstick_lock:
            now = time.perf_counter()
            for t in ts:
                running = now - t.last_start
                if t.active and stuck(running, t.gpu_wait, self.knobs):
                    for s in t.gate_slots():
                        if self.gates.is_shut(s):
                            t.opened_early += 1
                            self.gates.open_stuck(s, t.name, running, t.opened_early, stacks)

    def _unstick_scan(self) -> None:
        """The gate watchdog's scan (gate.py): a stuck LC request no BE issuer
        can open, each being stuck in a launch itself, is found within a
        scan's interval (gate_timeout_ms / 4); the log says where every
        thread was."""
        self._unstick(self.lc_tenants(), stacks=True)

    def _park_on(self, ts: tuple[GpuTenant, ...], v: LcView) -> tuple[int, int, float] | None:
        """The wait for the LC request ``v`` expects next (None: its tenant
        has no counter, so BE holds on the host)."""
        if v.until_i < 0:
            return None
        t = ts[v.until_i]
        if t.pass_slot < 0:
            return None             # no request counted yet, or no counter left
        return t.pass_slot, (t.pass_n + 1) & MASK, t.due + self.knobs.hold_us / 1e6

    @contextlib.contextmanager
    def be(self, t: TenantState) -> Iterator[None]:
        """BE torch work in this block (and its backward) is atomized and paced."""
        assert isinstance(t, GpuTenant) and t.pacer is not None
        p = t.pacer
        ensure_thread(p.stream_for("full"))
        p.owner = threading.get_ident()
        p.kind = "full"
        # autograd runs a CUDA backward on its device thread unless told:
        # each of its ops then takes the GIL from the issuer's thread
        threads = torch.autograd.set_multithreading_enabled(not self.knobs.inline_backward)
        try:
            with threads, torch.cuda.stream(p.stream_for("full")), AtomizeMode(p):
                yield
        finally:
            p.drain()           # busy time was counted atom by atom
            if sm_target_set():
                set_sm_target(0)    # this thread's other GEMMs plan for every SM

    def run_be(self, t: TenantState, ops: Iterator[RowOp], stop: threading.Event) -> None:
        """Issue row ops (laked.sched.atoms) atom by atom until ``ops`` ends or ``stop``."""
        assert isinstance(t, GpuTenant) and t.pacer is not None
        p = t.pacer
        ensure_thread(p.stream_for("full"))
        p.owner = threading.get_ident()
        with torch.cuda.stream(p.stream_for("full")):
            p.kind = "full"
            for op in ops:
                if stop.is_set():
                    break
                self.host_first.pause()
                key = ("rowop", op.rows, id(op.piece.__code__))

                def piece(i0: int, i1: int, op: RowOp = op) -> None:
                    op.piece(i0, i1)
                    op.done_rows = i1
                    t.items += i1 - i0
                p.run_split(Split(key, op.rows, 1e-6, piece, None, guessed=False))
            p.drain()

    # -- diagnostics (scripts/bench/timeline_be.py --events) ---------------------------
    def trace_start(self) -> float:
        """Time every BE atom and LC request on the GPU with events (no
        profiler, so the issuers pay ~2 us per atom, not CUPTI's per call).
        Returns the host time (perf_counter) of the spans' zero."""
        ev = Events(timing=True, blocking=True)
        ref = ev.record(raw_stream(self.dev))
        while not ev.done(ref):     # spin: a blocking wait's wake-up would skew the zero
            pass
        host0 = time.perf_counter()
        for p in self._pacers():
            p.trace, p.trace_ref = [], ref
        self._trace = _Trace(ev, ref)
        return host0

    @property
    def lc_trace(self) -> list[tuple[Any, Any]] | None:
        """The LC requests' events of the trace in progress (None: no trace)."""
        return None if self._trace is None else self._trace.lc

    def trace_stop(self) -> dict[str, Any]:
        """Stop tracing (after the traced BE jobs ended, with no LC request
        in flight: its events are destroyed here) and return the spans
        in seconds from the zero: {"lc": [(start, end)], "be": {tenant:
        [(start, end, host time queued, estimated seconds)]}}."""
        tr, self._trace = self._trace, None
        assert tr is not None
        ev, ref = tr.ev, tr.ref
        torch.cuda.synchronize()
        lc = []
        for s, e in tr.lc:
            if e is not None:
                lc.append((ev.elapsed_s(ref, s), ev.elapsed_s(ref, e)))
                ev.put(e)
            ev.put(s)
        be = {}
        for p in self._pacers():
            p.reap()
            be[p.t.name] = p.trace or []
            p.trace = p.trace_ref = None
        ev.put(ref)
        ev.close()
        return {"lc": lc, "be": be}

    def _pacers(self) -> list[Pacer]:
        with self._tlock:
            return [x.pacer for x in self.tenants.values()
                    if isinstance(x, GpuTenant) and x.pacer is not None]

    # -- views for laked status, top and the kernel's policy ----------------------------
    def queue_delay_us(self) -> int:
        """How long LC work arriving now would wait: the BE atom running (est.)."""
        worst = 0.0
        for p in self._pacers():
            if p.inflight:
                worst = max(worst, p.inflight[0].est_s)
        return int(worst * 1e6)

    def _readings(self, read: Callable[[], int], interval: str) -> Iterator[int]:
        """``read()`` every knob ``interval`` seconds until close; a failed read
        (NVML can fail transiently) is skipped."""
        while not self._energy_stop.wait(getattr(self.knobs, interval)):
            try:
                value = read()
            except Exception as e:  # noqa: BLE001 - logged, and the next read tried
                log.debug("NVML read (%s) failed: %s", read.__name__, e)
                continue
            yield value

    def _sample_energy(self) -> None:
        if self.nvml is None:
            return
        last = self.nvml.energy_mj()
        busy: dict[str, float] = {}
        for now in self._readings(self.nvml.energy_mj, "energy_interval_s"):
            de, last = (now - last) / 1e3, now
            with self._tlock:
                ts = list(self.tenants.values())
            deltas = {t.name: t.busy_s - busy.get(t.name, t.busy_s) for t in ts}
            busy = {t.name: t.busy_s for t in ts}
            total = sum(max(0.0, d) for d in deltas.values())
            if total <= 0:
                self.idle_energy_j += de
                continue
            for t in ts:
                t.energy_j += de * max(0.0, deltas[t.name]) / total

    def _govern(self) -> None:
        """BE's duty from the SM clock, every ``clock_interval_s`` (governor.py)."""
        assert self.nvml is not None
        for mhz in self._readings(self.nvml.clocks_mhz, "clock_interval_s"):
            # knobs set at run time take effect at the next reading
            self.gov.floor = self.knobs.be_duty
            self.gov.target_mhz = target_mhz(self._clocks, self.knobs.clock_slip)
            self.gov.step(self.lc_recent(), mhz)

    def power_advice(self) -> dict[str, Any]:
        """Advise-only DVFS from the tenants' busy time and sensitivities."""
        with self._tlock:
            ts = [t for t in self.tenants.values() if isinstance(t, GpuTenant)]
        total = sum(t.busy_s for t in ts)
        if not self._clocks or not total:
            return {"advice": None, "why": "no NVML clocks" if not self._clocks
                    else "no GPU work yet"}
        # LC tenants are assumed fully clock-sensitive (their tail matters most);
        # BE sensitivity is the FLOP-bound share of its atoms (roofline estimate)
        sens = {t.name: (1.0 if t.is_lc or t.pacer is None else t.pacer.sensitivity())
                for t in ts}
        s_all = sum(t.busy_s / total * sens[t.name] for t in ts)
        a = power.advise(s_all, self.knobs.power_slip, self._clocks)
        return {"advice": vars(a), "sensitivity": {n: round(v, 3) for n, v in sens.items()},
                "mode": "advise-only (no clock is ever set)",
                "current_sm_mhz": self.nvml.clocks_mhz() if self.nvml else None}

    def status(self) -> dict[str, Any]:
        out = super().status()
        ts = {t.name: t for t in list(self.tenants.values()) if isinstance(t, GpuTenant)}
        for s in out["tenants"]:
            t = ts.get(s["name"])
            s["partition"] = t.partition.name if t is not None and t.partition else "full"
            if t is not None and t.is_lc:
                s["gates_opened_early"] = t.opened_early
        out.update({
            "total_sms": self.parts.total_sms, "unit_sms": self.parts.unit,
            "knobs": vars(self.knobs), "lc_active": self.lc_active,
            "gates_forced_open": self.gates.forced_opens,
            "gates_opened_early": self.gates.early_opens,
            "parks": self.parks.stats(),
            "host_first": self.host_first.stats(),
            "queue_delay_us": self.queue_delay_us(),
            "idle_energy_j": round(self.idle_energy_j, 3),
            "be_duty": {"now": round(self.gov.duty, 3), "sm_mhz": self.gov.mhz,
                        "target_mhz": round(self.gov.target_mhz)},
            "rightsizing": [t.model.summary() | {"sms": t.sms}
                            for t in self.lc_tenants() if t.model is not None],
            "power": self.power_advice(),
        })
        return out

    def close(self) -> None:
        for t in list(self.tenants.values()):
            self.remove_tenant(t)
        self._energy_stop.set()
        self._energy.join(2)
        if self._clock.is_alive():
            self._clock.join(2)
        torch.cuda.synchronize()
        self.parks.close()
        self.gates.close_all()
        self.parts.cu.cuDevicePrimaryCtxRelease(self.parts.dev)

"""Raw-stream work (kernel cu* sessions, INFER, user cu* sessions) in the GPU arbiter.

The GPU executor launches on CUDA streams it made with the driver API, not
through torch, so the arbiter cannot atomize that work; it can gate it:

- **LC tenant** (the kernel by default): each of its streams gets a gate of
  its own (``gate.py``), shut on the stream just before every launch and
  opened just after it, so BE atoms that reach the GPU while the kernel's
  work runs wait for it, and LC waits for at most the BE atom already
  running.  One gate per stream, because a flag shared by two streams
  would be opened by whichever finished first.  Launches also feed the
  arrival predictor that sizes BE atoms (per launch, not per request).
  With the knob ``park_raw`` (off by default), each also bumps the
  tenant's request counter on the GPU once its work ran, so a BE atom that
  will not fit before the next launch parks behind it (park.py) as it does
  behind a torch tenant's request, and BE starts the moment the kernel's
  work ends.  On an H200 beside kernel INFER (three device calls) it gives
  BE more (0.94-0.95, 0.90-0.91, 0.84-0.85 of solo beside gemm/mem/train,
  against 0.91, 0.86-0.87, 0.75-0.77 holding on the host) but a worse
  INFER tail (p99 0.80-1.06 ms against 0.66-0.91): a parked issuer keeps
  queueing, so its Python runs around the predicted arrival and takes the
  GIL from the executor's thread.  With two streams, marks can land out of
  order (a store, not a max): a park may then wait for the following
  launch or its host release.
- **INFER batches** end as LC requests once their output is in the
  region (``request``), not once their launches are queued.  A batch's
  gate shuts and opens with host stores (``close_now``, ``open_now``):
  shut as its first launch is queued, open once its output is on the
  host, so no gate write is ever queued on the executor's INFER stream.
  That costs BE the batch's copy back (tens of us) and spares LC a driver
  call, which hands the GIL over mid-batch.  A failed batch opens its
  gate too (its work may still run beside BE: gates only order work).
  While an LC tenant's batch runs, BE jobs' Python waits at its next op
  (``host_first_us``, hostfirst.py): the batch is nearly all host time
  (copies, launches, driver calls that each hand the GIL over).  Entering
  and leaving a batch is one flat object (``_Batch``), since it runs on
  every kernel request.  Its time and its leave (which wakes BE's
  issuers; their queued atoms went at the gate's open) wait until its
  completion is posted (``settle``, from the executor's ``posted``): off
  the kernel's path.
- **No BE tenant**: an LC tenant's launches and batches go bare, with no
  gate, no hold and no arrival counted (nothing waits on them), only the
  arrival predictor fed, so BE's first atoms are sized from it.  A batch
  keeps the mode it began in.  A BE tenant's first atoms may then meet a
  kernel batch already running ungated: one batch, once.  The scheduler's
  cost to a kernel alone on the GPU is then a few attribute reads.
- **BE tenant** (a user client that asked for BE): every launch first waits
  on the GPU for all LC gates.  Its kernels run whole: laked cannot cut a
  cubin it did not compile into block ranges.

Waits go only on non-blocking streams: a BE tenant's streams are created
CU_STREAM_NON_BLOCKING (``nonblocking_streams``) and its launches on the
legacy stream run ungated.  The executors share one context and so its
legacy stream, which orders against every blocking stream: a wait on such
a stream could sit in front of legacy work that an LC stream's open must
follow, and that open is what the wait waits for (a cycle no watchdog
breaks, since the open was queued).  The same ordering would make LC wait
for whole BE kernels.  A destroyed stream's gate goes back only once the
work queued on it has run (its writes would otherwise land on the gate's
next owner).  Nothing between a close and its open allocates device memory
(gate.py's known stall): the executor loads functions eagerly and
allocates before it launches.
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from .base import Tenancy, TenantState
from .gate import GateError
from .hostfirst import next_wait
from .partition import check

if TYPE_CHECKING:
    from .arbiter import GpuArbiter, GpuTenant

log = logging.getLogger("laked.sched")

NOTHING = None      # before_launch's token when there is no gate to open
_retired_keys = itertools.count(-1, -1)     # stream_slots keys of destroyed streams


class GpuTenancy(Tenancy):
    def __init__(self, arbiter: GpuArbiter, tenant: TenantState) -> None:
        super().__init__(tenant)
        self.arb = arbiter
        self.gates = arbiter.gates
        self.gt: GpuTenant = tenant     # type: ignore[assignment]
        # Raw streams live on the primary context: no green partition, so
        # no right-sizing (its predictor would see one size only)
        self.gt.allow_partition = False
        self.gt.model = None
        self.lc = self.gt.is_lc         # fixed for a tenant's life; read on every launch
        self.broken = ""                # why launches now go ungated
        self._retiring: list[tuple[int, Any]] = []     # (stream_slots key, event)
        # in an INFER batch: the gates it shut (opened as it ends), its start
        # and its leaves held back; None outside a batch
        self._opens: list[int] | None = None
        self._bare = False              # the batch began with no BE tenant there
        self._t0 = 0.0
        self._leaves_due = 0
        # an ended batch's bookkeeping, for settle(): (its seconds, None if it
        # failed; its items; its leaves; the start of a bare batch, whose
        # arrival the predictor has yet to see, else 0), None when nothing is owed
        self._due: tuple[float | None, int, int, float] | None = None

    @property
    def nonblocking_streams(self) -> bool:     # type: ignore[override]
        return not self.lc

    @property
    def ungated(self) -> int:
        """BE launches on the legacy stream (every other one waited at the gates)."""
        return 0 if self.lc else self.gt.launches - self.gt.atoms

    def _slot(self, stream: Any) -> int:
        t = self.gt
        key = int(stream)
        slot = t.stream_slots.get(key)
        if slot is None:
            try:
                slot = t.stream_slots[key] = self.gates.slot()
            except RuntimeError as e:
                # out of gates: share the tenant's own (it may open early)
                log.warning("%s: %s; stream %#x shares the tenant's gate", t.name, e, key)
                slot = t.stream_slots[key] = t.slot
        return slot

    def before_launch(self, stream: Any) -> tuple[int, int] | None:
        t = self.gt
        t.launches += 1
        if self.broken:
            return NOTHING
        if self._retiring:
            self._reap()
        opens = self._opens
        if opens is None:
            if self.lc and not self.arb.be_tenants:     # nothing to hold back
                self.arb._predict(t, time.perf_counter())  # noqa: SLF001
                return NOTHING
        elif self._bare:                # a batch keeps the mode it began in
            return NOTHING
        try:
            if not self.lc:
                if int(stream) != 0:    # not the legacy stream: see the module docstring
                    self.gates.wait(stream, self.arb.lc_slots())
                    t.atoms += 1
                return NOTHING
            slot = self._slot(stream)
            if opens is None:
                self.gates.close(slot, stream)
            elif slot not in opens:
                # an INFER batch: nothing of the last batch is queued before
                # it but kernels, so a host store shuts the gate (on an
                # H200's host the step went 22 -> 14 us, kinfer_split)
                self.gates.close_now(slot)
                opens.append(slot)
        except (GateError, RuntimeError) as e:
            self._break(str(e))
            return NOTHING
        # the arbiter's own tenant: its private bookkeeping is ours to call
        n = self.arb._next_request(t) if self.arb.knobs.park_raw else -1    # noqa: SLF001
        if opens is None:
            self.arb._arrive(t, time.perf_counter())   # noqa: SLF001
        return slot, n

    def after_launch(self, stream: Any, token: tuple[int, int] | None) -> None:
        if token is NOTHING:
            return
        slot, n = token
        if self._opens is not None:
            self._batch_launched(stream, n)
            return
        try:
            self.gates.open(slot, stream)
            self.arb._mark(self.gt, stream, n)     # noqa: SLF001
        except GateError as e:
            self._break(str(e))         # the watchdog reopens it: still recorded as shut
        finally:
            self.arb._leave(self.gt)                # noqa: SLF001

    def _batch_launched(self, stream: Any, n: int) -> None:
        """A launch of an INFER batch is queued: its arrival is counted (from
        the batch's start), its leave once the batch is settled.  Counted
        here or before the launch, it costs the batch the same: the layers'
        kernels end before the next launch, so no GPU time hides it
        (kinfer_split, stop 32)."""
        arb = self.arb
        try:
            arb._mark(self.gt, stream, n)           # noqa: SLF001
        except GateError as e:
            self._break(str(e))
        arb._arrive(self.gt, self._t0)              # noqa: SLF001
        self._leaves_due += 1

    def request(self, items: int) -> _Batch:
        """An INFER batch: LC leaves once its result is on the host, as a torch
        LC request does (arbiter.run_lc), not once its launches are queued.
        A BE issuer woken at the queueing would run its Python through the
        rest of the batch (the copy back, the completion), and each of the
        batch's remaining steps would wait for the GIL.  For the same reason
        BE's Python waits (hostfirst.py) while an LC tenant's batch runs.
        The batch's gates open and BE's Python goes on as it ends; the rest
        of its bookkeeping waits for ``settle``."""
        return _Batch(self, items)

    def settle(self) -> None:
        """The last batch's bookkeeping (its time, its leaves), which the
        executor defers until the batch's completion is posted (the kernel
        waits for that, not for this): the next batch, or the tenancy's
        close, settles it if nothing did."""
        due, self._due = self._due, None
        if due is None:
            return
        dt, items, leaves, unseen = due
        t = self.gt
        if dt is not None:
            t.record(dt, items)
            # its usual time, by which a stalled batch is told (plan.stuck): a
            # batch's work stuck behind a BE gate wait was held 500 ms, to the
            # watchdog's timeout, while the arbiter's check knew no usual time
            t.gpu_wait = next_wait(t.gpu_wait, dt)
        arb = self.arb
        if unseen:              # a bare batch: its arrival was not counted
            arb._predict(t, unseen)     # noqa: SLF001 - the arbiter's own tenant
        for _ in range(leaves):
            arb._leave(t)       # noqa: SLF001 - the arbiter's own tenant

    def forget(self, stream: Any) -> None:
        """Called before ``stream`` is destroyed: its gate goes back once its work ran."""
        t = self.gt
        slot = t.stream_slots.pop(int(stream), None)
        if slot is None or slot == t.slot:
            return
        cu = self.gates.cu
        try:
            err, = cu.cuStreamQuery(stream)
            if int(err) == 0:
                self.gates.release(slot)
                return
            ev = check(cu.cuEventCreate(int(cu.CUevent_flags.CU_EVENT_DISABLE_TIMING)),
                       "cuEventCreate")
            check(cu.cuEventRecord(ev, stream), "cuEventRecord")
        except RuntimeError as e:       # GateError, or PartitionError from check
            # kept: the tenant's removal gives it back, after the executor's close
            t.stream_slots[next(_retired_keys)] = slot
            log.warning("%s: gate %d of a destroyed stream kept until the tenant goes: %s",
                        t.name, slot, e)
            return
        key = next(_retired_keys)
        t.stream_slots[key] = slot      # BE keeps waiting on it meanwhile
        self._retiring.append((key, ev))

    def _reap(self, wait: bool = False) -> None:
        """Give back the gates of destroyed streams whose work has run."""
        cu = self.gates.cu
        still = []
        for key, ev in self._retiring:
            err, = cu.cuEventSynchronize(ev) if wait else cu.cuEventQuery(ev)
            if int(err) == int(cu.CUresult.CUDA_ERROR_NOT_READY):
                still.append((key, ev))
                continue
            cu.cuEventDestroy(ev)
            slot = self.gt.stream_slots.pop(key, None)
            if slot is not None:
                self.gates.release(slot)
        self._retiring = still

    def close(self) -> None:
        """The executor closed: every gate goes back once its stream's work ran."""
        self.settle()
        self._reap(wait=True)

    def context_lost(self) -> None:
        # The reset took the gates' memory (and torch's state) with it.
        self.gt.stream_slots.clear()
        self._retiring.clear()
        self._break("the GPU context was reset after a fault")

    def _break(self, why: str) -> None:
        if not self.broken:
            self.broken = why
            log.error("%s: launches are no longer gated (%s); BE work may delay them",
                      self.gt.name, why)


class _Batch:
    """One INFER batch's entry and exit (GpuTenancy.request), flat.  As
    three nested context managers (the generic request, the host-path hold,
    the batch's own bookkeeping), with a queued open, lake added 59-66 us to
    each batch on an H200's host; this way, 32 us (kinfer_split, stop 30).
    Each function a batch touches costs ~1 us more than its work: laked's
    other Python (a BE job's) runs between batches and leaves the caches
    cold.  So its exit does only what BE waits for (the gates, the hold),
    and leaves the rest to ``settle``."""

    __slots__ = ("ten", "items", "key")

    def __init__(self, ten: GpuTenancy, items: int) -> None:
        self.ten, self.items, self.key = ten, items, 0

    def __enter__(self) -> None:
        ten = self.ten
        if ten._opens is not None:
            raise RuntimeError(f"{ten.gt.name}: an INFER batch began inside another")
        if ten._due is not None:
            ten.settle()            # the last batch's: no completion was posted since
        ten._opens, ten._leaves_due = [], 0
        ten._bare = ten.lc and not ten.arb.be_tenants   # nothing to hold back
        if not ten._bare:
            lead = ten.arb.knobs.host_first_us
            if lead and ten.lc:         # the whole batch is host path (module docstring)
                self.key = threading.get_ident()
                ten.arb.host_first.hold(self.key, lead / 1e6)
        ten._t0 = time.perf_counter()

    def __exit__(self, typ: Any, exc: Any, tb: Any) -> None:
        ten = self.ten
        if typ is None:
            dt: float | None = time.perf_counter() - ten._t0
        else:
            dt = None
            if issubclass(typ, Exception):
                ten.gt.errors += 1
        opens, ten._opens = ten._opens or [], None
        for slot in opens:              # a bare batch shut none, held nothing
            ten.gates.open_now(slot)
        if self.key:
            ten.arb.host_first.release(self.key)
        # a bare batch's arrival is owed to the predictor (settle)
        ten._due = (dt, self.items, ten._leaves_due, ten._t0 if ten._bare else 0.0)
        ten._leaves_due = 0

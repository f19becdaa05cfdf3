"""Raw-stream work (kernel cu* sessions, INFER, user cu* sessions) in the GPU arbiter.

The GPU executor launches on CUDA streams it made with the driver API, not
through torch, so the arbiter cannot atomize that work; it can gate it:

- **LC tenant** (the kernel by default): each of its streams gets a gate of
  its own (``gate.py``), shut on the stream just before every launch and
  opened just after it, so BE atoms that reach the GPU while the kernel's
  work runs wait for it, and LC waits for at most the BE atom already
  running.  One gate per stream, because a flag shared by two streams
  would be opened by whichever finished first.  Launches also feed the
  arrival predictor that sizes BE atoms.
- **BE tenant** (a user client that asked for BE): every launch first waits
  on the GPU for all LC gates.  Its kernels run whole: laked cannot cut a
  cubin it did not compile into block ranges.

Nothing between a gate's close and its open allocates device memory (see
gate.py's known stall): the executor loads functions eagerly and
allocates before it launches.
"""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from .base import Tenancy, TenantState
from .gate import GateError

if TYPE_CHECKING:
    from .arbiter import GpuArbiter, GpuTenant

log = logging.getLogger("laked.sched")


class GpuTenancy(Tenancy):
    def __init__(self, arbiter: "GpuArbiter", tenant: TenantState) -> None:
        super().__init__(tenant)
        self.arb = arbiter
        self.gt: GpuTenant = tenant     # type: ignore[assignment]
        # Raw streams live on the primary context: no green partition, so
        # no right-sizing (its predictor would see one size only)
        self.gt.allow_partition = False
        self.gt.model = None
        self.broken = ""                # why launches now go ungated

    def _slot(self, stream: Any) -> int:
        t = self.gt
        key = int(stream)
        slot = t.stream_slots.get(key)
        if slot is None:
            try:
                slot = t.stream_slots[key] = self.arb.gates.slot()
            except RuntimeError as e:
                # out of gates: share the tenant's own (it may open early)
                log.warning("%s: %s; stream %#x shares the tenant's gate", t.name, e, key)
                slot = t.stream_slots[key] = t.slot
        return slot

    def before_launch(self, stream: Any) -> int:
        t = self.gt
        t.launches += 1
        if self.broken:
            return -1
        try:
            if not t.is_lc:
                self.arb.gates.wait(stream, self.arb.lc_slots())
                t.atoms += 1
                return -1
            slot = self._slot(stream)
            self.arb.gates.close(slot, stream)
        except (GateError, RuntimeError) as e:
            self._break(str(e))
            return -1
        self.arb._arrive(t, time.perf_counter())   # noqa: SLF001 - the arbiter's own tenant
        return slot

    def after_launch(self, stream: Any, token: int) -> None:
        if token < 0:
            return
        try:
            self.arb.gates.open(token, stream)
        except GateError as e:
            self._break(str(e))
            self.arb.gates.open_now(token)
        finally:
            self.arb._leave(self.gt)                # noqa: SLF001

    def forget(self, stream: Any) -> None:
        slot = self.gt.stream_slots.pop(int(stream), None)
        if slot is not None and slot != self.gt.slot:
            self.arb.gates.release(slot)

    def context_lost(self) -> None:
        # The reset took the gates' memory (and torch's state) with it.
        self.gt.stream_slots.clear()
        self._break("the GPU context was reset after a fault")

    def _break(self, why: str) -> None:
        if not self.broken:
            self.broken = why
            log.error("%s: launches are no longer gated (%s); BE work may delay them",
                      self.gt.name, why)

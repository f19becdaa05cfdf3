"""What every arbiter offers, and the one for machines without a GPU.

An arbiter runs tenants' work: ``run_lc(t, fn)`` runs one latency-critical
request and returns fn's result once the device has finished it;
``be(t)`` is a context inside which a best-effort tenant's work is paced
(on a GPU: cut into atoms so LC work never waits behind it for long).
Hosted models, hosted jobs and the kernel's GPU work all go through one
arbiter, so ``status()`` is the whole picture for ``laked status``/``top``.

``CpuArbiter`` is the arbiter of a machine without a usable GPU: work runs
on the CPU (torch's CPU device), with the same bookkeeping; the GPU one is
``laked.sched.arbiter.GpuArbiter``.  Importable without torch or CUDA.
"""
from __future__ import annotations

import collections
import contextlib
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, TypeVar

from ..tenants import TenantSpec

T = TypeVar("T")


def percentile_ms(sorted_s: list[float], q: float) -> float | None:
    if not sorted_s:
        return None
    return sorted_s[min(len(sorted_s) - 1, int(len(sorted_s) * q))] * 1e3


@dataclass
class TenantState:
    """A tenant as the arbiter tracks it (counters only grow; top takes rates)."""
    spec: TenantSpec
    sms: int = 0                     # SMs of the partition it runs on now (0: CPU)
    requests: int = 0                # LC requests done
    items: int = 0                   # items (batch rows, samples) done
    atoms: int = 0                   # BE atoms issued
    launches: int = 0                # raw kernel launches (cu* sessions), see Tenancy
    busy_s: float = 0.0              # device time attributed to it
    energy_j: float = 0.0            # GPU energy attributed to it (NVML)
    errors: int = 0
    latencies: collections.deque[float] = field(
        default_factory=lambda: collections.deque(maxlen=4096))

    @property
    def name(self) -> str:
        return self.spec.name

    def record(self, seconds: float, items: int = 1) -> None:
        """One request done in ``seconds`` of device time."""
        self.latencies.append(seconds)
        self.requests += 1
        self.items += items
        self.busy_s += seconds

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.latencies)
        s = self.spec
        return {"name": s.name, "class": s.cls, "kind": s.kind, "uid": s.uid,
                "quota_sms": s.quota_sms, "priority": s.priority, "sms": self.sms,
                "requests": self.requests, "items": self.items, "atoms": self.atoms,
                "launches": self.launches,
                "busy_s": round(self.busy_s, 6), "energy_j": round(self.energy_j, 3),
                "errors": self.errors,
                "p50_ms": percentile_ms(lat, 0.5), "p99_ms": percentile_ms(lat, 0.99)}


class Tenancy:
    """An executor's work (cu* launches, INFER batches) as one tenant's.

    Executors call ``before_launch``/``after_launch`` around each kernel
    launch on a raw CUDA stream and wrap an INFER batch in ``request``.
    This one only counts (an unbound executor has ``Tenancy(None)``); the
    GPU arbiter's (laked.sched.tenancy) also gates the launches.
    """

    # The executor creates its streams CU_STREAM_NON_BLOCKING when this is set.
    nonblocking_streams = False

    def __init__(self, tenant: TenantState | None = None) -> None:
        self.t = tenant

    def before_launch(self, stream: Any) -> Any:
        """Called before a launch is queued on ``stream``; returns a token for after."""
        if self.t is not None:
            self.t.launches += 1
        return None

    def after_launch(self, stream: Any, token: Any) -> None:
        """Called once the launch is queued (or failed to be)."""

    def forget(self, stream: Any) -> None:
        """``stream`` was destroyed."""

    def context_lost(self) -> None:
        """The executor reset the CUDA context: its streams are gone."""

    def close(self) -> None:
        """The executor closed, its work all done."""

    def settle(self) -> None:
        """Bookkeeping a request left for after its completion was posted."""

    @contextlib.contextmanager
    def request(self, items: int) -> Iterator[None]:
        """One request (an INFER batch of ``items`` rows), timed until it is done."""
        t = self.t
        if t is None:
            yield
            return
        t0 = time.perf_counter()
        try:
            yield
        except Exception:
            t.errors += 1
            raise
        t.record(time.perf_counter() - t0, items)


class Arbiter:
    """Tenant bookkeeping shared by the CPU and GPU arbiters."""

    device = "cpu"

    def __init__(self) -> None:
        self.tenants: dict[str, TenantState] = {}
        self._tlock = threading.Lock()

    def add_tenant(self, spec: TenantSpec) -> TenantState:
        with self._tlock:
            if spec.name in self.tenants:
                raise ValueError(f"tenant {spec.name!r} exists already")
            t = self.tenants[spec.name] = self._new_state(spec)
        return t

    def _new_state(self, spec: TenantSpec) -> TenantState:
        return TenantState(spec)

    def remove_tenant(self, t: TenantState) -> None:
        with self._tlock:
            if self.tenants.get(t.name) is t:
                del self.tenants[t.name]

    def run_lc(self, t: TenantState, fn: Callable[[], T], items: int = 1) -> T:
        raise NotImplementedError

    def tenancy(self, t: TenantState) -> Tenancy:
        """How an executor's cu* launches and INFER batches run as ``t``'s work."""
        return Tenancy(t)

    @contextlib.contextmanager
    def be(self, t: TenantState) -> Iterator[None]:
        raise NotImplementedError
        yield

    def status(self) -> dict[str, Any]:
        with self._tlock:
            tenants = [t.summary() for t in self.tenants.values()]
        return {"device": self.device, "tenants": tenants}

    def close(self) -> None:
        pass


class CpuArbiter(Arbiter):
    """No GPU: work runs on the CPU, timed and counted like the GPU's."""

    device = "cpu"

    def run_lc(self, t: TenantState, fn: Callable[[], T], items: int = 1) -> T:
        t0 = time.perf_counter()
        try:
            out = fn()
        except Exception:
            t.errors += 1
            raise
        t.record(time.perf_counter() - t0, items)
        return out

    @contextlib.contextmanager
    def be(self, t: TenantState) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            t.busy_s += time.perf_counter() - t0

    def status(self) -> dict[str, Any]:
        out = super().status()
        out["why"] = "no usable GPU: hosted work runs on the CPU"
        return out


"""SM partitions as green contexts, built once from one split.

The device's SMs are split once into units of ``unit`` SMs (8 on Hopper,
the granularity green contexts allow); a partition is a run of consecutive
units (plus, optionally, the SMs the split left over) turned into a green
context with its own streams.  Creating one costs about a millisecond, so
partitions are made on first use and cached: the set a scheduler asks for
is small (the tenants' quotas and their complements).
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("laked.sched.partition")


class PartitionError(RuntimeError):
    pass


def _driver() -> Any:
    try:
        from cuda.bindings import driver
    except ImportError:
        from cuda import cuda as driver  # type: ignore[no-redef]
    return driver


def check(ret: Any, what: str) -> Any:
    err, *vals = ret if isinstance(ret, tuple) else (ret,)
    if int(err) != 0:
        raise PartitionError(f"{what} failed with CUresult {int(err)}")
    return vals[0] if len(vals) == 1 else (tuple(vals) if vals else None)


@dataclass
class Partition:
    """A green context over ``sms`` SMs and the streams made on it."""
    name: str
    sms: int
    units: tuple[int, int]          # [first, end) unit indices
    gctx: Any
    ctx: Any                        # cuCtxFromGreenCtx: for module loads
    streams: dict[int, Any] = field(default_factory=dict)   # priority -> CUstream

    def stream(self, priority: int = 0) -> Any:
        """A non-blocking stream of this partition (one per priority)."""
        st = self.streams.get(priority)
        if st is None:
            cu = _driver()
            st = check(cu.cuGreenCtxStreamCreate(
                self.gctx, int(cu.CUstream_flags.CU_STREAM_NON_BLOCKING), priority),
                "cuGreenCtxStreamCreate")
            self.streams[priority] = st
        return st

    def torch_stream(self, priority: int = 0) -> Any:
        import torch
        return torch.cuda.ExternalStream(int(self.stream(priority)))


class Partitions:
    """Every partition of one device, from a single split."""

    def __init__(self, device: int = 0, unit: int = 8) -> None:
        cu = _driver()
        self.cu = cu
        check(cu.cuInit(0), "cuInit")
        self.dev = check(cu.cuDeviceGet(device), "cuDeviceGet")
        res = check(cu.cuDeviceGetDevResource(
            self.dev, cu.CUdevResourceType.CU_DEV_RESOURCE_TYPE_SM), "cuDeviceGetDevResource")
        self.total_sms = int(res.sm.smCount)
        n = self.total_sms // unit
        units, count, rest = check(cu.cuDevSmResourceSplitByCount(n, res, 0, unit),
                                   "cuDevSmResourceSplitByCount")
        self.units = list(units)[:int(count)]
        self.rest = rest
        self.unit = unit
        self._cache: dict[tuple[int, int, bool], Partition] = {}
        self._lock = threading.Lock()
        log.info("%d SMs: %d units of %d, %d left over", self.total_sms, len(self.units),
                 unit, int(rest.sm.smCount))

    @property
    def n_units(self) -> int:
        return len(self.units)

    def get(self, first: int, end: int, with_rest: bool = False) -> Partition:
        """The partition over units [first, end) (and the leftover SMs)."""
        if not 0 <= first < end <= self.n_units:
            raise PartitionError(f"units [{first}, {end}) outside 0..{self.n_units}")
        key = (first, end, with_rest)
        with self._lock:
            p = self._cache.get(key)
            if p is None:
                p = self._cache[key] = self._make(first, end, with_rest)
        return p

    def full(self) -> Partition:
        return self.get(0, self.n_units, True)

    def tail(self, sms: int) -> Partition:
        """The last units and the leftover SMs: at most ``sms`` SMs, at least one unit."""
        rest = self.total_sms - self.n_units * self.unit
        units = max(1, min(self.n_units, (sms - rest) // self.unit))
        return self.get(self.n_units - units, self.n_units, True)

    def _make(self, first: int, end: int, with_rest: bool) -> Partition:
        cu = self.cu
        res = self.units[first:end] + ([self.rest] if with_rest and
                                       int(self.rest.sm.smCount) else [])
        desc = check(cu.cuDevResourceGenerateDesc(res, len(res)), "cuDevResourceGenerateDesc")
        gctx = check(cu.cuGreenCtxCreate(
            desc, self.dev, int(cu.CUgreenCtxCreate_flags.CU_GREEN_CTX_DEFAULT_STREAM)),
            "cuGreenCtxCreate")
        ctx = check(cu.cuCtxFromGreenCtx(gctx), "cuCtxFromGreenCtx")
        sms = sum(int(r.sm.smCount) for r in res)
        name = f"u{first}-{end}{'+r' if with_rest else ''}"
        log.info("partition %s: %d SMs", name, sms)
        return Partition(name, sms, (first, end), gctx, ctx)

    def units_for(self, sms: int) -> int:
        """Units needed to give at least ``sms`` SMs."""
        return max(1, min(self.n_units, -(-sms // self.unit)))

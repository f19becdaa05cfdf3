"""What every executor shares: op dispatch, sessions and their handles.

An executor carries out one ``lake_sqe`` at a time for the server and
answers ``(CUresult, ret0, ret1)``, or ``None`` when the completion must
wait (it then comes back later through ``reap()``).  Nothing raises out of
``execute``: bad handles, bad offsets and surprises all become CUresults,
because a kernel caller is waiting for an answer and laked must go on.

Device memory can be metered per executor (laked's user clients: per uid,
through laked.tenants.MemoryLedger): ``mem_charge(n)`` is asked before a
MEM_ALLOC reaches the handler and may refuse it (CUDA_ERROR_OUT_OF_MEMORY);
``mem_release(n)`` gives bytes back on MEM_FREE, SESSION_CLOSE and
``close()``.  This happens here, around every executor's handlers, so the
CPU and GPU executors are metered alike.
"""
from __future__ import annotations

import bisect
import itertools
import logging
from abc import ABC
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .. import abi
from ..mlp import FixedMLP
from ..region import Region, RegionError, Sqe
from ..sched.base import Tenancy

log = logging.getLogger("laked.executor")

Completion = tuple[int, int, int]
Handler = Callable[[Sqe], "Completion | None"]

OK: Completion = (abi.LAKE_CUDA_SUCCESS, 0, 0)

# op number -> lower-case name ("memcpy_htod"), from the header
OP_NAMES: dict[int, str] = {v: k.lower() for k, v in abi.names_with_prefix("LAKE_OP_").items()}


def op_name(op: int) -> str:
    return OP_NAMES.get(op, f"op{op}")


class ExecutorUnavailable(RuntimeError):
    """The executor cannot run on this machine; the message says why."""


class CuError(Exception):
    """A CUresult to hand back to the caller from deep inside a handler."""

    def __init__(self, code: int, why: str = "") -> None:
        super().__init__(why or f"CUresult {code}")
        self.code = code


class HandleError(CuError):
    def __init__(self, why: str) -> None:
        super().__init__(abi.LAKE_CUDA_ERROR_INVALID_HANDLE, why)


@dataclass
class Session:
    """One caller's objects.  Handles are opaque numbers laked hands out;
    device pointers are real ones (kernels need them), tracked by range."""

    id: int
    initialized: bool = False
    contexts: set[int] = field(default_factory=set)
    objects: dict[int, tuple[str, Any]] = field(default_factory=dict)
    alloc_bases: list[int] = field(default_factory=list)    # sorted
    alloc_sizes: dict[int, int] = field(default_factory=dict)
    lost: int = 0           # sticky CUresult after the GPU context was lost

    def get(self, handle: int, kind: str) -> Any:
        entry = self.objects.get(handle)
        if entry is None or entry[0] != kind:
            raise HandleError(f"session {self.id}: no {kind} with handle {handle:#x}")
        return entry[1]

    def of_kind(self, kind: str) -> list[tuple[int, Any]]:
        return [(h, o) for h, (k, o) in self.objects.items() if k == kind]

    def add_alloc(self, dptr: int, size: int) -> None:
        bisect.insort(self.alloc_bases, dptr)
        self.alloc_sizes[dptr] = size

    def remove_alloc(self, dptr: int) -> bool:
        if dptr not in self.alloc_sizes:
            return False
        del self.alloc_sizes[dptr]
        self.alloc_bases.pop(bisect.bisect_left(self.alloc_bases, dptr))
        return True

    def owns_range(self, dptr: int, length: int) -> bool:
        """Whether [dptr, dptr + length) lies inside one of our allocations."""
        i = bisect.bisect_right(self.alloc_bases, dptr) - 1
        if i < 0:
            return False
        base = self.alloc_bases[i]
        return dptr + length <= base + self.alloc_sizes[base]

    @property
    def device_bytes(self) -> int:
        return sum(self.alloc_sizes.values())


class Executor(ABC):
    """Dispatches ops to ``op_<name>`` methods; subclasses fill them in."""

    name = "base"
    # An fd the server polls beside the doorbell: readable when ``reap``
    # has completions (executors that finish work on other threads).
    wake_fd: int | None = None
    # Why this executor was chosen (auto falling back to the CPU says why).
    why: str = ""
    # Device-memory metering (None: unlimited); see the module docstring.
    mem_charge: Callable[[int], bool] | None = None
    mem_release: Callable[[int], None] | None = None

    def __init__(self, region: Region) -> None:
        self.region = region
        self.registered = False
        self.sessions: dict[int, Session] = {}
        # session -> dptr -> bytes charged through mem_charge
        self._charged: dict[int, dict[int, int]] = {}
        self._handles = itertools.count(1)
        self._handlers: dict[int, Handler] = {}
        self._models: dict[tuple[int, int], FixedMLP] = {}
        # whose work this is, for the arbiter (laked binds the kernel's or a client's tenant)
        self.tenancy = Tenancy()
        self._settle: Tenancy | None = None     # whose bookkeeping posted() runs
        for op, name in OP_NAMES.items():
            fn = getattr(self, f"op_{name}", None)
            if fn is not None:
                self._handlers[op] = fn

    # -- the server's interface -------------------------------------------
    def execute(self, sqe: Sqe) -> Completion | None:
        op = sqe.op
        if op == abi.LAKE_OP_MEM_ALLOC and self.mem_charge is not None:
            return self._metered_alloc(sqe)
        if op == abi.LAKE_OP_MEM_FREE and self._charged:
            return self._metered_free(sqe)
        if op == abi.LAKE_OP_SESSION_CLOSE and self._charged:
            res = self._dispatch(sqe)
            self._give_back(sum(self._charged.pop(sqe.session, {}).values()))
            return res
        return self._dispatch(sqe)

    def _metered_alloc(self, sqe: Sqe) -> Completion | None:
        n = sqe.args[0]
        if n:                               # size 0: the handler says INVALID_VALUE
            try:
                ok = self.mem_charge is not None and self.mem_charge(n)
            except Exception:  # noqa: BLE001 - a caller is waiting: refuse, do not hang it
                log.exception("mem_charge(%d) failed; refusing the allocation", n)
                ok = False
            if not ok:
                log.debug("mem_alloc of %d bytes (session %d) refused: device-memory quota",
                          n, sqe.session)
                return (abi.LAKE_CUDA_ERROR_OUT_OF_MEMORY, 0, 0)
        res = self._dispatch(sqe)
        if n and res is not None and res[0] == abi.LAKE_CUDA_SUCCESS:
            self._charged.setdefault(sqe.session, {})[res[1]] = n
        elif n:
            # Failed (or deferred, which no executor does for an alloc: it
            # could not be matched to its pointer): nothing stays charged.
            self._give_back(n)
        return res

    def _metered_free(self, sqe: Sqe) -> Completion | None:
        held = self._charged.get(sqe.session)
        n = held.get(sqe.args[0]) if held else None
        res = self._dispatch(sqe)
        if n is not None and res is not None and res[0] == abi.LAKE_CUDA_SUCCESS:
            assert held is not None
            del held[sqe.args[0]]
            if not held:
                del self._charged[sqe.session]
            self._give_back(n)
        return res

    def _give_back(self, nbytes: int) -> None:
        if nbytes and self.mem_release is not None:
            try:
                self.mem_release(nbytes)
            except Exception:  # noqa: BLE001 - bookkeeping must not fail a request
                log.exception("mem_release(%d) failed", nbytes)

    def release_charges(self) -> None:
        """Give back everything still charged (the executor is closing)."""
        charged, self._charged = self._charged, {}
        self._give_back(sum(sum(a.values()) for a in charged.values()))

    def charged_bytes(self) -> int:
        """Device bytes currently charged through ``mem_charge``."""
        return sum(sum(a.values()) for a in self._charged.values())

    def _dispatch(self, sqe: Sqe) -> Completion | None:
        handler = self._handlers.get(sqe.op)
        if handler is None:
            return (abi.LAKE_CUDA_ERROR_NOT_SUPPORTED, 0, 0)
        try:
            return handler(sqe)
        except CuError as e:
            log.debug("%s (session %d): %s", op_name(sqe.op), sqe.session, e)
            return (e.code, 0, 0)
        except (RegionError, ValueError) as e:
            log.debug("%s (session %d): %s", op_name(sqe.op), sqe.session, e)
            return (abi.LAKE_CUDA_ERROR_INVALID_VALUE, 0, 0)
        except Exception:  # noqa: BLE001 - a bug here must not take laked down
            log.exception("%s (session %d) failed unexpectedly", op_name(sqe.op), sqe.session)
            return (abi.LAKE_CUDA_ERROR_UNKNOWN, 0, 0)

    def posted(self) -> None:
        """The server posted this round's completions: the tenancy's
        bookkeeping of the round's INFER batches, which the kernel need not
        wait for, runs now (Tenancy.settle)."""
        ten, self._settle = self._settle, None
        if ten is not None:
            ten.settle()

    def reap(self) -> list[tuple[int, Completion]]:
        """Completions of requests that ``execute`` answered with None."""
        return []

    def deferred(self) -> int:
        """How many completions ``reap`` still owes."""
        return 0

    def info(self) -> dict[str, Any]:
        return {"executor": self.name, "registered": self.registered,
                "why": self.why or None, "sessions": len(self.sessions),
                "device_bytes": sum(s.device_bytes for s in self.sessions.values())}

    def close(self) -> None:
        """Free every session's objects and what the executor holds (subclasses
        that override this call it last: it gives the device-memory charges back)."""
        self.sessions.clear()
        self.release_charges()

    # -- helpers for subclasses ------------------------------------------
    def session(self, sid: int) -> Session:
        s = self.sessions.get(sid)
        if s is None:
            s = self.sessions[sid] = Session(sid)
        return s

    def new_handle(self) -> int:
        return next(self._handles)

    def payload(self, sqe: Sqe) -> memoryview:
        """The request's payload (the server has checked its bounds)."""
        if sqe.data_len == 0:
            raise CuError(abi.LAKE_CUDA_ERROR_INVALID_VALUE, "request has no payload")
        return self.region.view(sqe.data_off, sqe.data_len)

    # Every executor answers these two the same way.
    def op_null(self, sqe: Sqe) -> Completion:
        return OK

    # -- LAKE_OP_INFER: a batch through a fixed-point MLP ---------------------
    def op_infer(self, sqe: Sqe) -> Completion:
        mid, version, blob_off, blob_len, batch, n_in, n_out = sqe.args[:7]
        model = self._model(mid, version, blob_off, blob_len)
        if model.shape[0] != n_in or model.shape[-1] != n_out or not batch:
            raise CuError(abi.LAKE_CUDA_ERROR_INVALID_VALUE,
                          f"model {mid} v{version} is {model.shape}, asked {n_in}->{n_out}")
        in_len, out_len = 4 * batch * n_in, 4 * batch * n_out
        if sqe.data_len != in_len + out_len:
            raise CuError(abi.LAKE_CUDA_ERROR_INVALID_VALUE,
                          f"payload {sqe.data_len} bytes, batch {batch} needs {in_len + out_len}")
        data = self.payload(sqe)
        x = np.frombuffer(data[:in_len], dtype="<i4").reshape(batch, n_in)
        ten = self._settle = self.tenancy     # its bookkeeping waits for posted()
        with ten.request(batch):              # done once the output is in the region
            y = self.run_mlp(mid, version, model, x)
            data[in_len:] = np.ascontiguousarray(y, dtype="<i4").tobytes()
        return OK

    def _model(self, mid: int, version: int, off: int, length: int) -> FixedMLP:
        """The weights from the region blob, parsed once per version."""
        model = self._models.get((mid, version))
        if model is None:
            model = FixedMLP.from_blob(self.region.view(off, length))
            for key in [k for k in self._models if k[0] == mid]:
                self.forget_model(key)
            self._models[(mid, version)] = model
        return model

    def forget_model(self, key: tuple[int, int]) -> None:
        self._models.pop(key, None)

    def run_mlp(self, mid: int, version: int, model: FixedMLP, x: np.ndarray) -> np.ndarray:
        """The reference computation; the GPU executor runs it on the GPU."""
        return model.run(x)

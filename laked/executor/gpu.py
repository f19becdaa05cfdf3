"""The GPU executor: lake_sqe ops carried out with CUDA's driver API.

cuda-python (``cuda.bindings.driver``, or the older ``cuda.cuda``) on the
device's primary context, shared by every session (one process owns all
launches, so no MPS).  The whole region is registered with
cuMemHostRegister(DEVICEMAP) once, so copies from and to region buffers are
DMA-direct; if registration fails (or is turned off) copies go from the
pageable mapping and the driver stages them, and ``info()`` says why.

The server thread never waits for the GPU on behalf of one stream:

- async copies, stream and context synchronisation, and sync copies larger
  than ``INLINE_COPY_MAX`` record an event and complete when it fires; one
  waiter thread per CUDA stream blocks in cuEventSynchronize (the GIL is
  released there) and rings ``wake_fd`` so the server reaps at once.
  Events of one stream fire in order, so completions of one stream come
  back in submission order and a sync's completion follows those of the
  copies before it;
- launches complete once queued (as cuLaunchKernel returns); their faults
  surface at the next synchronisation, as in CUDA.

A fault that poisons a CUDA context (illegal address, launch failure, ...)
is answered to every request it touches; laked then resets the primary
context, registers the region again and goes on: the sessions alive at the
fault lose their objects and get that CUresult until they close, new
sessions work as before.  INFER runs the fixed-point MLP with a kernel
compiled once by NVRTC, bit-identical to the CPU reference.
"""
from __future__ import annotations

import ctypes
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import abi
from ..mlp import FixedMLP
from ..region import Region, Sqe, parse_launch_params
from .base import OK, Completion, CuError, Executor, ExecutorUnavailable, Session

log = logging.getLogger("laked.executor.gpu")

# Sync copies up to this size run on the server thread (a hop through a
# waiter costs more than the copy: ~85 us at 4 MiB on an H100); larger ones
# are deferred like async ones.
INLINE_COPY_MAX = 4 << 20

# A sync whose streams are busy is re-checked this long on the server
# thread before it is handed to a waiter: short kernels finish in a few
# microseconds, and the hop through a waiter thread costs tens.
SYNC_SPIN_S = 50e-6

# CUresults after which the context is unusable until reset (CUDA's "sticky" errors).
STICKY = frozenset({700, 702, 710, 714, 715, 716, 717, 718, 719})


def _import_cuda() -> tuple[Any, Any]:
    try:
        from cuda.bindings import driver, nvrtc
    except ImportError:
        try:
            from cuda import cuda as driver  # type: ignore[no-redef]
            from cuda import nvrtc  # type: ignore[no-redef]
        except ImportError as e:
            raise ExecutorUnavailable(f"cuda-python is not installed ({e})") from None
    return driver, nvrtc


MLP_SRC = r"""
extern "C" __global__ void lake_mlp_layer(const int *__restrict__ w,
        const int *__restrict__ b, const int *__restrict__ in,
        int *__restrict__ out, int n_in, int n_out, int batch, int frac,
        int relu)
{
    int o = blockIdx.x * blockDim.x + threadIdx.x;
    if (o >= n_out)
        return;
    const int *row = w + (long long)o * n_in;
    for (int k = blockIdx.y; k < batch; k += gridDim.y) {
        const int *x = in + (long long)k * n_in;
        unsigned long long acc = 0;     /* wrapping, as the ABI says */
        for (int i = 0; i < n_in; i++)
            acc += (unsigned long long)((long long)row[i] * (long long)x[i]);
        long long v = ((long long)acc >> frac) + b[o];
        v = v > 2147483647LL ? 2147483647LL : v;
        v = v < -2147483648LL ? -2147483648LL : v;
        if (relu && v < 0)
            v = 0;
        out[(long long)k * n_out + o] = (int)v;
    }
}
"""


@dataclass
class _DevModel:
    layers: list[tuple[int, int, int, int]]     # (w dptr, b dptr, n_in, n_out)
    frac: int
    max_dim: int
    bufs: list[tuple[int, int]]                 # (dptr, bytes) for the batch, grown on demand


@dataclass
class _Pending:
    """A deferred completion: done when all of its ``left`` events fired."""

    rid: int
    left: int
    result: int = 0
    ret0: int = 0


@dataclass
class GpuStats:
    deferred: int = 0           # requests completed through a waiter
    inline_syncs: int = 0       # stream/ctx syncs answered at once (already idle)
    staged_copies: int = 0      # copies from/to an unregistered region
    context_resets: int = 0
    last_fault: int = 0
    by_stream_waiters: int = 0  # waiter threads started
    faults: list[str] = field(default_factory=list)


class _Waiter:
    """Completes the events of one CUDA stream, in order, off the server thread."""

    def __init__(self, ex: "GpuExecutor", key: int) -> None:
        self.ex = ex
        self.q: queue.SimpleQueue[tuple[_Pending, Any] | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name=f"laked-gpu-wait-{key:x}",
                                       daemon=True)
        self.thread.start()

    def _run(self) -> None:
        cu = self.ex.cu
        self.ex._make_current()  # noqa: SLF001 - our own executor
        while True:
            item = self.q.get()
            if item is None:
                return
            pend, ev = item
            err, = cu.cuEventSynchronize(ev)   # releases the GIL while it waits
            self.ex._event_done(pend, ev, int(err))  # noqa: SLF001


class GpuExecutor(Executor):
    name = "gpu"

    def __init__(self, region: Region, device: int = 0, register: bool = True) -> None:
        super().__init__(region)
        self.cu, self.nvrtc = _import_cuda()
        self.device_ordinal = device
        self.register_error = ""
        self.gstats = GpuStats()
        self._tls = threading.local()
        self._gen = 0                       # bumped by every context reset
        self._lock = threading.Lock()       # guards _done, _outstanding, _fault
        self._done: list[tuple[int, Completion]] = []
        self._outstanding = 0
        self._fault = 0                     # sticky CUresult seen, not yet recovered
        self.broken = ""                    # set when a reset failed: say why, answer errors
        self._waiters: dict[int, _Waiter] = {}
        self._events: list[Any] = []        # free events, reused
        self._mlp_fn: Any = None
        self._mlp_mod: Any = None
        self._infer_st: Any = None          # INFER's own stream (greatest priority)
        self._dev_models: dict[tuple[int, int], _DevModel] = {}
        self._want_register = register
        try:
            self._check(self.cu.cuInit(0), "cuInit", unavailable=True)
            self.dev = self._check(self.cu.cuDeviceGet(device), "cuDeviceGet", unavailable=True)
            name = self._check(self.cu.cuDeviceGetName(128, self.dev), "cuDeviceGetName",
                               unavailable=True)
            self.ctx = self._check(self.cu.cuDevicePrimaryCtxRetain(self.dev),
                                   "cuDevicePrimaryCtxRetain", unavailable=True)
        except ExecutorUnavailable:
            raise
        except Exception as e:  # noqa: BLE001 - e.g. no libcuda.so: cuda-python raises its own
            raise ExecutorUnavailable(f"CUDA driver unusable: {e}") from None
        self.device_name = bytes(name).split(b"\0", 1)[0].decode()
        # cuFuncLoad needs it in the bindings and in the driver (12.4+)
        version = self._check(self.cu.cuDriverGetVersion(), "cuDriverGetVersion")
        self._func_load = hasattr(self.cu, "cuFuncLoad") and int(version) >= 12040
        self._make_current()
        # Waiters ring this; the server polls it beside the doorbell.
        self.wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._register()

    # -- CUDA plumbing ------------------------------------------------------------
    def _check(self, ret: Any, what: str, unavailable: bool = False) -> Any:
        err, *vals = ret if isinstance(ret, tuple) else (ret,)
        code = int(err)
        if code != 0:
            if unavailable:
                raise ExecutorUnavailable(f"{what} failed with CUresult {code}")
            if code in STICKY:
                self._note_fault(code, what)
            raise CuError(code, f"{what} failed with CUresult {code}")
        if not vals:
            return None
        return vals[0] if len(vals) == 1 else tuple(vals)

    def _make_current(self) -> None:
        if getattr(self._tls, "gen", -1) != self._gen:
            self._check(self.cu.cuCtxSetCurrent(self.ctx), "cuCtxSetCurrent")
            self._tls.gen = self._gen

    def _register(self) -> None:
        self._set_registered(False)
        if not self._want_register:
            self.register_error = "registration turned off; the driver stages every copy"
            log.warning("region not registered (turned off): copies are staged")
            return
        flags = (self.cu.CU_MEMHOSTREGISTER_DEVICEMAP
                 if hasattr(self.cu, "CU_MEMHOSTREGISTER_DEVICEMAP")
                 else self.cu.CUmemhostregister_flags.CU_MEMHOSTREGISTER_DEVICEMAP)
        err, = self.cu.cuMemHostRegister(self.region.address, self.region.size, int(flags))
        if int(err) == 0:
            self._set_registered(True)
            self.register_error = ""
            log.info("region registered with CUDA (%d MiB, device-mapped)",
                     self.region.size >> 20)
        else:
            self.register_error = (f"cuMemHostRegister failed with CUresult {int(err)}; "
                                   "the driver stages every copy")
            log.warning("region not registered: %s", self.register_error)

    def _set_registered(self, yes: bool) -> None:
        """Ours, and the header's LAKE_DAEMON_F_REGISTERED for the kernel to read."""
        self.registered = yes
        flags = self.region.daemon_flags & ~abi.LAKE_DAEMON_F_REGISTERED
        self.region.daemon_flags = flags | (abi.LAKE_DAEMON_F_REGISTERED if yes else 0)

    def info(self) -> dict[str, Any]:
        out = super().info()
        g = self.gstats
        out.update(device=self.device_name, register_error=self.register_error or None,
                   copies="zero-copy (registered)" if self.registered else "staged",
                   deferred_now=self.deferred(), deferred_total=g.deferred,
                   inline_syncs=g.inline_syncs, staged_copies=g.staged_copies,
                   stream_waiters=len(self._waiters), context_resets=g.context_resets,
                   last_fault=g.last_fault or None, broken=self.broken or None)
        return out

    # -- the server's interface -----------------------------------------------------
    def execute(self, sqe: Sqe) -> Completion | None:
        if self._fault:
            self._recover()
        if self.broken:
            if sqe.op == abi.LAKE_OP_SESSION_CLOSE:
                self.sessions.pop(sqe.session, None)
            if sqe.op in (abi.LAKE_OP_NULL, abi.LAKE_OP_SESSION_CLOSE):
                return OK
            return (self.gstats.last_fault or abi.LAKE_CUDA_ERROR_UNKNOWN, 0, 0)
        self._make_current()
        s = self.sessions.get(sqe.session)
        if s is not None and s.lost and sqe.op not in (abi.LAKE_OP_NULL,
                                                       abi.LAKE_OP_SESSION_CLOSE):
            return (s.lost, 0, 0)    # its objects died with the context
        return super().execute(sqe)

    def reap(self) -> list[tuple[int, Completion]]:
        # The doorbell resets wake_fd; waiters append before they ring it.
        if self._fault and not self._outstanding:
            self._recover()
        if not self._done:
            return []
        with self._lock:
            done, self._done = self._done, []
        return done

    def deferred(self) -> int:
        return self._outstanding

    # -- deferred completions -------------------------------------------------------
    def _event(self) -> Any:
        try:
            return self._events.pop()
        except IndexError:
            return self._check(self.cu.cuEventCreate(
                int(self.cu.CUevent_flags.CU_EVENT_DISABLE_TIMING)), "cuEventCreate")

    def _waiter(self, stream: Any) -> _Waiter:
        key = int(stream)
        w = self._waiters.get(key)
        if w is None:
            w = self._waiters[key] = _Waiter(self, key)
            self.gstats.by_stream_waiters += 1
        return w

    def _defer(self, rid: int, streams: list[Any], ret0: int = 0) -> None:
        """Complete ``rid`` once everything queued so far on ``streams`` is done."""
        pend = _Pending(rid, len(streams), ret0=ret0)
        recorded = []
        try:
            for st in streams:
                ev = self._event()
                self._check(self.cu.cuEventRecord(ev, st), "cuEventRecord")
                recorded.append((st, ev))
        except CuError:
            for _st, ev in recorded:   # nothing handed to a waiter yet: undo
                self._events.append(ev)
            raise
        with self._lock:
            self._outstanding += 1
        self.gstats.deferred += 1
        for st, ev in recorded:
            self._waiter(st).q.put((pend, ev))

    def _event_done(self, pend: _Pending, ev: Any, err: int) -> None:
        """On a waiter thread: one event of ``pend`` fired (or failed)."""
        if err in STICKY:
            self._note_fault(err, "cuEventSynchronize")
            self.cu.cuEventDestroy(ev)   # the context is going away: do not reuse
        else:
            self._events.append(ev)
        with self._lock:
            if err and not pend.result:
                pend.result = err
            pend.left -= 1
            if pend.left:
                return
            self._outstanding -= 1
            self._done.append((pend.rid, (pend.result, pend.ret0 if not pend.result else 0, 0)))
        os.eventfd_write(self.wake_fd, 1)

    def _note_fault(self, code: int, what: str) -> None:
        with self._lock:
            if not self._fault:
                self._fault = code
                self.gstats.last_fault = code
                self.gstats.faults.append(f"{what}: CUresult {code}")
                del self.gstats.faults[:-8]
        log.error("GPU fault %d (%s): the CUDA context must be reset", code, what)

    def _stop_waiters(self) -> None:
        for w in self._waiters.values():
            w.q.put(None)
        for w in self._waiters.values():
            w.thread.join(10)
        self._waiters.clear()

    def _recover(self) -> None:
        """Reset the poisoned context once every waiter has seen the fault."""
        if self._outstanding:
            return      # waiters still hold events of the old context; reap retries
        code = self._fault
        log.error("resetting the CUDA context after fault %d; %d session(s) lose their "
                  "objects", code, len(self.sessions))
        self._stop_waiters()
        for s in self.sessions.values():
            s.lost = s.lost or code
            s.objects.clear()
            s.contexts.clear()
            s.alloc_sizes.clear()
            s.alloc_bases.clear()
        self._events.clear()
        self._mlp_fn = self._mlp_mod = self._infer_st = None
        self.tenancy.context_lost()
        self._dev_models.clear()
        self._models.clear()
        if self.registered:
            self.cu.cuMemHostUnregister(self.region.address)
            self._set_registered(False)
        try:
            self._reset_context()
        except Exception as e:  # noqa: BLE001 - whatever it was, laked must keep answering
            self.broken = (f"GPU context lost (CUresult {code}) and not recoverable in this "
                           f"process ({e}); restart laked")
            log.error("%s", self.broken)
        else:
            self._register()
            self.gstats.context_resets += 1
            log.warning("CUDA context reset after fault %d; serving again", code)
        with self._lock:
            self._fault = 0

    def _reset_context(self) -> None:
        """A fresh primary context: reset, drop ours, retain a new one, probe it."""
        cu = self.cu
        cu.cuCtxSetCurrent(cu.CUcontext(0))     # the poisoned one must not stay current
        err, = cu.cuDevicePrimaryCtxReset(self.dev)
        if int(err):
            log.warning("cuDevicePrimaryCtxReset: CUresult %d", int(err))
        cu.cuDevicePrimaryCtxRelease(self.dev)
        self.ctx = self._check(cu.cuDevicePrimaryCtxRetain(self.dev), "cuDevicePrimaryCtxRetain")
        self._gen += 1
        self._make_current()
        probe = self._check(cu.cuMemAlloc(4096), "cuMemAlloc (probe after reset)")
        self._check(cu.cuMemFree(probe), "cuMemFree (probe after reset)")

    # -- helpers ------------------------------------------------------------------------
    def _stream(self, sqe: Sqe, handle: int) -> Any:
        if not (sqe.flags & abi.LAKE_SQE_F_ASYNC) or handle == 0:
            return self.cu.CUstream(0)
        return self.session(sqe.session).get(handle, "stream")

    def _host_ptr(self, off: int, n: int) -> int:
        self.region.check_heap(off, n)
        return self.region.ptr(off)

    def _owned(self, sqe: Sqe, dptr: int, n: int) -> None:
        if n == 0 or not self.session(sqe.session).owns_range(dptr, n):
            raise CuError(abi.LAKE_CUDA_ERROR_INVALID_VALUE,
                          f"[{dptr:#x}, +{n}) is not memory session {sqe.session} allocated")

    def _copy(self, sqe: Sqe, htod: bool, dptr: int, off: int, n: int,
              stream_h: int) -> Completion | None:
        self._owned(sqe, dptr, n)
        host = self._host_ptr(off, n)
        stream = self._stream(sqe, stream_h)
        what = "cuMemcpyHtoD" if htod else "cuMemcpyDtoH"
        if not self.registered:
            # Pageable source or destination: the driver stages it and the
            # call returns when the host side is done with (the kernel may
            # free a staged payload as soon as it has the completion).
            self.gstats.staged_copies += 1
            if htod:
                self._check(self.cu.cuMemcpyHtoD(dptr, host, n), what)
            else:
                self._check(self.cu.cuMemcpyDtoH(host, dptr, n), what)
            return OK
        is_async = bool(sqe.flags & abi.LAKE_SQE_F_ASYNC)
        if not is_async and n <= INLINE_COPY_MAX:
            if htod:
                self._check(self.cu.cuMemcpyHtoD(dptr, host, n), what)
            else:
                self._check(self.cu.cuMemcpyDtoH(host, dptr, n), what)
            return OK
        # Async, or a large sync copy: queue it (on the legacy stream for a
        # sync one, which orders it with all blocking streams, like cuMemcpy)
        if htod:
            self._check(self.cu.cuMemcpyHtoDAsync(dptr, host, n, stream), what + "Async")
        else:
            self._check(self.cu.cuMemcpyDtoHAsync(host, dptr, n, stream), what + "Async")
        self._defer(sqe.id, [stream])
        return None

    def _sync(self, sqe: Sqe, streams: list[Any]) -> Completion | None:
        """Complete at once if ``streams`` are idle, else when they drain."""
        not_ready = int(self.cu.CUresult.CUDA_ERROR_NOT_READY)
        busy = streams
        deadline = time.perf_counter() + SYNC_SPIN_S
        while True:
            still = []
            for st in busy:
                err, = self.cu.cuStreamQuery(st)
                code = int(err)
                if code == not_ready:
                    still.append(st)
                elif code:
                    if code in STICKY:
                        self._note_fault(code, "cuStreamQuery")
                    return (code, 0, 0)
            busy = still
            if not busy:
                self.gstats.inline_syncs += 1
                return OK
            if time.perf_counter() > deadline:
                break
        self._defer(sqe.id, busy)
        return None

    # -- ops ----------------------------------------------------------------------------
    def op_init(self, sqe: Sqe) -> Completion:
        self.session(sqe.session).initialized = True
        return OK

    def op_device_get(self, sqe: Sqe) -> Completion:
        count = self._check(self.cu.cuDeviceGetCount(), "cuDeviceGetCount")
        if sqe.args[0] != self.device_ordinal or not 0 <= sqe.args[0] < count:
            return (abi.LAKE_CUDA_ERROR_INVALID_DEVICE, 0, 0)   # laked serves one device
        return (0, sqe.args[0], 0)

    def op_ctx_create(self, sqe: Sqe) -> Completion:
        if sqe.args[1] != self.device_ordinal:
            return (abi.LAKE_CUDA_ERROR_INVALID_DEVICE, 0, 0)
        s = self.session(sqe.session)
        h = self.new_handle()
        s.objects[h] = ("ctx", self.ctx)     # every session shares the primary context
        s.contexts.add(h)
        return (0, h, 0)

    def op_ctx_destroy(self, sqe: Sqe) -> Completion:
        s = self.session(sqe.session)
        s.get(sqe.args[0], "ctx")
        del s.objects[sqe.args[0]]
        s.contexts.discard(sqe.args[0])
        return OK

    def op_ctx_sync(self, sqe: Sqe) -> Completion | None:
        # The legacy stream orders after every blocking stream; the
        # session's own streams cover those created non-blocking.
        s = self.session(sqe.session)
        return self._sync(sqe, [self.cu.CUstream(0)] + [st for _h, st in s.of_kind("stream")])

    def op_module_load(self, sqe: Sqe) -> Completion:
        image = bytes(self.payload(sqe))
        if not image.endswith(b"\0"):
            image += b"\0"      # PTX is text: CUDA wants it terminated (harmless for cubin)
        mod = self._check(self.cu.cuModuleLoadData(image), "cuModuleLoadData")
        h = self.new_handle()
        self.session(sqe.session).objects[h] = ("module", mod)
        return (0, h, 0)

    def op_module_unload(self, sqe: Sqe) -> Completion:
        s = self.session(sqe.session)
        self._check(self.cu.cuModuleUnload(s.get(sqe.args[0], "module")), "cuModuleUnload")
        del s.objects[sqe.args[0]]
        return OK

    def op_module_get_function(self, sqe: Sqe) -> Completion:
        s = self.session(sqe.session)
        mod = s.get(sqe.args[0], "module")
        name = bytes(self.payload(sqe)).split(b"\0", 1)[0]
        fn = self._function(mod, name)
        h = self.new_handle()
        s.objects[h] = ("function", fn)
        return (0, h, 0)

    def _function(self, mod: Any, name: bytes) -> Any:
        """A function, loaded now: with lazy loading its first launch would
        allocate device memory, which must not happen while a gate is shut
        (laked/sched/gate.py)."""
        fn = self._check(self.cu.cuModuleGetFunction(mod, name), "cuModuleGetFunction")
        if self._func_load:
            self._check(self.cu.cuFuncLoad(fn), "cuFuncLoad")
        return fn

    def op_mem_alloc(self, sqe: Sqe) -> Completion:
        if sqe.args[0] == 0:
            return (abi.LAKE_CUDA_ERROR_INVALID_VALUE, 0, 0)
        dptr = int(self._check(self.cu.cuMemAlloc(sqe.args[0]), "cuMemAlloc"))
        self.session(sqe.session).add_alloc(dptr, sqe.args[0])
        return (0, dptr, 0)

    def op_mem_free(self, sqe: Sqe) -> Completion:
        s = self.session(sqe.session)
        if sqe.args[0] not in s.alloc_sizes:
            return (abi.LAKE_CUDA_ERROR_INVALID_VALUE, 0, 0)
        self._check(self.cu.cuMemFree(sqe.args[0]), "cuMemFree")
        s.remove_alloc(sqe.args[0])
        return OK

    def op_memcpy_htod(self, sqe: Sqe) -> Completion | None:
        dptr, off, n, stream_h = sqe.args[:4]
        return self._copy(sqe, True, dptr, off, n, stream_h)

    def op_memcpy_dtoh(self, sqe: Sqe) -> Completion | None:
        off, dptr, n, stream_h = sqe.args[:4]
        return self._copy(sqe, False, dptr, off, n, stream_h)

    def op_launch(self, sqe: Sqe) -> Completion:
        a = sqe.args
        fn = self.session(sqe.session).get(a[0], "function")
        if any(not 0 <= v <= 0xFFFFFFFF for v in a[1:8]):
            raise CuError(abi.LAKE_CUDA_ERROR_INVALID_VALUE, f"launch dimensions {a[1:8]}")
        # kernelParams point straight at the values in the payload: the
        # driver copies them before cuLaunchKernel returns.
        params = parse_launch_params(self.payload(sqe), base=sqe.data_off)
        base = self.region.address
        ptrs = (ctypes.c_void_p * max(1, len(params)))(*[base + o for o, _n in params])
        stream = self._stream(sqe, a[8])
        token = self.tenancy.before_launch(stream)     # the arbiter's gate
        try:
            self._check(self.cu.cuLaunchKernel(fn, a[1], a[2], a[3], a[4], a[5], a[6], a[7],
                                               stream, ctypes.addressof(ptrs), 0),
                        "cuLaunchKernel")
        finally:
            self.tenancy.after_launch(stream, token)
        return OK

    def op_stream_create(self, sqe: Sqe) -> Completion:
        flags = sqe.args[0]
        if self.tenancy.nonblocking_streams:    # a BE tenant's (laked/sched/tenancy.py)
            flags |= int(self.cu.CUstream_flags.CU_STREAM_NON_BLOCKING)
        st = self._check(self.cu.cuStreamCreate(flags), "cuStreamCreate")
        h = self.new_handle()
        self.session(sqe.session).objects[h] = ("stream", st)
        return (0, h, 0)

    def op_stream_destroy(self, sqe: Sqe) -> Completion:
        s = self.session(sqe.session)
        st = s.get(sqe.args[0], "stream")
        self.tenancy.forget(st)     # its gate goes back once its queued work has run
        # CUDA destroys it once its work is done; its waiter drains, then ends.
        self._check(self.cu.cuStreamDestroy(st), "cuStreamDestroy")
        del s.objects[sqe.args[0]]
        w = self._waiters.pop(int(st), None)
        if w is not None:
            w.q.put(None)
        return OK

    def op_stream_sync(self, sqe: Sqe) -> Completion | None:
        stream = (self.session(sqe.session).get(sqe.args[0], "stream") if sqe.args[0]
                  else self.cu.CUstream(0))
        return self._sync(sqe, [stream])

    def op_session_close(self, sqe: Sqe) -> Completion:
        s = self.sessions.pop(sqe.session, None)
        if s is not None:
            self._free_session(s)
        return OK

    def _free_session(self, s: Session) -> None:
        streams = [st for _h, st in s.of_kind("stream")]
        for st in streams:
            self.cu.cuStreamSynchronize(st)     # nothing of theirs may still run
        if s.alloc_sizes:
            self.cu.cuStreamSynchronize(self.cu.CUstream(0))
        for dptr in list(s.alloc_sizes):
            self.cu.cuMemFree(dptr)
        for st in streams:
            self.tenancy.forget(st)
            self.cu.cuStreamDestroy(st)
            w = self._waiters.pop(int(st), None)
            if w is not None:
                w.q.put(None)
        for _h, mod in s.of_kind("module"):
            self.cu.cuModuleUnload(mod)
        s.objects.clear()
        s.alloc_sizes.clear()
        s.alloc_bases.clear()

    def close(self) -> None:
        try:
            self._make_current()
            self.cu.cuCtxSynchronize()
            self._stop_waiters()
            for s in list(self.sessions.values()):
                if not s.lost:
                    self._free_session(s)
            for key in list(self._dev_models):
                self.forget_model(key)
            for ev in self._events:
                self.cu.cuEventDestroy(ev)
            self._events.clear()
            if self._infer_st is not None:
                self.tenancy.forget(self._infer_st)
                self.cu.cuStreamDestroy(self._infer_st)
                self._infer_st = None
            self.tenancy.close()
            if self.registered:
                self.cu.cuMemHostUnregister(self.region.address)
                self._set_registered(False)
            self.cu.cuDevicePrimaryCtxRelease(self.dev)
            os.close(self.wake_fd)
        finally:
            super().close()     # forgets the sessions, gives device-memory charges back

    # -- INFER on the GPU -------------------------------------------------------------------
    def _compile_mlp(self) -> Any:
        if self._mlp_fn is not None:
            return self._mlp_fn
        nv = self.nvrtc
        major = self._check(self.cu.cuDeviceGetAttribute(
            self.cu.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, self.dev),
            "cuDeviceGetAttribute")
        minor = self._check(self.cu.cuDeviceGetAttribute(
            self.cu.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, self.dev),
            "cuDeviceGetAttribute")
        err, prog = nv.nvrtcCreateProgram(MLP_SRC.encode(), b"lake_mlp.cu", 0, [], [])
        if int(err) != 0:
            raise CuError(abi.LAKE_CUDA_ERROR_UNKNOWN, f"nvrtcCreateProgram: {int(err)}")
        opts = [f"--gpu-architecture=compute_{major}{minor}".encode()]
        err, = nv.nvrtcCompileProgram(prog, len(opts), opts)
        if int(err) != 0:
            _, n = nv.nvrtcGetProgramLogSize(prog)
            logbuf = b" " * n
            nv.nvrtcGetProgramLog(prog, logbuf)
            raise CuError(abi.LAKE_CUDA_ERROR_UNKNOWN, f"NVRTC: {logbuf.decode(errors='replace')}")
        _, size = nv.nvrtcGetPTXSize(prog)
        ptx = b" " * size
        nv.nvrtcGetPTX(prog, ptx)
        nv.nvrtcDestroyProgram(prog)
        self._mlp_mod = self._check(self.cu.cuModuleLoadData(ptx), "cuModuleLoadData")
        self._mlp_fn = self._function(self._mlp_mod, b"lake_mlp_layer")
        return self._mlp_fn

    def _infer_stream(self) -> Any:
        """INFER's stream: non-blocking (kernel sessions' work on the legacy
        stream does not order it) at the greatest priority."""
        if self._infer_st is None:
            _lo, hi = self._check(self.cu.cuCtxGetStreamPriorityRange(), "priority range")
            flags = int(self.cu.CUstream_flags.CU_STREAM_NON_BLOCKING)
            self._infer_st = self._check(self.cu.cuStreamCreateWithPriority(flags, hi),
                                         "cuStreamCreateWithPriority")
        return self._infer_st

    def _upload(self, model: FixedMLP) -> _DevModel:
        layers = []
        for w, b in zip(model.w, model.b):
            ptrs = []
            for arr in (np.ascontiguousarray(w, np.int32), np.ascontiguousarray(b, np.int32)):
                d = int(self._check(self.cu.cuMemAlloc(arr.nbytes), "cuMemAlloc"))
                self._check(self.cu.cuMemcpyHtoD(d, arr.ctypes.data, arr.nbytes), "cuMemcpyHtoD")
                ptrs.append(d)
            layers.append((ptrs[0], ptrs[1], w.shape[1], w.shape[0]))
        return _DevModel(layers, model.frac, max(model.shape), [])

    def forget_model(self, key: tuple[int, int]) -> None:
        super().forget_model(key)
        dm = self._dev_models.pop(key, None)
        if dm is not None:
            for w, b, _, _ in dm.layers:
                self.cu.cuMemFree(w)
                self.cu.cuMemFree(b)
            for d, _ in dm.bufs:
                self.cu.cuMemFree(d)

    def _batch_bufs(self, dm: _DevModel, batch: int) -> list[int]:
        need = 4 * batch * dm.max_dim
        if not dm.bufs or dm.bufs[0][1] < need:
            for d, _ in dm.bufs:
                self.cu.cuMemFree(d)
            dm.bufs = [(int(self._check(self.cu.cuMemAlloc(need), "cuMemAlloc")), need)
                       for _ in range(2)]
        return [d for d, _ in dm.bufs]

    def run_mlp(self, mid: int, version: int, model: FixedMLP, x: np.ndarray) -> np.ndarray:
        fn = self._compile_mlp()
        dm = self._dev_models.get((mid, version))
        if dm is None:
            dm = self._dev_models[(mid, version)] = self._upload(model)
        batch = x.shape[0]
        a, b = self._batch_bufs(dm, batch)          # allocations first: no gate is shut yet
        st = self._infer_stream()
        xs = np.ascontiguousarray(x, np.int32)
        self._check(self.cu.cuMemcpyHtoDAsync(a, xs.ctypes.data, xs.nbytes, st),
                    "cuMemcpyHtoDAsync")
        token = self.tenancy.before_launch(st)      # one gate for the whole batch
        try:
            src = self._mlp_layers(fn, dm, batch, a, b, st)
        finally:
            self.tenancy.after_launch(st, token)
        out = np.empty((batch, dm.layers[-1][3]), np.int32)
        # pageable destination: returns once the copy (and the layers) are done
        self._check(self.cu.cuMemcpyDtoHAsync(out.ctypes.data, src, out.nbytes, st),
                    "cuMemcpyDtoHAsync")
        self._check(self.cu.cuStreamSynchronize(st), "cuStreamSynchronize")
        return out

    def _mlp_layers(self, fn: Any, dm: _DevModel, batch: int, a: int, b: int,
                    st: Any) -> int:
        """Queue every layer on ``st``; returns the buffer holding the output."""
        src, dst = a, b
        for i, (w, bias, n_in, n_out) in enumerate(dm.layers):
            relu = int(i != len(dm.layers) - 1)
            vals = [ctypes.c_uint64(w), ctypes.c_uint64(bias), ctypes.c_uint64(src),
                    ctypes.c_uint64(dst), ctypes.c_int(n_in), ctypes.c_int(n_out),
                    ctypes.c_int(batch), ctypes.c_int(dm.frac), ctypes.c_int(relu)]
            ptrs = (ctypes.c_void_p * len(vals))(*[ctypes.addressof(v) for v in vals])
            block = min(256, max(32, n_out))
            grid_y = min(batch, 65535)
            self._check(self.cu.cuLaunchKernel(fn, (n_out + block - 1) // block, grid_y, 1,
                                               block, 1, 1, 0, st,
                                               ctypes.addressof(ptrs), 0), "cuLaunchKernel")
            src, dst = dst, src
        return src

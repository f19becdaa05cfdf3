"""The GPU executor: lake_sqe ops carried out with CUDA's driver API.

cuda-python (``cuda.bindings.driver``, or the older ``cuda.cuda``) and the
device's primary context.  The whole region is registered with
cuMemHostRegister(DEVICEMAP) once, so copies from and to region buffers are
DMA-direct; if registration fails the executor stages copies through
pageable memory and says so in ``info()``.  Async copies complete when an
event recorded after them fires (the kernel frees staged payloads on
completion); launches complete once queued, their errors surface at the
next synchronize, as CUDA's do.  INFER runs the fixed-point MLP with a
kernel compiled once by NVRTC, bit-identical to the CPU reference.
"""
from __future__ import annotations

import ctypes
import logging
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import abi
from ..mlp import FixedMLP
from ..region import Region, Sqe, parse_launch_params
from .base import OK, Completion, CuError, Executor, ExecutorUnavailable

log = logging.getLogger("laked.executor.gpu")


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


class GpuExecutor(Executor):
    name = "gpu"

    def __init__(self, region: Region, device: int = 0, register: bool = True) -> None:
        super().__init__(region)
        self.cu, self.nvrtc = _import_cuda()
        self.device_ordinal = device
        self.register_error = ""
        self._ctx_lock = threading.Lock()
        self._current: set[int] = set()
        self._deferred: list[tuple[int, Any]] = []
        self._mlp_fn: Any = None
        self._dev_models: dict[tuple[int, int], _DevModel] = {}
        self._check(self.cu.cuInit(0), "cuInit", unavailable=True)
        self.dev = self._check(self.cu.cuDeviceGet(device), "cuDeviceGet", unavailable=True)
        name = self._check(self.cu.cuDeviceGetName(128, self.dev), "cuDeviceGetName")
        self.device_name = bytes(name).split(b"\0", 1)[0].decode()
        self.ctx = self._check(self.cu.cuDevicePrimaryCtxRetain(self.dev),
                               "cuDevicePrimaryCtxRetain", unavailable=True)
        self._make_current()
        if register:
            self._register()

    # -- CUDA plumbing ------------------------------------------------------------
    def _check(self, ret: Any, what: str, unavailable: bool = False) -> Any:
        err, *vals = ret if isinstance(ret, tuple) else (ret,)
        code = int(err)
        if code != 0:
            if unavailable:
                raise ExecutorUnavailable(f"{what} failed with CUresult {code}")
            raise CuError(code, f"{what} failed with CUresult {code}")
        if not vals:
            return None
        return vals[0] if len(vals) == 1 else tuple(vals)

    def _make_current(self) -> None:
        tid = threading.get_ident()
        if tid not in self._current:
            self._check(self.cu.cuCtxSetCurrent(self.ctx), "cuCtxSetCurrent")
            self._current.add(tid)

    def _register(self) -> None:
        flags = (self.cu.CU_MEMHOSTREGISTER_DEVICEMAP
                 if hasattr(self.cu, "CU_MEMHOSTREGISTER_DEVICEMAP")
                 else self.cu.CUmemhostregister_flags.CU_MEMHOSTREGISTER_DEVICEMAP)
        err, = self.cu.cuMemHostRegister(self.region.address, self.region.size, int(flags))
        if int(err) == 0:
            self.registered = True
            log.info("region registered with CUDA (%d MiB, device-mapped)",
                     self.region.size >> 20)
        else:
            self.register_error = f"cuMemHostRegister failed with CUresult {int(err)}"
            log.warning("%s: copies will be staged", self.register_error)

    def info(self) -> dict[str, Any]:
        out = super().info()
        out.update(device=self.device_name, register_error=self.register_error or None,
                   deferred=len(self._deferred))
        return out

    def execute(self, sqe: Sqe) -> Completion | None:
        self._make_current()
        return super().execute(sqe)

    # -- deferred completions -------------------------------------------------------
    def _defer(self, sqe: Sqe, stream: Any) -> None:
        ev = self._check(self.cu.cuEventCreate(
            int(self.cu.CUevent_flags.CU_EVENT_DISABLE_TIMING)), "cuEventCreate")
        self._check(self.cu.cuEventRecord(ev, stream), "cuEventRecord")
        self._deferred.append((sqe.id, ev))

    def reap(self) -> list[tuple[int, Completion]]:
        if not self._deferred:
            return []
        self._make_current()
        done, keep = [], []
        not_ready = int(self.cu.CUresult.CUDA_ERROR_NOT_READY)
        for rid, ev in self._deferred:
            err, = self.cu.cuEventQuery(ev)
            if int(err) == not_ready:
                keep.append((rid, ev))
                continue
            self.cu.cuEventDestroy(ev)
            done.append((rid, (int(err), 0, 0)))
        self._deferred = keep
        return done

    def deferred(self) -> int:
        return len(self._deferred)

    # -- helpers ------------------------------------------------------------------------
    def _stream(self, sqe: Sqe, handle: int) -> Any:
        if not (sqe.flags & abi.LAKE_SQE_F_ASYNC) or handle == 0:
            return self.cu.CUstream(0)
        return self.session(sqe.session).get(handle, "stream")

    def _host_ptr(self, off: int, n: int) -> int:
        self.region.check_heap(off, n)
        return self.region.ptr(off)

    def _owned(self, sqe: Sqe, dptr: int, n: int) -> None:
        if not self.session(sqe.session).owns_range(dptr, n):
            raise CuError(abi.LAKE_CUDA_ERROR_INVALID_VALUE,
                          f"[{dptr:#x}, +{n}) is not memory session {sqe.session} allocated")

    # -- ops ----------------------------------------------------------------------------
    def op_init(self, sqe: Sqe) -> Completion:
        self.session(sqe.session).initialized = True
        return OK

    def op_device_get(self, sqe: Sqe) -> Completion:
        count = self._check(self.cu.cuDeviceGetCount(), "cuDeviceGetCount")
        if not 0 <= sqe.args[0] < count:
            return (abi.LAKE_CUDA_ERROR_INVALID_DEVICE, 0, 0)
        return (0, sqe.args[0], 0)

    def op_ctx_create(self, sqe: Sqe) -> Completion:
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

    def op_ctx_sync(self, sqe: Sqe) -> Completion:
        self._check(self.cu.cuCtxSynchronize(), "cuCtxSynchronize")
        return OK

    def op_module_load(self, sqe: Sqe) -> Completion:
        image = bytes(self.payload(sqe))
        if not image.endswith(b"\0"):
            image += b"\0"      # PTX is text: CUDA wants it terminated
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
        fn = self._check(self.cu.cuModuleGetFunction(mod, name), "cuModuleGetFunction")
        h = self.new_handle()
        s.objects[h] = ("function", fn)
        return (0, h, 0)

    def op_mem_alloc(self, sqe: Sqe) -> Completion:
        if sqe.args[0] == 0:
            return (abi.LAKE_CUDA_ERROR_INVALID_VALUE, 0, 0)
        dptr = int(self._check(self.cu.cuMemAlloc(sqe.args[0]), "cuMemAlloc"))
        self.session(sqe.session).add_alloc(dptr, sqe.args[0])
        return (0, dptr, 0)

    def op_mem_free(self, sqe: Sqe) -> Completion:
        s = self.session(sqe.session)
        if not s.remove_alloc(sqe.args[0]):
            return (abi.LAKE_CUDA_ERROR_INVALID_VALUE, 0, 0)
        self._check(self.cu.cuMemFree(sqe.args[0]), "cuMemFree")
        return OK

    def op_memcpy_htod(self, sqe: Sqe) -> Completion | None:
        dptr, off, n, stream_h = sqe.args[:4]
        self._owned(sqe, dptr, n)
        host = self._host_ptr(off, n)
        stream = self._stream(sqe, stream_h)
        if not self.registered:
            staged = np.frombuffer(self.region.read(off, n), np.uint8)
            self._check(self.cu.cuMemcpyHtoD(dptr, staged.ctypes.data, n), "cuMemcpyHtoD")
            return OK
        if sqe.flags & abi.LAKE_SQE_F_ASYNC:
            self._check(self.cu.cuMemcpyHtoDAsync(dptr, host, n, stream), "cuMemcpyHtoDAsync")
            self._defer(sqe, stream)
            return None
        self._check(self.cu.cuMemcpyHtoD(dptr, host, n), "cuMemcpyHtoD")
        return OK

    def op_memcpy_dtoh(self, sqe: Sqe) -> Completion | None:
        off, dptr, n, stream_h = sqe.args[:4]
        self._owned(sqe, dptr, n)
        host = self._host_ptr(off, n)
        stream = self._stream(sqe, stream_h)
        if not self.registered:
            staged = np.empty(n, np.uint8)
            self._check(self.cu.cuMemcpyDtoH(staged.ctypes.data, dptr, n), "cuMemcpyDtoH")
            self.region.write(off, staged.tobytes())
            return OK
        if sqe.flags & abi.LAKE_SQE_F_ASYNC:
            self._check(self.cu.cuMemcpyDtoHAsync(host, dptr, n, stream), "cuMemcpyDtoHAsync")
            self._defer(sqe, stream)
            return None
        self._check(self.cu.cuMemcpyDtoH(host, dptr, n), "cuMemcpyDtoH")
        return OK

    def op_launch(self, sqe: Sqe) -> Completion:
        a = sqe.args
        fn = self.session(sqe.session).get(a[0], "function")
        data = self.payload(sqe)
        params = parse_launch_params(data)
        bufs = [ctypes.create_string_buffer(bytes(data[o:o + n]), n) for o, n in params]
        ptrs = (ctypes.c_void_p * max(1, len(bufs)))(*[ctypes.addressof(b) for b in bufs])
        stream = self._stream(sqe, a[8])
        self._check(self.cu.cuLaunchKernel(fn, a[1], a[2], a[3], a[4], a[5], a[6], a[7],
                                           stream, ctypes.addressof(ptrs), 0),
                    "cuLaunchKernel")
        return OK

    def op_stream_create(self, sqe: Sqe) -> Completion:
        st = self._check(self.cu.cuStreamCreate(sqe.args[0]), "cuStreamCreate")
        h = self.new_handle()
        self.session(sqe.session).objects[h] = ("stream", st)
        return (0, h, 0)

    def op_stream_destroy(self, sqe: Sqe) -> Completion:
        s = self.session(sqe.session)
        self._check(self.cu.cuStreamDestroy(s.get(sqe.args[0], "stream")), "cuStreamDestroy")
        del s.objects[sqe.args[0]]
        return OK

    def op_stream_sync(self, sqe: Sqe) -> Completion:
        stream = (self.session(sqe.session).get(sqe.args[0], "stream") if sqe.args[0]
                  else self.cu.CUstream(0))
        self._check(self.cu.cuStreamSynchronize(stream), "cuStreamSynchronize")
        return OK

    def op_session_close(self, sqe: Sqe) -> Completion:
        s = self.sessions.pop(sqe.session, None)
        if s is not None:
            self._free_session(s)
        return OK

    def _free_session(self, s: Any) -> None:
        self.cu.cuCtxSynchronize()   # nothing of theirs may still run
        for dptr in list(s.alloc_sizes):
            self.cu.cuMemFree(dptr)
        for _h, (kind, obj) in list(s.objects.items()):
            if kind == "stream":
                self.cu.cuStreamDestroy(obj)
            elif kind == "module":
                self.cu.cuModuleUnload(obj)
        s.objects.clear()
        s.alloc_sizes.clear()
        s.alloc_bases.clear()

    def close(self) -> None:
        self._make_current()
        for s in list(self.sessions.values()):
            self._free_session(s)
        self.sessions.clear()
        for key in list(self._dev_models):
            self.forget_model(key)
        if self.registered:
            self.cu.cuMemHostUnregister(self.region.address)
            self.registered = False
        self.cu.cuDevicePrimaryCtxRelease(self.dev)

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
        mod = self._check(self.cu.cuModuleLoadData(ptx), "cuModuleLoadData")
        self._mlp_fn = self._check(self.cu.cuModuleGetFunction(mod, b"lake_mlp_layer"),
                                   "cuModuleGetFunction")
        return self._mlp_fn

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
        a, b = self._batch_bufs(dm, batch)
        xs = np.ascontiguousarray(x, np.int32)
        self._check(self.cu.cuMemcpyHtoD(a, xs.ctypes.data, xs.nbytes), "cuMemcpyHtoD")
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
                                               block, 1, 1, 0, self.cu.CUstream(0),
                                               ctypes.addressof(ptrs), 0), "cuLaunchKernel")
            src, dst = dst, src
        out = np.empty((batch, dm.layers[-1][3]), np.int32)
        self._check(self.cu.cuMemcpyDtoH(out.ctypes.data, src, out.nbytes), "cuMemcpyDtoH")
        return out

"""Cheap stream and event handling for the arbiter's per-request paths.

torch.cuda.current_stream() and the torch.cuda.stream() context cost tens
of microseconds per call (device-index lookups, Stream objects); an LC
request crosses them several times and a BE job once per op.  These helpers
use torch's C entry points for the current stream and CUDA driver events
from a pool instead.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Any, Iterator

import torch

from .partition import _driver


_tls = threading.local()
_primary: list[Any] = []          # the device's primary context, once retained


def set_primary(ctx: Any) -> None:
    _primary[:] = [ctx]


def ensure_ctx() -> None:
    """Make the primary context current on this thread (driver calls need one;
    a thread that never ran torch work has none yet)."""
    if _primary and not getattr(_tls, "ctx", False):
        err, = _driver().cuCtxSetCurrent(_primary[0])
        if int(err):
            raise RuntimeError(f"cuCtxSetCurrent failed with CUresult {int(err)}")
        _tls.ctx = True


def ensure_thread(stream: torch.cuda.Stream) -> None:
    """A thread's first cuBLAS call on a stream creates handles and workspaces,
    which can synchronise the device.  Done behind a shut LC gate that would
    wait for BE work held by the gate (a deadlock the watchdog has to break),
    so each thread does it once, on ``stream``, before it touches a gate."""
    done = getattr(_tls, "warm", None)
    if done is None:
        done = _tls.warm = set()
    key = stream.cuda_stream
    if key in done:
        return
    ensure_ctx()
    with using(stream):
        # the largest cuBLAS workspace a GEMM asks for, in both precisions
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.ones(1024, 1024, device="cuda", dtype=dtype)
            (x @ x).sum()
    stream.synchronize()
    done.add(key)


def raw_stream(device: int = 0) -> int:
    """The current torch stream's CUstream handle, as an int."""
    return torch._C._cuda_getCurrentRawStream(device)


@contextlib.contextmanager
def using(stream: torch.cuda.Stream, device: int = 0) -> Iterator[None]:
    """``with torch.cuda.stream(stream)`` without its bookkeeping."""
    prev = torch._C._cuda_getCurrentStream(device)
    torch._C._cuda_setStream(stream_id=stream.stream_id, device_index=stream.device_index,
                             device_type=stream.device_type)
    try:
        yield
    finally:
        torch._C._cuda_setStream(stream_id=prev[0], device_index=prev[1], device_type=prev[2])


class Events:
    """CUDA driver events, reused (creation costs more than recording)."""

    def __init__(self, timing: bool, blocking: bool = False) -> None:
        self.cu = _driver()
        f = self.cu.CUevent_flags
        self.flags = ((0 if timing else int(f.CU_EVENT_DISABLE_TIMING))
                      | (int(f.CU_EVENT_BLOCKING_SYNC) if blocking else 0))
        self.free: list[Any] = []
        self._not_ready = int(self.cu.CUresult.CUDA_ERROR_NOT_READY)

    def record(self, stream: int) -> Any:
        ev = self.free.pop() if self.free else self._new()
        err, = self.cu.cuEventRecord(ev, stream)
        if int(err):
            raise RuntimeError(f"cuEventRecord failed with CUresult {int(err)}")
        return ev

    def _new(self) -> Any:
        ensure_ctx()
        err, ev = self.cu.cuEventCreate(self.flags)
        if int(err):
            raise RuntimeError(f"cuEventCreate failed with CUresult {int(err)}")
        return ev

    def done(self, ev: Any) -> bool:
        err, = self.cu.cuEventQuery(ev)
        code = int(err)
        if code and code != self._not_ready:
            raise RuntimeError(f"cuEventQuery failed with CUresult {code}")
        return code == 0

    def wait(self, ev: Any) -> None:
        err, = self.cu.cuEventSynchronize(ev)
        if int(err):
            raise RuntimeError(f"cuEventSynchronize failed with CUresult {int(err)}")

    def elapsed_s(self, start: Any, end: Any) -> float:
        err, ms = self.cu.cuEventElapsedTime(start, end)
        return float(ms) / 1e3 if not int(err) else 0.0

    def put(self, *evs: Any) -> None:
        self.free.extend(evs)

    def close(self) -> None:
        for ev in self.free:
            self.cu.cuEventDestroy(ev)
        self.free.clear()

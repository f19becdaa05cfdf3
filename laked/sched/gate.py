"""GPU-side gates: best-effort atoms start only while no LC work runs.

Each LC tenant owns one 32-bit flag in device memory.  Its stream writes 1
(cuStreamWriteValue32) before its work and 0 after it, so the flag is 1
exactly while the GPU runs that tenant's request, with no host round trip.
Every BE atom is preceded on its stream by cuStreamWaitValue32(flag == 0)
for the LC tenants it could delay: the GPU's front end holds the next atom
until LC is done and releases it the moment LC ends.  BE can thus keep
atoms queued (no bubbles) and an arriving LC request waits for at most the
atom already running.

The flags live in device memory because a flag in mapped host memory was
seen to release waiters only after ~0.4 ms on an H100 (driver 580).

A gate can only stay shut if a host thread blocks on device-wide work
while an LC request is half-issued (its close queued, its open not yet):
the watchdog reopens any flag shut longer than ``timeout_s`` from a side
stream, counts it and logs it.  Known limit (H100, driver 580): a first
use that allocates device memory (a new cuBLAS workspace, allocator
growth) while a BE stream waits at a shut gate was seen to block inside
the driver itself, where no stream, the watchdog's included, gets
through.  laked therefore warms every thread's streams before they touch
a gate and reserves allocator memory at start (arbiter.py), and LC work
that allocates nothing (CUDA graphs) never meets it.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Iterable

from .fast import ensure_ctx
from .partition import _driver, check

log = logging.getLogger("laked.sched.gate")

SLOTS = 256     # LC tenants' gates, one per raw stream of kernel/cu* tenants


class GateError(RuntimeError):
    pass


class Gates:
    def __init__(self, timeout_s: float = 0.1) -> None:
        cu = self.cu = _driver()
        self.base = int(check(cu.cuMemAlloc(4 * SLOTS), "cuMemAlloc (gates)"))
        check(cu.cuMemsetD32(self.base, 0, SLOTS), "cuMemsetD32 (gates)")
        self.side = check(cu.cuStreamCreate(int(cu.CUstream_flags.CU_STREAM_NON_BLOCKING)),
                          "cuStreamCreate (gate watchdog)")
        self.timeout_s = timeout_s
        self._free = list(range(SLOTS - 1, -1, -1))
        self._closed_at: dict[int, float] = {}      # slot -> host time of the close
        self._lock = threading.Lock()
        self.forced_opens = 0
        self._eq = int(cu.CUstreamWaitValue_flags.CU_STREAM_WAIT_VALUE_EQ)
        self._stop = threading.Event()
        self._wd = threading.Thread(target=self._watch, name="laked-gate-watchdog", daemon=True)
        self._wd.start()

    def slot(self) -> int:
        with self._lock:
            if not self._free:
                raise RuntimeError(f"all {SLOTS} gates are taken (LC tenants and their streams)")
            return self._free.pop()

    def release(self, slot: int) -> None:
        self.open_now(slot)
        self._closed_at.pop(slot, None)
        with self._lock:
            self._free.append(slot)

    def addr(self, slot: int) -> int:
        return self.base + 4 * slot

    # close/open/wait sit on every LC request and BE atom: plain dict updates
    # (atomic under the GIL) and a bare return-code check keep them cheap.
    def close(self, slot: int, stream: int) -> None:
        """Queue "LC running" on ``stream`` (takes effect when the stream gets there)."""
        if slot not in self._closed_at:
            self._closed_at[slot] = time.monotonic()
        err, = self.cu.cuStreamWriteValue32(stream, self.base + 4 * slot, 1, 0)
        if int(err):
            raise GateError(f"cuStreamWriteValue32 (gate close) failed with CUresult {int(err)}")

    def open(self, slot: int, stream: int) -> None:
        """Queue "LC done" on ``stream``, after the work queued before it."""
        err, = self.cu.cuStreamWriteValue32(stream, self.base + 4 * slot, 0, 0)
        if int(err):        # still recorded as shut: the watchdog reopens it
            raise GateError(f"cuStreamWriteValue32 (gate open) failed with CUresult {int(err)}")
        self._closed_at.pop(slot, None)

    def wait(self, stream: int, slots: Iterable[int]) -> None:
        """Queue, on ``stream``, a wait until every flag of ``slots`` is 0.

        ``stream`` must be non-blocking: see laked/sched/tenancy.py."""
        for s in slots:
            err, = self.cu.cuStreamWaitValue32(stream, self.base + 4 * s, 0, self._eq)
            if int(err):
                raise GateError(f"cuStreamWaitValue32 (gate) failed with CUresult {int(err)}")

    def open_now(self, slot: int) -> None:
        """Open a gate from the host: a memset on a stream of its own, which no
        other stream's work (BE held by this very gate) can delay."""
        err, = self.cu.cuMemsetD32Async(self.addr(slot), 0, 1, self.side)
        if not int(err):
            err, = self.cu.cuStreamSynchronize(self.side)
        if int(err):
            raise GateError(f"reopening gate {slot} failed with CUresult {int(err)}")

    def _watch(self) -> None:
        """Reopen gates a stuck host left shut (see the module docstring).

        Only the host's record says a gate is late (its open was never
        queued), so nothing here reads device memory: a synchronous read
        could itself wait behind the work the shut gate holds."""
        ensure_ctx()
        while not self._stop.wait(self.timeout_s / 4):
            now = time.monotonic()
            for s, t in list(self._closed_at.items()):
                if now - t <= self.timeout_s or self._closed_at.get(s) != t:
                    continue
                try:
                    self.open_now(s)
                except GateError as e:
                    log.error("gate watchdog could not reopen gate %d: %s", s, e)
                    continue
                self._closed_at.pop(s, None)
                self.forced_opens += 1
                log.warning("gate %d shut for over %.0f ms with its LC request not fully "
                            "issued: reopened, BE work resumes", s, self.timeout_s * 1e3)

    def close_all(self) -> None:
        self._stop.set()
        self._wd.join(2)
        self.cu.cuMemsetD32(self.base, 0, SLOTS)
        self.cu.cuStreamSynchronize(self.side)
        self.cu.cuStreamDestroy(self.side)
        self.cu.cuMemFree(self.base)

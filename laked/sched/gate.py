"""GPU-side gates: best-effort atoms start only while no LC work runs.

Each LC tenant (and each raw stream of a kernel or cu* tenant) owns one
32-bit flag, non-zero (a generation number) while that tenant's request
is due or running.  A raw stream's close is queued on it
(cuStreamWriteValue32: it takes effect after the work queued before it);
an LC tenant's own stream has nothing queued before its request, so that
close is a host store as the request arrives (``close_now``).  Every open
is queued after the request's work, so the flag falls to 0 exactly when
the GPU is done with it, with no host round trip.
Every BE atom is preceded on its stream by cuStreamWaitValue32(flag == 0)
for the LC tenants it could delay: the GPU's front end holds the next atom
until LC is done and releases it the moment LC ends.  BE can thus keep
atoms queued (no bubbles) and an arriving LC request waits for at most the
atom already running.

The flags live in pinned, device-mapped host memory, so the host can open
a gate with a plain store, whatever the GPU's queues are doing.  That is
the watchdog's way out of a stall: on an H200 (driver 580) an LC request
whose open had been queued was seen never to run, its stream's work stuck
behind a BE stream's gate wait (the driver may serialise streams onto one
hardware queue; the API warns that waits it cannot see can deadlock), and
with the flags in device memory no queue could reach them to let the wait
go.  The watchdog reads the flags themselves: one that has held the same
generation for longer than ``timeout_s`` is reopened from the host,
counted and logged, so a stall costs at most that long and never hangs.
A BE issuer held for the request usually gets there first (``open_stuck``,
GpuArbiter._unstick): it is awake every few milliseconds while LC runs and
knows the tenant's usual time, so a stall costs milliseconds, not 500.
Not when the issuer is itself stuck in a launch: on an H200 a stall held
the LC thread in cudaGraphLaunch, its gate shut, and the training job's
issuer in a cuBLAS launch, both in the driver until the watchdog's reopen
at 500 ms.  So each of the watchdog's scans (every ``timeout_s``/4) also
runs the arbiter's check (``on_scan``), and such a stall costs at most a
scan's interval past unstick_ms, ~130 ms by default.  (Scanning every 50
ms instead, the one table run on it met 6 of 12 pairs against 12 and 11
on the tree before; a scan's wake takes the GIL, perhaps from LC.)  The
same happened to a kernel INFER batch (laked's server thread in its copy
back, the work queued behind a BE stream's gate wait), which the check
now knows by its batches' usual time.
"""
from __future__ import annotations

import ctypes
import itertools
import logging
import sys
import threading
import time
import traceback
from typing import Any, Callable, Iterable

import numpy as np

from .partition import _driver, check

log = logging.getLogger("laked.sched.gate")

SLOTS = 256     # LC tenants' gates, one per raw stream of kernel/cu* tenants
STACKS_LOGGED = 3   # forced opens that log every thread's stack (where the stall sat)
EARLY_LOGGED = 10   # early opens logged one by one per tenant (then every 100th)
_DEVICEMAP = 0x02   # CU_MEMHOSTALLOC_DEVICEMAP
_PORTABLE = 0x01    # CU_MEMHOSTALLOC_PORTABLE: every context may map it


class GateError(RuntimeError):
    pass


def overdue(flags: "ctypes.Array[ctypes.c_uint32]", seen: dict[int, tuple[int, float]],
            now: float, timeout_s: float) -> list[int]:
    """Gates whose flag has held one generation for longer than ``timeout_s``.

    ``seen`` (slot -> (generation, first seen)) carries what earlier scans
    saw; a generation that changed in between was a new request's, so only
    a request that never reached its open is overdue.  The scan holds the
    GIL, which an LC request may be waiting for: numpy finds the few shut
    gates among all of them in microseconds, in a copy (the GPU writes the
    flags while numpy counts them, which numpy refuses)."""
    now_flags = np.array(np.ctypeslib.as_array(flags))
    shut = np.flatnonzero(now_flags).tolist()
    for s in seen.keys() - set(shut):
        del seen[s]
    late = []
    for s in shut:
        gen = int(now_flags[s])
        first = seen.get(s)
        if first is None or first[0] != gen:
            seen[s] = (gen, now)
        elif now - first[1] > timeout_s:
            del seen[s]
            late.append(s)
    return late


def thread_stacks(limit: int = 6) -> str:
    """Every thread's innermost ``limit`` Python frames, the caller's left out."""
    names = {t.ident: t.name for t in threading.enumerate()}
    me = threading.get_ident()
    out = []
    for ident, frame in sys._current_frames().items():
        if ident == me:
            continue
        lines = traceback.format_stack(frame, limit)
        out.append(f"  {names.get(ident, ident)}:\n" + "".join("    " + x for x in lines))
    return "".join(out)


def pinned_words(cu: Any, n: int, what: str) -> tuple[int, int, "ctypes.Array[ctypes.c_uint32]"]:
    """``n`` zeroed 32-bit words in pinned, device-mapped host memory: (host
    address, device address, the words as a ctypes array)."""
    host = int(check(cu.cuMemHostAlloc(4 * n, _DEVICEMAP | _PORTABLE), f"cuMemHostAlloc ({what})"))
    ctypes.memset(host, 0, 4 * n)
    try:
        dev = int(check(cu.cuMemHostGetDevicePointer(host, 0),
                        f"cuMemHostGetDevicePointer ({what})"))
    except Exception:
        cu.cuMemFreeHost(host)
        raise
    return host, dev, (ctypes.c_uint32 * n).from_address(host)


class Gates:
    def __init__(self, timeout_s: float = 0.1) -> None:
        cu = self.cu = _driver()
        self._host, self.base, self.flags = pinned_words(cu, SLOTS, "gates")
        self.timeout_s = timeout_s
        self._free = list(range(SLOTS - 1, -1, -1))
        self._lock = threading.Lock()
        self._gen = itertools.count(1)
        self.forced_opens = 0
        self.early_opens = 0            # opened by a BE issuer (open_stuck)
        self.stacks_left = STACKS_LOGGED    # forced opens still to log with stacks
        self.on_scan: Callable[[], None] | None = None      # run at every watchdog scan
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
        with self._lock:
            self._free.append(slot)

    def addr(self, slot: int) -> int:
        return self.base + 4 * slot

    def is_shut(self, slot: int) -> bool:
        """What the GPU last wrote (or the host stored) in the gate's flag."""
        return bool(self.flags[slot])

    # close/open/wait sit on every LC request and BE atom: a bare return-code
    # check keeps them cheap.
    def _next_gen(self) -> int:
        return next(self._gen) & 0xFFFFFFFF or 1

    def close(self, slot: int, stream: int) -> None:
        """Queue "LC running" on ``stream`` (takes effect when the stream gets there)."""
        err, = self.cu.cuStreamWriteValue32(stream, self.base + 4 * slot, self._next_gen(), 0)
        if int(err):
            raise GateError(f"cuStreamWriteValue32 (gate close) failed with CUresult {int(err)}")

    def open(self, slot: int, stream: int) -> None:
        """Queue "LC done" on ``stream``, after the work queued before it."""
        err, = self.cu.cuStreamWriteValue32(stream, self.base + 4 * slot, 0, 0)
        if int(err):        # the flag stays shut: the watchdog reopens it
            raise GateError(f"cuStreamWriteValue32 (gate open) failed with CUresult {int(err)}")

    def wait(self, stream: int, slots: Iterable[int]) -> None:
        """Queue, on ``stream``, a wait until every flag of ``slots`` is 0.

        ``stream`` must be non-blocking: see laked/sched/tenancy.py."""
        for s in slots:
            err, = self.cu.cuStreamWaitValue32(stream, self.base + 4 * s, 0, self._eq)
            if int(err):
                raise GateError(f"cuStreamWaitValue32 (gate) failed with CUresult {int(err)}")

    def close_now(self, slot: int) -> None:
        """Shut a gate from the host, for a stream with nothing queued before
        the LC work (an LC tenant's own stream, whose last request's open
        has run).  A store, not a driver call, so the LC thread keeps the
        GIL: a driver call lets a BE issuer take it, and getting it back
        cost LC's request ~50-200 us before its first launch."""
        self.flags[slot] = self._next_gen()

    def open_now(self, slot: int) -> None:
        """Open a gate from the host: a store into the pinned flag, which no
        GPU queue stands in front of."""
        self.flags[slot] = 0

    def open_stuck(self, slot: int, who: str, running_s: float, nth: int,
                   stacks: bool = False) -> None:
        """Open the gate of an LC request stuck behind a BE gate wait (what the
        watchdog does, found sooner by a BE issuer held for the request, or
        by the watchdog's ``on_scan``: ``stacks`` logs where every thread was).
        ``nth``: the tenant's early opens, this one included.  The log's
        allowance is per tenant, so one tenant's stalls do not hide the first
        of a tenant that came later."""
        where = self._stacks() if stacks else ""
        self.open_now(slot)
        self.early_opens += 1
        n = self.early_opens
        if where or nth <= EARLY_LOGGED or n % 100 == 0:
            log.warning("gate %d: %s's LC request still running after %.1f ms, "
                        "far past its usual time: opened early (%d for it, %d in all)%s",
                        slot, who, running_s * 1e3, nth, n, where)

    def _stacks(self) -> str:
        """Every thread's stack, for the first STACKS_LOGGED stalls."""
        if self.stacks_left <= 0:
            return ""
        self.stacks_left -= 1
        return "; laked's threads were at:\n" + thread_stacks()

    def _watch(self) -> None:
        """Reopen gates shut for longer than ``timeout_s`` (see the module
        docstring), and run ``on_scan``.  It makes no driver call, so no
        stall can hold it up."""
        seen: dict[int, tuple[int, float]] = {}
        while not self._stop.wait(self.timeout_s / 4):
            try:
                late = overdue(self.flags, seen, time.monotonic(), self.timeout_s)
            except Exception:  # noqa: BLE001 - the watchdog must outlive any one scan
                log.exception("gate watchdog: a scan failed; scanning again")
                continue
            for s in late:
                # taken while the stall lasts: the threads still sit where it holds them
                where = self._stacks()
                self.open_now(s)
                self.forced_opens += 1
                log.warning("gate %d shut for over %.0f ms by one LC request: reopened, "
                            "BE work resumes%s", s, self.timeout_s * 1e3, where)
            if self.on_scan is not None:
                try:
                    self.on_scan()
                except Exception:  # noqa: BLE001 - as above
                    log.exception("gate watchdog: its check of LC requests failed")

    def close_all(self) -> None:
        self._stop.set()
        self._wd.join(2)
        ctypes.memset(self._host, 0, 4 * SLOTS)
        self.cu.cuMemFreeHost(self._host)

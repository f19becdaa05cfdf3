"""laked's data plane: drain the submission ring, execute, post completions.

One thread.  It sleeps on the doorbell, takes up to ``batch`` submissions at
a time, hands each to the executor, collects deferred completions the
executor reaps (async GPU work), posts completions in one publish and rings
the kernel once per batch.  A completion that does not fit the completion
ring waits for the next round: nothing is dropped.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field

from . import abi
from .doorbell import Doorbell
from .executor import Executor, op_name
from .region import Cqe, Region, RegionError, Sqe

log = logging.getLogger("laked.server")


@dataclass
class ServerStats:
    requests: int = 0
    completions: int = 0
    errors: int = 0
    bad_requests: int = 0
    ring_errors: int = 0
    batches: int = 0            # rounds that found submissions
    max_batch: int = 0
    internal_errors: int = 0    # bugs caught by the loop (each logged)
    by_op: dict[str, int] = field(default_factory=dict)


class Server:
    def __init__(self, region: Region, doorbell: Doorbell, executor: Executor,
                 batch: int = 64) -> None:
        self.region = region
        self.doorbell = doorbell
        self.executor = executor
        self.batch = batch
        self.stats = ServerStats()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pending: list[Cqe] = []
        if executor.wake_fd is not None:     # completions finished on other threads
            doorbell.watch(executor.wake_fd)
        # stop() rings this so the thread does not sit out its poll timeout
        self._stop_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        doorbell.watch(self._stop_fd)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="laked-server", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the thread (for good); the doorbell and executor stay the caller's."""
        if self._stop_fd < 0:
            return
        self._stop.set()
        os.eventfd_write(self._stop_fd, 1)
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("server thread did not stop within %.0fs", timeout)
                return      # leave its fds alone: it may still poll them
            self._thread = None
        self.doorbell.unwatch(self._stop_fd)
        os.close(self._stop_fd)
        self._stop_fd = -1

    def _run(self) -> None:
        log.info("serving requests with the %s executor", self.executor.name)
        while not self._stop.is_set():
            try:
                self.step()
            except OSError as e:
                log.error("data plane stopped: %s", e)
                return
            except Exception:  # noqa: BLE001 - a bug must not leave kernel callers hanging
                self.stats.internal_errors += 1
                log.exception("data plane round failed; going on")
                self._stop.wait(0.01)

    def _idle_timeout(self) -> float:
        if self._pending:
            return 0.001        # the kernel is draining the CQ: retry soon
        if self.executor.deferred():
            # The executor's wake fd says when; the timeout is a safety net.
            return 0.001 if self.executor.wake_fd is None else 0.05
        return 0.2

    def step(self) -> int:
        """One round: wait, execute what is there, post; returns requests done."""
        if not self.region.sq_pending():
            self.doorbell.wait_for_submissions(self._idle_timeout())
        try:
            sqes = self.region.take_submissions(self.batch)
        except RegionError as e:
            self.stats.ring_errors += 1
            log.warning("submission ring: %s", e)
            sqes = []
        if sqes:
            self.stats.batches += 1
            self.stats.max_batch = max(self.stats.max_batch, len(sqes))
        for sqe in sqes:
            self._execute(sqe)
        for rid, (res, r0, r1) in self.executor.reap():
            self._complete(Cqe(rid, res, r0, r1))
        self._post()
        if sqes:
            self.executor.posted()      # bookkeeping the kernel need not wait for
        return len(sqes)

    def _execute(self, sqe: Sqe) -> None:
        self.stats.requests += 1
        name = op_name(sqe.op)
        self.stats.by_op[name] = self.stats.by_op.get(name, 0) + 1
        if sqe.data_len and not self.region.in_heap(sqe.data_off, sqe.data_len):
            self.stats.bad_requests += 1
            log.warning("%s %d: payload [%d, +%d) outside the heap", name, sqe.id,
                        sqe.data_off, sqe.data_len)
            self._complete(Cqe(sqe.id, abi.LAKE_CUDA_ERROR_INVALID_VALUE))
            return
        if log.isEnabledFor(logging.DEBUG):
            t0 = time.perf_counter()
            res = self.executor.execute(sqe)
            log.debug("%s %d session %d -> %s in %.1f us", name, sqe.id, sqe.session,
                      "deferred" if res is None else res[0], (time.perf_counter() - t0) * 1e6)
        else:
            res = self.executor.execute(sqe)
        if res is not None:
            self._complete(Cqe(sqe.id, *res))

    def _complete(self, cqe: Cqe) -> None:
        if cqe.result != abi.LAKE_CUDA_SUCCESS:
            self.stats.errors += 1
        self._pending.append(cqe)

    def _post(self) -> None:
        if not self._pending:
            return
        n = self.region.post_completions(self._pending)
        if n:
            del self._pending[:n]
            self.stats.completions += n
            self.doorbell.completions_posted()

    def info(self) -> dict[str, object]:
        s = self.stats
        return {"requests": s.requests, "completions": s.completions, "errors": s.errors,
                "bad_requests": s.bad_requests, "ring_errors": s.ring_errors,
                "batches": s.batches, "max_batch": s.max_batch,
                "internal_errors": s.internal_errors,
                "waiting_completions": len(self._pending),
                "deferred": self.executor.deferred(), "by_op": dict(s.by_op)}

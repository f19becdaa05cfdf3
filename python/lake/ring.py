"""The producer side of a lake region: what lake.ko does for kernel callers.

A ``Ring`` owns a region over a sealed memfd (laid out by
laked.region.init_region, as kmod/region.c lays out /dev/lake) and the two
eventfd doorbells: it rings ``sq_efd`` after publishing submissions and
reads completions when laked rings ``cq_efd``.  Whoever consumes the ring
is somebody else: laked's server in a thread of this process
(lake.standin.StandIn) or laked itself, which received the memfd and the
eventfds over its client socket (lake.client.Client).

What it keeps from the kernel's semantics (kmod/cuapi.c):

- sessions: each ``Session`` is one caller; ``close()`` sends
  SESSION_CLOSE and laked frees everything the session owned;
- payloads (module images, function names, launch parameters, staged
  copies) live in heap buffers freed when their request completes;
- ``launch`` and the ``*_async`` copies do not wait: their failures are
  latched per session and reported by the next ``stream_sync`` /
  ``ctx_sync``, as lake_take_async_err does;
- a full submission ring makes submitters wait (backpressure), up to a
  timeout, and loses nothing.

    ring = Ring(16 << 20)          # then hand ring.fd, sq_efd, cq_efd to laked
    s = ring.session()
    s.null()
"""
from __future__ import annotations

import bisect
import fcntl
import itertools
import logging
import mmap
import os
import select
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from laked import abi
from laked.executor import op_name
from laked.region import Cqe, Region, Sqe, init_region, pack_launch_params

log = logging.getLogger("lake.ring")

HEAP_ALIGN = abi.LAKE_HEAP_ALIGN
# laked refuses a client region that could still shrink: a shrunk memfd
# would SIGBUS laked when it touches the missing pages.
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


class CallError(RuntimeError):
    """A request answered with a CUresult other than success."""

    def __init__(self, op: int, code: int) -> None:
        super().__init__(f"{op_name(op)} failed with CUresult {code}")
        self.op = op
        self.code = code


class RingFull(TimeoutError):
    """The submission ring stayed full for the whole timeout (the kernel's -EBUSY)."""


class HeapExhausted(MemoryError):
    pass


class PeerGone(ConnectionError):
    """The consumer of the ring (laked) went away; no completion will come."""


class Heap:
    """First-fit allocator over [start, end) of the region, like the kernel's gen_pool."""

    def __init__(self, start: int, end: int) -> None:
        self._lock = threading.Lock()
        self._free: list[tuple[int, int]] = [(start, end - start)]   # sorted (off, len)
        self._used: dict[int, int] = {}
        self.start, self.end = start, end

    def alloc(self, n: int, align: int = HEAP_ALIGN) -> int:
        n = max(1, n)
        with self._lock:
            for i, (off, length) in enumerate(self._free):
                at = (off + align - 1) & ~(align - 1)
                if at + n > off + length:
                    continue
                pieces = []
                if at > off:
                    pieces.append((off, at - off))
                if at + n < off + length:
                    pieces.append((at + n, off + length - at - n))
                self._free[i:i + 1] = pieces
                self._used[at] = n
                return at
        raise HeapExhausted(f"region heap: no {n} contiguous bytes left "
                            f"({self.end - self.start - self.used} free in all)")

    def free(self, off: int) -> None:
        with self._lock:
            n = self._used.pop(off)
            i = bisect.bisect_left(self._free, (off, 0))
            self._free.insert(i, (off, n))
            # coalesce with the neighbours
            if i + 1 < len(self._free) and off + n == self._free[i + 1][0]:
                self._free[i] = (off, n + self._free[i + 1][1])
                del self._free[i + 1]
            if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == off:
                prev = self._free[i - 1]
                self._free[i - 1] = (prev[0], prev[1] + self._free[i][1])
                del self._free[i]

    def size_of(self, off: int) -> int:
        return self._used[off]

    @property
    def used(self) -> int:
        return sum(self._used.values())


@dataclass
class Launch:
    fn: int
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    params: Sequence[bytes]
    shared: int = 0
    stream: int = 0


@dataclass
class _Async:
    session: "Session"
    payload: int | None


@dataclass
class Session:
    """One caller: the cu*-like API, as lakelib/lake.h spells it."""

    k: "Ring"
    id: int
    host_bufs: set[int] = field(default_factory=set)
    async_err: int = 0
    closed: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # -- plumbing ---------------------------------------------------------------
    def call(self, op: int, args: Sequence[int] = (), flags: int = 0, data_off: int = 0,
             data_len: int = 0, check: bool = True) -> Cqe:
        c = self.k.wait(self.k.submit(op, args, flags, data_off, data_len, self.id))
        if check and c.result != 0:
            raise CallError(op, c.result)
        return c

    def _with_payload(self, op: int, args: Sequence[int], data: bytes) -> Cqe:
        off = self.k.heap.alloc(len(data))
        try:
            self.k.write(off, data)
            return self.call(op, args, data_off=off, data_len=len(data))
        finally:
            self.k.heap.free(off)

    def submit_async(self, op: int, args: Sequence[int], data: bytes | None = None) -> int:
        """Queue an async request (LAKE_SQE_F_ASYNC); its failure is latched."""
        payload = None
        if data is not None:
            payload = self.k.heap.alloc(len(data))
            self.k.write(payload, data)
        return self.k.submit(op, args, abi.LAKE_SQE_F_ASYNC,
                             payload or 0, len(data) if data is not None else 0, self.id,
                             on_done=_Async(self, payload))

    def _latched(self, c: Cqe, op: int) -> None:
        """Raise the sync's own error, else the first async one since the last sync."""
        with self._lock:
            err, self.async_err = self.async_err, 0
        if c.result:
            raise CallError(op, c.result)
        if err:
            raise CallError(op, err)

    # -- lake_cu* ------------------------------------------------------------------
    def null(self) -> None:
        self.call(abi.LAKE_OP_NULL)

    def init(self, flags: int = 0) -> None:
        self.call(abi.LAKE_OP_INIT, (flags,))

    def device_get(self, ordinal: int = 0) -> int:
        return self.call(abi.LAKE_OP_DEVICE_GET, (ordinal,)).ret0

    def ctx_create(self, dev: int = 0, flags: int = 0) -> int:
        return self.call(abi.LAKE_OP_CTX_CREATE, (flags, dev)).ret0

    def ctx_destroy(self, ctx: int) -> None:
        self.call(abi.LAKE_OP_CTX_DESTROY, (ctx,))

    def ctx_sync(self) -> None:
        self._latched(self.call(abi.LAKE_OP_CTX_SYNC, check=False), abi.LAKE_OP_CTX_SYNC)

    def module_load(self, image: bytes) -> int:
        return self._with_payload(abi.LAKE_OP_MODULE_LOAD, (), image).ret0

    def module_unload(self, mod: int) -> None:
        self.call(abi.LAKE_OP_MODULE_UNLOAD, (mod,))

    def get_function(self, module: int, name: str) -> int:
        return self._with_payload(abi.LAKE_OP_MODULE_GET_FUNCTION, (module,),
                                  name.encode() + b"\0").ret0

    def mem_alloc(self, n: int) -> int:
        return self.call(abi.LAKE_OP_MEM_ALLOC, (n,)).ret0

    def mem_free(self, dptr: int) -> None:
        self.call(abi.LAKE_OP_MEM_FREE, (dptr,))

    def mem_alloc_host(self, n: int) -> int:
        """A region buffer (an offset) the GPU reads and writes directly."""
        off = self.k.heap.alloc(n)
        self.host_bufs.add(off)
        return off

    def mem_free_host(self, off: int) -> None:
        self.host_bufs.remove(off)
        self.k.heap.free(off)

    def host_copy(self, data: bytes) -> int:
        """A region buffer holding ``data`` (e.g. a model blob for ``infer``)."""
        off = self.mem_alloc_host(len(data))
        self.k.write(off, data)
        return off

    def memcpy_htod(self, dptr: int, src: int | bytes, n: int | None = None) -> None:
        """From a region buffer (offset) directly, or from bytes through a staged payload."""
        if isinstance(src, int):
            self.call(abi.LAKE_OP_MEMCPY_HTOD, (dptr, src, n or 0, 0))
            return
        data = bytes(src)
        off = self.k.heap.alloc(len(data))
        try:
            self.k.write(off, data)
            self.call(abi.LAKE_OP_MEMCPY_HTOD, (dptr, off, len(data), 0))
        finally:
            self.k.heap.free(off)

    def memcpy_htod_async(self, dptr: int, src: int, n: int, stream: int = 0) -> int:
        return self.submit_async(abi.LAKE_OP_MEMCPY_HTOD, (dptr, src, n, stream))

    def memcpy_dtoh(self, dst: int | None, dptr: int, n: int) -> bytes | None:
        """Into a region buffer (offset), or, with ``dst`` None, staged: returns the bytes."""
        if dst is not None:
            self.call(abi.LAKE_OP_MEMCPY_DTOH, (dst, dptr, n, 0))
            return None
        off = self.k.heap.alloc(n)
        try:
            self.call(abi.LAKE_OP_MEMCPY_DTOH, (off, dptr, n, 0))
            return self.k.read(off, n)
        finally:
            self.k.heap.free(off)

    def memcpy_dtoh_async(self, dst: int, dptr: int, n: int, stream: int = 0) -> int:
        return self.submit_async(abi.LAKE_OP_MEMCPY_DTOH, (dst, dptr, n, stream))

    def launch(self, ln: Launch) -> int:
        """Queue a kernel launch; like lake_cuLaunchKernel it does not wait."""
        return self.submit_async(abi.LAKE_OP_LAUNCH,
                                 (ln.fn, *ln.grid, *ln.block, ln.shared, ln.stream),
                                 pack_launch_params(ln.params))

    def stream_create(self, flags: int = 0) -> int:
        return self.call(abi.LAKE_OP_STREAM_CREATE, (flags,)).ret0

    def stream_destroy(self, stream: int) -> None:
        self.call(abi.LAKE_OP_STREAM_DESTROY, (stream,))

    def stream_sync(self, stream: int = 0) -> None:
        self._latched(self.call(abi.LAKE_OP_STREAM_SYNC, (stream,), check=False),
                      abi.LAKE_OP_STREAM_SYNC)

    def infer(self, model_id: int, version: int, blob_off: int, blob_len: int, batch: int,
              n_in: int, n_out: int, data_off: int) -> None:
        self.call(abi.LAKE_OP_INFER, (model_id, version, blob_off, blob_len, batch, n_in,
                                      n_out), data_off=data_off,
                  data_len=4 * batch * (n_in + n_out))

    def infer_rows(self, model_id: int, version: int, blob_off: int, blob_len: int,
                   x: np.ndarray, n_out: int) -> np.ndarray:
        """``infer`` on int32 rows ``x`` (batch x n_in) through a region buffer of its own."""
        batch, n_in = x.shape
        off = self.mem_alloc_host(4 * batch * (n_in + n_out))
        try:
            self.k.write(off, np.ascontiguousarray(x, "<i4").tobytes())
            self.infer(model_id, version, blob_off, blob_len, batch, n_in, n_out, off)
            out = self.k.read(off + 4 * batch * n_in, 4 * batch * n_out)
        finally:
            self.mem_free_host(off)
        return np.frombuffer(out, "<i4").reshape(batch, n_out)

    def close(self) -> None:
        """lake_session_close: laked frees the session's objects, we its host buffers."""
        if self.closed:
            return
        self.closed = True
        try:
            self.call(abi.LAKE_OP_SESSION_CLOSE)
        finally:
            for off in list(self.host_bufs):
                self.mem_free_host(off)


class Ring:
    """A region over a sealed memfd plus its doorbells, seen from the producer side.

    ``fd`` (the memfd), ``sq_efd`` and ``cq_efd`` are what a consumer needs;
    ``close()`` closes all three.  Any number of threads may submit and wait.
    """

    def __init__(self, size: int = 64 << 20, *, name: str = "lake-ring") -> None:
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        self.sq_efd = self.cq_efd = -1
        self.mm: mmap.mmap | None = None
        try:
            os.ftruncate(self.fd, size)
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, SEALS)
            self.mm = mmap.mmap(self.fd, size, mmap.MAP_SHARED,
                                mmap.PROT_READ | mmap.PROT_WRITE)
            init_region(self.mm)
            self.region = Region(self.mm)           # the kernel's role: producer
            self.sq_efd = os.eventfd(0, os.EFD_CLOEXEC)
            self.cq_efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        except BaseException:
            self._close_fds()
            raise
        self.heap = Heap(self.region.heap_off, self.region.heap_end)
        self.sq_full_waits = 0
        self._ids = itertools.count(1)
        self._sids = itertools.count(1)
        self._sq_lock = threading.Lock()
        self._cv = threading.Condition()
        self._reaping = False
        self._done: dict[int, Cqe] = {}
        self._async: dict[int, _Async] = {}
        self._poll = select.poll()
        self._poll.register(self.cq_efd, select.POLLIN)
        self._hangup_fd: int | None = None
        self._default: Session | None = None
        self._closed = False

    def watch_hangup(self, fd: int) -> None:
        """Fail waits with PeerGone once ``fd`` (laked's socket) hangs up,
        instead of letting callers sit out their timeout."""
        # POLLRDHUP only: a reply arriving on the socket (POLLIN) is not ours to read.
        self._poll.register(fd, select.POLLRDHUP)
        self._hangup_fd = fd

    def session(self) -> Session:
        """A new session (a kernel caller's lake_session_open)."""
        return Session(self, next(self._sids))

    @property
    def default(self) -> Session:
        if self._default is None:
            self._default = self.session()
        return self._default

    # -- the region --------------------------------------------------------------------
    def alloc(self, n: int, align: int = HEAP_ALIGN) -> int:
        """A heap buffer that stays until ``free``."""
        return self.heap.alloc(n, align)

    def free(self, off: int) -> None:
        self.heap.free(off)

    def write(self, off: int, data: bytes | bytearray | memoryview) -> None:
        self.region.write(off, data)

    def read(self, off: int, n: int) -> bytes:
        return self.region.read(off, n)

    def view(self, off: int, n: int) -> memoryview:
        return self.region.view(off, n)

    # -- requests ------------------------------------------------------------------------
    def try_submit(self, op: int, args: Sequence[int] = (), flags: int = 0, data_off: int = 0,
                   data_len: int = 0, session: int = 0, on_done: _Async | None = None
                   ) -> int | None:
        """Publish one request; None when the ring is full."""
        with self._sq_lock:
            rid = next(self._ids)
            if on_done is not None:
                self._async[rid] = on_done
            if not self.region.submit(Sqe(rid, op, session, flags, tuple(args), data_off,
                                          data_len)):
                self._async.pop(rid, None)
                return None
        os.eventfd_write(self.sq_efd, 1)
        return rid

    def submit(self, op: int, args: Sequence[int] = (), flags: int = 0, data_off: int = 0,
               data_len: int = 0, session: int = 0, on_done: _Async | None = None,
               timeout: float = 30.0) -> int:
        """Publish one request, waiting while the ring is full (never dropping it)."""
        rid = self.try_submit(op, args, flags, data_off, data_len, session, on_done)
        if rid is not None:
            return rid
        self.sq_full_waits += 1
        deadline = time.monotonic() + timeout
        while rid is None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RingFull(f"submission ring full for {timeout}s ({op_name(op)} not sent)")
            self._reap_or_wait(min(left, 0.001))
            rid = self.try_submit(op, args, flags, data_off, data_len, session, on_done)
        return rid

    def wait(self, rid: int, timeout: float = 30.0) -> Cqe:
        """The completion of ``rid``; any number of threads may wait at once."""
        deadline = time.monotonic() + timeout
        while True:
            with self._cv:
                c = self._done.pop(rid, None)
                if c is not None:
                    return c
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"request {rid} not answered in {timeout}s")
                if self._reaping:
                    self._cv.wait(left)
                    continue
                self._reaping = True
            self._reap_as_owner(min(left, 0.05))

    def _reap_or_wait(self, timeout: float) -> None:
        with self._cv:
            if self._reaping:
                self._cv.wait(timeout)
                return
            self._reaping = True
        self._reap_as_owner(timeout)

    def _reap_as_owner(self, timeout: float) -> None:
        """One reaper at a time reads the completion ring; it wakes the others.

        Completions are filed before the reaper steps down, so a waiter
        that takes over never sleeps on an answer already taken off the ring.
        """
        done: dict[int, Cqe] = {}
        gone = False
        try:
            for fd, ev in self._poll.poll(max(0, int(timeout * 1000 + 0.999))):
                if fd == self.cq_efd:
                    try:
                        os.eventfd_read(self.cq_efd)
                    except BlockingIOError:
                        pass
                elif ev & (select.POLLRDHUP | select.POLLHUP | select.POLLERR
                           | select.POLLNVAL):
                    gone = True
            for c in self.region.take_completions():
                a = self._async.pop(c.id, None)
                if a is None:
                    done[c.id] = c
                    continue
                if a.payload is not None:
                    self.heap.free(a.payload)
                if c.result:
                    with a.session._lock:  # noqa: SLF001 - our own session
                        if not a.session.async_err:
                            a.session.async_err = c.result
        finally:
            with self._cv:
                self._done.update(done)
                self._reaping = False
                self._cv.notify_all()
        if gone and not done:
            raise PeerGone("laked closed the connection: no more completions will come")

    def call(self, op: int, args: Sequence[int] = (), flags: int = 0, data_off: int = 0,
             data_len: int = 0, check: bool = True) -> Cqe:
        """One request on the default session, waited for."""
        return self.default.call(op, args, flags, data_off, data_len, check)

    def drain(self, timeout: float = 30.0) -> None:
        """Wait until every async request has completed."""
        deadline = time.monotonic() + timeout
        while self._async:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(self._async)} async requests still pending")
            self._reap_or_wait(0.01)

    # -- the default session's API, for short scripts -----------------------------------
    def null(self) -> None:
        self.default.null()

    def init(self) -> None:
        self.default.init()

    def mem_alloc(self, n: int) -> int:
        return self.default.mem_alloc(n)

    def mem_free(self, dptr: int) -> None:
        self.default.mem_free(dptr)

    def htod(self, dptr: int, off: int, n: int) -> None:
        self.default.memcpy_htod(dptr, off, n)

    def dtoh(self, off: int, dptr: int, n: int) -> None:
        self.default.memcpy_dtoh(off, dptr, n)

    def module_load(self, image: bytes) -> int:
        return self.default.module_load(image)

    def get_function(self, module: int, name: str) -> int:
        return self.default.get_function(module, name)

    def launch(self, ln: Launch) -> int:
        return self.default.launch(ln)

    def stream_create(self) -> int:
        return self.default.stream_create()

    def stream_sync(self, stream: int = 0) -> None:
        self.default.stream_sync(stream)

    def ctx_sync(self) -> None:
        self.default.ctx_sync()

    def session_close(self) -> None:
        """SESSION_CLOSE for the default session; the next call opens a fresh one."""
        if self._default is not None:
            self._default.close()
            self._default = None

    # -- teardown ------------------------------------------------------------------------
    def _close_fds(self) -> None:
        if self.mm is not None:
            self.mm.close()
            self.mm = None
        for fd in (self.fd, self.sq_efd, self.cq_efd):
            if fd >= 0:
                os.close(fd)
        self.fd = self.sq_efd = self.cq_efd = -1

    def close(self) -> None:
        """Unmap the region and close the memfd and both eventfds."""
        if self._closed:
            return
        self._closed = True
        self.region.close()
        self._close_fds()

    def __enter__(self) -> "Ring":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def u64(v: int) -> bytes:
    return struct.pack("<Q", v)


def u32(v: int) -> bytes:
    return struct.pack("<I", v)


def f32(v: float) -> bytes:
    return struct.pack("<f", v)

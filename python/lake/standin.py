"""A user-space stand-in for lake.ko's side of the data plane.

Same region layout, same ring entries, same ops as /dev/lake, but over a
memfd, with eventfds for doorbells and laked's Server running in a thread
of this process.  The device machine has a GPU but cannot load modules:
this is how laked's GPU executor is tested and measured there.

    with StandIn(executor="gpu") as k:
        d = k.mem_alloc(4096)
        off = k.alloc(4096); k.write(off, data); k.htod(d, off, 4096)
"""
from __future__ import annotations

import itertools
import mmap
import os
import select
import struct
import threading
from dataclasses import dataclass
from typing import Sequence

from laked import abi
from laked.doorbell import EventfdDoorbell
from laked.executor import choose_executor
from laked.region import Cqe, Region, Sqe, init_region, pack_launch_params
from laked.server import Server


class CallError(RuntimeError):
    def __init__(self, op: int, code: int) -> None:
        super().__init__(f"op {op} failed with CUresult {code}")
        self.code = code


@dataclass
class Launch:
    fn: int
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    params: Sequence[bytes]
    shared: int = 0
    stream: int = 0


class StandIn:
    def __init__(self, size: int = 64 << 20, executor: str = "gpu", session: int = 1) -> None:
        self.fd = os.memfd_create("lake-standin", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, size)
        self.mm = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        init_region(self.mm)
        self.region = Region(self.mm)           # the kernel's role: producer
        self._laked_region = Region(self.mm)    # laked's role: consumer
        self.sq_efd, self.cq_efd = os.eventfd(0), os.eventfd(0)
        os.set_blocking(self.cq_efd, False)
        self.executor = choose_executor(executor, self._laked_region)
        self.server = Server(self._laked_region, EventfdDoorbell(self.sq_efd, self.cq_efd),
                             self.executor)
        self.server.start()
        self.session = session
        self._ids = itertools.count(1)
        self._done: dict[int, Cqe] = {}
        self._lock = threading.Lock()
        self._poll = select.poll()
        self._poll.register(self.cq_efd, select.POLLIN)
        self._heap_next = self.region.heap_off

    # -- heap: a bump allocator, reset between uses ---------------------------------
    def alloc(self, n: int, align: int = 256) -> int:
        off = (self._heap_next + align - 1) & ~(align - 1)
        if off + n > self.region.heap_end:
            raise MemoryError(f"stand-in heap exhausted ({n} bytes asked)")
        self._heap_next = off + n
        return off

    def reset_heap(self) -> None:
        self._heap_next = self.region.heap_off

    def write(self, off: int, data: bytes | memoryview) -> None:
        self.region.write(off, data)

    def read(self, off: int, n: int) -> bytes:
        return self.region.read(off, n)

    def view(self, off: int, n: int) -> memoryview:
        return self.region.view(off, n)

    # -- requests ----------------------------------------------------------------------
    def submit(self, op: int, args: Sequence[int] = (), flags: int = 0, data_off: int = 0,
               data_len: int = 0) -> int:
        rid = next(self._ids)
        sqe = Sqe(rid, op, self.session, flags, tuple(args) + (0,) * (10 - len(args)),
                  data_off, data_len)
        while not self.region.submit(sqe):       # full ring: wait, never drop
            self._reap(0.001)
        os.eventfd_write(self.sq_efd, 1)
        return rid

    def wait(self, rid: int, timeout: float = 30.0) -> Cqe:
        import time
        deadline = time.monotonic() + timeout
        while rid not in self._done:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"request {rid} not answered in {timeout}s")
            self._reap(left)
        return self._done.pop(rid)

    def _reap(self, timeout: float) -> None:
        if not self._poll.poll(max(0, int(timeout * 1000))):
            return
        try:
            os.eventfd_read(self.cq_efd)
        except BlockingIOError:
            pass
        for c in self.region.take_completions():
            self._done[c.id] = c

    def call(self, op: int, args: Sequence[int] = (), flags: int = 0, data_off: int = 0,
             data_len: int = 0, check: bool = True) -> Cqe:
        with self._lock:
            c = self.wait(self.submit(op, args, flags, data_off, data_len))
        if check and c.result != 0:
            raise CallError(op, c.result)
        return c

    # -- the cu*-like API -----------------------------------------------------------------
    def null(self) -> None:
        self.call(abi.LAKE_OP_NULL)

    def init(self) -> None:
        self.call(abi.LAKE_OP_INIT)

    def mem_alloc(self, n: int) -> int:
        return self.call(abi.LAKE_OP_MEM_ALLOC, (n,)).ret0

    def mem_free(self, dptr: int) -> None:
        self.call(abi.LAKE_OP_MEM_FREE, (dptr,))

    def htod(self, dptr: int, off: int, n: int, stream: int = 0) -> None:
        flags = abi.LAKE_SQE_F_ASYNC if stream else 0
        self.call(abi.LAKE_OP_MEMCPY_HTOD, (dptr, off, n, stream), flags)

    def dtoh(self, off: int, dptr: int, n: int, stream: int = 0) -> None:
        flags = abi.LAKE_SQE_F_ASYNC if stream else 0
        self.call(abi.LAKE_OP_MEMCPY_DTOH, (off, dptr, n, stream), flags)

    def _with_payload(self, op: int, args: Sequence[int], data: bytes) -> Cqe:
        off = self.alloc(len(data))
        self.write(off, data)
        return self.call(op, args, data_off=off, data_len=len(data))

    def module_load(self, image: bytes) -> int:
        return self._with_payload(abi.LAKE_OP_MODULE_LOAD, (), image).ret0

    def get_function(self, module: int, name: str) -> int:
        return self._with_payload(abi.LAKE_OP_MODULE_GET_FUNCTION, (module,),
                                  name.encode() + b"\0").ret0

    def launch(self, ln: Launch) -> None:
        data = pack_launch_params(ln.params)
        flags = abi.LAKE_SQE_F_ASYNC if ln.stream else 0
        off = self.alloc(len(data))
        self.write(off, data)
        self.call(abi.LAKE_OP_LAUNCH, (ln.fn, *ln.grid, *ln.block, ln.shared, ln.stream),
                  flags, off, len(data))

    def stream_create(self) -> int:
        return self.call(abi.LAKE_OP_STREAM_CREATE, (0,)).ret0

    def stream_sync(self, stream: int = 0) -> None:
        self.call(abi.LAKE_OP_STREAM_SYNC, (stream,))

    def ctx_sync(self) -> None:
        self.call(abi.LAKE_OP_CTX_SYNC)

    def session_close(self) -> None:
        self.call(abi.LAKE_OP_SESSION_CLOSE)

    def close(self) -> None:
        self.server.stop()
        self.executor.close()
        self._laked_region.close()
        self.region.close()
        self.mm.close()
        for fd in (self.fd, self.sq_efd, self.cq_efd):
            os.close(fd)

    def __enter__(self) -> "StandIn":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def u64(v: int) -> bytes:
    return struct.pack("<Q", v)


def u32(v: int) -> bytes:
    return struct.pack("<I", v)

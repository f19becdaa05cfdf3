"""A user-space stand-in for lake.ko's side of the data plane.

Same region layout (laked.region.init_region writes what kmod/region.c
writes), same ring entries, same ops and the same call semantics as the
kernel's lake_cu* API (kmod/cuapi.c), but over a memfd with eventfds for
doorbells (lake.ring.Ring) and laked's Server running in a thread of this
process.  The device machine has a GPU but cannot load modules: this is
how laked's GPU executor is tested and measured there.  User-space clients
of a running laked use the same Ring through lake.Client instead.

    with StandIn(executor="gpu") as k:
        s = k.session()
        s.init()
        d = s.mem_alloc(4096)
        buf = s.mem_alloc_host(4096)
        k.write(buf, data)
        s.memcpy_htod(d, buf, 4096)
        s.close()
"""
from __future__ import annotations

import logging

from laked.doorbell import EventfdDoorbell
from laked.executor import choose_executor
from laked.region import Region
from laked.server import Server

# Re-exported: tests, GPU tests and benchmarks import these from here.
from .ring import (HEAP_ALIGN, CallError, Heap, HeapExhausted, Launch, PeerGone, Ring,
                   RingFull, Session, f32, u32, u64)

__all__ = ["HEAP_ALIGN", "CallError", "Heap", "HeapExhausted", "Launch", "PeerGone", "Ring",
           "RingFull", "Session", "StandIn", "f32", "u32", "u64"]

log = logging.getLogger("lake.standin")


class StandIn(Ring):
    """lake.ko's role over a memfd (a Ring), with laked's server in a thread.

    ``start=False`` leaves the server stopped (tests of a full ring); call
    ``server.start()`` later.
    """

    def __init__(self, size: int = 64 << 20, executor: str = "gpu", *, register: bool = True,
                 start: bool = True, batch: int = 64) -> None:
        super().__init__(size, name="lake-standin")
        self._laked_region = Region(self.mm)        # laked's role: consumer
        try:
            # looked up in this module at call time: tests substitute it
            self.executor = choose_executor(executor, self._laked_region, register=register)
        except BaseException:
            self._laked_region.close()
            Ring.close(self)                          # no fd left behind
            raise
        self.doorbell = EventfdDoorbell(self.sq_efd, self.cq_efd)
        self.server = Server(self._laked_region, self.doorbell, self.executor, batch=batch)
        if start:
            self.server.start()

    def close(self) -> None:
        if self._closed:
            return
        self.server.stop()
        self.doorbell.close()
        self.executor.close()
        self._laked_region.close()
        super().close()

    def __enter__(self) -> "StandIn":
        return self

"""laked's end of /dev/lake: claim it, map the region, serve it.

SERVE makes this file the one server (a second laked gets EBUSY) and resets
the rings; closing the file tells the kernel we are gone, which fails every
request still pending, so a crash can never leave a kernel caller waiting
past its timeout.
"""
from __future__ import annotations

import fcntl
import logging
import mmap
import os
import struct
from dataclasses import dataclass
from typing import Any

from . import abi
from .doorbell import DevLakeDoorbell
from .executor import Executor, choose_executor
from .region import Region
from .server import Server

log = logging.getLogger("laked.dataplane")

DEV = "/dev/lake"


@dataclass
class DataPlane:
    fd: int
    mm: mmap.mmap
    region: Region
    executor: Executor
    server: Server

    @classmethod
    def open(cls, executor_kind: str, path: str = DEV) -> "DataPlane":
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            fcntl.ioctl(fd, abi.LAKE_IOC_SERVE)
            info = bytearray(abi.sizeof("lake_region_info"))
            fcntl.ioctl(fd, abi.LAKE_IOC_INFO, info)
            size, _version = struct.unpack(abi.STRUCTS["lake_region_info"][0], info)
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError:
            os.close(fd)
            raise
        region = Region(mm)
        executor = choose_executor(executor_kind, region)
        server = Server(region, DevLakeDoorbell(fd), executor)
        server.start()
        log.info("serving %s (%d MiB region) with the %s executor", path, size >> 20,
                 executor.name)
        return cls(fd, mm, region, executor, server)

    def close(self) -> None:
        self.server.stop()
        self.server.doorbell.close()
        self.executor.close()
        self.region.close()
        self.mm.close()
        os.close(self.fd)   # the kernel fails whatever is still pending
        log.info("stopped serving %s", DEV)

    def info(self) -> dict[str, Any]:
        ex = self.executor.info()
        if self.executor.name != "gpu":
            copies = "no GPU copies (CPU executor)"
        elif ex.get("registered"):
            copies = "registered with CUDA (cuMemHostRegister, device-mapped): DMA-direct"
        else:
            copies = f"staging copies: {ex.get('register_error') or 'not registered'}"
        return {"executor": self.executor.name, "executor_why": ex.get("why"),
                "region_registered": bool(ex.get("registered")),
                "region_copies": copies,
                "region_mb": self.region.size >> 20,
                "executor_info": ex, "server": self.server.info()}

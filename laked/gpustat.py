"""GPU utilisation as the policies see it: NVML when a GPU exists, else 0.

An operator may pin the value (``laked util set N``), e.g. to keep kernel
work off a GPU reserved for something else; ``laked util auto`` unpins it.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("laked.gpustat")


def _nvml_handle() -> Any:
    try:
        import pynvml  # nvidia-ml-py; absent on machines without a GPU
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetHandleByIndex(0)
    except pynvml.NVMLError as e:
        log.info("no GPU utilisation from NVML: %s", e)
        return None


@dataclass
class GpuUtil:
    override: int | None = None
    _handle: Any = None
    _probed: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def source(self) -> str:
        if self.override is not None:
            return "override"
        return "nvml" if self._handle is not None else "none"

    def read(self) -> int:
        with self._lock:
            if self.override is not None:
                return self.override
            if not self._probed:
                self._handle, self._probed = _nvml_handle(), True
            if self._handle is None:
                return 0
        import pynvml
        return int(pynvml.nvmlDeviceGetUtilizationRates(self._handle).gpu)

    def set_override(self, value: int | None) -> None:
        if value is not None and not 0 <= value <= 100:
            raise ValueError("GPU utilisation is a percentage, 0..100")
        with self._lock:
            self.override = value

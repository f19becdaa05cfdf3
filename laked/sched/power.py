"""Power advice: per-tenant energy and the clock DVFS would pick, advise-only.

Energy comes from NVML's total-energy counter (millijoules since driver
load), read around each tenant's work.  The DVFS model is DESIGN.md's: a
kernel's slowdown at clock f is s * (f_max / f - 1), with s its
sensitivity (1: compute-bound, 0: memory-bound); for a sequence with
aggregate sensitivity S = sum(w * s) the clock that costs at most ``slip``
is f = f_max / (1 + slip / S), rounded up to a supported clock.  Nothing
here sets a clock: NVML is only read.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Advice:
    f_max_mhz: int
    advised_mhz: int
    sensitivity: float
    slip: float
    predicted_slowdown: float
    # dynamic power ~ f * V^2 and V ~ f over the DVFS range: ~f^3; energy for
    # the same work ~ f^2.  A rough figure, labelled as such in status.
    predicted_energy_saving: float


def advise(sensitivity: float, slip: float, supported_mhz: list[int]) -> Advice:
    f_max = max(supported_mhz)
    if sensitivity <= 0:
        target = float(min(supported_mhz))
    else:
        target = f_max / (1.0 + slip / sensitivity)
    f = min((c for c in supported_mhz if c >= target), default=f_max)
    slowdown = sensitivity * (f_max / f - 1.0)
    return Advice(f_max, f, sensitivity, slip, slowdown, 1.0 - (f / f_max) ** 2)


class Nvml:
    """Read-only NVML: energy counter and supported clocks."""

    def __init__(self, index: int = 0) -> None:
        import pynvml
        pynvml.nvmlInit()
        self.nv: Any = pynvml
        self.h = pynvml.nvmlDeviceGetHandleByIndex(index)

    def energy_mj(self) -> int:
        return int(self.nv.nvmlDeviceGetTotalEnergyConsumption(self.h))

    def supported_graphics_mhz(self) -> list[int]:
        mem = self.nv.nvmlDeviceGetSupportedMemoryClocks(self.h)[0]
        return sorted(int(c) for c in self.nv.nvmlDeviceGetSupportedGraphicsClocks(self.h, mem))

    def clocks_mhz(self) -> int:
        return int(self.nv.nvmlDeviceGetClockInfo(self.h, self.nv.NVML_CLOCK_SM))


@dataclass
class EnergyMeter:
    """Energy attributed to one tenant: the counter's growth over its runs."""
    nvml: Nvml
    joules: float = 0.0
    _start: int | None = None

    def begin(self) -> None:
        self._start = self.nvml.energy_mj()

    def end(self) -> None:
        if self._start is not None:
            self.joules += (self.nvml.energy_mj() - self._start) / 1e3
            self._start = None

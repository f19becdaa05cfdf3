"""BE's duty while LC is active: idle GPU time that buys LC a higher clock.

A GPU at its power limit lowers its clock: a GEMM loop on every SM of the
H200 runs it near 1450 MHz rather than 1980, and an LC request that finds
that clock takes about 1.35x as long as alone, however the arbiter orders
the work.  BE left idle for a share of the time draws less power, so the
clock rises (on the H200, BE at 0.85 of the time gave LC ~1710 MHz and lost
~6 % of its own rate).  BE that does not hold the clock down (an
issuer-bound training loop) should keep its whole share, so the share is
governed by the SM clock NVML reads: lowered while the clock is under
``f_max / (1 + clock_slip)``, raised while it is above, between
``be_duty`` and 1.  The pacer turns the share into a GPU-side gap after
each BE atom (``pacer.py``).
"""
from __future__ import annotations

from dataclasses import dataclass

DOWN = 0.05          # duty lost per reading under the target clock
UP = 0.02            # ... and won per reading above it
HYSTERESIS = 0.03    # above means above target * (1 + this)


@dataclass
class Governor:
    floor: float                 # be_duty: the least share BE keeps
    target_mhz: float            # the clock LC's requests should find (0: none known)
    duty: float = 1.0            # BE's share now
    mhz: float = 0.0             # the last SM clock read

    @property
    def active(self) -> bool:
        return self.floor < 1.0 and self.target_mhz > 0

    def step(self, lc_recent: bool, mhz: float) -> float:
        """The share after one clock reading ``mhz``."""
        self.mhz = mhz
        if not self.active:
            self.duty = 1.0
        elif not lc_recent:
            # LC's next burst starts with the clock protected; BE wins its
            # share back within a few readings if the clock stays high
            self.duty = self.floor
        elif mhz < self.target_mhz:
            self.duty = max(self.floor, self.duty - DOWN)
        elif mhz > self.target_mhz * (1.0 + HYSTERESIS):
            self.duty = min(1.0, self.duty + UP)
        return self.duty


def target_mhz(supported_mhz: list[int], clock_slip: float) -> float:
    """The clock LC should find: the fastest one, less ``clock_slip``."""
    return max(supported_mhz) / (1.0 + clock_slip) if supported_mhz else 0.0

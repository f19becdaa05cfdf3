"""The scheduler's knobs (laked.toml's [scheduler] table), checked by name and type.

Pure, so the planning code (plan.py) and the host tests can use them
without torch or a GPU.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

# knobs the GPU arbiter reads once, when it starts (the rest are read as used)
AT_START = frozenset({"gil_switch_us", "gate_timeout_ms", "reserve_mb"})


@dataclass
class Knobs:
    """Scheduler knobs; laked.toml's [scheduler] table sets them by name."""
    atom_us: float = 500.0          # BE atom while LC tenants are active (LithOS: 250-500)
    light_atom_us: float = 300.0    # ... of an issuer at or under park_one (0: atom_us; at most it)
    idle_atom_us: float = 2000.0    # BE atom when no LC request came for quiet_s
    min_atom_us: float = 30.0       # a smaller atom is not worth it: park (or hold) instead
    hold_us: float = 1500.0         # hold at most this long past a predicted LC arrival
    lead_us: float = 0.0            # expect LC this much before its predicted arrival
    park: bool = True               # a hold parks the atom on the GPU (park.py)
    park_raw: bool = False          # ... behind raw-stream LC launches too (tenancy.py)
    park_one: float = 0.5           # one atom parked, an issuer this light (host s per GPU s)
                                    # sleeps until LC came (0: none)
    be_sms: int = 0                 # BE's SMs while LC tenants are active (0: all of them)
    be_duty: float = 1.0            # BE's least share of GPU time while LC is active (1: all)
    clock_slip: float = 0.15        # ... governed to keep the SM clock >= f_max / (1 + this)
    clock_interval_s: float = 0.05  # how often the governor reads the SM clock
    join_small: bool = True         # a small op may join the atom before it (pacer.py)
    learn_whole: bool = True        # learn ops run whole's measured / estimated time
    fill_pointwise: bool = True     # cut a pointwise op to fill the room before LC
    depth: int = 4                  # BE atoms queued per tenant (gated: LC waits for one)
    inline_backward: bool = True    # a BE job's backward runs on its own thread, not autograd's
    quiet_s: float = 1.0            # an LC tenant this long without requests is idle
    slip: float = 1.1               # right-sizing: latency within slip x whole GPU
    rightsize: bool = True
    probe_after: int = 32           # requests on the whole GPU before the probe
    gate_timeout_ms: float = 500.0  # watchdog: reopen a gate shut this long
    unstick_ms: float = 5.0         # a held BE issuer opens the gates of an LC request
                                    # running this long and 8x its usual time (0: never)
    energy_interval_s: float = 0.25
    gil_switch_us: float = 50.0     # laked's threads hand the GIL over within this
    host_first_us: float = 100.0    # BE's Python waits while an LC request's host path runs:
                                    # from its arrival to its launch, and from this long
                                    # before its GPU work's predicted end (0: never)
    power_slip: float = 0.05        # advice: the clock that costs at most this slowdown
    reserve_mb: int = 2048          # device memory torch's allocator caches at start

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "Knobs":
        known = {f.name: f for f in fields(cls)}
        k = cls()
        for name, value in (d or {}).items():
            if name not in known:
                raise ValueError(f"unknown scheduler knob {name!r} "
                                 f"(known: {', '.join(sorted(known))})")
            want = type(getattr(k, name))
            if want is bool and not isinstance(value, bool):
                raise ValueError(f"scheduler knob {name}: expected true/false")
            if want in (int, float) and (isinstance(value, bool) or
                                         not isinstance(value, (int, float)) or value < 0):
                raise ValueError(f"scheduler knob {name}: expected a number >= 0")
            setattr(k, name, want(value))
        if k.depth < 1:
            raise ValueError("scheduler knob depth: at least 1")
        if not 0.05 <= k.be_duty <= 1.0:
            raise ValueError("scheduler knob be_duty: between 0.05 and 1")
        if k.clock_interval_s < 0.005:
            raise ValueError("scheduler knob clock_interval_s: at least 0.005")
        if k.slip < 1.0:
            raise ValueError("scheduler knob slip: at least 1.0")
        return k

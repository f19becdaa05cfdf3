"""Per-model latency tables for cost policies (map "costs").

lake.ko counts, per model and side, runs, items and nanoseconds
(/sys/kernel/lake/models/NAME/stats).  Each tick laked takes the change
since the last one as a sample (mean batch, mean latency) and fits
latency = fixed + per_item * batch by least squares over recent samples:
per item only on the CPU, fixed + per item through laked.  A pinned entry
(laked cost set) wins over the measured one.
"""
from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from . import sysfs

log = logging.getLogger("laked.costs")

SAMPLES = 64


@dataclass
class Cost:
    cpu_ns_per_item: int
    gpu_ns_fixed: int
    gpu_ns_per_item: int

    def leaf(self) -> tuple[int, int, int, int]:
        cap = 0xFFFFFFFF
        return (min(self.cpu_ns_per_item, cap), min(self.gpu_ns_fixed, cap),
                min(self.gpu_ns_per_item, cap), 1)


@dataclass
class _Model:
    last: dict[str, int] = field(default_factory=dict)
    cpu: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=SAMPLES))
    gpu: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=SAMPLES))


def _sample(now: dict[str, int], last: dict[str, int], side: str) -> tuple[float, float] | None:
    runs = now[f"{side}_runs"] - last.get(f"{side}_runs", 0)
    if runs <= 0:
        return None
    items = now[f"{side}_items"] - last.get(f"{side}_items", 0)
    ns = now[f"{side}_ns"] - last.get(f"{side}_ns", 0)
    return items / runs, ns / runs


def fit(samples: list[tuple[float, float]], fixed: bool) -> tuple[float, float]:
    """(fixed, per_item) >= 0 for latency over batch."""
    b = np.array([s[0] for s in samples])
    t = np.array([s[1] for s in samples])
    if not fixed or len(set(b.round(3))) < 2:
        return 0.0, float(t.sum() / max(b.sum(), 1e-9))
    a = np.vstack([np.ones_like(b), b]).T
    (c0, c1), *_ = np.linalg.lstsq(a, t, rcond=None)
    if c1 < 0:
        return float(t.mean()), 0.0
    return max(float(c0), 0.0), float(c1)


@dataclass
class CostTable:
    models: dict[int, _Model] = field(default_factory=dict)
    pinned: dict[int, Cost] = field(default_factory=dict)

    def observe(self) -> None:
        for m in sysfs.models():
            mid, stats = int(m["id"]), dict(m["stats"])  # type: ignore[arg-type]
            st = self.models.setdefault(mid, _Model())
            for side, q in (("cpu", st.cpu), ("gpu", st.gpu)):
                s = _sample(stats, st.last, side)
                if s is not None:
                    q.append(s)
            st.last = stats

    def table(self) -> dict[int, Cost]:
        out: dict[int, Cost] = {}
        # a copy: laked status reads the table while the daemon's tick adds models
        for mid, st in list(self.models.items()):
            if st.cpu and st.gpu:
                _, cpu_per = fit(list(st.cpu), fixed=False)
                g0, g1 = fit(list(st.gpu), fixed=True)
                out[mid] = Cost(round(cpu_per), round(g0), round(g1))
        out.update(self.pinned)
        return out

    def pin(self, model_id: int, cost: Cost | None) -> None:
        if cost is None:
            self.pinned.pop(model_id, None)
        else:
            self.pinned[model_id] = cost

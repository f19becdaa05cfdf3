"""Right-sizing and latency prediction per kernel (or per hosted model step).

Latency on t SMs follows l(t) = m/t + b (work that spreads over SMs plus a
part that does not).  Each observation (t, l) refines a least-squares fit;
a tenant gets the smallest offered partition whose predicted latency is
within ``slip`` of the prediction for the whole GPU.  The same fit predicts
every run before it happens; a prediction off by more than ``miss_s`` is a
miss, and the miss rate and mean error go to laked status.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass, field

import numpy as np

MISS_S = 50e-6


@dataclass
class KernelModel:
    name: str
    points: collections.deque[tuple[int, float]] = field(
        default_factory=lambda: collections.deque(maxlen=256))   # (sms, seconds), recent
    m: float = 0.0
    b: float = 0.0
    predictions: int = 0
    misses: int = 0
    abs_err_s: float = 0.0
    # least-squares sums over every observation, x = 1/t: O(1) per request
    _sums: list[float] = field(default_factory=lambda: [0.0] * 5)   # n, sx, sxx, sy, sxy
    _sizes: set[int] = field(default_factory=set)

    def observe(self, sms: int, seconds: float) -> None:
        if self.fitted:
            err = abs(self.predict(sms) - seconds)
            self.predictions += 1
            self.abs_err_s += err
            self.misses += err > MISS_S
        self.points.append((sms, seconds))
        x = 1.0 / sms
        for i, v in enumerate((1.0, x, x * x, seconds, x * seconds)):
            self._sums[i] += v
        self._sizes.add(sms)
        if self.fitted:
            self._fit()

    @property
    def fitted(self) -> bool:
        return len(self._sizes) >= 2

    def _fit(self) -> None:
        n, sx, sxx, sy, sxy = self._sums
        det = n * sxx - sx * sx
        if det <= 0:
            return
        m = (n * sxy - sx * sy) / det
        b = (sy - m * sx) / n
        self.m, self.b = max(m, 0.0), max(b, 0.0)

    def predict(self, sms: int) -> float:
        return self.m / sms + self.b

    def fit_error(self) -> float:
        """Mean relative error of the fit over the points it was fitted on."""
        if not self.fitted:
            return float("nan")
        # a copy first (list() of a deque is one step for other threads): the
        # LC thread adds points while laked status reads them
        points = list(self.points)
        return float(np.mean([abs(self.predict(t) - s) / s for t, s in points]))

    def right_size(self, offers: list[int], slip: float = 1.1) -> int:
        """The smallest offered SM count within ``slip`` of the largest's latency."""
        best = max(offers)
        if not self.fitted:
            return best
        limit = slip * self.predict(best)
        return min((t for t in offers if self.predict(t) <= limit), default=best)

    def summary(self) -> dict[str, float | int | str]:
        return {"kernel": self.name, "m_us_sm": self.m * 1e6, "b_us": self.b * 1e6,
                "fit_error": self.fit_error(), "predictions": self.predictions,
                "misses": self.misses,
                "mean_abs_err_us": self.abs_err_s / self.predictions * 1e6
                if self.predictions else 0.0}

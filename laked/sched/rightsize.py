"""Right-sizing and latency prediction per kernel (or per hosted model step).

Latency on t SMs follows l(t) = m/t + b (work that spreads over SMs plus a
part that does not).  Each observation (t, l) refines a least-squares fit;
a tenant gets the smallest offered partition whose predicted latency is
within ``slip`` of the prediction for the whole GPU.  The same fit predicts
every run before it happens; a prediction off by more than ``miss_s`` is a
miss, and the miss rate and mean error go to laked status.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

MISS_S = 50e-6


@dataclass
class KernelModel:
    name: str
    points: list[tuple[int, float]] = field(default_factory=list)   # (sms, seconds)
    m: float = 0.0
    b: float = 0.0
    predictions: int = 0
    misses: int = 0
    abs_err_s: float = 0.0

    def observe(self, sms: int, seconds: float) -> None:
        if self.fitted:
            err = abs(self.predict(sms) - seconds)
            self.predictions += 1
            self.abs_err_s += err
            self.misses += err > MISS_S
        self.points.append((sms, seconds))
        self.points = self.points[-256:]
        self._fit()

    @property
    def fitted(self) -> bool:
        return len({t for t, _ in self.points}) >= 2

    def _fit(self) -> None:
        if not self.fitted:
            return
        t = np.array([p[0] for p in self.points], dtype=float)
        lat = np.array([p[1] for p in self.points])
        a = np.vstack([1.0 / t, np.ones_like(t)]).T
        (m, b), *_ = np.linalg.lstsq(a, lat, rcond=None)
        self.m, self.b = max(float(m), 0.0), max(float(b), 0.0)

    def predict(self, sms: int) -> float:
        return self.m / sms + self.b

    def fit_error(self) -> float:
        """Mean relative error of the fit over the points it was fitted on."""
        if not self.fitted:
            return float("nan")
        return float(np.mean([abs(self.predict(t) - s) / s for t, s in self.points]))

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

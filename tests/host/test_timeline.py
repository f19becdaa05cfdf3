"""scripts/bench/timeline_be.py's split of the GPU's idle time before LC (no GPU)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("torch", reason="the benchmark scripts import torch")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts" / "bench"))

import timeline_be as T  # noqa: E402

LC, BE = 7, 3           # stream ids


def _us(x: float) -> float:
    return x * 1e-6       # arrivals are in seconds, kernels in microseconds


def test_idle_before_lc_is_cut_at_the_predicted_and_the_host_arrival() -> None:
    ks = [(0, 100, BE), (200, 260, LC), (270, 300, LC),        # dry 20, late 30, issue 50
          (310, 500, BE), (450, 480, LC),                     # BE ran into LC: no idle
          (600, 650, BE), (720, 760, LC)]                     # came early: dry 50, issue 20
    arrivals = [(_us(150), _us(120)), (_us(440), _us(430)), (_us(680), _us(700))]
    out = T.idle_before_lc(ks, {LC}, arrivals, 0.0)
    assert out["requests"] == 3 and out["idle_before"] == 2
    assert out["ms"] == {"queue_dry": 0.07, "late": 0.03, "issue": 0.07}
    # every idle microsecond is in one part: BE's end to LC's first kernel
    assert sum(out["ms"].values()) == pytest.approx((200 - 100 + 720 - 650) / 1e3)
    assert out["arrival_to_kernel_us"]["p50"] == 40.0


def test_the_previous_request_bounds_the_idle_and_the_offset_maps_the_clocks() -> None:
    # LC's previous request ended at 400; BE's last kernel at 100: idle from 400
    ks = [(0, 100, BE), (300, 400, LC), (500, 550, LC)]
    off = 1e9                                   # trace clock = perf_counter us + 1e9
    arrivals = [(_us(290), _us(280)), (_us(480), _us(450))]
    out = T.idle_before_lc([(a + off, b + off, s) for a, b, s in ks], {LC}, arrivals, off)
    assert out["idle_before"] == 2
    # first: dry 180, late 10, issue 10; second: dry 50, late 30, issue 20
    assert out["ms"] == {"queue_dry": 0.23, "late": 0.04, "issue": 0.03}


def test_unmapped_clocks_are_reported_not_split() -> None:
    ks = [(0, 100, BE), (200, 260, LC)]
    out = T.idle_before_lc(ks, {LC}, [(_us(150), _us(120))], -1e6)
    assert "ms" not in out and out["clocks_disagree_median_us"] > 3000


def test_be_idle_is_cut_where_the_atom_was_queued() -> None:
    be = [(0, 100, -50), (180, 300, 150),      # queued at 150: issuer late 50, waited 30
          (305, 400, 0),                       # a 5 us gap: not idle
          (600, 700, 390)]                     # LC ran 450-550: idle 400-450 and 550-600
    lc = [(450, 550)]
    out = T.be_idle(be, lc)
    assert out["n"] == 2
    assert out["issuer_late_ms"] == 0.05            # 100 -> 150
    assert out["waited_ms"] == pytest.approx(0.08)  # 150 -> 180, and 550 -> 600


def test_event_spans_become_kernels_on_two_streams_in_us() -> None:
    spans = {"lc": [(0.0004, 0.0005), (0.001, 0.0)],          # an unfinished one is dropped
             "be": {"a": [(0.0, 0.0003, 10.0001)], "b": [(0.0006, 0.0007, 10.0005)]}}
    ks, be = T.event_spans(spans, 10.0)
    assert ks == [(0.0, 300.0, 0), (400.0, 500.0, T.EV_LC), (600.0, 700.0, 0)]
    assert [round(h, 3) for _, _, h in be] == [100.0, 500.0]
    out = T.summarize(ks, 1, {T.EV_LC})
    assert out["gpu_busy_share"] == pytest.approx(500 / 700, abs=1e-4)
    assert out["idle_gaps_ms"]["before_lc"] == {"n": 1, "ms": 0.1}

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
    be = [(0, 100, -50, 90), (180, 300, 150, 90),   # queued at 150: issuer late 50, waited 30
          (305, 400, 0, 90),                        # a 5 us gap: not idle
          (600, 700, 390, 90)]                      # LC ran 450-550: idle 400-450, 550-600
    lc = [(450, 550)]
    out = T.be_idle(be, lc)
    assert out["n"] == 2
    assert out["issuer_late_ms"] == 0.05            # 100 -> 150
    assert out["waited_ms"] == pytest.approx(0.08)  # 150 -> 180, and 550 -> 600


def test_event_spans_become_kernels_on_two_streams_in_us() -> None:
    spans = {"lc": [(0.0004, 0.0005), (0.001, 0.0)],          # an unfinished one is dropped
             "be": {"a": [(0.0, 0.0003, 10.0001, 0.00025)],
                    "b": [(0.0006, 0.0007, 10.0005, 0.0001)]}}
    ks, be = T.event_spans(spans, 10.0)
    assert ks == [(0.0, 300.0, 0), (400.0, 500.0, T.EV_LC), (600.0, 700.0, 0)]
    assert [round(h, 3) for _, _, h, _ in be] == [100.0, 500.0]
    assert [round(e, 3) for _, _, _, e in be] == [250.0, 100.0]
    out = T.summarize(ks, 1, {T.EV_LC})
    assert out["gpu_busy_share"] == pytest.approx(500 / 700, abs=1e-4)
    assert out["idle_gaps_ms"]["before_lc"] == {"n": 1, "ms": 0.1}


def test_tail_names_the_slowest_requests_and_the_be_atoms_beside_them() -> None:
    # four requests (host seconds; arrivals 1 ms apart, each predicted 10 us early);
    # GPU spans in us from the zero (host time 0 maps to 0: offset 0)
    arrivals = [(0.001 * i, 0.001 * i - 10e-6) for i in range(4)]
    lc = [(1000.0 * i + 50, 1000.0 * i + 550) for i in range(4)]
    lat = [0.00058, 0.00059, 0.0009, 0.00057]          # request 2 is the slow one
    lc[2] = (2300.0, 2800.0)                             # it started 300 us late ...
    be = [(1900.0, 2290.0, 1800.0, 200.0)]               # ... behind a BE atom of 390 us
    out = T.tail(lat, arrivals, lc, be, 0.0, share=0.25)
    row, = out["slowest"]
    assert row["lat"] == 900.0 and row["issue"] == 300.0 and row["gpu"] == 500.0
    assert row["after"] == pytest.approx(100.0) and row["late"] == pytest.approx(10.0)
    assert row["be_beside"] == 1 and row["be_longest"] == 390.0
    assert row["be_longest_est"] == 200.0 and row["be_left_at_arrival"] == 290.0
    assert out["middle_median"]["be_beside"] == 0 and out["middle_median"]["issue"] == 50.0
    assert T.tail(lat[:3], arrivals, lc, be, 0.0) == {"unmatched": [3, 4, 4]}

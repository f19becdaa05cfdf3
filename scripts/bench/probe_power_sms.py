#!/usr/bin/env python3
"""Probe (device machine): a BE GEMM loop on fewer SMs, its rate, SM clock and power.

A loop of 8192^3 bf16 GEMMs on every SM runs into the power limit and the
SM clock drops (NVML read ~1530 MHz against 1980 MHz idle), and LC work
that runs between its atoms finds that clock.  On fewer SMs the loop draws
less power, so the clock stays higher and the rate falls by less than the
SMs do.  This prints, per partition size (green contexts, as the arbiter's
``be_sms`` knob uses), GEMMs/s as a share of the whole GPU's, the mean SM
clock and power over the run, and an LC GEMM chain's graph replay time
measured right after the loop stops (the clock LC would find); then LC's
time and the SM clock at gaps of 0-500 ms after a whole-GPU loop stops
(how fast the clock comes back).  LC is timed on the host, launch to
synchronize, so its times include launch and wake-up costs.
Usage: probe_power_sms.py [OUT.json] [SECONDS]
"""
from __future__ import annotations

import json
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "python"), str(ROOT / "scripts" / "bench")]

import pynvml  # noqa: E402
import torch  # noqa: E402

import workloads as W  # noqa: E402
from laked.sched.partition import Partitions  # noqa: E402


def loop(be: W.BeWork, stream: Any, stop: threading.Event, count: list[int]) -> None:
    """BE steps on ``stream``, two in flight at most (as sched_gpu's direct BE)."""
    evs: list[torch.cuda.Event] = []
    with torch.cuda.stream(stream):
        while not stop.is_set():
            be.step()
            ev = torch.cuda.Event()
            ev.record(stream)
            evs.append(ev)
            while len(evs) > 2:
                evs.pop(0).synchronize()
                count[0] += 1
    for ev in evs:
        ev.synchronize()


def run(be: W.BeWork, stream: Any, seconds: float, h: Any) -> dict[str, float]:
    stop, count = threading.Event(), [0]
    th = threading.Thread(target=loop, args=(be, stream, stop, count))
    th.start()
    time.sleep(0.5)                             # past the start and the clock ramp
    c0, t0 = count[0], time.perf_counter()
    clocks, watts = [], []
    while time.perf_counter() - t0 < seconds:
        clocks.append(pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM))
        watts.append(pynvml.nvmlDeviceGetPowerUsage(h) / 1e3)
        time.sleep(0.02)
    rate = (count[0] - c0) / (time.perf_counter() - t0)
    stop.set()
    th.join()
    return {"steps_per_s": rate, "sm_mhz": statistics.mean(clocks),
            "watts": statistics.mean(watts)}


def heat(be: W.BeWork, stream: Any, steps: int) -> None:
    """``steps`` BE steps on ``stream``, a few queued at a time, then wait."""
    with torch.cuda.stream(stream):
        for i in range(steps):
            be.step()
            if i % 4 == 3:
                stream.synchronize()
    stream.synchronize()


def lc_after(lc: W.LcWork, be: W.BeWork, stream: Any, hi: Any, gap_s: float,
             h: Any, reps: int = 10) -> tuple[float, float]:
    """LC's graph replay (ms, median) ``gap_s`` after ~50 ms of the BE loop on
    ``stream`` stops, and the SM clock NVML reads just before it."""
    ts, mhz = [], []
    for _ in range(reps):
        heat(be, stream, 32)
        if gap_s:
            time.sleep(gap_s)
        mhz.append(pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM))
        t = time.perf_counter()
        with torch.cuda.stream(hi):
            lc.run()
        hi.synchronize()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3, statistics.mean(mhz)


def main() -> None:
    out_path = sys.argv[1] if len(sys.argv) > 1 else ""
    seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 3.0
    pynvml.nvmlInit()
    h = pynvml.nvmlDeviceGetHandleByIndex(0)
    parts = Partitions(0)
    torch.zeros(1, device="cuda")
    hi = torch.cuda.Stream(priority=-5)         # torch maps it to the highest priority
    be = W.BE["gemm"]()
    lc = W.LC["gemm"]()
    lc.capture(hi)
    rows = []
    for units in (parts.n_units, parts.n_units - 1, parts.n_units - 2, parts.n_units - 4):
        p = parts.get(parts.n_units - units, parts.n_units, True)
        s = p.torch_stream(0)
        with torch.cuda.stream(s):
            be.step()
        s.synchronize()
        r = run(be, s, seconds, h)
        r["lc_after_ms"] = lc_after(lc, be, s, hi, 0.0, h)[0]
        r["sms"] = p.sms
        rows.append(r)
        print(json.dumps(r), flush=True)
    base = rows[0]["steps_per_s"]
    for r in rows:
        r["rate_vs_all"] = r["steps_per_s"] / base
        r["sms_share"] = r["sms"] / parts.total_sms
    # how fast the clock comes back once the loop stops: LC after a gap
    full = parts.full().torch_stream(0)
    recovery = []
    for gap in (0.0, 0.2e-3, 0.5e-3, 1e-3, 2e-3, 5e-3, 20e-3, 100e-3, 500e-3):
        ms, mhz = lc_after(lc, be, full, hi, gap, h)
        recovery.append({"gap_ms": gap * 1e3, "lc_ms": ms, "sm_mhz": mhz})
        print(json.dumps(recovery[-1]), flush=True)
    res = {"device": torch.cuda.get_device_name(), "rows": rows, "recovery": recovery}
    print(json.dumps(res, indent=1))
    if out_path:
        Path(out_path).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()

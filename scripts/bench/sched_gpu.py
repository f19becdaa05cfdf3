#!/usr/bin/env python3
"""LC tail next to BE work, side by side in one run (device machine).

LC: 16 dependent bf16 GEMMs ([512x4096].[4096x4096] + ReLU) per request,
arriving every --period-ms (open loop: a late request starts at once).
BE: a loop of 8192^3 bf16 GEMMs.  Configurations:
  isolated-lc, isolated-be, shared (two streams, LC high priority: the
  MPS-like baseline), static (green contexts: LC quota / the rest), lake
  (laked.sched: LC on the whole GPU, BE atoms adaptive in size and place).
Reports LC p50/p99 and their ratio to isolated, BE throughput ratio to
solo, energy per LC request (NVML), and the scheduler's own cost (LC alone
through the scheduler vs direct).  GC paused while measuring.
Writes docs/bench/sched_gpu.json.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "python")]

import torch  # noqa: E402

from laked.sched import atoms  # noqa: E402
from laked.sched.partition import Partitions  # noqa: E402
from laked.sched.scheduler import Knobs, Scheduler  # noqa: E402

DEV = "cuda"
BF = torch.bfloat16


class Energy:
    def __init__(self) -> None:
        try:
            import pynvml
            pynvml.nvmlInit()
            self.h = pynvml.nvmlDeviceGetHandleByIndex(0)
            self.nv = pynvml
        except Exception:  # noqa: BLE001 - energy is optional
            self.nv = None

    def mj(self) -> float:
        return float(self.nv.nvmlDeviceGetTotalEnergyConsumption(self.h)) if self.nv else 0.0


class Workloads:
    def __init__(self) -> None:
        self.x = torch.randn(512, 4096, device=DEV, dtype=BF)
        self.ws = [torch.randn(4096, 4096, device=DEV, dtype=BF) / 64 for _ in range(16)]
        self.a = torch.randn(8192, 8192, device=DEV, dtype=BF)
        self.b = torch.randn(8192, 8192, device=DEV, dtype=BF)
        self.out = torch.empty(8192, 8192, device=DEV, dtype=BF)

    def lc(self) -> None:
        h = self.x
        for w in self.ws:
            h = torch.relu(h @ w)

    def be_whole(self) -> None:
        torch.matmul(self.a, self.b, out=self.out)

    def be_ops(self) -> Any:
        while True:
            yield atoms.matmul(self.a, self.b, self.out)


def lc_loop(run_one: Callable[[], float], n: int, period: float) -> list[float]:
    lat = []
    nxt = time.perf_counter()
    for _ in range(n):
        # sleep most of the gap, spin the last 300 us: sleep's wake-up jitter
        # would otherwise land in LC's measured tail
        now = time.perf_counter()
        if nxt - now > 300e-6:
            time.sleep(nxt - now - 300e-6)
        while time.perf_counter() < nxt:
            pass
        lat.append(run_one())
        nxt += period
    return lat


def summarize(lat: list[float]) -> dict[str, float]:
    s = sorted(lat)
    return {"n": len(s), "p50_ms": statistics.median(s) * 1e3,
            "p99_ms": s[int(len(s) * 0.99)] * 1e3}


def timed_lc(stream: Any, wl: Workloads) -> Callable[[], float]:
    def one() -> float:
        t = time.perf_counter()
        with torch.cuda.stream(stream):
            wl.lc()
        stream.synchronize()
        return time.perf_counter() - t
    return one


def be_thread(fn: Callable[[], None], stream: Any, stop: threading.Event,
              count: list[int]) -> threading.Thread:
    def run() -> None:
        with torch.cuda.stream(stream):
            while not stop.is_set():
                fn()
                ev = torch.cuda.Event()
                ev.record(stream)
                while not ev.query():          # keep one GEMM queued at most
                    time.sleep(0)
                count[0] += 1
    t = threading.Thread(target=run)
    t.start()
    return t


def measure(name: str, lc_fn: Callable[[], float] | None, be: Callable[[threading.Event], Any]
            | None, args: argparse.Namespace, energy: Energy) -> dict[str, Any]:
    stop = threading.Event()
    be_state = be(stop) if be else None
    time.sleep(0.3)
    e0, t0 = energy.mj(), time.perf_counter()
    rows0 = be_state["rows"]() if be_state else 0
    gc.disable()
    try:
        if lc_fn:
            lat = lc_loop(lc_fn, args.requests, args.period_ms / 1e3)
        else:
            time.sleep(args.requests * args.period_ms / 1e3)
            lat = []
    finally:
        gc.enable()
    dt = time.perf_counter() - t0
    rows = (be_state["rows"]() - rows0) if be_state else 0
    e1 = energy.mj()
    stop.set()
    if be_state:
        be_state["join"]()
    torch.cuda.synchronize()
    res: dict[str, Any] = {"config": name, "seconds": dt}
    if lat:
        res["lc"] = summarize(lat)
        res["energy_mj_per_lc"] = (e1 - e0) / len(lat)
    if be_state:
        res["be_gemms_per_s"] = rows / 8192 / dt
    print(name, json.dumps(res), flush=True)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--period-ms", type=float, default=5.0)
    ap.add_argument("--lc-quota-sms", type=int, default=64)
    ap.add_argument("--busy-rows", type=int, default=0)
    ap.add_argument("--idle-rows", type=int, default=8192)
    ap.add_argument("--idle-depth", type=int, default=2)
    ap.add_argument("--lead-ms", type=float, default=1.2)
    ap.add_argument("--soon-rows", type=int, default=384)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "docs" / "bench" / "sched_gpu.json"))
    args = ap.parse_args()
    torch.zeros(1, device=DEV)
    wl = Workloads()
    energy = Energy()
    parts = Partitions()
    _, lo, hi = parts.cu.cuCtxGetStreamPriorityRange()
    hi_stream = torch.cuda.Stream(priority=-1)
    lo_stream = torch.cuda.Stream(priority=0)
    lc_units = parts.units_for(args.lc_quota_sms)
    st_lc = parts.get(0, lc_units).torch_stream(int(hi))
    st_be = parts.get(lc_units, parts.n_units, True).torch_stream(int(lo))
    sched = Scheduler(parts, args.lc_quota_sms,
                      Knobs(busy_rows=args.busy_rows, idle_rows=args.idle_rows,
                            idle_depth=args.idle_depth, lead_s=args.lead_ms / 1e3,
                            soon_rows=args.soon_rows))
    lc_t = sched.tenant("lc-gemm-chain", "LC", args.lc_quota_sms)
    be_t = sched.tenant("be-gemm", "BE", parts.total_sms)
    for _ in range(20):          # warm cuBLAS on every stream
        for s in (hi_stream, lo_stream, st_lc, st_be, sched.lc_stream, sched.be_busy_stream,
                  sched.be_full_stream):
            with torch.cuda.stream(s):
                wl.lc()
                torch.matmul(wl.a[:1024], wl.b, out=wl.out[:1024])
    torch.cuda.synchronize()

    def plain_be(stream: Any) -> Callable[[threading.Event], Any]:
        def start(stop: threading.Event) -> Any:
            count = [0]
            t = be_thread(wl.be_whole, stream, stop, count)
            return {"rows": lambda: count[0] * 8192, "join": t.join}
        return start

    def lake_be(stop: threading.Event) -> Any:
        t = threading.Thread(target=sched.run_be, args=(be_t, wl.be_ops(), stop))
        t.start()
        return {"rows": lambda: be_t.rows, "join": t.join}

    runs: list[dict[str, Any]] = []
    for rep in range(args.repeats):
        runs.append(measure("isolated-lc", timed_lc(hi_stream, wl), None, args, energy))
        runs.append(measure("isolated-be", None, plain_be(lo_stream), args, energy))
        runs.append(measure("shared", timed_lc(hi_stream, wl), plain_be(lo_stream), args,
                            energy))
        runs.append(measure("static", timed_lc(st_lc, wl), plain_be(st_be), args, energy))
        runs.append(measure("lake", lambda: sched.run_lc(lc_t, wl.lc), lake_be, args, energy))
        runs.append(measure("lake-lc-alone", lambda: sched.run_lc(lc_t, wl.lc), None, args,
                            energy))
    iso_lc = [r for r in runs if r["config"] == "isolated-lc"]
    iso_be = [r for r in runs if r["config"] == "isolated-be"]
    table = []
    for name in ("shared", "static", "lake", "lake-lc-alone", "isolated-lc"):
        for i, r in enumerate(x for x in runs if x["config"] == name):
            row = {"config": name, "repeat": i, **r.get("lc", {})}
            row["lc_p50_ratio"] = r["lc"]["p50_ms"] / iso_lc[i]["lc"]["p50_ms"]
            row["lc_p99_ratio"] = r["lc"]["p99_ms"] / iso_lc[i]["lc"]["p99_ms"]
            if "be_gemms_per_s" in r:
                row["be_ratio"] = r["be_gemms_per_s"] / iso_be[i]["be_gemms_per_s"]
            row["energy_mj_per_lc"] = r.get("energy_mj_per_lc")
            table.append(row)
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "args": vars(args), "runs": runs, "table": table, "scheduler": sched.status()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    for row in table:
        print(f"{row['config']:>14} r{row['repeat']}: LC p50 {row['p50_ms']:.2f} ms "
              f"p99 {row['p99_ms']:.2f} ms (x{row['lc_p50_ratio']:.2f}/x{row['lc_p99_ratio']:.2f})"
              f" BE {row.get('be_ratio', float('nan')):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Diagnostics (device machine): where a BE job's GPU time goes beside LC.

Records the GPU's kernel timeline (torch.profiler, CUDA activity only) for
a window of each config and reports, per config: how much of the window
some kernel ran (the rest is GPU idle), each stream's kernel time, BE's
kernel time per step (against the direct run's: kernels that run slower,
on a lower clock, split into pieces or beside LC's), and the SM clock NVML
read meanwhile.  Configs, as sched_gpu.py names them: isolated-be (direct),
lake-be-alone (at the idle atom budget and at ``--atom-us``, which shows
what splitting alone costs) and lake (LC every --period-ms beside BE).
In the lake window the GPU's idle time before each LC request is split at
the request's predicted and host arrival (``before_lc``: BE's queue ran
dry early, the request came late, or its issue took that long), with the
arbiter's arrival log mapped onto the trace's epoch clock.
CUPTI adds a little to each launch, so its numbers are not the table's.
With --events the arbiter times each BE atom and LC request with CUDA
events instead (GpuArbiter.trace_start): no CUPTI cost on the issuer's
driver calls, atoms instead of kernels, and BE's idle gaps split at the
host time each atom was queued (``be_idle``: the issuer was late, or the
atom waited for a gate or a park), and the slowest LC requests one by one
(``tail``: where each one's time went and the BE atoms beside it).
"""
from __future__ import annotations

import argparse
import bisect
import contextlib
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import sched_gpu as S  # noqa: E402 - sets sys.path and CUDA_DEVICE_MAX_CONNECTIONS

import torch  # noqa: E402

import workloads as W  # noqa: E402
from laked.sched.arbiter import GpuArbiter  # noqa: E402
from laked.tenants import TenantSpec  # noqa: E402


EV_LC = 1     # --events: the stream number LC requests stand on


def union_us(spans: list[tuple[float, float]]) -> float:
    """Time covered by the intervals (start, end)."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def summarize(ks: list[tuple[float, float, int]], steps: int,
              lc_streams: set[int]) -> dict[str, Any]:
    """Busy share of the window, kernel time per stream, and the GPU's idle
    gaps (over 20 us) by what ends them: an LC kernel ("before_lc", BE had
    stopped for LC's arrival), or a BE kernel after an LC one ("after_lc")
    or after a BE one ("be_be", BE's issue fell behind).  ``ks``: kernels
    (start us, end us, stream), sorted; with --events, BE atoms and LC
    requests stand for kernels."""
    if not ks:
        return {"kernels": 0}
    t0, t1 = ks[0][0], max(b for _, b, _ in ks)
    by_stream: dict[int, list[tuple[float, float]]] = {}
    for a, b, st in ks:
        by_stream.setdefault(st, []).append((a, b))
    window = t1 - t0
    streams = {str(k): {"kernels": len(v), "kernel_ms": round(sum(b - a for a, b in v) / 1e3, 3),
                        "busy_ms": round(union_us(v) / 1e3, 3), "lc": k in lc_streams}
               for k, v in sorted(by_stream.items(), key=lambda kv: -len(kv[1]))}
    idle = {"before_lc": [0, 0.0], "after_lc": [0, 0.0], "be_be": [0, 0.0]}
    end, last = ks[0][1], ks[0][2]
    for a, b, st in ks[1:]:
        if a - end > 20:
            kind = ("before_lc" if st in lc_streams else
                    "after_lc" if last in lc_streams else "be_be")
            idle[kind][0] += 1
            idle[kind][1] += a - end
        if b > end:
            end, last = b, st
    out: dict[str, Any] = {
        "kernels": len(ks), "window_ms": round(window / 1e3, 3),
        "gpu_busy_share": round(union_us([(a, b) for a, b, _ in ks]) / window, 4),
        "idle_gaps_ms": {k: {"n": n, "ms": round(us / 1e3, 3)} for k, (n, us) in idle.items()},
        "streams": streams}
    if steps:
        be_ms = sum(v["kernel_ms"] for v in streams.values() if not v["lc"])
        out["be_kernel_ms_per_step"] = round(be_ms / steps, 4)
        out["be_kernels_per_step"] = round(
            sum(v["kernels"] for v in streams.values() if not v["lc"]) / steps, 2)
    return out


def epoch_us_per_perf() -> float:
    """Offset from perf_counter seconds to the trace's clock (unix epoch, us):
    kineto converts CUPTI's timestamps to epoch time.  The closest of a few
    back-to-back readings of both clocks."""
    best = None
    for _ in range(20):
        a = time.perf_counter()
        e = time.time_ns() / 1e3
        b = time.perf_counter()
        if best is None or b - a < best[0]:
            best = (b - a, e - (a + b) / 2 * 1e6)
    assert best is not None
    return best[1]


def kernels_epoch_us(trace: dict[str, Any]) -> list[tuple[float, float, int]]:
    """(start, end, stream) of every kernel, in epoch microseconds."""
    base = float(trace.get("baseTimeNanoseconds", 0)) / 1e3
    return sorted((base + e["ts"], base + e["ts"] + e["dur"], int(e["args"].get("stream", -1)))
                  for e in trace.get("traceEvents", []) if e.get("cat") == "kernel")


def _max_ends(spans: list[tuple[float, float]]) -> list[float]:
    """The latest end among spans[0..i], for each i (spans sorted by start)."""
    out: list[float] = []
    for _, b in spans:
        out.append(max(b, out[-1]) if out else b)
    return out


def idle_before_lc(ks: list[tuple[float, float, int]], lc_streams: set[int],
                   arrivals: list[tuple[float, float]], offset_us: float) -> dict[str, Any]:
    """Split the GPU's idle time before each LC request's first kernel by
    what it waited for.  ``ks``: kernels (start, end, stream) in the trace's
    clock; ``arrivals``: (host arrival, predicted arrival) in perf_counter
    seconds, ``offset_us`` added to map them onto that clock.  The idle runs
    from the later of BE's last kernel end and the previous LC request's
    end to LC's first kernel, cut at the predicted and the host arrival:

    - ``queue_dry``: BE's queued work ended before the predicted arrival;
    - ``late``: the request reached laked after its predicted arrival;
    - ``issue``: from its arrival on the host to its first kernel."""
    lc = [(a, b) for a, b, st in ks if st in lc_streams]
    be = [(a, b) for a, b, st in ks if st not in lc_streams]
    lc_starts = [a for a, _ in lc]
    be_starts = [a for a, _ in be]
    lc_max_end, be_max_end = _max_ends(lc), _max_ends(be)
    tot = {"queue_dry": 0.0, "late": 0.0, "issue": 0.0}
    late_us, issue_us, n = [], [], 0
    for host_s, due_s in arrivals:
        h = host_s * 1e6 + offset_us
        i = bisect.bisect_left(lc_starts, h - 20.0)     # 20 us: the clocks' mapping
        if i >= len(lc):
            continue
        g = lc[i][0]
        issue_us.append(g - h)
        if due_s:
            late_us.append(h - (due_s * 1e6 + offset_us))
        j = bisect.bisect_left(be_starts, g)
        q = be_max_end[j - 1] if j else float("-inf")
        prev = lc_max_end[i - 1] if i else float("-inf")
        start = max(q, prev)
        if q > g or start == float("-inf") or g <= start:
            continue                # BE ran into LC, or the GPU never idled before it
        n += 1
        p = min(max(due_s * 1e6 + offset_us, start), g) if due_s else start
        a = min(max(h, p), g)
        tot["queue_dry"] += p - start
        tot["late"] += a - p
        tot["issue"] += g - a
    out: dict[str, Any] = {"requests": len(arrivals), "idle_before": n,
                           "ms": {k: round(v / 1e3, 3) for k, v in tot.items()}}
    mid = statistics.median(issue_us) if issue_us else 0.0
    if not -50.0 <= mid <= 3000.0:
        # a request's first kernel runs within a few hundred us of its
        # arrival: anything else means the two clocks were not mapped
        return {"requests": len(arrivals), "clocks_disagree_median_us": round(mid, 1)}
    for name, xs in (("arrival_minus_predicted_us", late_us), ("arrival_to_kernel_us", issue_us)):
        if xs:
            xs.sort()
            out[name] = {f"p{q}": round(S.pctl(xs, q / 100), 1) for q in (10, 50, 90)}
    return out


def be_idle(be: list[tuple[float, float, float, float]], lc: list[tuple[float, float]]
            ) -> dict[str, Any]:
    """The GPU's idle time (gaps over 20 us) that a BE atom's start ends,
    split at the host time the atom was queued (all in us, one clock):
    until then the issuer was late (``issuer_late``); after it the queued
    atom waited for a gate or a park (``waited``)."""
    spans = sorted([(a, b, h) for a, b, h, _ in be] + [(a, b, -1.0) for a, b in lc])
    if not spans:
        return {"n": 0}
    end, late, waited, n = spans[0][1], 0.0, 0.0, 0
    for a, b, h in spans[1:]:
        if a - end > 20 and h >= 0:
            n += 1
            cut = min(max(h, end), a)
            late += cut - end
            waited += a - cut
        end = max(end, b)
    return {"n": n, "issuer_late_ms": round(late / 1e3, 3), "waited_ms": round(waited / 1e3, 3)}


def event_spans(spans: dict[str, Any], host0: float
                ) -> tuple[list[tuple[float, float, int]], list[tuple[float, float, float, float]]]:
    """GpuArbiter.trace_stop's spans in us from its zero: as kernels
    (BE atoms on stream 0, LC requests on stream 1) and BE's atoms with the
    host time each was queued and its estimated time."""
    be = [(a * 1e6, b * 1e6, (h - host0) * 1e6, est * 1e6) for xs in spans["be"].values()
          for a, b, h, est in xs if b > 0]
    ks = sorted([(a, b, 0) for a, b, _, _ in be] +
                [(a * 1e6, b * 1e6, EV_LC) for a, b in spans["lc"] if b > 0])
    return ks, be


def tail(lat: list[float], arrivals: list[tuple[float, float]], lc: list[tuple[float, float]],
         be: list[tuple[float, float, float, float]], offset_us: float,
         share: float = 0.02) -> dict[str, Any]:
    """The slowest ``share`` of LC requests, one row each (us): its latency,
    arrival to its GPU start (``issue``), its GPU span, what is left after
    it (the host's wake-up), how late it came against the prediction, and
    the BE atoms that ran beside it: how many, the longest one's measured
    and estimated time, and how long the one running at its arrival had
    left.  The middle half's medians come alongside, to compare."""
    n = min(len(lat), len(arrivals), len(lc))
    if not n or len(lat) != len(lc):
        return {"unmatched": [len(lat), len(arrivals), len(lc)]}
    be = sorted(be)
    starts = [a for a, _, _, _ in be]

    def row(i: int) -> dict[str, float]:
        h = arrivals[i][0] * 1e6 + offset_us
        g0, g1 = lc[i]
        j = bisect.bisect_left(starts, g1)
        beside = [x for x in be[max(0, j - 64):j] if x[1] > h]
        at_h = [x for x in beside if x[0] <= h]
        longest = max(beside, key=lambda x: x[1] - x[0], default=None)
        due = arrivals[i][1]
        return {"lat": round(lat[i] * 1e6, 1), "issue": round(g0 - h, 1),
                "gpu": round(g1 - g0, 1), "after": round(lat[i] * 1e6 - (g1 - h), 1),
                "late": round(h - (due * 1e6 + offset_us), 1) if due else 0.0,
                "be_beside": len(beside),
                "be_longest": round(longest[1] - longest[0], 1) if longest else 0.0,
                "be_longest_est": round(longest[3], 1) if longest else 0.0,
                "be_left_at_arrival": round(max(x[1] for x in at_h) - h, 1) if at_h else 0.0}
    order = sorted(range(n), key=lambda i: lat[i])
    mid = [row(i) for i in order[n // 4: 3 * n // 4]]
    return {"slowest": [row(i) for i in order[-max(1, int(n * share)):]],
            "middle_median": {k: round(statistics.median(r[k] for r in mid), 1)
                              for k in mid[0]}}


def plans(log: list[tuple[float, float, float, float, Any]]) -> dict[str, Any]:
    """The BE plan decisions by outcome, with the predicted time to LC's
    arrival, BE's queue and the op's need at each (ms percentiles)."""
    out: dict[str, Any] = {}
    for what in ("full", "park", "hold", "comp"):
        rows = [r for r in log if (r[4] is None and what == "hold") or
                (r[4] is not None and r[4][0] == what)]
        if not rows:
            continue
        d: dict[str, Any] = {"n": len(rows)}
        for i, name in ((1, "until"), (2, "queued"), (3, "need")):
            xs = sorted(r[i] * 1e3 for r in rows if r[i] != float("inf"))
            if xs:
                d[name] = {f"p{q}": round(S.pctl(xs, q / 100), 3) for q in (10, 50, 90)}
        out[what] = d
    return out


class Clock:
    """Mean SM clock over a window, read every 10 ms on a thread."""

    def __init__(self) -> None:
        self.read = S.nvml_reader("clocks_mhz")
        self.samples: list[float] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(0.01):
            self.samples.append(self.read())

    def __enter__(self) -> "Clock":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()

    def mean(self) -> float:
        return round(statistics.fmean(self.samples), 1) if self.samples else 0.0


def window(label: str, be: S.BeRunner | None, lc_one: Callable[[], float] | None,
           args: argparse.Namespace, out_dir: Path, lc_streams: set[int],
           arb: GpuArbiter | None = None, arrivals_too: bool = False) -> dict[str, Any]:
    """One config's window (after --warm LC requests or 0.3 s of BE),
    profiled, or with --events timed by ``arb``'s events; with
    ``arrivals_too``, LC's arrivals are logged and the idle before each split."""
    events = args.events and arb is not None
    ctx = be if be is not None else contextlib.nullcontext()
    with ctx:
        if lc_one is not None:
            S.paced(lc_one, args.warm, args.period_ms / 1e3)
        else:
            time.sleep(0.3)
        steps0 = be.steps if be else 0
        p0 = S.pacer_stats(be.tenant) if be is not None and be.tenant is not None else {}
        if events:
            assert arb is not None
            prof: Any = contextlib.nullcontext()
            host0 = arb.trace_start()
            offset = -host0 * 1e6
        else:
            prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
            offset = epoch_us_per_perf()
        if arrivals_too:
            assert arb is not None
            arb.arrive_log = []
        with Clock() as clk, prof:
            t0 = time.perf_counter()
            if lc_one is not None:
                lat = S.paced(lc_one, args.requests, args.period_ms / 1e3)
            else:
                time.sleep(args.requests * args.period_ms / 1e3)
                lat = []
            dt = time.perf_counter() - t0
            steps = (be.steps - steps0) if be else 0
            p1 = S.pacer_stats(be.tenant) if p0 else {}
        arrivals = arb.arrive_log if arrivals_too and arb is not None else None
        if arrivals_too and arb is not None:
            arb.arrive_log = None
    torch.cuda.synchronize()
    if events:
        assert arb is not None
        ks, be_atoms = event_spans(arb.trace_stop(), host0)
        lc_streams = {EV_LC}
    elif args.events:
        ks = []                 # a direct run: nothing to time it with
    else:
        path = out_dir / f"{label}.json"
        prof.export_chrome_trace(str(path))
        ks = kernels_epoch_us(json.loads(path.read_text()))
    tl = summarize(ks, steps, lc_streams)
    if events:
        tl["be_idle"] = be_idle(be_atoms, [(a, b) for a, b, st in ks if st == EV_LC])
    if arrivals:
        tl["before_lc"] = idle_before_lc(ks, lc_streams, arrivals, offset)
        if events:
            tl["tail"] = tail(lat, arrivals, [(a, b) for a, b, st in ks if st == EV_LC],
                              be_atoms, offset)
    r = {"config": label, "seconds": round(dt, 4), "be_steps_per_s": round(steps / dt, 2),
         "sm_mhz": clk.mean(), "timeline": tl}
    if lat:
        s = sorted(lat)
        r["lc_p50_ms"] = round(statistics.median(s) * 1e3, 4)
        r["lc_p99_ms"] = round(S.pctl(s, 0.99) * 1e3, 4)
    if p0:      # in the window
        r["be_pacer"] = {k: round(v - p0[k], 4) for k, v in p1.items()}
    print(f"  {label}: {json.dumps(r)}", flush=True)
    return r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lc", default="gemm")
    ap.add_argument("--be", default="train")
    ap.add_argument("--atom-us", type=float, default=400.0,
                    help="lake-be-alone's second budget (the LC-recent atom size)")
    ap.add_argument("--requests", type=int, default=200, help="LC requests in each window")
    ap.add_argument("--period-ms", type=float, default=5.0)
    ap.add_argument("--warm", type=int, default=40)
    ap.add_argument("--knob", action="append", default=[], metavar="NAME=VALUE")
    ap.add_argument("--events", action="store_true",
                    help="time BE atoms and LC requests with events, not the profiler "
                         "(no CUPTI cost per driver call; no per-kernel detail)")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    knobs = S.parse_knobs(args.knob)
    out_dir = Path(tempfile.mkdtemp(prefix="timeline-"))
    arb = GpuArbiter(knobs)
    be = W.BE[args.be]()
    lc = W.LC[args.lc]()
    lo = torch.cuda.Stream(priority=arb.prio_lo)
    with torch.cuda.stream(lo):
        lc.run()
        be.step()
    lc.capture(torch.cuda.Stream(priority=arb.prio_hi))
    runs = [window("isolated-be", S.BeRunner(be, lo), None, args, out_dir, set())]
    idle = arb.knobs.idle_atom_us
    for budget in (idle, args.atom_us):
        arb.knobs.idle_atom_us = budget
        tb = arb.add_tenant(TenantSpec(f"be-alone-{budget:.0f}", "BE", 0, kind="job"))
        try:
            runs.append(window(f"lake-be-alone-{budget:.0f}us",
                               S.BeRunner(be, arb=arb, tenant=tb), None, args, out_dir,
                               set(), arb))
        finally:
            arb.remove_tenant(tb)
    arb.knobs.idle_atom_us = idle
    tl = arb.add_tenant(TenantSpec(f"lc-{lc.name}", "LC", 0, kind="model"))
    tl.allow_partition = False
    runs.append(window("lake-lc-alone", None, S.lake_lc(arb, tl, lc), args, out_dir, set(),
                       arb))
    lc_streams = {int(k) for k in runs[-1]["timeline"].get("streams", {})}
    tb = arb.add_tenant(TenantSpec(f"be-{be.name}", "BE", 0, kind="job"))
    try:
        arb.plan_log = []
        runs.append(window("lake", S.BeRunner(be, arb=arb, tenant=tb),
                           S.lake_lc(arb, tl, lc), args, out_dir, lc_streams, arb, True))
        runs[-1]["plans"] = plans(arb.plan_log)
        print(f"  plans: {json.dumps(runs[-1]['plans'])}", flush=True)
        arb.plan_log = None
    finally:
        arb.remove_tenant(tb)
        arb.remove_tenant(tl)
    if args.out:
        Path(args.out).write_text(json.dumps({"lc": lc.name, "be": be.name,
                                              "knobs": vars(arb.knobs), "runs": runs},
                                             indent=2) + "\n")
    arb.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

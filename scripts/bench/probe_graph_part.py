#!/usr/bin/env python3
"""Probe (device machine): does a CUDA graph captured on a green context's
stream stay on that context's SMs, and what does each LC workload's graph
cost on fewer SMs (the right-sizing curve)?

Prints JSON: for an 8192^2 bf16 GEMM, eager and graph replay times on the
whole GPU and on 16 and 64 SMs (a graph that left its partition would
replay at the whole GPU's speed); then per LC workload the graph replay
median on 16..all SMs, and LC p50/p99 with a BE GEMM loop on the
complement partition.  Usage: probe_graph_part.py [OUT.json]
"""
from __future__ import annotations

import json
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "python"), str(ROOT / "scripts" / "bench")]

import torch  # noqa: E402

import workloads as W  # noqa: E402
from laked.sched.partition import Partitions, check  # noqa: E402


def med_ms(run, stream, n: int = 20) -> float:
    run()
    stream.synchronize()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        run()
        stream.synchronize()
        ts.append(time.perf_counter() - t)
    return round(statistics.median(ts) * 1e3, 4)


def capture(fn, stream) -> torch.cuda.CUDAGraph:
    """``fn`` as a graph captured on ``stream`` (as the benchmark's LC work is)."""
    w = W.LcWork("probe", fn)
    w.capture(stream)
    assert w.graph is not None
    return w.graph


def on(g: torch.cuda.CUDAGraph, s):
    """Replay ``g`` on ``s`` (replay() launches on torch's current stream)."""
    def run() -> None:
        with torch.cuda.stream(s):
            g.replay()
    return run


def main() -> None:
    parts = Partitions(0)
    cu = parts.cu
    prim = check(cu.cuDevicePrimaryCtxRetain(parts.dev), "retain")
    check(cu.cuCtxSetCurrent(prim), "set")
    torch.zeros(1, device="cuda")
    full = torch.cuda.Stream()
    out: dict = {"total_sms": parts.total_sms}
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    o = torch.empty_like(a)

    def mm() -> None:
        torch.matmul(a, a, out=o)
    probe = {}
    for name, s in [("full", full), ("16", parts.get(0, 2).torch_stream()),
                    ("64", parts.get(0, 8).torch_stream())]:
        def eager(s=s) -> None:
            with torch.cuda.stream(s):
                mm()
        g = capture(mm, s)
        probe[name] = {"eager": med_ms(eager, s), "graph_own": med_ms(on(g, s), s),
                       "graph_on_full": med_ms(on(g, full), full)}
    out["gemm8192"] = probe
    print(json.dumps(probe), flush=True)

    units = [2, 4, 6, 8, 10, 12, 14]
    curves = {}
    conc = {}
    for lname in ("gemm", "conv", "attn"):
        lc = W.LC[lname]()
        c = {}
        graphs = {}
        for u in units + [None]:
            p = parts.full() if u is None else parts.get(0, u)
            s = p.torch_stream(-5)
            g = capture(lc.fn, s)
            graphs[u] = (g, s)
            c[p.sms] = med_ms(on(g, s), s, 50)
        curves[lname] = c
        print(lname, json.dumps(c), flush=True)
        # LC on [0,u) beside a BE GEMM loop on the rest
        res = {}
        for u in (6, 8, 10):
            g, s = graphs[u]
            bp = parts.get(u, parts.n_units, True)
            bs = bp.torch_stream(0)
            stop = threading.Event()
            steps = [0]

            def be(bs=bs, stop=stop, steps=steps) -> None:  # type: ignore[no-untyped-def]
                check(cu.cuCtxSetCurrent(prim), "set")
                with torch.cuda.stream(bs):
                    while not stop.is_set():
                        mm()
                        steps[0] += 1
                        if steps[0] % 4 == 0:
                            bs.synchronize()
                bs.synchronize()
            th = threading.Thread(target=be)
            t0 = time.perf_counter()
            th.start()
            lat = []
            rep = on(g, s)
            for _ in range(300):
                t = time.perf_counter()
                rep()
                s.synchronize()
                lat.append(time.perf_counter() - t)
                time.sleep(0.004)
            stop.set()
            th.join()
            dt = time.perf_counter() - t0
            lat.sort()
            res[parts.get(0, u).sms] = {"p50": round(lat[150] * 1e3, 4),
                                        "p99": round(lat[296] * 1e3, 4),
                                        "be_gemm_per_s": round(steps[0] / dt, 1)}
        conc[lname] = res
        print(lname, "beside BE gemm", json.dumps(res), flush=True)
    # BE gemm solo rate on the whole GPU
    out["be_solo_gemm_per_s"] = round(1e3 / med_ms(mm, torch.cuda.current_stream(), 30), 1)
    out["curves_ms"] = curves
    out["beside_be_gemm"] = conc
    print(json.dumps(out))
    if len(sys.argv) > 1:
        Path(sys.argv[1]).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()

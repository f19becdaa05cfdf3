#!/usr/bin/env python3
"""Does a gate wait on BE's stream hold up LC work on other streams? (device machine)

The gate watchdog's stalls (laked/sched/gate.py) leave an LC request's work
queued and never run until a gate reopens.  One explanation is that the
driver puts an LC stream on the same hardware queue as BE's stream, where a
gate wait in front blocks it.  This probe tests that directly: it shuts a
gate from the host, queues a wait on it on BE's stream (the arbiter's
whole-GPU green context, low priority), queues work on a candidate LC stream
and says whether that work finished within 50 ms.  Candidates: 40 of
torch's high-priority pool streams (LC tenants get theirs there), with a
pointwise op, a CUDA graph replay (as the benchmark's LC), and a graph
beside four BE GEMM atoms held at the gate.

    python3 scripts/bench/queue_probe.py [--connections 8]

Stop 27 ran these checks as two ad-hoc scripts on an H200 (driver 580), with
32 hardware queues (and the pointwise op also with 8, on 40 low-priority and
40 raw driver streams besides): no stream's work was held up in any case.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "python")]

WAIT_S = 0.05       # work not done by then counts as held up


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--connections", default="32", help="CUDA_DEVICE_MAX_CONNECTIONS")
    ap.add_argument("--streams", type=int, default=40)
    args = ap.parse_args()
    os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] = args.connections    # before CUDA starts
    import torch

    from laked.sched.arbiter import GpuArbiter
    arb = GpuArbiter({})
    gates = arb.gates
    slot = gates.slot()
    be = arb.full.torch_stream(arb.prio_lo)
    x = torch.ones(1 << 20, device="cuda")
    a = torch.randn(512, 4096, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        (a @ w).relu_()                 # cuBLAS ready before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):
        y = a
        for _ in range(4):
            y = (y @ w).relu_()
    torch.cuda.synchronize()

    def held_up(st: Any, lc_work: Callable[[], None], be_atoms: int) -> bool:
        gates.close_now(slot)
        with torch.cuda.stream(be):
            gates.wait(be.cuda_stream, [slot])
            for _ in range(be_atoms):
                a @ w                   # BE atoms queued behind the wait
        with torch.cuda.stream(st):
            lc_work()
            ev = torch.cuda.Event()
            ev.record(st)
        t0 = time.perf_counter()
        while not ev.query() and time.perf_counter() - t0 < WAIT_S:
            time.sleep(0.0005)
        stuck = not ev.query()
        gates.open_now(slot)
        torch.cuda.synchronize()
        return stuck

    streams = [torch.cuda.Stream(priority=arb.prio_hi) for _ in range(args.streams)]
    cases = [("pointwise op", lambda: x.add_(1.0), 0), ("graph replay", graph.replay, 0),
             ("graph replay beside 4 held BE atoms", graph.replay, 4)]
    print(f"CUDA_DEVICE_MAX_CONNECTIONS={args.connections}, {len(streams)} LC streams")
    try:
        for label, work, atoms in cases:
            res = [held_up(s, work, atoms) for s in streams]
            print(f"{label}: {sum(res)} of {len(res)} held up: "
                  f"{''.join('X' if r else '.' for r in res)}", flush=True)
    finally:
        gates.open_now(slot)
        arb.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Diagnostics (device machine): what a BE job's issuer pays per op and per
atom boundary, without a profiler's own cost.

1. Driver calls the pacer makes at every boundary, through cuda-python and
   through ctypes on libcuda directly (ns per call, median of batches).
2. The op-level atomizer's dispatch: a pointwise op on a small tensor
   directly, under an empty TorchDispatchMode, and inside ``GpuArbiter.be()``.
3. Training steps (BE ``--be``), directly and inside ``be()`` at each atom
   size in ``--atoms``: wall and issuing-thread CPU time per step, the
   pacer's boundary and queue-wait time, atoms per step, and the time spent
   in the pacer's and arbiter's functions (wrapped with a timer; calls nest,
   so the numbers overlap).
"""
from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "python"), str(ROOT / "scripts" / "bench")]

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import workloads as W  # noqa: E402
from laked.sched import arbiter as A, gate as G, opmode as O, pacer as P  # noqa: E402
from laked.sched.arbiter import GpuArbiter  # noqa: E402
from laked.sched.partition import _driver  # noqa: E402
from laked.tenants import TenantSpec  # noqa: E402


def per_call_ns(fn: Callable[[], Any], n: int = 2000, batches: int = 7) -> float:
    out = []
    for _ in range(batches):
        t0 = time.perf_counter_ns()
        for _ in range(n):
            fn()
        out.append((time.perf_counter_ns() - t0) / n)
    return statistics.median(out)


def driver_calls() -> dict[str, float]:
    cu = _driver()
    lib = ctypes.CDLL("libcuda.so.1")
    vp, u32 = ctypes.c_void_p, ctypes.c_uint32
    rec = lib.cuEventRecord
    rec.argtypes, rec.restype = [vp, vp], ctypes.c_int
    qry = lib.cuEventQuery
    qry.argtypes, qry.restype = [vp], ctypes.c_int
    wait = lib.cuStreamWaitValue32_v2
    wait.argtypes, wait.restype = [vp, ctypes.c_uint64, u32, u32], ctypes.c_int
    s = torch.cuda.Stream()
    stream = s.cuda_stream
    flags = int(cu.CUevent_flags.CU_EVENT_DISABLE_TIMING)
    _, ev = cu.cuEventCreate(flags)
    evp = int(ev)
    gates = G.Gates(1.0)
    addr = gates.addr(0)
    eq = int(cu.CUstreamWaitValue_flags.CU_STREAM_WAIT_VALUE_EQ)
    res = {
        "cuda-python cuEventRecord": per_call_ns(lambda: cu.cuEventRecord(ev, stream)),
        "ctypes cuEventRecord": per_call_ns(lambda: rec(evp, stream)),
        "cuda-python cuEventQuery": per_call_ns(lambda: cu.cuEventQuery(ev)),
        "ctypes cuEventQuery": per_call_ns(lambda: qry(evp)),
        "cuda-python cuStreamWaitValue32": per_call_ns(
            lambda: cu.cuStreamWaitValue32(stream, addr, 0, eq), n=500),
        "ctypes cuStreamWaitValue32_v2": per_call_ns(lambda: wait(stream, addr, 0, eq), n=500),
        "torch raw stream": per_call_ns(lambda: torch._C._cuda_getCurrentRawStream(0)),
    }
    torch.cuda.synchronize()
    cu.cuEventDestroy(ev)
    gates.close_all()
    return res


class _Empty(TorchDispatchMode):
    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        return func(*args, **(kwargs or {}))


def dispatch(arb: GpuArbiter) -> dict[str, float]:
    x = torch.randn(1024, device="cuda")
    torch.cuda.synchronize()
    res = {"relu direct": per_call_ns(lambda: torch.relu(x), n=500)}
    with _Empty():
        res["relu, empty mode"] = per_call_ns(lambda: torch.relu(x), n=500)
    t = arb.add_tenant(TenantSpec("be-dispatch", "BE", 0, kind="job"))
    with arb.be(t):
        res["relu, be()"] = per_call_ns(lambda: torch.relu(x), n=500)
    torch.cuda.synchronize()
    res["est_seconds"] = per_call_ns(lambda: O.est_seconds((x, x), {}))
    arb.remove_tenant(t)
    return res


class Timers:
    """Cumulative time and calls of wrapped functions (class attributes)."""

    def __init__(self) -> None:
        self.t: dict[str, list[float]] = {}
        self.undo: list[tuple[Any, str, Any]] = []

    def wrap(self, owner: Any, name: str) -> None:
        orig = getattr(owner, name)
        acc = self.t.setdefault(f"{getattr(owner, '__name__', owner)}.{name}", [0.0, 0])
        pc = time.perf_counter

        def timed(*a: Any, **k: Any) -> Any:
            t0 = pc()
            try:
                return orig(*a, **k)
            finally:
                acc[0] += pc() - t0
                acc[1] += 1
        setattr(owner, name, timed)
        self.undo.append((owner, name, orig))

    def reset(self) -> None:
        for v in self.t.values():
            v[0], v[1] = 0.0, 0

    def restore(self) -> None:
        for owner, name, orig in reversed(self.undo):
            setattr(owner, name, orig)


def steps(arb: GpuArbiter, be: Any, atoms: list[float], n: int, timed: bool) -> list[dict]:
    rows = []
    for _ in range(5):
        be.step()
    torch.cuda.synchronize()
    t0, c0 = time.perf_counter(), time.thread_time()
    for _ in range(n):
        be.step()
    torch.cuda.synchronize()
    rows.append({"config": "direct", "ms_step": (time.perf_counter() - t0) / n * 1e3,
                 "cpu_ms_step": (time.thread_time() - c0) / n * 1e3})
    tm = Timers()
    if timed:
        for owner, name in ((P.Pacer, "_boundary"), (P.Pacer, "_close"), (P.Pacer, "reap"),
                            (P.Pacer, "wait_depth"), (A.GpuArbiter, "be_plan"),
                            (G.Gates, "wait"), (O.AtomizeMode, "__torch_dispatch__"),
                            (O, "est_seconds"), (O, "whole_seconds")):
            tm.wrap(owner, name)
    try:
        for atom in atoms:
            arb.knobs.idle_atom_us = atom
            t = arb.add_tenant(TenantSpec(f"be-{atom:.0f}", "BE", 0, kind="job"))
            p = t.pacer
            with arb.be(t):
                for _ in range(5):
                    be.step()
            torch.cuda.synchronize()
            p.boundary_s = p.wait_depth_s = 0.0
            a0 = t.atoms
            tm.reset()
            t0, c0 = time.perf_counter(), time.thread_time()
            with arb.be(t):
                for _ in range(n):
                    be.step()
            torch.cuda.synchronize()
            wall = time.perf_counter() - t0
            row = {"config": f"be() {atom:.0f} us", "ms_step": wall / n * 1e3,
                   "cpu_ms_step": (time.thread_time() - c0) / n * 1e3,
                   "atoms_step": (t.atoms - a0) / n,
                   "boundary_us_atom": p.boundary_s / max(1, t.atoms - a0) * 1e6,
                   "wait_depth_ms_step": p.wait_depth_s / n * 1e3}
            if timed:
                row["us_per_step"] = {k: round(v[0] / n * 1e6, 1) for k, v in tm.t.items()}
                row["calls_per_step"] = {k: round(v[1] / n, 1) for k, v in tm.t.items()}
            rows.append(row)
            arb.remove_tenant(t)
    finally:
        tm.restore()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--be", default="train")
    ap.add_argument("--atoms", default="2000,400")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.autograd.set_multithreading_enabled(False)    # backward on the issuing thread
    arb = GpuArbiter()
    be = W.BE[args.be]()
    atoms = [float(a) for a in args.atoms.split(",")]
    out: dict[str, Any] = {"driver_ns": driver_calls(), "dispatch_ns": dispatch(arb)}
    out["steps"] = steps(arb, be, atoms, args.steps, timed=False)
    out["steps_timed"] = steps(arb, be, atoms, args.steps, timed=True)
    arb.close()
    print(json.dumps(out, indent=1))
    if args.out:
        args.out.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

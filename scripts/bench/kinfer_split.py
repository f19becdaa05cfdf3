#!/usr/bin/env python3
"""Where kernel INFER's time through the arbiter goes (device machine).

sched_gpu.py measures kinfer through the arbiter alone at ~1.2-1.3x its
isolated latency.  This runs the same workload (workloads.KernelInfer: the
kernel's side in a child process, laked's Server and GPU executor here)
with nothing else on the GPU, in interleaved blocks of --block requests per
mode, so every mode meets the same machine state:

  direct     the executor bound to no tenant (sched_gpu's isolated run)
  lake       bound to an arbiter LC tenant, as laked binds the kernel's
             (with no BE tenant, as here without --be, its batches go bare:
             no gate, no hold, no arrival counted; tenancy.py)
  gated      lake with an idle BE tenant registered: the gated path
  nogate     gated, its gate's close and open (host stores) left out
  nohold     gated with host_first_us=0 (no HostFirst hold around the batch)
  nobook     gated, the arbiter's _arrive/_leave bookkeeping left out
  direct-sw5, lake-sw5  the GIL switch interval at Python's 5 ms, not laked's

Leaving parts out is for attribution only (laked never runs that way).
Each request's round trip, as the kernel's side saw it, is cut at stamps
taken on one clock (CLOCK_MONOTONIC) in both processes:

  wake      the kernel's submit to op_infer's start (doorbell, the server
            thread's wake and GIL, the ring)
  enter     op_infer's start to run_mlp's (model lookup, the tenancy's
            request: the host-path hold)
  copy_in   run_mlp's start to the gate (the input's copy)
  gate      before_launch (gate close, the arrival's bookkeeping)
  launch    the layers' launches
  open      after_launch (in an INFER batch the gate opens at its end, in
            exit: a host store)
  out_sync  the output's copy back and the stream's synchronise
  exit      run_mlp's end to op_infer's (result into the region, the leave)
  post      op_infer's end to the kernel's side seeing it (completion ring,
            doorbell, its wake)

Per mode: each part's median, and its mean over the slowest 1 % of round
trips (where the tail comes from).  --be NAME runs that BE step (gemm, mem,
train) through the arbiter for the whole run, as sched_gpu's lake config.
After the interleaved rounds, direct and lake run once more with the
arbiter's NVML threads (energy, clock governor) stopped.  Writes JSON (--out).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "32")
ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "python"), str(ROOT / "scripts" / "bench")]

import sched_gpu as S  # noqa: E402
import workloads as W  # noqa: E402
from laked.sched.arbiter import GpuArbiter  # noqa: E402
from laked.sched.base import Tenancy  # noqa: E402
from laked.tenants import TenantSpec  # noqa: E402

MODES = ("direct", "lake", "gated", "nogate", "nohold", "nobook", "direct-sw5", "lake-sw5")
GATED = ("gated", "nogate", "nohold", "nobook")     # modes run beside an idle BE tenant
PARTS = ("wake", "enter", "copy_in", "gate", "launch", "open", "out_sync", "exit", "post")
# the stamps that end each part, after the kernel's submit ("t0")
ENDS = ("op0", "mlp0", "bl0", "bl1", "al0", "al1", "mlp1", "op1", "t1")


class _NoGates:
    """The gate calls a GpuTenancy makes, doing nothing (attribution only)."""

    def __init__(self, real: Any) -> None:
        self.real = real

    def slot(self) -> int:
        return self.real.slot()

    def close(self, slot: int, stream: int) -> None:
        pass

    def close_now(self, slot: int) -> None:
        pass

    def open(self, slot: int, stream: int) -> None:
        pass

    def open_now(self, slot: int) -> None:
        pass


def stamped(box: dict[str, float], begin: str, end: str,
            fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with its start and end put in ``box`` under ``begin`` and ``end``."""
    def call(*a: Any) -> Any:
        box[begin] = time.perf_counter()
        try:
            return fn(*a)
        finally:
            box[end] = time.perf_counter()
    return call


class Probe:
    def __init__(self, arb: GpuArbiter, kin: W.KernelInfer, period_s: float) -> None:
        self.arb, self.kin, self.period = arb, kin, period_s
        self.t = arb.add_tenant(TenantSpec("kernel", "LC", 0, kind="kernel"))
        self.ten: dict[str, Any] = {"direct": Tenancy()}
        for m in ("lake", *GATED):
            self.ten[m] = arb.tenancy(self.t)
        self.ten["nogate"].gates = _NoGates(arb.gates)
        self.box: dict[str, float] = {}
        for ten in self.ten.values():
            ten.before_launch = stamped(self.box, "bl0", "bl1", ten.before_launch)
            ten.after_launch = stamped(self.box, "al0", "al1", ten.after_launch)
        ex = kin.executor
        ex.run_mlp = stamped(self.box, "mlp0", "mlp1", ex.run_mlp)
        op = next(k for k, fn in ex._handlers.items()    # noqa: SLF001 - bound at init
                  if fn.__name__ == "op_infer")
        ex._handlers[op] = stamped(self.box, "op0", "op1", ex._handlers[op])   # noqa: SLF001
        self.rows: dict[str, list[list[float]]] = {}

    @contextlib.contextmanager
    def mode(self, m: str) -> Iterator[None]:
        ex, arb = self.kin.executor, self.arb
        sw, lead = sys.getswitchinterval(), arb.knobs.host_first_us
        ex.tenancy = self.ten.get(m.removesuffix("-sw5"))
        if m.endswith("-sw5"):
            sys.setswitchinterval(0.005)
        if m == "nohold":
            arb.knobs.host_first_us = 0.0
        if m == "nobook":
            arb._arrive = lambda t, now: None       # noqa: SLF001 - attribution only
            arb._leave = lambda t: None             # noqa: SLF001
        idle = None
        if m in GATED and not arb.be_tenants:
            idle = arb.add_tenant(TenantSpec("idle-be", "BE", 0, kind="job"))
        try:
            yield
        finally:
            if idle is not None:
                arb.remove_tenant(idle)
            sys.setswitchinterval(sw)
            arb.knobs.host_first_us = lead
            arb.__dict__.pop("_arrive", None)
            arb.__dict__.pop("_leave", None)

    def one(self) -> list[float]:
        """One batch: its round trip, then each part's time (PARTS)."""
        b = self.box
        b.clear()
        b["t0"], b["t1"] = self.kin.run_stamped()
        parts, last = [], b["t0"]
        for k in ENDS:
            parts.append(b[k] - last)
            last = b[k]
        return [b["t1"] - b["t0"], *parts]

    def block(self, m: str, n: int, keep: bool = True) -> None:
        with self.mode(m):
            rows = S.paced(self.one, n, self.period)
        if keep:
            self.rows.setdefault(m, []).extend(rows)

    def rounds(self, modes: list[str], n: int, block: int) -> None:
        """``n`` rounds of a block per mode, interleaved, GC paused."""
        S.interleaved(self.block, modes, n, block)

    def summary(self, base: str) -> dict[str, Any]:
        res: dict[str, Any] = {}
        b = sorted(r[0] for r in self.rows[base])
        for m, rows in self.rows.items():
            rows = sorted(rows)
            rt = [r[0] for r in rows]
            slow = rows[-max(1, len(rows) // 100):]
            res[m] = {"n": len(rt),
                      "p50_ms": round(statistics.median(rt) * 1e3, 4),
                      "p99_ms": round(S.pctl(rt, 0.99) * 1e3, 4),
                      "p50_x": round(statistics.median(rt) / statistics.median(b), 3),
                      "p99_x": round(S.pctl(rt, 0.99) / S.pctl(b, 0.99), 3),
                      "parts_p50_us": {k: round(statistics.median(r[i + 1] for r in rows) * 1e6, 1)
                                       for i, k in enumerate(PARTS)},
                      "parts_slowest_1pct_us": {
                          k: round(statistics.fmean(r[i + 1] for r in slow) * 1e6, 1)
                          for i, k in enumerate(PARTS)}}
        return res


def show(res: dict[str, Any]) -> None:
    for part, r in res.items():
        print(part)
        print(f"  {'':11s} {'p50':>6s} {'p99':>6s}  " + " ".join(f"{k:>8s}" for k in PARTS))
        for m, s in r.items():
            print(f"  {m:11s} {s['p50_ms']:.3f} {s['p99_ms']:.3f}  p50 "
                  + " ".join(f"{v:8.1f}" for v in s["parts_p50_us"].values()))
            print(f"  {'':11s} x{s['p50_x']:.2f} x{s['p99_x']:.2f}  1%  "
                  + " ".join(f"{v:8.1f}" for v in s["parts_slowest_1pct_us"].values()))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--block", type=int, default=100, help="requests per mode per round")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--period-ms", type=float, default=5.0)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--be", default="", help="a BE step through the arbiter all along "
                    "(gemm, mem, train)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "bench" / "kinfer_split.json"))
    args = ap.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    bad = set(modes) - set(MODES)
    if bad or "direct" not in modes:
        raise SystemExit(f"kinfer_split: modes must include direct and be among {MODES}")
    arb = GpuArbiter()
    kin = W.KernelInfer()
    be = contextlib.nullcontext()
    if args.be:
        tb = arb.add_tenant(TenantSpec(f"be-{args.be}", "BE", 0, kind="job"))
        be = S.BeRunner(W.BE[args.be](), arb=arb, tenant=tb)
    try:
        p = Probe(arb, kin, args.period_ms / 1e3)
        with be:
            for m in modes:
                p.block(m, 40, keep=False)      # warm every path
            kin.check()
            p.rounds(modes, args.rounds, args.block)
            res = {"interleaved": p.summary("direct")}
            arb._energy_stop.set()              # noqa: SLF001 - the NVML threads end
            arb._energy.join(2)                 # noqa: SLF001
            if arb._clock.is_alive():           # noqa: SLF001
                arb._clock.join(2)              # noqa: SLF001
            p.rows = {}
            p.rounds(["direct", "lake"], args.rounds // 2 or 1, args.block)
            res["no_nvml_threads"] = p.summary("direct")
        kin.check()
    finally:
        kin.server.stop()
        kin.sock.close()            # the kernel's side exits
        kin.proc.wait(10)
        arb.close()
    show(res)
    out = {"args": vars(args), "result": res}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Diagnostics (device machine): where a BE job's host time goes under the
op-level atomizer.  Runs one BE workload's steps inside ``GpuArbiter.be()``
with atoms of ``--atom-us`` (no LC tenant, so no holds) under cProfile,
backward on the issuing thread so the profile sees it, and prints host
milliseconds per step (sleeps excluded: they are waits for the GPU) and the
functions that cost the most.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "python"), str(ROOT / "scripts" / "bench")]

import torch  # noqa: E402

import workloads as W  # noqa: E402
from laked.sched.arbiter import GpuArbiter  # noqa: E402
from laked.tenants import TenantSpec  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--be", default="train")
    ap.add_argument("--atom-us", type=float, default=400.0)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--top", type=int, default=30)
    args = ap.parse_args()
    arb = GpuArbiter({"idle_atom_us": args.atom_us})
    be = W.BE[args.be]()
    t = arb.add_tenant(TenantSpec("be-prof", "BE", 0, kind="job"))
    torch.autograd.set_multithreading_enabled(False)
    with arb.be(t):
        for _ in range(10):
            be.step()
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    with arb.be(t):
        for _ in range(args.steps):
            be.step()
    prof.disable()
    dt = time.perf_counter() - t0
    st = pstats.Stats(prof)
    sleep_s = sum(v[2] for k, v in st.stats.items() if k[2] in ("<built-in method time.sleep>",))
    print(f"{args.be} atom {args.atom_us:.0f} us: {dt / args.steps * 1e3:.3f} ms/step wall, "
          f"{(dt - sleep_s) / args.steps * 1e3:.3f} ms/step host (sleeps {sleep_s:.3f} s), "
          f"atoms/step {t.atoms / (args.steps + 10):.1f}")
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(args.top)
    # the pacer's own functions by cumulative time: what an atom boundary costs
    pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats("laked/sched", args.top)
    print(out.getvalue())
    arb.remove_tenant(t)
    arb.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

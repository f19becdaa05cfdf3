#!/usr/bin/env python3
"""Probe (device machine): do GEMM pieces run in two waves on a partition, and
does cuBLAS's SM count target fix it?

For [M, 8192] x [8192, 8192] bf16 (M: the row pieces BE's atoms cut the
8192^3 GEMM into, and the whole of it), mm and addmm (bias) are timed with
CUDA events (median of 20) on the whole GPU, on a partition of the last
``--sms`` SMs, and on that partition with ``cublasSetSmCountTarget`` (mm)
and torch's ``_set_sm_carveout`` (addmm, if this torch has it).  A ratio
near 132/124 = 1.06 means one wave; near 2, two.
Usage: probe_sm_target.py [--sms 124] [--out OUT.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "python")]

import torch  # noqa: E402

from laked.sched.blas import set_sm_target  # noqa: E402
from laked.sched.partition import Partitions  # noqa: E402


def timed(fn: Callable[[], Any], stream: Any, n: int = 20) -> float:
    """Median ms of ``fn`` on ``stream`` (CUDA events, after two warm-ups)."""
    ts = []
    with torch.cuda.stream(stream):
        for i in range(n + 2):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record(stream)
            fn()
            b.record(stream)
            b.synchronize()
            if i >= 2:
                ts.append(a.elapsed_time(b))
    return statistics.median(ts)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sms", type=int, default=124)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    torch.zeros(1, device="cuda")
    parts = Partitions(0)
    cap = parts.tail(args.sms)
    full = parts.full().torch_stream(0)
    part = cap.torch_stream(0)
    carve = getattr(torch._C, "_set_sm_carveout", None)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(8192, device="cuda", dtype=torch.bfloat16)
    rows = []
    for m in (512, 1024, 2048, 4096, 8192):
        a = torch.randn(m, 8192, device="cuda", dtype=torch.bfloat16)
        out = torch.empty(m, 8192, device="cuda", dtype=torch.bfloat16)

        def mm(a: torch.Tensor = a, out: torch.Tensor = out) -> None:
            torch.mm(a, b, out=out)

        def addmm(a: torch.Tensor = a, out: torch.Tensor = out) -> None:
            torch.addmm(bias, a, b, out=out)
        r: dict[str, Any] = {"m": m, "sms": cap.sms}
        for name, fn in (("mm", mm), ("addmm", addmm)):
            r[f"{name}_all_ms"] = timed(fn, full)
            r[f"{name}_part_ms"] = timed(fn, part)
        with torch.cuda.stream(part):
            r["target_set"] = set_sm_target(cap.sms)
        r["mm_part_target_ms"] = timed(mm, part)
        r["addmm_part_target_ms"] = timed(addmm, part)
        with torch.cuda.stream(part):
            set_sm_target(0)
        if carve is not None:
            carve(parts.total_sms - cap.sms)
            r["addmm_part_carveout_ms"] = timed(addmm, part)
            r["mm_part_carveout_ms"] = timed(mm, part)
            carve(None)
        for k in [k for k in r if k.endswith("_ms") and "_part" in k]:
            r[k.replace("_ms", "_ratio")] = r[k] / r[k.split("_part")[0] + "_all_ms"]
        rows.append(r)
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v)
                          for k, v in r.items()}), flush=True)
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "carveout": carve is not None, "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

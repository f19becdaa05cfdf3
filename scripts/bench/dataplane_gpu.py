#!/usr/bin/env python3
"""laked's data plane on a GPU, through the ring protocol (device machine).

The stand-in (python/lake/standin.py) plays lake.ko over a memfd region laid
out like /dev/lake's, with the kernel's call semantics; laked's server runs
in a thread of this process, as it would serve the kernel.  Every figure is
set against a baseline measured in the same run:

  - per-request overhead: a NULL op's round trip (stand-in -> server thread
    -> stand-in) vs a bare Python function call and vs a pipe round trip to
    a thread (the cheapest cross-thread wake-up Python has);
  - copies: lake_cuMemcpyHtoD/DtoH of a buffer in the registered region vs
    cuMemcpyHtoD/DtoH from cuMemAllocHost (pinned) memory, 64 KiB..64 MiB;
  - launch round trip: a one-block kernel launched and its stream
    synchronised through lake (launch does not wait, the sync does, as in
    the kernel API) vs cuLaunchKernel + cuStreamSynchronize directly;
  - the fixed-point MLP (31->256->2) through LAKE_OP_INFER, per batch.

Median and p99 over --samples (>= 1000) samples each, GC off while timing.
Writes JSON (default docs/bench/dataplane_gpu.json) and prints a markdown table.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "python"), str(ROOT / "scripts" / "bench")]

from lake.standin import Launch, StandIn, u32, u64  # noqa: E402
from laked import mlp  # noqa: E402
from vecadd_ptx import VECADD_PTX  # noqa: E402

COPY_SIZES = [64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20]


def stats(samples: list[float]) -> dict[str, float]:
    s = sorted(samples)
    return {"median_us": s[len(s) // 2] * 1e6, "p99_us": s[min(len(s) - 1, int(len(s) * 0.99))] * 1e6,
            "n": len(s)}


def timed(fn: Callable[[], Any], n: int, warm: int = 50) -> dict[str, float]:
    for _ in range(warm):
        fn()
    out = [0.0] * n
    clock = time.perf_counter
    gc.collect()
    gc.disable()
    try:
        for i in range(n):
            t = clock()
            fn()
            out[i] = clock() - t
    finally:
        gc.enable()
    return stats(out)


def ratio(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    return {"median": a["median_us"] / b["median_us"], "p99": a["p99_us"] / b["p99_us"]}


def pipe_round_trip(n: int) -> dict[str, float]:
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()

    def echo() -> None:
        while True:
            b = os.read(r1, 1)
            if b == b"q":
                return
            os.write(w2, b)
    t = threading.Thread(target=echo)
    t.start()

    def rt() -> None:
        os.write(w1, b"x")
        os.read(r2, 1)
    try:
        return timed(rt, n)
    finally:
        os.write(w1, b"q")
        t.join()
        for fd in (r1, w1, r2, w2):
            os.close(fd)


def bench_null(k: StandIn, n: int) -> dict[str, Any]:
    s = k.session()

    def bare() -> None:
        pass
    lake = timed(s.null, n, 200)
    call = timed(bare, n)
    pipe = pipe_round_trip(n)
    s.close()
    return {"lake": lake, "python_call": call, "pipe_thread": pipe,
            "ratio_vs_pipe": ratio(lake, pipe),
            "overhead_vs_call_us": lake["median_us"] - call["median_us"]}


def bench_copies(k: StandIn, n: int) -> list[dict[str, Any]]:
    cu = k.executor.cu
    s = k.session()
    s.init()
    rows = []
    for size in COPY_SIZES:
        reps = n
        host = s.mem_alloc_host(size)
        k.write(host, np.random.default_rng(size).bytes(size))
        d = s.mem_alloc(size)
        k.executor._make_current()  # noqa: SLF001 - the direct baseline runs on this thread
        _, pinned = cu.cuMemAllocHost(size)
        pinned = int(pinned)
        row: dict[str, Any] = {"bytes": size}
        row["lake_htod"] = timed(lambda: s.memcpy_htod(d, host, size), reps, 5)
        row["lake_dtoh"] = timed(lambda: s.memcpy_dtoh(host, d, size), reps, 5)
        row["pinned_htod"] = timed(lambda: cu.cuMemcpyHtoD(d, pinned, size), reps, 5)
        row["pinned_dtoh"] = timed(lambda: cu.cuMemcpyDtoH(pinned, d, size), reps, 5)
        cu.cuMemFreeHost(pinned)
        s.mem_free(d)
        s.mem_free_host(host)
        for key in ("lake_htod", "lake_dtoh", "pinned_htod", "pinned_dtoh"):
            row[key]["GBps"] = size / (row[key]["median_us"] * 1e-6) / 1e9
        row["htod_ratio"] = ratio(row["lake_htod"], row["pinned_htod"])
        row["dtoh_ratio"] = ratio(row["lake_dtoh"], row["pinned_dtoh"])
        rows.append(row)
        print(f"copy {size >> 10:>6} KiB: HtoD lake {row['lake_htod']['GBps']:6.2f} GB/s vs "
              f"pinned {row['pinned_htod']['GBps']:6.2f}; DtoH lake "
              f"{row['lake_dtoh']['GBps']:6.2f} vs {row['pinned_dtoh']['GBps']:6.2f}", flush=True)
    s.close()
    return rows


def bench_launch(k: StandIn, n: int) -> dict[str, Any]:
    cu = k.executor.cu
    s = k.session()
    s.init()
    fn = s.get_function(s.module_load(VECADD_PTX), "vecadd")
    st = s.stream_create()
    da, db, dc = (s.mem_alloc(4096) for _ in range(3))
    ln = Launch(fn, (1, 1, 1), (256, 1, 1), [u64(da), u64(db), u64(dc), u32(256)], stream=st)

    def via_lake() -> None:
        s.launch(ln)
        s.stream_sync(st)
    lake = timed(via_lake, n, 100)
    k.executor._make_current()  # noqa: SLF001
    _, m = cu.cuModuleLoadData(VECADD_PTX + b"\0")
    _, f = cu.cuModuleGetFunction(m, b"vecadd")
    _, stream = cu.cuStreamCreate(0)
    vals = [ctypes.c_uint64(da), ctypes.c_uint64(db), ctypes.c_uint64(dc), ctypes.c_uint32(256)]
    ptrs = (ctypes.c_void_p * 4)(*[ctypes.addressof(v) for v in vals])

    def direct() -> None:
        cu.cuLaunchKernel(f, 1, 1, 1, 256, 1, 1, 0, stream, ctypes.addressof(ptrs), 0)
        cu.cuStreamSynchronize(stream)
    base = timed(direct, n, 100)
    cu.cuStreamDestroy(stream)
    cu.cuModuleUnload(m)
    s.close()
    return {"lake": lake, "direct": base, "ratio": ratio(lake, base)}


def bench_infer(k: StandIn, n: int) -> list[dict[str, Any]]:
    model = mlp.quantize(*mlp.linnos_like(0))
    blob = model.blob()
    s = k.session()
    boff = s.mem_alloc_host(len(blob))
    k.write(boff, blob)
    rows = []
    for batch in (1, 8, 64, 256, 1024):
        x = mlp.to_fixed(np.random.default_rng(batch).normal(size=(batch, 31)), model.frac)
        off = s.mem_alloc_host(batch * 33 * 4)
        k.write(off, x.astype("<i4").tobytes())
        r = timed(lambda: s.infer(1, 1, boff, len(blob), batch, 31, 2, off), n, 20)
        y = np.frombuffer(k.read(off + batch * 124, batch * 8), "<i4").reshape(batch, 2)
        assert np.array_equal(y, model.run(x)), "GPU INFER differs from the reference"
        rows.append({"batch": batch, **r, "items_per_s": batch / (r["median_us"] * 1e-6)})
        s.mem_free_host(off)
    s.close()
    return rows


def table(out: dict[str, Any]) -> str:
    def us(d: dict[str, float]) -> str:
        return f"{d['median_us']:.1f} / {d['p99_us']:.1f}"
    lines = [f"Device: {out['device']}; region registered: {out['registered']}; "
             f"{out['samples']} samples each (median / p99, µs)", "",
             "| measurement | lake | baseline | baseline is | ratio (median, p99) |",
             "| --- | --- | --- | --- | --- |"]
    nl = out["null_round_trip"]
    lines.append(f"| NULL round trip | {us(nl['lake'])} | {us(nl['pipe_thread'])} | pipe round "
                 f"trip to a thread | {nl['ratio_vs_pipe']['median']:.2f}×, "
                 f"{nl['ratio_vs_pipe']['p99']:.2f}× |")
    lines.append(f"| NULL round trip | {us(nl['lake'])} | {us(nl['python_call'])} | bare Python "
                 f"call | +{nl['overhead_vs_call_us']:.1f} µs per request |")
    la = out["launch_round_trip"]
    lines.append(f"| launch + stream sync | {us(la['lake'])} | {us(la['direct'])} | cuda-python "
                 f"launch + sync | {la['ratio']['median']:.2f}×, {la['ratio']['p99']:.2f}× |")
    for r in out["copies"]:
        for d in ("htod", "dtoh"):
            lk, pn, rt = r[f"lake_{d}"], r[f"pinned_{d}"], r[f"{d}_ratio"]
            size = f"{r['bytes'] >> 20} MiB" if r["bytes"] >= 1 << 20 else f"{r['bytes'] >> 10} KiB"
            lines.append(f"| {d.upper().replace('TO', 'to')} {size} | {us(lk)} "
                         f"({lk['GBps']:.1f} GB/s) | {us(pn)} ({pn['GBps']:.1f} GB/s) | "
                         f"cuMemcpy from cuMemAllocHost | {rt['median']:.2f}×, {rt['p99']:.2f}× |")
    for r in out.get("infer_mlp_31_256_2", []):
        lines.append(f"| INFER MLP 31-256-2, batch {r['batch']} | {r['median_us']:.1f} / "
                     f"{r['p99_us']:.1f} | | | {r['items_per_s']:.3g} items/s |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--out", default=str(ROOT / "docs" / "bench" / "dataplane_gpu.json"))
    args = ap.parse_args()
    n = args.samples
    out: dict[str, Any] = {"host": platform.node(), "python": platform.python_version(),
                           "samples": n, "when": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                               time.gmtime())}
    try:
        from importlib.metadata import version
        out["cuda_bindings"] = version("cuda-bindings")
    except Exception:  # noqa: BLE001 - informational only
        out["cuda_bindings"] = None
    # 64 MiB copies need their buffer in the heap: a region bigger than the kernel's default
    with StandIn(size=192 << 20, executor="gpu") as k:
        out["device"] = k.executor.device_name
        out["registered"] = k.executor.registered
        out["region_mb"] = k.region.size >> 20
        out["null_round_trip"] = bench_null(k, n)
        print(f"null: {out['null_round_trip']['lake']}", flush=True)
        out["launch_round_trip"] = bench_launch(k, n)
        print(f"launch: {out['launch_round_trip']['ratio']}", flush=True)
        out["copies"] = bench_copies(k, n)
        out["infer_mlp_31_256_2"] = bench_infer(k, n)
        out["server"] = k.server.info()
        out["executor"] = {key: v for key, v in k.executor.info().items()
                           if isinstance(v, (int, float, str, bool, type(None)))}
    md = table(out)
    out["table_md"] = md
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print()
    print(md)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

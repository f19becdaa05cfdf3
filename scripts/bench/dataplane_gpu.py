#!/usr/bin/env python3
"""laked's data plane on a GPU, through the ring protocol (device machine).

Each figure is a ratio against a baseline measured in the same run:
  - per-request overhead: NULL op round trip (stand-in -> laked server thread
    -> stand-in) vs a pipe round trip to a thread (the cheapest cross-thread
    wake-up Python has);
  - copies: HtoD/DtoH through the registered region vs cuMemcpy from pinned
    memory (cuMemAllocHost), same sizes;
  - launch round trip: a tiny kernel launched and synchronised through lake
    vs directly with cuda-python.
Also the fixed-point MLP (31->256->2) through LAKE_OP_INFER per batch size.
Median and p99 over many samples, GC paused; writes docs/bench/dataplane_gpu.json.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "python")]

from lake.standin import Launch, StandIn, u32, u64  # noqa: E402
from laked import abi, mlp  # noqa: E402


def stats(samples: list[float]) -> dict[str, float]:
    s = sorted(samples)
    return {"median_us": statistics.median(s) * 1e6, "p99_us": s[int(len(s) * 0.99)] * 1e6,
            "n": len(s)}


def timed(fn, n: int, warm: int = 50) -> list[float]:  # type: ignore[no-untyped-def]
    for _ in range(warm):
        fn()
    out = []
    gc.disable()
    try:
        for _ in range(n):
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
    finally:
        gc.enable()
    return out


def pipe_baseline(n: int) -> list[float]:
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
    out = timed(rt, n)
    os.write(w1, b"q")
    t.join()
    for fd in (r1, w1, r2, w2):
        os.close(fd)
    return out


def ratio(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    return {"median": a["median_us"] / b["median_us"], "p99": a["p99_us"] / b["p99_us"]}


def bench_copies(k: StandIn, sizes: list[int], reps: int) -> list[dict[str, object]]:
    cu = k.executor.cu
    rows = []
    for size in sizes:
        k.reset_heap()
        off = k.alloc(size)
        k.write(off, np.random.default_rng(0).bytes(size))
        d = k.mem_alloc(size)
        _, pinned = cu.cuMemAllocHost(size)
        pinned = int(pinned)
        k.executor._make_current()  # noqa: SLF001 - direct baseline on this thread
        lake_h = stats(timed(lambda: k.htod(d, off, size), reps, 5))
        lake_d = stats(timed(lambda: k.dtoh(off, d, size), reps, 5))
        k.executor._make_current()  # noqa: SLF001
        base_h = stats(timed(lambda: cu.cuMemcpyHtoD(d, pinned, size), reps, 5))
        base_d = stats(timed(lambda: cu.cuMemcpyDtoH(pinned, d, size), reps, 5))
        cu.cuMemFreeHost(pinned)
        k.mem_free(d)
        gbs = lambda s: size / (s["median_us"] * 1e-6) / 1e9  # noqa: E731
        rows.append({"bytes": size, "lake_htod": lake_h, "pinned_htod": base_h,
                     "lake_dtoh": lake_d, "pinned_dtoh": base_d,
                     "lake_htod_GBps": gbs(lake_h), "pinned_htod_GBps": gbs(base_h),
                     "lake_dtoh_GBps": gbs(lake_d), "pinned_dtoh_GBps": gbs(base_d),
                     "htod_time_ratio": ratio(lake_h, base_h),
                     "dtoh_time_ratio": ratio(lake_d, base_d)})
        print(f"copy {size >> 10:>7} KiB: HtoD lake {gbs(lake_h):6.2f} GB/s vs pinned "
              f"{gbs(base_h):6.2f}; DtoH lake {gbs(lake_d):6.2f} vs {gbs(base_d):6.2f}",
              flush=True)
    return rows


def bench_launch(k: StandIn, n: int) -> dict[str, object]:
    from vecadd_ptx import VECADD_PTX  # type: ignore[import-not-found]
    cu = k.executor.cu
    k.reset_heap()
    mod = k.module_load(VECADD_PTX)
    fn = k.get_function(mod, "vecadd")
    da, db, dc = (k.mem_alloc(4096) for _ in range(3))
    ln = Launch(fn, (1, 1, 1), (256, 1, 1), [u64(da), u64(db), u64(dc), u32(256)])
    heap_mark = k._heap_next  # noqa: SLF001 - reuse the param buffer space

    def via_lake() -> None:
        k._heap_next = heap_mark  # noqa: SLF001
        k.launch(ln)
        k.stream_sync(0)
    lake_s = stats(timed(via_lake, n))
    k.executor._make_current()  # noqa: SLF001
    _, m = cu.cuModuleLoadData(VECADD_PTX + b"\0")
    _, f = cu.cuModuleGetFunction(m, b"vecadd")
    import ctypes
    vals = [ctypes.c_uint64(da), ctypes.c_uint64(db), ctypes.c_uint64(dc), ctypes.c_uint32(256)]
    ptrs = (ctypes.c_void_p * 4)(*[ctypes.addressof(v) for v in vals])

    def direct() -> None:
        cu.cuLaunchKernel(f, 1, 1, 1, 256, 1, 1, 0, cu.CUstream(0), ctypes.addressof(ptrs), 0)
        cu.cuStreamSynchronize(cu.CUstream(0))
    direct_s = stats(timed(direct, n))
    return {"lake": lake_s, "direct": direct_s, "ratio": ratio(lake_s, direct_s)}


def bench_infer(k: StandIn, reps: int) -> list[dict[str, object]]:
    model = mlp.quantize(*mlp.linnos_like(0))
    blob = model.blob()
    rows = []
    for batch in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024):
        k.reset_heap()
        boff = k.alloc(len(blob))
        k.write(boff, blob)
        x = mlp.to_fixed(np.random.default_rng(batch).normal(size=(batch, 31)), model.frac)
        off = k.alloc(batch * 33 * 4)
        k.write(off, x.astype("<i4").tobytes())
        args = (1, 1, boff, len(blob), batch, 31, 2)
        s = stats(timed(lambda: k.call(abi.LAKE_OP_INFER, args, data_off=off,
                                       data_len=batch * 33 * 4), reps, 10))
        y = np.frombuffer(k.read(off + batch * 124, batch * 8), "<i4").reshape(batch, 2)
        assert np.array_equal(y, model.run(x))
        rows.append({"batch": batch, **s, "items_per_s": batch / (s["median_us"] * 1e-6)})
        print(f"infer batch {batch:>5}: median {s['median_us']:8.1f} us "
              f"p99 {s['p99_us']:8.1f} us", flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--out", default=str(ROOT / "docs" / "bench" / "dataplane_gpu.json"))
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "scripts" / "bench"))
    out: dict[str, object] = {"host": platform.node(), "python": platform.python_version()}
    with StandIn(size=192 << 20, executor="gpu") as k:
        k.init()
        out["device"] = k.executor.device_name
        out["registered"] = k.executor.registered
        null = stats(timed(k.null, args.samples, 200))
        pipe = stats(pipe_baseline(args.samples))
        out["null_round_trip"] = {"lake": null, "pipe_thread_baseline": pipe,
                                  "ratio": ratio(null, pipe)}
        print(f"null: lake {null['median_us']:.1f} us (p99 {null['p99_us']:.1f}) vs pipe "
              f"{pipe['median_us']:.1f} us (p99 {pipe['p99_us']:.1f})", flush=True)
        out["launch_round_trip"] = bench_launch(k, args.samples)
        print(f"launch: {out['launch_round_trip']}", flush=True)
        out["copies"] = bench_copies(k, [64 << 10, 1 << 20, 16 << 20, 64 << 20],
                                     max(50, args.samples // 20))
        out["infer_mlp_31_256_2"] = bench_infer(k, max(200, args.samples // 4))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

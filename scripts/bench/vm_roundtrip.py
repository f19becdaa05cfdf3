"""Null round trip kernel -> laked -> kernel vs a bare ioctl, in one VM run.

Run inside the VM as root with lake.ko loaded (make bench-vm does it):
starts laked, then times LAKE_IOC_NOP (the ioctl floor) and LAKE_IOC_NULL_RT
(a request on the ring that laked completes) alternately in blocks, so both
see the same machine state.  Writes docs/bench/vm_roundtrip.json.
"""
from __future__ import annotations

import fcntl
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from laked import abi  # noqa: E402

BLOCKS = 20
PER_BLOCK = 250


def timed(fd: int, cmd: int, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter_ns()
        fcntl.ioctl(fd, cmd)
        out.append((time.perf_counter_ns() - t) / 1000.0)
    return out


def summary(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    return {"n": len(xs), "median_us": round(statistics.median(xs), 2),
            "p99_us": round(xs[int(len(xs) * 0.99) - 1], 2),
            "mean_us": round(statistics.fmean(xs), 2)}


def main() -> int:
    env = dict(os.environ, LAKED_RUN_DIR="/tmp/lake-bench")
    if not Path("/sys/kernel/lake").exists():
        subprocess.run(["insmod", str(ROOT / "kmod" / "lake.ko")], check=True)
    laked = [sys.executable, "-m", "laked.cli"]
    subprocess.run(laked + ["start", "--daemon"], check=True, env=env, cwd=ROOT)
    fd = os.open("/dev/lake", os.O_RDWR)
    try:
        timed(fd, abi.LAKE_IOC_NULL_RT, 200)       # warm-up
        nop: list[float] = []
        rt: list[float] = []
        block_ratio = []
        gc.disable()
        for _ in range(BLOCKS):
            a = timed(fd, abi.LAKE_IOC_NOP, PER_BLOCK)
            b = timed(fd, abi.LAKE_IOC_NULL_RT, PER_BLOCK)
            nop += a
            rt += b
            block_ratio.append(statistics.median(b) / statistics.median(a))
        gc.enable()
    finally:
        os.close(fd)
        subprocess.run(laked + ["stop"], env=env, cwd=ROOT)
    res = {
        "what": "null round trip kernel->laked(cpu executor)->kernel vs bare ioctl",
        "where": f"VM (virtme-ng, QEMU TCG, no KVM), kernel {platform.release()}",
        "bare_ioctl": summary(nop),
        "null_round_trip": summary(rt),
        "ratio_median": round(statistics.median(rt) / statistics.median(nop), 1),
        "ratio_p99": round(summary(rt)["p99_us"] / summary(nop)["p99_us"], 1),
        "block_ratio_spread": [round(min(block_ratio), 1), round(max(block_ratio), 1)],
    }
    out = ROOT / "docs" / "bench" / "vm_roundtrip.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

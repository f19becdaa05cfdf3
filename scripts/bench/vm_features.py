"""Issue 4's kernel-side costs, measured inside the VM in one run.

lake_linnos's bench (kernel code, ktime around blocks of calls, 201 samples,
median and p99 per call) gives: capture vs an empty noinline call, the
decision with each shipped policy vs the built-in C rule, and in-kernel CPU
inference of the 31->256->2 MLP for batch 1..1024.  The GPU side of the
inference table comes from the device run (docs/bench/dataplane_gpu.json).
Writes docs/bench/vm_features.json.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "python")]
from laked import mlp  # noqa: E402
from laked.genl import Control  # noqa: E402

LINNOS = Path("/sys/kernel/lake_linnos")
ITERS = 1000


def run_bench() -> dict[str, tuple[float, float]]:
    (LINNOS / "bench").write_text(str(ITERS))
    out = {}
    for line in (LINNOS / "result").read_text().splitlines():
        name, med, p99 = line.split()
        out[name] = (int(med) / 1000, int(p99) / 1000)     # ps -> ns
    return out


def main() -> int:
    env = dict(os.environ, LAKED_RUN_DIR="/tmp/lake-bench-f")
    laked = [sys.executable, "-m", "laked.cli"]
    if not Path("/sys/kernel/lake").exists():
        subprocess.run(["insmod", str(ROOT / "kmod" / "lake.ko")], check=True)
    subprocess.run(["insmod", str(ROOT / "lakelib/examples/lake_linnos.ko")], check=True)
    subprocess.run(laked + ["start", "--daemon", "--executor", "cpu"], check=True, env=env)
    try:
        fixed = mlp.quantize(*mlp.linnos_like(0))
        with Control() as c:
            c.model_push("linnos", fixed.frac, fixed.layers())
        base = run_bench()
        decide = {"builtin": base["decide"]}
        for pol in ("threshold", "cost", "cpu-only", "gpu-only"):
            subprocess.run(laked + ["policy", "load", str(ROOT / "ebpf" / f"{pol}.bpf.c")],
                           check=True, env=env, capture_output=True)
            decide[pol] = run_bench()["decide"]
    finally:
        subprocess.run(laked + ["stop"], env=env)
        subprocess.run(["rmmod", "lake_linnos"])
    res = {
        "where": f"VM (virtme-ng, QEMU TCG, no KVM), kernel {platform.release()}",
        "unit": "ns per call: [median, p99] of 201 samples of 1000 calls",
        "capture": base["capture"], "empty_call": base["empty_call"],
        "capture_ratio_median": round(base["capture"][0] / base["empty_call"][0], 1),
        "decide": decide,
        "decide_ratio_median_vs_builtin": {k: round(v[0] / decide["builtin"][0], 2)
                                           for k, v in decide.items()},
        "infer_cpu": {k.removeprefix("infer_cpu_b"): v for k, v in base.items()
                      if k.startswith("infer_cpu_b")},
    }
    out = ROOT / "docs" / "bench" / "vm_features.json"
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

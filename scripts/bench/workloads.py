"""The scheduler benchmark's workloads (device machine; torch on CUDA).

LC (latency-critical) requests, each a few hundred microseconds on an H100:
  gemm  16 dependent bf16 GEMMs [512x4096].[4096x4096] + ReLU
  conv  a 4-stage convolutional network on 64 images of 3x224x224 (bf16, NHWC)
  attn  a pre-norm transformer encoder block, 16 sequences of 512 tokens, d=1024
  kinfer  the kernel's lake_infer GPU path: a batch of 1024 rows through a
        LinnOS-sized fixed-point MLP (31-256-2), over lake's ring to laked's
        GPU executor (lake.standin plays lake.ko; the device machine loads no
        modules), as the daemon's kernel tenant
BE (best-effort) steps:
  gemm  one 8192^3 bf16 GEMM
  mem   a memory-bound pass: y = x * a + b over 256 Mi float32 (4 GiB moved)
  train one SGD step of a 3-layer 4096-wide MLP on 8192 samples (bf16, autograd)
"""
from __future__ import annotations

from typing import Any, Callable

import torch

DEV = "cuda"
BF = torch.bfloat16


class LcWork:
    """An LC request: ``run()`` issues it on the current stream (graph replay if captured)."""

    def __init__(self, name: str, fn: Callable[[], Any]) -> None:
        self.name = name
        self.fn = fn
        self.graph: torch.cuda.CUDAGraph | None = None
        self.on_partition: LcWork | None = None     # its graph on a green context

    def capture(self, stream: torch.cuda.Stream) -> None:
        with torch.cuda.stream(stream):
            for _ in range(3):
                self.fn()
            stream.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, stream=stream):
                self.fn()
        torch.cuda.synchronize()
        self.graph = g

    def run(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self.fn()


class KernelInfer:
    """kinfer: not torch work, so no graph and no partition (the executor's
    raw streams live on the primary context); ``runner(tenancy)`` binds it
    to an arbiter tenant the way laked binds the kernel's."""

    name = "kinfer"
    graph = None
    partitionable = False

    def __init__(self, batch: int = 1024) -> None:
        import numpy as np
        from lake.standin import StandIn

        from laked import mlp
        self.k = StandIn(size=64 << 20, executor="gpu")
        self.s = self.k.session()
        self.s.init()
        self.model = mlp.quantize(*mlp.linnos_like(5))
        blob = self.model.blob()
        self.blob = (self.s.host_copy(blob), len(blob))
        self.batch = batch
        x = mlp.to_fixed(np.random.default_rng(1).normal(size=(batch, 31)), self.model.frac)
        self.off = self.s.mem_alloc_host(batch * 33 * 4)
        self.k.write(self.off, x.astype("<i4").tobytes())
        self.want = self.model.run(x).astype("<i4").tobytes()

    def capture(self, stream: Any) -> None:
        pass

    def run(self) -> None:
        self.s.infer(1, 1, *self.blob, self.batch, 31, 2, self.off)

    def runner(self, tenancy: Any) -> Callable[[], float]:
        import time

        def one() -> float:
            self.k.executor.tenancy = tenancy
            t0 = time.perf_counter()
            self.run()
            return time.perf_counter() - t0
        return one

    def check(self) -> None:
        got = self.k.read(self.off + self.batch * 31 * 4, self.batch * 8)
        if got != self.want:
            raise AssertionError("kinfer: INFER output differs from the CPU reference")


def lc_gemm() -> LcWork:
    x = torch.randn(512, 4096, device=DEV, dtype=BF)
    ws = [torch.randn(4096, 4096, device=DEV, dtype=BF) / 64 for _ in range(16)]

    def fn() -> torch.Tensor:
        h = x
        for w in ws:
            h = torch.relu(h @ w)
        return h
    return LcWork("gemm", fn)


def lc_conv() -> LcWork:
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 64, 7, 2, 3), torch.nn.ReLU(),
        torch.nn.Conv2d(64, 128, 3, 2, 1), torch.nn.ReLU(),
        torch.nn.Conv2d(128, 256, 3, 2, 1), torch.nn.ReLU(),
        torch.nn.Conv2d(256, 512, 3, 2, 1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(512, 1000),
    ).to(DEV, BF).to(memory_format=torch.channels_last).eval()
    x = torch.randn(64, 3, 224, 224, device=DEV, dtype=BF).to(memory_format=torch.channels_last)

    def fn() -> torch.Tensor:
        with torch.inference_mode():
            return net(x)
    return LcWork("conv", fn)


def lc_attn() -> LcWork:
    block = torch.nn.TransformerEncoderLayer(1024, 16, 4096, batch_first=True,
                                             norm_first=True, dropout=0.0)
    block = block.to(DEV, BF).eval()
    x = torch.randn(16, 512, 1024, device=DEV, dtype=BF)

    def fn() -> torch.Tensor:
        with torch.inference_mode():
            return block(x)
    return LcWork("attn", fn)


class BeWork:
    """A BE job: ``step()`` issues one unit of work on the current stream."""

    def __init__(self, name: str, step: Callable[[], Any], unit: str) -> None:
        self.name = name
        self.step = step
        self.unit = unit


def be_gemm() -> BeWork:
    a = torch.randn(8192, 8192, device=DEV, dtype=BF)
    b = torch.randn(8192, 8192, device=DEV, dtype=BF)
    out = torch.empty(8192, 8192, device=DEV, dtype=BF)

    def step() -> None:
        torch.matmul(a, b, out=out)
    return BeWork("gemm", step, "GEMM")


def be_mem() -> BeWork:
    x = torch.randn(256 << 20, device=DEV)
    y = torch.empty_like(x)

    def step() -> None:
        torch.mul(x, 1.0001, out=y)
        y.add_(0.5)
    return BeWork("mem", step, "pass")


def be_train() -> BeWork:
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(4096, 4096), torch.nn.ReLU(),
                              torch.nn.Linear(4096, 4096), torch.nn.ReLU(),
                              torch.nn.Linear(4096, 4096)).to(DEV, BF)
    opt = torch.optim.SGD(mlp.parameters(), lr=1e-4)
    x = torch.randn(8192, 4096, device=DEV, dtype=BF)
    y = torch.randn(8192, 4096, device=DEV, dtype=BF)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(mlp(x), y)
        loss.backward()
        opt.step()
    return BeWork("train", step, "step")


LC = {"gemm": lc_gemm, "conv": lc_conv, "attn": lc_attn, "kinfer": KernelInfer}
BE = {"gemm": be_gemm, "mem": be_mem, "train": be_train}

"""The scheduler benchmark's workloads (device machine; torch on CUDA).

LC (latency-critical) requests, each a few hundred microseconds on an H100:
  gemm  16 dependent bf16 GEMMs [512x4096].[4096x4096] + ReLU
  conv  a 4-stage convolutional network on 32 images of 3x224x224 (bf16, NHWC);
        batch 32 keeps it near the others' GPU time (64 took 1.06 ms on an H200,
        21 % of the GPU at one request per 5 ms: BE could keep 0.79 at most)
  attn  a pre-norm transformer encoder block, 16 sequences of 512 tokens, d=1024
  kinfer  the kernel's lake_infer GPU path: a batch of 1024 rows through a
        LinnOS-sized fixed-point MLP (31-256-2), over lake's ring to laked's
        GPU executor, as the daemon's kernel tenant; lake.ko's side is a
        child process (the device machine loads no modules)
BE (best-effort) steps:
  gemm  one 8192^3 bf16 GEMM
  mem   a memory-bound pass: y = x * a + b over 256 Mi float32 (4 GiB moved)
  train one SGD step of a 3-layer 4096-wide MLP on 8192 samples (bf16, autograd)
"""
from __future__ import annotations

import mmap
import os
import socket
import struct
import subprocess
import sys
from pathlib import Path
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
    to an arbiter tenant the way laked binds the kernel's.

    lake.ko's side runs in a child process (kinfer_kernel.py), as the
    kernel runs outside laked: this process serves the child's ring with
    laked's Server and GPU executor.  A caller thread in this process, as
    lake.standin has it, would wait for the GIL to see each completion,
    a wait beside BE's issuer that no kernel caller has."""

    name = "kinfer"
    graph = None
    partitionable = False

    def __init__(self, batch: int = 1024) -> None:
        from laked.doorbell import EventfdDoorbell
        from laked.executor import choose_executor
        from laked.region import Region
        from laked.server import Server

        self.sock, there = socket.socketpair()
        child = Path(__file__).with_name("kinfer_kernel.py")
        self.proc = subprocess.Popen([sys.executable, str(child), str(there.fileno()),
                                      str(batch)], pass_fds=(there.fileno(),))
        there.close()
        _, fds, _, _ = socket.recv_fds(self.sock, 1, 3)
        if len(fds) != 3:
            raise RuntimeError(f"kinfer: the kernel side sent {len(fds)} fds, not 3")
        fd, sq_efd, cq_efd = fds
        self.mm = mmap.mmap(fd, os.fstat(fd).st_size)
        os.close(fd)
        self.region = Region(self.mm)
        self.executor = choose_executor("gpu", self.region, register=True)
        self.server = Server(self.region, EventfdDoorbell(sq_efd, cq_efd), self.executor)
        self.server.start()
        self._ask(b"g", 1)              # the child sets up its session, model and input

    def _ask(self, cmd: bytes, n: int) -> bytes:
        self.sock.sendall(cmd)
        got = b""
        while len(got) < n:
            more = self.sock.recv(n - len(got))
            if not more:
                raise RuntimeError(f"kinfer: the kernel side exited (code {self.proc.wait()})")
            got += more
        return got

    def capture(self, stream: Any) -> None:
        pass

    def run(self) -> float:
        """One batch, as bound last; its round trip in seconds, as the kernel saw it."""
        return struct.unpack("d", self._ask(b"r", 8))[0]

    def run_stamped(self) -> tuple[float, float]:
        """One batch; when the kernel's side asked and saw the answer (perf_counter)."""
        t0, t1 = struct.unpack("dd", self._ask(b"t", 16))
        return t0, t1

    def runner(self, tenancy: Any) -> Callable[[], float]:
        def one() -> float:
            self.executor.tenancy = tenancy
            return self.run()
        return one

    def check(self) -> None:
        if self._ask(b"c", 1) != b"1":
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


def lc_conv(batch: int = 32) -> LcWork:
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 64, 7, 2, 3), torch.nn.ReLU(),
        torch.nn.Conv2d(64, 128, 3, 2, 1), torch.nn.ReLU(),
        torch.nn.Conv2d(128, 256, 3, 2, 1), torch.nn.ReLU(),
        torch.nn.Conv2d(256, 512, 3, 2, 1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(512, 1000),
    ).to(DEV, BF).to(memory_format=torch.channels_last).eval()
    x = torch.randn(batch, 3, 224, 224, device=DEV, dtype=BF).to(memory_format=torch.channels_last)

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

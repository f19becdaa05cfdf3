"""Executors: what carries out a lake_sqe.  ``choose_executor`` picks one.

- ``gpu``: CUDA through cuda-python's driver API (laked/executor/gpu.py).
- ``cpu``: no GPU; cu* ops answer CUDA_ERROR_NO_DEVICE.

cuda-python is imported only when the GPU executor is asked for, so this
package imports anywhere.
"""
from __future__ import annotations

import logging

from ..region import Region
from .base import Completion, Executor, ExecutorUnavailable, op_name
from .cpu import CpuExecutor

log = logging.getLogger("laked.executor")

KINDS = ("auto", "cpu", "gpu")

__all__ = ["Completion", "CpuExecutor", "Executor", "ExecutorUnavailable", "KINDS",
           "choose_executor", "op_name"]


def choose_executor(kind: str, region: Region, *, device: int = 0,
                    register: bool = True) -> Executor:
    """Build the executor ``kind`` ("auto", "cpu" or "gpu") over ``region``.

    "auto" takes the GPU when cuda-python imports and a device answers, and
    says in the log why it did not otherwise.  "gpu" without a usable GPU
    raises ExecutorUnavailable with the reason.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown executor {kind!r}; choose one of {', '.join(KINDS)}")
    if kind == "cpu":
        log.info("executor: cpu (forced); cu* requests answer CUDA_ERROR_NO_DEVICE")
        ex = CpuExecutor(region)
        ex.why = "forced (--executor cpu)"
        return ex
    from .gpu import GpuExecutor  # deferred: imports nothing from CUDA until asked
    try:
        ex = GpuExecutor(region, device=device, register=register)
    except ExecutorUnavailable as e:
        if kind == "gpu":
            raise ExecutorUnavailable(f"--executor gpu: {e}") from e
        log.info("executor: cpu (no usable GPU: %s)", e)
        cpu = CpuExecutor(region)
        cpu.why = f"no usable GPU: {e}"
        return cpu
    log.info("executor: gpu (%s, region %s)", ex.device_name,
             "registered: copies are DMA-direct" if ex.registered
             else "NOT registered: copies are staged")
    ex.why = "forced (--executor gpu)" if kind == "gpu" else "auto: a CUDA device answered"
    return ex

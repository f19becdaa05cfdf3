"""The CPU executor: what laked can answer without a GPU.

The low-level cu* ops need a GPU, so they get a clear
CUDA_ERROR_NO_DEVICE (what cuInit says on a machine without one); the
no-op and session bookkeeping succeed so kernel callers can probe laked
and close sessions.  Inference (LAKE_OP_INFER) runs here with numpy, with
the same bits as the kernel's CPU path.
"""
from __future__ import annotations

from .. import abi
from ..region import Sqe
from .base import OK, OP_NAMES, Completion, Executor

NO_DEVICE: Completion = (abi.LAKE_CUDA_ERROR_NO_DEVICE, 0, 0)


class CpuExecutor(Executor):
    name = "cpu"

    def __init__(self, region) -> None:  # type: ignore[no-untyped-def]
        super().__init__(region)
        for op, name in OP_NAMES.items():
            if name not in ("null", "session_close", "infer"):
                self._handlers[op] = self._no_device

    def _no_device(self, sqe: Sqe) -> Completion:
        return NO_DEVICE

    def op_session_close(self, sqe: Sqe) -> Completion:
        self.sessions.pop(sqe.session, None)
        return OK

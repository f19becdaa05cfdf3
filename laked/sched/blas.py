"""cuBLAS's SM count target for the calling thread's torch handle.

Hopper cuBLAS's persistent GEMM kernels launch one block per SM of the
device, whatever green context the stream belongs to; on a partition of
fewer SMs the extra blocks wait for a second wave, and a GEMM piece can take
twice as long (pytorch/pytorch#143988).  ``cublasSetSmCountTarget`` tells
cuBLAS how many SMs to plan for.  torch keeps one cuBLAS handle per thread
and device, so the target is set per thread, and only when it changes.
"""
from __future__ import annotations

import ctypes
import functools
import logging
import os
import threading
from typing import Any

log = logging.getLogger("laked.sched.blas")

_tls = threading.local()


@functools.cache
def _find() -> Any:
    """cublasSetSmCountTarget from the libcublas torch already loaded (None: not there)."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "libcublas.so" in line}
    except OSError as e:
        log.info("no SM count target for cuBLAS: %s", e)
        return None
    for p in sorted(paths):
        if os.path.basename(p).startswith("libcublas.so"):
            fn = getattr(ctypes.CDLL(p), "cublasSetSmCountTarget", None)
            if fn is not None:
                fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_int], ctypes.c_int
                return fn
    log.info("no SM count target for cuBLAS: libcublas is not loaded or lacks it")
    return None


def set_sm_target(sms: int) -> bool:
    """Plan this thread's cuBLAS GEMMs for ``sms`` SMs (0: the device's).
    False when cuBLAS cannot (the GEMMs then run as before)."""
    import torch
    handle = torch.cuda.current_blas_handle()
    if getattr(_tls, "state", None) == (handle, sms):
        return True
    fn = _find()
    if fn is None:
        return False
    status = fn(ctypes.c_void_p(handle), sms)
    if status:
        log.warning("cublasSetSmCountTarget(%d) failed with status %d", sms, status)
        return False
    _tls.state = (handle, sms)
    return True


def sm_target_set() -> bool:
    """This thread's cuBLAS handle plans for fewer SMs than the device's
    (be_sms turned off at run time leaves it so until it is set back)."""
    state = getattr(_tls, "state", None)
    return state is not None and state[1] != 0

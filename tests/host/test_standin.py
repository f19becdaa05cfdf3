"""The stand-in drives laked's server in a thread, as the kernel would."""
from __future__ import annotations

import threading

import pytest

from lake.standin import CallError, StandIn
from laked import abi


def test_round_trips_through_the_server_thread() -> None:
    with StandIn(size=4 << 20, executor="cpu") as k:
        for _ in range(500):
            k.null()
        with pytest.raises(CallError) as e:
            k.mem_alloc(4096)
        assert e.value.code == abi.LAKE_CUDA_ERROR_NO_DEVICE
        k.session_close()
        assert k.server.info()["requests"] == 502


def test_more_requests_than_ring_slots() -> None:
    """Submissions beyond the ring's size wait for room; none is lost."""
    with StandIn(size=4 << 20, executor="cpu") as k:
        ids = [k.submit(abi.LAKE_OP_NULL) for _ in range(3 * abi.LAKE_SQ_ENTRIES)]
        got = [k.wait(i).result for i in ids]
        assert got == [0] * len(ids)


def test_gpu_executor_says_why_it_is_unavailable() -> None:
    from laked.executor import ExecutorUnavailable
    try:
        import cuda  # noqa: F401
        pytest.skip("cuda-python present: the GPU tests cover this machine")
    except ImportError:
        pass
    with pytest.raises(ExecutorUnavailable, match="cuda-python"):
        StandIn(size=4 << 20, executor="gpu")

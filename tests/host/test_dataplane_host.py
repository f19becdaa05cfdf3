"""laked's server and executors over a plain buffer laid out like /dev/lake's
region: the kernel's side played by Region's producer methods."""
from __future__ import annotations

import os

import numpy as np
import pytest

from laked import abi, mlp
from laked.doorbell import EventfdDoorbell
from laked.executor import CpuExecutor
from laked.region import Region, Sqe, init_region
from laked.server import Server


@pytest.fixture
def plane():  # type: ignore[no-untyped-def]
    buf = bytearray(4 << 20)
    init_region(buf)
    region = Region(buf)
    sq, cq = os.eventfd(0), os.eventfd(0)
    server = Server(region, EventfdDoorbell(sq, cq), CpuExecutor(region))
    yield region, server
    os.close(sq)
    os.close(cq)


def heap_put(region: Region, off: int, data: bytes) -> int:
    at = region.heap_off + off
    region.write(at, data)
    return at


def test_null_and_cu_ops_on_the_cpu(plane) -> None:  # type: ignore[no-untyped-def]
    region, server = plane
    assert region.submit(Sqe(1, abi.LAKE_OP_NULL))
    assert region.submit(Sqe(2, abi.LAKE_OP_INIT))
    assert region.submit(Sqe(3, abi.LAKE_OP_MEM_ALLOC, args=(4096,)))
    assert server.step() == 3
    got = {c.id: c.result for c in region.take_completions()}
    assert got == {1: 0, 2: abi.LAKE_CUDA_ERROR_NO_DEVICE, 3: abi.LAKE_CUDA_ERROR_NO_DEVICE}


def test_infer_matches_the_reference(plane) -> None:  # type: ignore[no-untyped-def]
    region, server = plane
    model = mlp.quantize(*mlp.linnos_like(3))
    blob = model.blob()
    blob_at = heap_put(region, 0, blob)
    x = mlp.to_fixed(np.random.default_rng(0).normal(size=(50, 31)), model.frac)
    data_at = heap_put(region, 1 << 20, x.astype("<i4").tobytes() + bytes(50 * 2 * 4))
    sqe = Sqe(7, abi.LAKE_OP_INFER, args=(1, 1, blob_at, len(blob), 50, 31, 2),
              data_off=data_at, data_len=50 * 33 * 4)
    assert region.submit(sqe)
    server.step()
    [c] = region.take_completions()
    assert (c.id, c.result) == (7, 0)
    y = np.frombuffer(region.read(data_at + 50 * 31 * 4, 50 * 2 * 4), "<i4").reshape(50, 2)
    assert np.array_equal(y, model.run(x))


def test_bad_requests_get_errors_not_crashes(plane) -> None:  # type: ignore[no-untyped-def]
    region, server = plane
    model = mlp.quantize(*mlp.linnos_like(4))
    blob_at = heap_put(region, 0, model.blob())
    outside = Sqe(1, abi.LAKE_OP_NULL, data_off=8, data_len=64)        # in the rings
    wrong_shape = Sqe(2, abi.LAKE_OP_INFER, args=(1, 1, blob_at, len(model.blob()), 4, 30, 2),
                      data_off=region.heap_off + 65536, data_len=4 * 32 * 4)
    garbage = Sqe(3, abi.LAKE_OP_INFER, args=(2, 1, region.heap_off + 9000, 64, 1, 31, 2),
                  data_off=region.heap_off + 65536, data_len=33 * 4)
    unknown = Sqe(4, 999)
    for s in (outside, wrong_shape, garbage, unknown):
        assert region.submit(s)
    server.step()
    got = {c.id: c.result for c in region.take_completions()}
    assert got[1] == got[2] == got[3] == abi.LAKE_CUDA_ERROR_INVALID_VALUE
    assert got[4] == abi.LAKE_CUDA_ERROR_NOT_SUPPORTED


def test_completions_wait_for_ring_space(plane) -> None:  # type: ignore[no-untyped-def]
    region, server = plane
    n = abi.LAKE_CQ_ENTRIES + 40
    done: list[int] = []
    sent = rounds = 0
    while len(done) < n and rounds < 1000:
        rounds += 1
        while sent < n and region.submit(Sqe(sent, abi.LAKE_OP_NULL)):
            sent += 1
        server.step()
        if rounds > 5:          # a slow consumer first: the CQ fills up
            done += [c.id for c in region.take_completions()]
        elif rounds == 5:
            assert server.info()["waiting_completions"] > 0
    assert sorted(done) == list(range(n))

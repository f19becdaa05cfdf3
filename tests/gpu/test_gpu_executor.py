"""laked's GPU executor through the ring protocol (device machine only).

The stand-in plays lake.ko: a memfd region with the kernel's layout, the
same entries and ops.  Results are checked against numpy.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from laked import abi, mlp

try:
    from laked.executor.gpu import _import_cuda
    _driver, _ = _import_cuda()
    _err, = _driver.cuInit(0)
    _ok, _n = _driver.cuDeviceGetCount()
    HAVE_GPU = int(_err) == 0 and int(_ok) == 0 and _n > 0
    WHY = "" if HAVE_GPU else f"no CUDA device (cuInit {int(_err)})"
except Exception as e:  # noqa: BLE001 - any reason means: skip, and say it
    HAVE_GPU, WHY = False, f"cuda-python unusable here: {e}"

pytestmark = pytest.mark.skipif(not HAVE_GPU, reason=f"GPU tests need an NVIDIA GPU: {WHY}")

from lake.standin import CallError, Launch, StandIn, u32, u64  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts" / "bench"))
from vecadd_ptx import VECADD_PTX  # noqa: E402



@pytest.fixture
def k():  # type: ignore[no-untyped-def]
    with StandIn(size=256 << 20, executor="gpu") as s:
        s.init()
        yield s


def free_mem(k: StandIn) -> int:
    ex = k.executor
    ex._make_current()  # noqa: SLF001 - test reads the device's state
    _, free, _ = ex.cu.cuMemGetInfo()
    return int(free)


def test_region_is_registered(k: StandIn) -> None:
    assert k.executor.name == "gpu" and k.executor.registered, k.executor.info()


def test_vecadd_matches_numpy(k: StandIn) -> None:
    n = 1 << 20
    rng = np.random.default_rng(0)
    a = rng.integers(0, 2**31, n, dtype=np.uint32)
    b = rng.integers(0, 2**31, n, dtype=np.uint32)
    mod = k.module_load(VECADD_PTX)
    fn = k.get_function(mod, "vecadd")
    da, db, dc = (k.mem_alloc(4 * n) for _ in range(3))
    oa, ob, oc = (k.alloc(4 * n) for _ in range(3))
    k.write(oa, a.tobytes())
    k.write(ob, b.tobytes())
    k.htod(da, oa, 4 * n)
    k.htod(db, ob, 4 * n)
    k.launch(Launch(fn, ((n + 255) // 256, 1, 1), (256, 1, 1),
                    [u64(da), u64(db), u64(dc), u32(n)]))
    k.ctx_sync()
    k.dtoh(oc, dc, 4 * n)
    c = np.frombuffer(k.read(oc, 4 * n), np.uint32)
    assert np.array_equal(c, a + b)


@pytest.mark.parametrize("size", [1, 7, 4096, 65537, 3 << 20])
def test_copies_round_trip(k: StandIn, size: int) -> None:
    data = np.random.default_rng(size).bytes(size)
    src, dst = k.alloc(size + 3) + 3, k.alloc(size)       # unaligned source
    k.write(src, data)
    d = k.mem_alloc(size)
    k.htod(d, src, size)
    k.dtoh(dst, d, size)
    assert k.read(dst, size) == data


def test_async_copies_on_streams(k: StandIn) -> None:
    s1, s2 = k.stream_create(), k.stream_create()
    size = 8 << 20
    data = np.random.default_rng(3).bytes(size)
    src, dst = k.alloc(size), k.alloc(size)
    k.write(src, data)
    d = k.mem_alloc(size)
    k.htod(d, src, size, stream=s1)
    k.stream_sync(s1)
    k.dtoh(dst, d, size, stream=s2)
    k.stream_sync(s2)
    assert k.read(dst, size) == data


def test_gpu_errors_reach_the_caller(k: StandIn) -> None:
    with pytest.raises(CallError) as e:
        k.get_function(k.module_load(VECADD_PTX), "no_such_kernel")
    assert e.value.code == abi.LAKE_CUDA_ERROR_NOT_FOUND
    with pytest.raises(CallError) as e:
        k.module_load(b"this is not PTX")
    assert e.value.code != 0
    with pytest.raises(CallError) as e:
        k.launch(Launch(12345, (1, 1, 1), (1, 1, 1), [u64(0)]))   # a handle never given
    assert e.value.code == abi.LAKE_CUDA_ERROR_INVALID_HANDLE
    d = k.mem_alloc(4096)
    with pytest.raises(CallError):
        k.htod(d + 4000, k.alloc(4096), 4096)                    # past the allocation
    with pytest.raises(CallError) as e:
        k.htod(d, 8, 64)                                         # host side outside the heap
    assert e.value.code == abi.LAKE_CUDA_ERROR_INVALID_VALUE


def test_session_close_frees_device_memory(k: StandIn) -> None:
    before = free_mem(k)
    for _ in range(8):
        k.mem_alloc(64 << 20)
    assert before - free_mem(k) >= 500 << 20
    k.session_close()
    assert before - free_mem(k) < 64 << 20


def test_infer_on_the_gpu_matches_the_cpu_bits(k: StandIn) -> None:
    model = mlp.quantize(*mlp.linnos_like(5))
    blob = model.blob()
    boff = k.alloc(len(blob))
    k.write(boff, blob)
    for batch in (1, 33, 1024, 70000):
        x = mlp.to_fixed(np.random.default_rng(batch).normal(size=(batch, 31)), model.frac)
        off = k.alloc(batch * 33 * 4)
        k.write(off, x.astype("<i4").tobytes())
        k.call(abi.LAKE_OP_INFER, (1, 1, boff, len(blob), batch, 31, 2),
               data_off=off, data_len=batch * 33 * 4)
        y = np.frombuffer(k.read(off + batch * 31 * 4, batch * 8), "<i4").reshape(batch, 2)
        assert np.array_equal(y, model.run(x)), batch

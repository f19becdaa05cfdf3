"""laked's GPU executor through the ring protocol (device machine only).

The stand-in plays lake.ko: a memfd region with the kernel's layout, the
same entries, ops and call semantics (launches do not wait, async errors
surface at the next sync).  Results are checked against numpy.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from laked import abi, mlp

ROOT = Path(__file__).resolve().parents[2]

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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernels import SPIN_PTX, VECADD_PTX  # noqa: E402

from lake.standin import CallError, Launch, Session, StandIn, u32, u64  # noqa: E402

INVALID_VALUE = abi.LAKE_CUDA_ERROR_INVALID_VALUE


@pytest.fixture(scope="module")
def k():  # type: ignore[no-untyped-def]
    with StandIn(size=256 << 20, executor="gpu") as s:
        yield s


@pytest.fixture
def s(k: StandIn):  # type: ignore[no-untyped-def]
    sess = k.session()
    sess.init()
    yield sess
    sess.close()


def free_mem(k: StandIn) -> int:
    ex = k.executor
    ex._make_current()  # noqa: SLF001 - the test reads the device's state
    _, free, _ = ex.cu.cuMemGetInfo()
    return int(free)


def vecadd(k: StandIn, s: Session, n: int, seed: int = 0, stream: int = 0) -> None:
    """lakelib/examples/vecadd.c's steps: one operand zero-copy, one staged."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 2**31, n, dtype=np.uint32)
    b = rng.integers(0, 2**31, n, dtype=np.uint32)
    dev = s.device_get(0)
    ctx = s.ctx_create(dev)
    fn = s.get_function(s.module_load(VECADD_PTX), "vecadd")
    st = stream or s.stream_create()
    da, db, dc = (s.mem_alloc(4 * n) for _ in range(3))
    ha, hc = s.mem_alloc_host(4 * n), s.mem_alloc_host(4 * n)
    k.write(ha, a.tobytes())
    s.memcpy_htod_async(da, ha, 4 * n, st)              # zero-copy source
    s.memcpy_htod(db, b.tobytes())                      # staged source
    s.launch(Launch(fn, ((n + 255) // 256, 1, 1), (256, 1, 1),
                    [u64(da), u64(db), u64(dc), u32(n)], stream=st))
    s.memcpy_dtoh_async(hc, dc, 4 * n, st)
    s.stream_sync(st)
    assert np.array_equal(np.frombuffer(k.read(hc, 4 * n), np.uint32), a + b)
    staged = s.memcpy_dtoh(None, dc, 4 * n)             # staged destination
    assert np.array_equal(np.frombuffer(staged, np.uint32), a + b)
    s.ctx_destroy(ctx)


def test_region_is_registered(k: StandIn) -> None:
    info = k.executor.info()
    assert k.executor.name == "gpu" and k.executor.registered, info
    assert info["copies"] == "zero-copy (registered)" and info["register_error"] is None
    assert k.region.daemon_flags & abi.LAKE_DAEMON_F_REGISTERED


@pytest.mark.parametrize("n", [1, 1000, 1 << 20])
def test_vecadd_matches_numpy(k: StandIn, s: Session, n: int) -> None:
    vecadd(k, s, n, seed=n)


@pytest.mark.parametrize("size", [1, 7, 4096, 65537, (1 << 20) + 1, (3 << 20) + 5])
def test_copies_round_trip(k: StandIn, s: Session, size: int) -> None:
    data = np.random.default_rng(size).bytes(size)
    src = s.mem_alloc_host(size + 3) + 3              # unaligned source
    dst = s.mem_alloc_host(size + 5) + 5              # unaligned destination
    k.write(src, data)
    d = s.mem_alloc(size + 16)
    s.memcpy_htod(d + 16, src, size)                  # unaligned device address too
    s.memcpy_dtoh(dst, d + 16, size)
    assert k.read(dst, size) == data
    assert s.memcpy_dtoh(None, d + 16, size) == data
    s.mem_free(d)


def test_async_copies_on_streams(k: StandIn, s: Session) -> None:
    s1, s2 = s.stream_create(), s.stream_create()
    chunk, parts = 2 << 20, 8
    data = np.random.default_rng(3).bytes(chunk * parts)
    src, dst = s.mem_alloc_host(len(data)), s.mem_alloc_host(len(data))
    k.write(src, data)
    d = s.mem_alloc(len(data))
    for i in range(parts):                # both streams at once, interleaved
        st = (s1, s2)[i % 2]
        s.memcpy_htod_async(d + i * chunk, src + i * chunk, chunk, st)
        s.memcpy_dtoh_async(dst + i * chunk, d + i * chunk, chunk, st)
    s.stream_sync(s1)
    s.stream_sync(s2)
    assert k.read(dst, len(data)) == data
    s.ctx_sync()
    # the waiter thread posts a completion a moment before it counts it done
    deadline = time.monotonic() + 2
    while k.executor.deferred() and time.monotonic() < deadline:
        time.sleep(0.001)
    assert k.executor.deferred() == 0


def test_one_busy_stream_does_not_hold_up_others(k: StandIn, s: Session) -> None:
    """A long kernel on one stream: other callers' requests, and other
    streams' syncs, are answered while it runs (the server never waits)."""
    fn = s.get_function(s.module_load(SPIN_PTX), "spin")
    busy = s.stream_create()
    s.launch(Launch(fn, (1, 1, 1), (1, 1, 1), [u64(600_000_000)], stream=busy))  # ~0.3 s
    t0 = time.monotonic()
    done: list[float] = []
    waiter = threading.Thread(target=lambda: (s.stream_sync(busy),
                                              done.append(time.monotonic() - t0)))
    waiter.start()
    other = k.session()
    other.init()
    quick = other.stream_create()
    lat = []
    for _ in range(50):
        t = time.monotonic()
        other.null()
        other.stream_sync(quick)
        lat.append(time.monotonic() - t)
    other.close()
    waiter.join(30)
    assert done and done[0] > 0.05, "the spin kernel was too short to show anything"
    assert max(lat) < done[0] / 2, (max(lat), done[0])


def test_gpu_errors_reach_the_caller(k: StandIn, s: Session) -> None:
    mod = s.module_load(VECADD_PTX)
    with pytest.raises(CallError) as e:
        s.get_function(mod, "no_such_kernel")
    assert e.value.code == abi.LAKE_CUDA_ERROR_NOT_FOUND
    with pytest.raises(CallError) as e:
        s.module_load(b"this is not PTX")
    assert e.value.code != 0
    # a launch does not wait: its failure comes back at the next sync
    s.launch(Launch(12345, (1, 1, 1), (1, 1, 1), [u64(0)]))      # a handle never given
    with pytest.raises(CallError) as e:
        s.stream_sync()
    assert e.value.code == abi.LAKE_CUDA_ERROR_INVALID_HANDLE
    fn = s.get_function(mod, "vecadd")
    s.launch(Launch(fn, (1, 1, 1), (4096, 1, 1), [u64(0)] * 3 + [u32(0)]))   # block too big
    with pytest.raises(CallError) as e:
        s.ctx_sync()
    assert e.value.code == INVALID_VALUE
    s.ctx_sync()                                                  # reported once
    d = s.mem_alloc(4096)
    with pytest.raises(CallError) as e:
        s.memcpy_htod(d + 4000, s.mem_alloc_host(4096), 4096)    # past the allocation
    assert e.value.code == INVALID_VALUE
    with pytest.raises(CallError) as e:
        s.call(abi.LAKE_OP_MEMCPY_HTOD, (d, 8, 64, 0))            # host side in the rings
    assert e.value.code == INVALID_VALUE
    other = k.session()
    with pytest.raises(CallError) as e:
        other.memcpy_dtoh(None, d, 64)                            # someone else's memory
    assert e.value.code == INVALID_VALUE
    with pytest.raises(CallError):
        other.mem_free(d)
    other.close()
    with pytest.raises(CallError) as e:
        s.call(abi.LAKE_OP_MEM_ALLOC, (1 << 50,))                 # 1 PiB
    assert e.value.code == abi.LAKE_CUDA_ERROR_OUT_OF_MEMORY
    s.mem_free(d)
    vecadd(k, s, 4096)                                            # and the session still works


def test_session_close_frees_device_memory(k: StandIn) -> None:
    s = k.session()
    s.init()
    before = free_mem(k)
    for _ in range(8):
        s.mem_alloc(64 << 20)
    s.stream_create()
    s.module_load(VECADD_PTX)
    assert before - free_mem(k) >= 500 << 20
    assert k.executor.info()["device_bytes"] >= 512 << 20
    s.close()
    assert before - free_mem(k) < 32 << 20
    assert s.id not in k.executor.sessions


def test_many_threads_each_with_a_session(k: StandIn) -> None:
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        s = k.session()
        try:
            s.init()
            for j in range(3):
                vecadd(k, s, 10_000 + 17 * i, seed=100 * i + j)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)
        finally:
            s.close()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors


def test_staged_fallback_without_registration() -> None:
    with StandIn(size=16 << 20, executor="gpu", register=False) as k:
        info = k.executor.info()
        assert not k.executor.registered and info["copies"] == "staged"
        assert "turned off" in info["register_error"]
        assert not k.region.daemon_flags & abi.LAKE_DAEMON_F_REGISTERED
        s = k.session()
        s.init()
        vecadd(k, s, 50_000)
        assert k.executor.info()["staged_copies"] >= 3
        s.close()


def test_infer_on_the_gpu_matches_the_cpu_bits(k: StandIn, s: Session) -> None:
    model = mlp.quantize(*mlp.linnos_like(5))
    blob = model.blob()
    boff = s.host_copy(blob)
    for batch in (1, 33, 1024, 70000):
        x = mlp.to_fixed(np.random.default_rng(batch).normal(size=(batch, 31)), model.frac)
        y = s.infer_rows(1, 1, boff, len(blob), x, 2)
        assert np.array_equal(y, model.run(x)), batch


FAULT_SCRIPT = r"""
import json, sys
sys.path[:0] = [{root!r}, {root!r} + "/python", {root!r} + "/tests/gpu"]
from kernels import CRASH_PTX
from lake.standin import CallError, Launch, StandIn, u64
from test_gpu_executor import vecadd
out = {{}}
with StandIn(size=32 << 20, executor="gpu") as k:
    bad, bystander = k.session(), k.session()
    bad.init(); bystander.init()
    keep = bystander.mem_alloc(4096)
    fn = bad.get_function(bad.module_load(CRASH_PTX), "crash")
    bad.launch(Launch(fn, (1, 1, 1), (1, 1, 1), [u64(0)]))
    try:
        bad.stream_sync()
        out["sync"] = 0
    except CallError as e:
        out["sync"] = e.code
    try:
        bad.mem_alloc(64)
        out["after"] = 0
    except CallError as e:
        out["after"] = e.code
    try:
        bystander.mem_free(keep)
        out["bystander"] = 0
    except CallError as e:
        out["bystander"] = e.code
    bad.close(); bystander.close()
    fresh = k.session()
    try:
        fresh.init()
        vecadd(k, fresh, 100_000)
        out["fresh"] = "ok"
    except CallError as e:
        out["fresh"] = e.code
    fresh.close()
    k.null()
    info = k.executor.info()
    out["resets"] = info["context_resets"]
    out["registered"] = info["registered"]
    out["broken"] = info["broken"]
print("RESULT", json.dumps(out))
"""


def test_a_context_fault_is_reported_and_laked_recovers() -> None:
    """An illegal address poisons the context: the caller gets the fault at
    its sync, sessions of that time get it until they close, and laked
    resets the context so new sessions work -- or, where the driver will
    not give this process a working context again, keeps answering every
    request with the fault and says why in its status (never a hang).  In
    a child process: the reset takes the process's primary context with it."""
    res = subprocess.run([sys.executable, "-c", FAULT_SCRIPT.format(root=str(ROOT))],
                         capture_output=True, text=True, timeout=180, cwd=ROOT,
                         env=dict(os.environ))
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
    assert res.returncode == 0 and line, res.stdout[-2000:] + res.stderr[-4000:]
    out = json.loads(line[0][7:])
    print("fault recovery:", out)
    assert out["sync"] == 700, out                  # CUDA_ERROR_ILLEGAL_ADDRESS
    assert out["after"] == 700 and out["bystander"] == 700, out
    if out["resets"] == 1:
        assert out["fresh"] == "ok" and out["registered"] and not out["broken"], out
    else:
        assert out["fresh"] == 700 and "restart laked" in out["broken"], out

"""The stand-in drives laked's server in a thread over a memfd, as lake.ko would.

CPU executor only here (no GPU on this machine); tests/gpu runs the same
protocol against the GPU executor.
"""
from __future__ import annotations

import os
import random
import threading
import time

import numpy as np
import pytest

from lake.standin import CallError, Heap, HeapExhausted, Launch, RingFull, StandIn, u64
from laked import abi, mlp
from laked.executor import CpuExecutor, choose_executor
from laked.region import Sqe
from laked.sched.base import CpuArbiter
from laked.tenants import TenantSpec

NO_DEVICE = abi.LAKE_CUDA_ERROR_NO_DEVICE


@pytest.fixture
def k():  # type: ignore[no-untyped-def]
    with StandIn(size=4 << 20, executor="cpu") as s:
        yield s


def test_round_trips_through_the_server_thread(k: StandIn) -> None:
    for _ in range(500):
        k.null()
    assert k.executor.name == "cpu"
    with pytest.raises(CallError) as e:
        k.mem_alloc(4096)
    assert e.value.code == NO_DEVICE
    k.session_close()
    info = k.server.info()
    assert info["requests"] == info["completions"] == 502
    assert info["errors"] == 1 and info["by_op"] == {"null": 500, "mem_alloc": 1,
                                                      "session_close": 1}


def test_cpu_executor_answers_no_device_for_every_cu_op(k: StandIn) -> None:
    """What tests/vm expects of lake_vecadd on a machine without a GPU."""
    s = k.session()
    for op, name in ((abi.LAKE_OP_INIT, "init"), (abi.LAKE_OP_DEVICE_GET, "device_get"),
                     (abi.LAKE_OP_CTX_CREATE, "ctx_create"), (abi.LAKE_OP_MEM_ALLOC, "alloc"),
                     (abi.LAKE_OP_MEMCPY_HTOD, "htod"), (abi.LAKE_OP_STREAM_SYNC, "sync"),
                     (abi.LAKE_OP_CTX_SYNC, "ctx_sync"), (abi.LAKE_OP_MODULE_LOAD, "load")):
        assert s.call(op, (1,), check=False).result == NO_DEVICE, name
    s.null()
    s.close()                       # SESSION_CLOSE succeeds without a GPU
    assert s.closed


def test_launch_errors_are_latched_until_the_next_sync(k: StandIn) -> None:
    s = k.session()
    s.launch(Launch(1, (1, 1, 1), (1, 1, 1), [u64(0)]))      # does not wait, like the kernel
    k.drain()
    s.null()                                                   # not a sync: no error
    with pytest.raises(CallError) as e:
        s.stream_sync()
    assert e.value.code == NO_DEVICE
    assert s.async_err == 0
    assert k.heap.used == 0                                    # the params payload was freed


def test_more_requests_than_ring_slots(k: StandIn) -> None:
    """Submissions beyond the ring's size wait for room; none is lost."""
    ids = [k.submit(abi.LAKE_OP_NULL) for _ in range(3 * abi.LAKE_SQ_ENTRIES)]
    assert [k.wait(i).result for i in ids] == [0] * len(ids)


def test_full_ring_pushes_back_and_loses_nothing() -> None:
    with StandIn(size=4 << 20, executor="cpu", start=False) as k:
        ids = [k.try_submit(abi.LAKE_OP_NULL) for _ in range(abi.LAKE_SQ_ENTRIES)]
        assert None not in ids
        assert k.try_submit(abi.LAKE_OP_NULL) is None
        with pytest.raises(RingFull):
            k.submit(abi.LAKE_OP_NULL, timeout=0.05)
        # a submitter that waits for room gets in once laked drains the ring
        late: list[int] = []
        t = threading.Thread(target=lambda: late.append(k.submit(abi.LAKE_OP_NULL,
                                                                 timeout=20)))
        t.start()
        time.sleep(0.1)
        assert t.is_alive() and not late
        k.server.start()
        t.join(20)
        assert len(late) == 1
        assert [k.wait(i).result for i in ids + late] == [0] * (len(ids) + 1)
        assert k.sq_full_waits >= 2
        assert k.server.info()["max_batch"] > 1      # a full ring is drained in batches


def test_many_threads_many_sessions(k: StandIn) -> None:
    n_threads, per = 8, 300
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        rnd = random.Random(seed)
        s = k.session()
        try:
            for _ in range(per):
                if rnd.random() < 0.8:
                    s.null()
                else:
                    assert s.call(abi.LAKE_OP_MEM_ALLOC, (64,), check=False).result == NO_DEVICE
            s.close()
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and not any(t.is_alive() for t in threads)
    info = k.server.info()
    assert info["requests"] == info["completions"] == n_threads * (per + 1)


def test_an_executor_bug_is_an_error_not_a_hang() -> None:
    class Buggy(CpuExecutor):
        def op_null(self, sqe: Sqe):  # type: ignore[no-untyped-def]
            if sqe.args[0] == 13:
                raise RuntimeError("a bug")
            return super().op_null(sqe)

    with StandIn(size=4 << 20, executor="cpu") as k:
        k.executor.__class__ = Buggy
        k.executor._handlers[abi.LAKE_OP_NULL] = k.executor.op_null  # noqa: SLF001
        assert k.call(abi.LAKE_OP_NULL, (13,), check=False).result == \
            abi.LAKE_CUDA_ERROR_UNKNOWN
        k.null()


def test_deferred_completions_wake_the_server_at_once() -> None:
    """An executor finishing work on another thread rings wake_fd; the
    server must not sit out its idle timeout (here 5 s) before posting."""
    class Later(CpuExecutor):
        def __init__(self, region) -> None:  # type: ignore[no-untyped-def]
            super().__init__(region)
            self.wake_fd = os.eventfd(0, os.EFD_NONBLOCK)
            self._done: list[tuple[int, tuple[int, int, int]]] = []
            self._n = 0

        def op_null(self, sqe: Sqe):  # type: ignore[no-untyped-def]
            self._n += 1

            def finish() -> None:
                time.sleep(0.05)
                self._done.append((sqe.id, (0, 42, 0)))
                os.eventfd_write(self.wake_fd, 1)
            threading.Thread(target=finish).start()
            return None

        def reap(self):  # type: ignore[no-untyped-def]
            done, self._done = self._done, []
            self._n -= len(done)
            return done

        def deferred(self) -> int:
            return self._n

    import lake.standin as standin
    real = standin.choose_executor
    standin.choose_executor = lambda kind, region, **kw: Later(region)  # type: ignore
    try:
        with StandIn(size=4 << 20, executor="cpu") as k:
            k.server._idle_timeout = lambda: 5.0  # noqa: SLF001
            t = time.monotonic()
            assert k.call(abi.LAKE_OP_NULL).ret0 == 42
            assert time.monotonic() - t < 2.0
    finally:
        standin.choose_executor = real


def test_gpu_executor_says_why_it_is_unavailable() -> None:
    from laked.executor import ExecutorUnavailable
    try:
        import cuda  # noqa: F401
        pytest.skip("cuda-python present: the GPU tests cover this machine")
    except ImportError:
        pass
    with pytest.raises(ExecutorUnavailable, match="cuda-python"):
        StandIn(size=4 << 20, executor="gpu")
    # auto falls back to the CPU, and says so
    buf = bytearray(4 << 20)
    from laked.region import Region, init_region
    init_region(buf)
    assert choose_executor("auto", Region(buf)).name == "cpu"


def test_heap_allocator() -> None:
    h = Heap(4096, 4096 + 10_000)
    a = h.alloc(100)
    b = h.alloc(1, align=256)
    c = h.alloc(5000)
    assert a % 64 == 0 and b % 256 == 0 and c % 64 == 0
    assert len({range(a, a + 100), range(b, b + 1), range(c, c + 5000)}) == 3
    assert not set(range(a, a + 100)) & set(range(c, c + 5000))
    with pytest.raises(HeapExhausted):
        h.alloc(5000)
    h.free(c)
    h.free(a)
    h.free(b)
    assert h.used == 0 and h._free == [(4096, 10_000)]  # noqa: SLF001 - coalesced
    assert h.alloc(10_000) == 4096


def test_dataplane_reports_executor_region_and_counters() -> None:
    """What `laked status` shows of the data plane (DataPlane over a memfd here)."""
    import mmap

    from laked.dataplane import DataPlane
    from laked.doorbell import EventfdDoorbell
    from laked.region import Region, init_region
    from laked.server import Server
    fd = os.memfd_create("lake-test")
    os.ftruncate(fd, 4 << 20)
    mm = mmap.mmap(fd, 4 << 20)
    init_region(mm)
    region = Region(mm)
    ex = choose_executor("cpu", region)
    sq, cq = os.eventfd(0), os.eventfd(0)
    server = Server(region, EventfdDoorbell(sq, cq), ex)
    dp = DataPlane(fd, mm, region, ex, server)
    info = dp.info()
    assert info["executor"] == "cpu" and info["executor_why"] == "forced (--executor cpu)"
    assert info["region_copies"] == "no GPU copies (CPU executor)"
    assert not info["region_registered"] and info["region_mb"] == 4
    assert info["server"]["requests"] == 0 and "deferred" in info["server"]
    dp.close()
    os.close(sq)
    os.close(cq)


def test_infer_batches_are_the_bound_tenants_requests() -> None:
    """laked binds the kernel's (or a client's) tenant to the executor: every
    INFER batch is one request of it, a refused one is an error of it."""
    arb = CpuArbiter()
    t = arb.add_tenant(TenantSpec("kernel", "LC", 0, kind="kernel"))
    model = mlp.quantize(*mlp.linnos_like(5))
    blob = model.blob()
    with StandIn(size=8 << 20, executor="cpu") as k:
        k.executor.tenancy = arb.tenancy(t)
        s = k.session()
        boff = s.host_copy(blob)
        for batch in (1, 40):
            x = mlp.to_fixed(np.random.default_rng(batch).normal(size=(batch, 31)), model.frac)
            y = s.infer_rows(1, 1, boff, len(blob), x, 2)
            assert np.array_equal(y, model.run(x))
        with pytest.raises(CallError) as e:         # a batch of 0 rows is refused
            s.infer(1, 1, boff, len(blob), 0, 31, 2, boff)
        assert e.value.code == abi.LAKE_CUDA_ERROR_INVALID_VALUE
        s.close()
    st = {x["name"]: x for x in arb.status()["tenants"]}["kernel"]
    assert (st["requests"], st["items"]) == (2, 41)
    assert st["p99_ms"] is not None and st["p99_ms"] > 0

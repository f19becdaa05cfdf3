"""The arbiter's mechanisms on a real GPU (device machine only)."""
from __future__ import annotations

import contextlib
import ctypes
import os
import statistics
import threading
import time
from typing import Any, Callable

import numpy as np
import pytest

try:
    import torch
    HAVE = torch.cuda.is_available()
    WHY = "" if HAVE else "torch sees no CUDA device"
    from laked.sched.partition import Partitions, check
except Exception as e:  # noqa: BLE001 - any reason means: skip, and say it
    HAVE, WHY = False, f"torch/cuda-python unusable here: {e}"

pytestmark = pytest.mark.skipif(not HAVE, reason=f"scheduler tests need an NVIDIA GPU: {WHY}")

SMID_PTX = b"""
.version 7.0
.target sm_50
.address_size 64
.visible .entry smid(.param .u64 out)
{
  .reg .b32 %r<4>;
  .reg .b64 %rd<5>;
  .reg .pred %p;
  ld.param.u64 %rd1, [out];
  cvta.to.global.u64 %rd2, %rd1;
  mov.u32 %r1, %ctaid.x;
  mov.u32 %r2, %smid;
  mul.wide.u32 %rd3, %r1, 4;
  add.s64 %rd4, %rd2, %rd3;
  st.global.u32 [%rd4], %r2;
  mov.u64 %rd3, %clock64;
SPIN:
  mov.u64 %rd4, %clock64;
  sub.s64 %rd4, %rd4, %rd3;
  setp.lt.s64 %p, %rd4, 20000;
  @%p bra SPIN;
  ret;
}
\0"""


@pytest.fixture(scope="module")
def parts() -> "Partitions":
    torch.cuda.init()
    torch.zeros(1, device="cuda")       # the primary context exists first
    return Partitions()


def smids(parts: "Partitions", p, blocks: int = 4096) -> set[int]:  # type: ignore[no-untyped-def]
    cu = parts.cu
    prev = check(cu.cuCtxGetCurrent(), "cuCtxGetCurrent")
    try:
        return _smids(parts, p, blocks)
    finally:
        check(cu.cuCtxSetCurrent(prev), "cuCtxSetCurrent")   # torch's context again


def _smids(parts: "Partitions", p, blocks: int) -> set[int]:  # type: ignore[no-untyped-def]
    cu = parts.cu
    check(cu.cuCtxSetCurrent(p.ctx), "cuCtxSetCurrent")
    mod = check(cu.cuModuleLoadData(SMID_PTX), "cuModuleLoadData")
    fn = check(cu.cuModuleGetFunction(mod, b"smid"), "cuModuleGetFunction")
    d = int(check(cu.cuMemAlloc(4 * blocks), "cuMemAlloc"))
    arg = ctypes.c_uint64(d)
    ptrs = (ctypes.c_void_p * 1)(ctypes.addressof(arg))
    st = p.stream()
    check(cu.cuLaunchKernel(fn, blocks, 1, 1, 32, 1, 1, 0, st, ctypes.addressof(ptrs), 0),
          "cuLaunchKernel")
    check(cu.cuStreamSynchronize(st), "cuStreamSynchronize")
    out = np.empty(blocks, np.uint32)
    check(cu.cuMemcpyDtoH(out.ctypes.data, d, out.nbytes), "cuMemcpyDtoH")
    cu.cuMemFree(d)
    cu.cuModuleUnload(mod)
    return set(out.tolist())


def test_partitions_are_disjoint_sets_of_sms(parts: "Partitions") -> None:
    a = parts.get(0, 3)
    b = parts.get(3, parts.n_units, True)
    sa, sb = smids(parts, a), smids(parts, b)
    assert len(sa) <= a.sms and len(sb) <= b.sms
    assert len(sa) >= a.sms // 2 and len(sb) >= b.sms // 2      # they did spread
    assert not sa & sb, sorted(sa & sb)
    assert len(smids(parts, parts.full())) > len(sb)
    assert parts.get(0, 3) is a                                  # built once, cached


def test_atomized_ops_equal_the_whole_op(parts: "Partitions") -> None:
    from laked.sched import atoms
    g = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(4096, 1024, device="cuda", dtype=torch.bfloat16, generator=g)
    b = torch.randn(1024, 2048, device="cuda", dtype=torch.bfloat16, generator=g)
    whole = a @ b
    for rows in (4096, 1000, 512, 64):
        out = torch.empty_like(whole)
        op = atoms.matmul(a, b, out)
        while not op.finished:
            op.next_atom(rows)
        assert torch.equal(out, whole), rows
    w = torch.randn(512, 1024, device="cuda", dtype=torch.bfloat16, generator=g)
    ref = torch.relu(a @ w.t())
    out = torch.empty_like(ref)
    op = atoms.linear_relu(a, w, out)
    while not op.finished:
        op.next_atom(700)
    assert torch.equal(out, ref)
    x = torch.randn(10007, device="cuda", generator=g)
    out = torch.empty_like(x)
    op = atoms.elementwise(lambda i, o: torch.exp(i, out=o), x, out)
    while not op.finished:
        op.next_atom(999)
    assert torch.equal(out, torch.exp(x))


@pytest.fixture(scope="module")
def arb(parts: "Partitions"):  # type: ignore[no-untyped-def]
    from laked.sched.arbiter import GpuArbiter
    a = GpuArbiter({"atom_us": 400, "probe_after": 6, "gate_timeout_ms": 300})
    yield a
    a.close()


def _gemm_ops(a, b, out):  # type: ignore[no-untyped-def]
    from laked.sched import atoms
    while True:
        yield atoms.matmul(a, b, out)


def _lc_gemm(arb, name: str):  # type: ignore[no-untyped-def]
    """An LC tenant on the whole GPU and its request: one [512x4096].[4096x4096] GEMM."""
    from laked.tenants import TenantSpec
    lc = arb.add_tenant(TenantSpec(name, "LC", 0, kind="model"))
    lc.allow_partition = False
    x = torch.randn(512, 4096, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)

    def one_lc() -> None:
        torch.relu(x @ w)
    return lc, one_lc


def _lc_requests(arb, lc, one_lc, n: int, gap_s: float = 0.0) -> list[float]:  # type: ignore[no-untyped-def]
    """``n`` LC requests ``gap_s`` apart: their latencies, sorted."""
    n0 = len(lc.latencies)
    for _ in range(n):
        arb.run_lc(lc, one_lc)
        if gap_s:
            time.sleep(gap_s)
    return sorted(list(lc.latencies)[n0:])


def _int_gemm():  # type: ignore[no-untyped-def]
    """Operands and output of an 8192^3 bf16 GEMM of small integers: the sums
    are exact, so only bf16's rounding of them may differ from ``a @ b``."""
    a = torch.randint(-2, 3, (8192, 8192), device="cuda").to(torch.bfloat16)
    b = torch.randint(-2, 3, (8192, 8192), device="cuda").to(torch.bfloat16)
    return a, b, torch.empty(8192, 8192, device="cuda", dtype=torch.bfloat16)


@contextlib.contextmanager
def _be_gemms(arb, be, a, b, out, settle_s: float):  # type: ignore[no-untyped-def]
    """BE row-op GEMMs ``out = a @ b`` on a thread for the block (after ``settle_s``)."""
    stop = threading.Event()
    th = threading.Thread(target=arb.run_be, args=(be, _gemm_ops(a, b, out), stop))
    th.start()
    try:
        time.sleep(settle_s)
        yield th
    finally:
        stop.set()
        th.join(10)


def test_lc_waits_about_one_atom_behind_be(arb) -> None:  # type: ignore[no-untyped-def]
    from laked.tenants import TenantSpec
    lc, one_lc = _lc_gemm(arb, "t-lc")
    be = arb.add_tenant(TenantSpec("t-be", "BE", 0, kind="job"))
    big_a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    big_b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(8192, 8192, device="cuda", dtype=torch.bfloat16)
    try:
        alone_p50 = _lc_requests(arb, lc, one_lc, 200)[100]
        with _be_gemms(arb, be, big_a, big_b, out, 0.3):
            shared = _lc_requests(arb, lc, one_lc, 200, 0.002)
        assert be.atoms > 50 and be.items > 0
        atom_s = arb.knobs.atom_us / 1e6
        # median wait behind BE: at most about one atom (+ slack for the host)
        assert shared[100] - alone_p50 <= 1.5 * atom_s + 200e-6, (shared[100], alone_p50)
        # Eager LC beside row-op BE can stall in the driver (README, known limits);
        # the watchdog's host store ends each stall within gate_timeout_ms, and
        # stalls stay rare (0-4 in a run of this test on an H200)
        timeout_s = arb.knobs.gate_timeout_ms / 1e3
        assert shared[-1] < 1.25 * timeout_s + 0.1, shared[-1]     # the scan's period
        assert arb.gates.forced_opens <= len(shared) // 20, arb.gates.forced_opens
        st = arb.status()
        names = {t["name"]: t for t in st["tenants"]}
        assert names["t-lc"]["requests"] >= 400 and names["t-be"]["atoms"] == be.atoms
    finally:
        arb.gates.forced_opens = 0
        arb.remove_tenant(lc)
        arb.remove_tenant(be)


def test_be_parks_behind_lc_on_the_gpu_and_a_late_park_is_let_go(arb) -> None:  # type: ignore[no-untyped-def]
    from laked.tenants import TenantSpec
    lc, one_lc = _lc_gemm(arb, "t-park-lc")
    be = arb.add_tenant(TenantSpec("t-park-be", "BE", 0, kind="job"))
    a, b, out = _int_gemm()
    p0 = arb.parks.stats()
    try:
        alone_p50 = _lc_requests(arb, lc, one_lc, 100)[50]
        with _be_gemms(arb, be, a, b, out, 0.2) as th:
            shared = _lc_requests(arb, lc, one_lc, 150, 0.003)
            parked = arb.parks.parked - p0["parked"]
            released = arb.parks.released
            items = be.items
            time.sleep(0.3)              # LC stops: the park it left is let go
            assert be.items > items, ("BE stopped with LC", be.pacer.issue_x, arb.parks.stats())
            assert arb.parks.released > released, (released, arb.parks.stats())
        assert not th.is_alive(), "BE's thread did not stop"
        # holds before predicted arrivals became parks, and LC still waits
        # about one atom at most
        assert parked >= 30, arb.parks.stats()
        waited = shared[len(shared) // 2] - alone_p50
        assert waited <= 1.5 * arb.knobs.atom_us / 1e6 + 200e-6, (waited, alone_p50)
        torch.cuda.synchronize()
        torch.testing.assert_close(out.float(), (a @ b).float(), rtol=1e-2, atol=2.0)
        assert arb.status()["parks"]["parked"] == arb.parks.parked
    finally:
        arb.remove_tenant(lc)
        arb.remove_tenant(be)


def test_gate_holds_be_until_lc_ends_and_watchdog_reopens(arb, caplog) -> None:  # type: ignore[no-untyped-def]
    """The watchdog reopens a gate no queued work will open, and logs where
    every thread was while it stayed shut (this one: waiting on the event)."""
    from laked.tenants import TenantSpec
    lc = arb.add_tenant(TenantSpec("t-gate", "LC", 0, kind="kernel"))
    try:
        s = torch.cuda.Stream()
        x = torch.randn(1024, 1024, device="cuda")
        with torch.cuda.stream(s):
            x @ x                               # cuBLAS ready before anything waits
        s.synchronize()
        forced = arb.gates.forced_opens
        arb.gates.stacks_left = 1               # earlier tests' opens may have used them up
        arb.gates.close(lc.slot, torch.cuda.current_stream().cuda_stream)
        torch.cuda.current_stream().synchronize()
        arb.gates.wait(s.cuda_stream, [lc.slot])
        with torch.cuda.stream(s):
            y = x @ x
        ev = torch.cuda.Event()
        ev.record(s)
        time.sleep(0.05)
        assert not ev.query()                   # held by the gate
        t0 = time.perf_counter()
        with caplog.at_level("WARNING", logger="laked.sched.gate"):
            ev.synchronize()                    # the watchdog reopens it
        waited = time.perf_counter() - t0
        assert arb.gates.forced_opens == forced + 1
        assert "laked's threads were at" in caplog.text
        assert "MainThread" in caplog.text and "synchronize" in caplog.text
        assert waited < arb.knobs.gate_timeout_ms / 1e3 + 0.2
        assert torch.equal(y, x @ x)
    finally:
        arb.gates.forced_opens = 0
        arb.remove_tenant(lc)


def _gated_work_passed(arb, stuck_flag: int, lc, one_lc, wait_s: float) -> bool:  # type: ignore[no-untyped-def]
    """Start an LC request that cannot finish (its stream waits on
    ``stuck_flag``, shut), queue work behind its gate on a side stream (as
    BE's atoms are) and say whether that work ran within ``wait_s``; then
    let the request finish."""
    g = arb.gates
    g.close_now(stuck_flag)

    def stuck() -> None:
        g.wait(torch.cuda.current_stream().cuda_stream, [stuck_flag])
        one_lc()
    th = threading.Thread(target=arb.run_lc, args=(lc, stuck))
    side = torch.cuda.Stream()
    x = torch.ones(1024, device="cuda")
    try:
        th.start()
        while not g.is_shut(lc.slot):       # the request has shut its gate
            time.sleep(0.0002)
        g.wait(side.cuda_stream, [lc.slot])
        with torch.cuda.stream(side):
            x.add_(1.0)
        ev = torch.cuda.Event()
        ev.record(side)
        time.sleep(wait_s)
        assert th.is_alive(), "the stuck request finished on its own"
        return ev.query()
    finally:
        g.open_now(stuck_flag)
        th.join(5)
        side.synchronize()


def test_a_held_be_issuer_opens_a_stuck_lc_requests_gate(arb, caplog) -> None:  # type: ignore[no-untyped-def]
    """An LC request whose work stays queued (here: behind a flag only the
    test opens; in a stall, behind a BE gate wait) holds back the work queued
    at its gate.  The BE issuer, held on the host for the request, opens the
    gate once the request runs past unstick_ms and 8x its usual time, long
    before the watchdog's gate_timeout_ms; with the knob at 0 the work stays
    where it is."""
    from laked.tenants import TenantSpec
    lc, one_lc = _lc_gemm(arb, "t-stuck-lc")
    be = arb.add_tenant(TenantSpec("t-stuck-be", "BE", 0, kind="job"))
    a, b, out = _int_gemm()
    flag = arb.gates.slot()
    g = arb.gates
    unstick = arb.knobs.unstick_ms
    try:
        _lc_requests(arb, lc, one_lc, 50)           # the tenant's usual wait for the GPU
        assert 0 < lc.gpu_wait < unstick / 1e3 / 8
        early, forced = g.early_opens, g.forced_opens
        with _be_gemms(arb, be, a, b, out, 0.2):
            with caplog.at_level("WARNING", logger="laked.sched.gate"):
                assert _gated_work_passed(arb, flag, lc, one_lc, 0.08)
            assert g.early_opens == early + 1
            arb.knobs.unstick_ms = 0        # (the stuck request raised the usual time)
            assert not _gated_work_passed(arb, flag, lc, one_lc, 0.08)
            items = be.items
            time.sleep(0.05)
            assert be.items > items             # BE goes on once the request ends
        assert g.early_opens == early + 1 and lc.opened_early == 1
        # the log's allowance is the tenant's: earlier tests' stalls leave it whole
        assert "t-stuck-lc's LC request still running" in caplog.text
        assert "(1 for it," in caplog.text
        st = {s["name"]: s for s in arb.status()["tenants"]}
        assert st["t-stuck-lc"]["gates_opened_early"] == 1
        assert g.forced_opens == forced             # the watchdog had nothing to do
        torch.cuda.synchronize()
        torch.testing.assert_close(out.float(), (a @ b).float(), rtol=1e-2, atol=2.0)
    finally:
        arb.knobs.unstick_ms = unstick
        g.release(flag)
        arb.remove_tenant(lc)
        arb.remove_tenant(be)


def test_the_watchdog_opens_a_stuck_requests_gate_when_no_be_issuer_can(arb, caplog) -> None:  # type: ignore[no-untyped-def]
    """With no BE issuer awake to open it (in a stall seen on an H200 the
    issuer was stuck in a launch itself), the watchdog's scan opens a stuck
    LC request's gate by the same rule (unstick_ms, 8x its usual time),
    within a scan's interval (gate_timeout_ms / 4), not gate_timeout_ms;
    it logs every thread's stack."""
    lc, one_lc = _lc_gemm(arb, "t-stuck-alone")
    flag = arb.gates.slot()
    g = arb.gates
    try:
        _lc_requests(arb, lc, one_lc, 50)           # the tenant's usual wait for the GPU
        early, forced = g.early_opens, g.forced_opens
        g.stacks_left = 1
        scan_s = g.timeout_s / 4
        wait_s = arb.knobs.unstick_ms / 1e3 + 1.5 * scan_s + 0.02
        assert wait_s < 2 * g.timeout_s / 3
        with caplog.at_level("WARNING", logger="laked.sched.gate"):
            assert _gated_work_passed(arb, flag, lc, one_lc, wait_s)
        assert g.early_opens == early + 1 and g.forced_opens == forced
        assert "t-stuck-alone's LC request still running" in caplog.text
        assert "laked's threads were at" in caplog.text and "_request" in caplog.text
    finally:
        g.release(flag)
        arb.remove_tenant(lc)


def test_watchdog_breaks_a_circular_wait_between_gates(arb) -> None:  # type: ignore[no-untyped-def]
    """Two streams each queue their gate's open behind a wait on the other's
    gate (what a shared hardware queue makes of an LC request queued behind
    a BE wait): no queued work can open either, and the watchdog's host
    store must, within its timeout."""
    g = arb.gates
    x, y = g.slot(), g.slot()
    a, b = torch.cuda.Stream(), torch.cuda.Stream()
    try:
        g.close(x, a.cuda_stream)
        g.close(y, b.cuda_stream)
        a.synchronize()
        b.synchronize()
        assert g.is_shut(x) and g.is_shut(y)    # the GPU's writes, read from the host
        g.wait(a.cuda_stream, [y])
        g.open(x, a.cuda_stream)
        g.wait(b.cuda_stream, [x])
        g.open(y, b.cuda_stream)
        ea, eb = torch.cuda.Event(), torch.cuda.Event()
        ea.record(a)
        eb.record(b)
        time.sleep(0.05)
        assert not ea.query() and not eb.query()
        t0 = time.perf_counter()
        ea.synchronize()
        eb.synchronize()
        took = time.perf_counter() - t0
        assert g.forced_opens >= 1
        assert took < arb.knobs.gate_timeout_ms / 1e3 + 0.3, took
        assert not g.is_shut(x) and not g.is_shut(y)
    finally:
        # the watchdog counts each reopen after its store: let the scan end
        # before the count is reset, or a later test sees one of these
        time.sleep(g.timeout_s / 2)
        g.forced_opens = 0
        g.release(x)
        g.release(y)


def _until(cond: Callable[[], bool], timeout_s: float = 2.0) -> None:
    """Wait for ``cond`` (bookkeeping another thread does), at most ``timeout_s``."""
    end = time.monotonic() + timeout_s
    while not cond() and time.monotonic() < end:
        time.sleep(0.001)


def _spin_cycles(ms: float) -> int:
    """SM clock cycles that last at least ``ms`` (H100/H200 SMs clock at most 1980 MHz)."""
    return int(2.0e6 * ms)


@pytest.fixture
def kernel_side(arb):  # type: ignore[no-untyped-def]
    """laked's GPU executor bound to an LC tenant, as the daemon binds the kernel's."""
    import sys
    sys.path.insert(0, os.path.dirname(__file__))
    from kernels import SPIN_PTX
    from lake.standin import StandIn

    from laked.tenants import TenantSpec
    t = arb.add_tenant(TenantSpec("t-kernel", "LC", 0, kind="kernel"))
    with StandIn(size=64 << 20, executor="gpu") as k:
        k.executor.tenancy = arb.tenancy(t)
        s = k.session()
        s.init()
        spin = s.get_function(s.module_load(SPIN_PTX), "spin")
        yield k, s, spin, t
        s.close()
    arb.remove_tenant(t)


def test_kernel_launches_hold_be_atoms_until_they_end(arb, kernel_side) -> None:  # type: ignore[no-untyped-def]
    """Kernel cu* launches shut a gate per stream: a BE atom issued while the
    kernel's work runs starts only once the last of its streams is done."""
    from lake.standin import Launch, u64

    from laked.tenants import TenantSpec
    _k, s, spin, t = kernel_side
    st_long, st_short = s.stream_create(), s.stream_create()
    be = arb.add_tenant(TenantSpec("t-be-k", "BE", 0, kind="job"))
    x = torch.randn(1024, 1024, device="cuda")
    ref = x @ x
    forced = arb.gates.forced_opens
    try:
        with arb.be(be):
            x @ x                                   # the BE path is warm
        torch.cuda.synchronize()
        n0 = t.launches
        s.launch(Launch(spin, (1, 1, 1), (32, 1, 1), [u64(_spin_cycles(80))], stream=st_long))
        s.launch(Launch(spin, (1, 1, 1), (32, 1, 1), [u64(_spin_cycles(5))], stream=st_short))
        s.null()                                    # both launches (and gates) are queued
        assert t.launches == n0 + 2
        assert len(t.stream_slots) >= 2            # one gate per stream
        t0 = time.perf_counter()
        with arb.be(be):
            y = x @ x
            ev = torch.cuda.Event()
            ev.record()
            time.sleep(0.03)                        # the short stream is done by now
            # asked before leaving the block: leaving it waits for the atoms
            assert not ev.query(), "BE ran while the kernel's long launch was running"
        ev.synchronize()
        held = time.perf_counter() - t0
        assert held >= 0.06, held                   # until the 80 ms spin ended
        assert torch.equal(y, ref)
        s.stream_destroy(st_long)
        s.stream_destroy(st_short)
        assert not t.stream_slots                   # their gates went back
        assert arb.gates.forced_opens == forced
    finally:
        arb.remove_tenant(be)


def test_be_parks_behind_kernel_launches(arb, kernel_side) -> None:  # type: ignore[no-untyped-def]
    """With park_raw, kernel launches arriving in a rhythm: BE atoms that
    would not fit before the next one park behind it on the GPU."""
    from lake.standin import Launch, u64

    from laked.sched.park import behind
    from laked.tenants import TenantSpec
    _k, s, spin, t = kernel_side
    st = s.stream_create()
    be = arb.add_tenant(TenantSpec("t-be-kpark", "BE", 0, kind="job"))
    was, arb.knobs.park_raw = arb.knobs.park_raw, True
    a, b, out = _int_gemm()
    p0, forced = arb.parks.parked, arb.gates.forced_opens
    try:
        with _be_gemms(arb, be, a, b, out, 0.2):
            for _ in range(120):
                s.launch(Launch(spin, (1, 1, 1), (32, 1, 1), [u64(_spin_cycles(0.2))],
                                stream=st))
                s.stream_sync(st)
                time.sleep(0.003)
        parked = arb.parks.parked - p0
        assert parked >= 30, arb.parks.stats()
        # every launch was marked on the GPU after its work (the last park
        # may since have been let go by the host: one more)
        assert not behind(int(arb.parks.counts[t.pass_slot]), t.pass_n)
        assert be.items > 0 and arb.gates.forced_opens == forced
        torch.cuda.synchronize()
        torch.testing.assert_close(out.float(), (a @ b).float(), rtol=1e-2, atol=2.0)
        s.stream_destroy(st)
    finally:
        arb.knobs.park_raw = was
        arb.remove_tenant(be)


def test_be_client_launches_wait_for_lc_and_infer_is_counted(arb, kernel_side) -> None:  # type: ignore[no-untyped-def]
    """A BE client's cu* launches wait on the GPU for LC's gates (an unbound
    executor's do not); the kernel's INFER batches are its tenant's requests."""
    from kernels import SPIN_PTX
    from lake.standin import Launch, StandIn, u64

    from laked import mlp
    from laked.tenants import TenantSpec
    _k, s, spin, t = kernel_side
    be = arb.add_tenant(TenantSpec("t-be-client", "BE", 0, kind="client"))
    lc_st = s.stream_create()

    def tiny_launch_s(kb: StandIn) -> float:
        """Seconds from an 80 ms LC launch to the end of a tiny launch of ``kb``'s."""
        sb = kb.session()
        sb.init()
        fn = sb.get_function(sb.module_load(SPIN_PTX), "spin")
        st = sb.stream_create()
        t0 = time.perf_counter()
        s.launch(Launch(spin, (1, 1, 1), (32, 1, 1), [u64(_spin_cycles(80))], stream=lc_st))
        s.null()                                    # the LC launch and its gate are queued
        sb.launch(Launch(fn, (1, 1, 1), (32, 1, 1), [u64(1000)], stream=st))
        sb.stream_sync(st)
        took = time.perf_counter() - t0
        s.stream_sync(lc_st)
        sb.close()
        return took

    try:
        with StandIn(size=16 << 20, executor="gpu") as kb:
            free = tiny_launch_s(kb)                # not a tenant: runs beside LC
        with StandIn(size=16 << 20, executor="gpu") as kb:
            kb.executor.tenancy = arb.tenancy(be)
            gated = tiny_launch_s(kb)
        assert free < 0.04 and gated >= 0.06, (free, gated)
        assert be.launches == be.atoms == 1         # only the bound executor's launch
    finally:
        arb.remove_tenant(be)
    model = mlp.quantize(*mlp.linnos_like(5))
    blob = model.blob()
    boff = s.host_copy(blob)
    req0, items0 = t.requests, t.items
    for batch in (1, 500):
        xq = mlp.to_fixed(np.random.default_rng(batch).normal(size=(batch, 31)), model.frac)
        y = s.infer_rows(1, 1, boff, len(blob), xq, 2)
        assert np.array_equal(y, model.run(xq)), batch
    _until(lambda: t.requests - req0 == 2)      # kept once its completion is posted
    assert (t.requests - req0, t.items - items0) == (2, 501)
    summary = {x["name"]: x for x in arb.status()["tenants"]}["t-kernel"]
    assert summary["launches"] >= 4 and summary["p50_ms"] is not None


def test_infer_lets_be_go_only_once_its_result_is_back(arb, kernel_side) -> None:  # type: ignore[no-untyped-def]
    """An INFER batch's LC request ends (waking BE issuers held for it) once
    its output is on the host, not once its launches are queued: the batch
    is recorded and its output written by the time it leaves (which waits
    for its completion to be posted: Tenancy.settle).  With a BE tenant
    there: with none, the batch goes bare (no gate, no leave)."""
    from laked import mlp
    from laked.tenants import TenantSpec
    k, s, _spin, t = kernel_side
    be = arb.add_tenant(TenantSpec("t-be-infer", "BE", 0, kind="job"))
    model = mlp.quantize(*mlp.linnos_like(5))
    blob = model.blob()
    boff = s.host_copy(blob)
    xq = mlp.to_fixed(np.random.default_rng(7).normal(size=(256, 31)), model.frac)
    off = s.mem_alloc_host(256 * 33 * 4)
    k.write(off, xq.astype("<i4").tobytes())
    want = model.run(xq).astype("<i4").tobytes()
    seen = []
    leave = arb._leave

    def spy(tt):  # type: ignore[no-untyped-def]
        seen.append((tt is t, t.requests, arb.lc_active, k.read(off + 256 * 31 * 4, 256 * 8)))
        leave(tt)
    arb._leave = spy                    # an instance attribute: the tenancy calls it
    try:
        req0 = t.requests
        s.infer(1, 1, boff, len(blob), 256, 31, 2, off)
        _until(lambda: bool(seen))
    finally:
        del arb._leave
        arb.remove_tenant(be)
    assert len(seen) == 1, len(seen)
    mine, requests, active, out = seen[0]
    assert mine and requests == req0 + 1 and active == 1
    assert out == want                  # already copied back when BE was let go
    assert arb.lc_active == 0 and not t.active


def test_only_pieces_queued_ahead_of_the_gpu_teach_a_rate(arb) -> None:  # type: ignore[no-untyped-def]
    """A split piece the GPU reached before it was all queued times the
    issuer, not the GPU: learning from such pieces made rates grow without
    bound (smaller pieces, more issuer time per row).  Pieces queued behind
    running work teach the pacer; pieces the GPU waited for do not."""
    from laked.sched.atoms import RowOp
    from laked.tenants import TenantSpec
    be = arb.add_tenant(TenantSpec("t-rates", "BE", 0, kind="job"))
    x = torch.randn(64, 1 << 14, device="cuda")
    out = torch.empty_like(x)

    def slow(i0: int, i1: int) -> None:
        time.sleep(0.002)               # the GPU reaches the piece's start first
        torch.mul(x[i0:i1], 2.0, out=out[i0:i1])

    def block(i0: int, i1: int) -> None:
        torch.cuda._sleep(50_000_000)   # tens of ms: the next pieces queue behind it

    def fast(i0: int, i1: int) -> None:
        torch.mul(x[i0:i1], 2.0, out=out[i0:i1])

    ops = ([RowOp(64, slow) for _ in range(8)] + [RowOp(64, block)]
           + [RowOp(64, fast) for _ in range(3)])
    try:
        arb.run_be(be, iter(ops), threading.Event())
        learned = {key[2]: r for (_, key), r in be.pacer.rates.items() if key[0] == "rowop"}
        assert id(fast.__code__) in learned, learned
        assert id(slow.__code__) not in learned, learned
        torch.testing.assert_close(out, x * 2.0)
    finally:
        arb.remove_tenant(be)


def test_whole_ops_learn_their_gpu_time(arb) -> None:  # type: ignore[no-untyped-def]
    """An op run whole is estimated from its FLOPs at a fixed rate; the pacer
    learns the GPU's time over that estimate, per op and shape, from atoms
    queued ahead of the GPU, and plans BE's queue (the room before LC) with it."""
    from laked.sched import power
    from laked.sched.opmode import whole_seconds
    from laked.tenants import TenantSpec
    aten = torch.ops.aten
    be = arb.add_tenant(TenantSpec("t-learn", "BE", 0, kind="job"))
    a = torch.randn(8192, 4096, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(4096, device="cuda", dtype=torch.bfloat16)
    est = whole_seconds(aten.addmm.default, (bias, a, w), {})

    nv = power.Nvml()

    def clocked(fn: Callable[[], Any]) -> tuple[Any, float]:
        """fn's result and the SM clock's mean while it ran (NVML, every ms)."""
        mhz: list[int] = []
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(0.001):
                mhz.append(nv.clocks_mhz())
        th = threading.Thread(target=sample)
        th.start()
        try:
            out = fn()
        finally:
            stop.set()
            th.join()
        return out, statistics.fmean(mhz) if mhz else float(nv.clocks_mhz())

    def back_to_back() -> float:
        s0, s1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s0.record()
        for _ in range(60):
            torch.addmm(bias, a, w)
        s1.record()
        torch.cuda.synchronize()
        return s0.elapsed_time(s1) / 1e3 / 60 / est

    def paced() -> None:
        with arb.be(be):                    # each GEMM over the budget: an atom each
            for _ in range(60):
                torch.addmm(bias, a, w)
        torch.cuda.synchronize()

    # Compared in SM cycles: the power limit may lower the clock under one
    # run and not the other.  On an H200 both ran at 1980 MHz and the pacer
    # still learned 0.64 against 0.76 back to back (0.85 in cycles; a cold
    # GPU's 20-GEMM reference had read 0.77 against 0.61, which failed).
    for _ in range(50):
        torch.addmm(bias, a, w)
    ratio, ref_mhz = clocked(back_to_back)
    arb.knobs.idle_atom_us = 400.0          # no LC: the idle atom is the budget
    try:
        _, be_mhz = clocked(paced)
        learned = [v for k, v in be.pacer.scales.items() if k[0] == id(aten.addmm.default)]
        assert len(learned) == 1, be.pacer.scales
        cycles = learned[0] * be_mhz / (ratio * ref_mhz)
        assert abs(cycles - 1) < 0.2, (learned[0], be_mhz, ratio, ref_mhz)
    finally:
        arb.knobs.idle_atom_us = 2000.0
        arb.remove_tenant(be)


def test_small_ops_join_the_atom_before_them(arb) -> None:  # type: ignore[no-untyped-def]
    """A GEMM over the budget opens an atom; the ReLU after it (a few tens of
    microseconds) joins that atom instead of costing the issuer a boundary."""
    from laked.tenants import TenantSpec
    be = arb.add_tenant(TenantSpec("t-join", "BE", 0, kind="job"))
    a = torch.randn(8192, 4096, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    ref = torch.relu(a @ w)
    atoms = {}
    arb.knobs.learn_whole = False           # the FLOP estimate: over the 400 us budget
    arb.knobs.idle_atom_us = 400.0
    try:
        for join in (False, True):
            arb.knobs.join_small = join
            atoms0 = be.atoms
            with arb.be(be):
                for _ in range(10):
                    got = torch.relu(a @ w)
            torch.cuda.synchronize()
            atoms[join] = be.atoms - atoms0
            assert torch.equal(got, ref)
        assert atoms[False] >= 20 and atoms[True] <= 11, atoms
    finally:
        arb.knobs.join_small = arb.knobs.learn_whole = True
        arb.knobs.idle_atom_us = 2000.0
        arb.remove_tenant(be)


def test_trace_times_each_atom_and_request_on_the_gpu(arb) -> None:  # type: ignore[no-untyped-def]
    """trace_start/trace_stop (timeline_be.py --events): one span per BE atom
    and per LC request, as long as their GPU work, in order, each starting
    after the host queued it."""
    from laked.sched.atoms import RowOp
    from laked.tenants import TenantSpec
    be = arb.add_tenant(TenantSpec("t-trace", "BE", 0, kind="job"))
    lc, _ = _lc_gemm(arb, "t-trace-lc")

    def spin(i0: int, i1: int) -> None:
        torch.cuda._sleep(_spin_cycles(1.0))        # >= 1 ms at any clock
    try:
        arb.run_be(be, iter([RowOp(64, spin)]), threading.Event())      # warm
        host0 = arb.trace_start()
        arb.run_be(be, iter([RowOp(64, spin) for _ in range(4)]), threading.Event())
        arb.run_lc(lc, lambda: torch.cuda._sleep(_spin_cycles(1.0)))
        spans = arb.trace_stop()
        atoms = spans["be"]["t-trace"]
        assert len(atoms) == 4 and len(spans["lc"]) == 1, spans
        for i, (a, b, host, est) in enumerate(atoms):
            assert 0.0009 < b - a < 0.02 and est > 0, atoms
            assert host - host0 < a + 1e-4, (host - host0, a)   # queued before it ran
            if i:
                assert a >= atoms[i - 1][1] - 1e-6, atoms          # one stream: in order
        (a, b), = spans["lc"]
        assert 0.0009 < b - a < 0.02 and a >= atoms[-1][1] - 1e-6, (spans["lc"], atoms)
        assert be.pacer.trace is None and arb.lc_trace is None
    finally:
        arb.remove_tenant(be)
        arb.remove_tenant(lc)


def test_atomize_mode_gives_identical_results(arb) -> None:  # type: ignore[no-untyped-def]
    from laked.tenants import TenantSpec
    arb.knobs.idle_atom_us = arb.knobs.atom_us = 2.0     # tiny atoms: big ops are split
    be = arb.add_tenant(TenantSpec("t-mode", "BE", 0, kind="job"))
    g = torch.Generator(device="cuda").manual_seed(1)
    a = torch.randn(4096, 1024, device="cuda", dtype=torch.bfloat16, generator=g)
    b = torch.randn(1024, 2048, device="cuda", dtype=torch.bfloat16, generator=g)
    bias = torch.randn(2048, device="cuda", dtype=torch.bfloat16, generator=g)
    xb = torch.randn(64, 512, 1024, device="cuda", dtype=torch.bfloat16, generator=g)
    yb = torch.randn(64, 1024, 512, device="cuda", dtype=torch.bfloat16, generator=g)
    img = torch.randn(32, 16, 64, 64, device="cuda", generator=g)
    conv = torch.nn.Conv2d(16, 32, 3, padding=1).cuda()
    big = torch.randn(1 << 24, device="cuda", generator=g)
    ref = {"mm": a @ b, "addmm": torch.addmm(bias, a, b), "bmm": torch.bmm(xb, yb),
           "conv": conv(img), "pw": big * 3.0 + 1.0, "relu": torch.relu(a)}
    try:
        atoms0 = be.atoms
        with arb.be(be):
            got = {"mm": a @ b, "addmm": torch.addmm(bias, a, b), "bmm": torch.bmm(xb, yb),
                   "conv": conv(img), "pw": big * 3.0 + 1.0, "relu": torch.relu(a)}
            inplace = big.clone()
            inplace.mul_(2.0)
        torch.cuda.synchronize()
        assert be.atoms - atoms0 > 40, be.atoms - atoms0
        for k, v in ref.items():
            assert torch.equal(got[k], v), k
        assert torch.equal(inplace, big * 2.0)
    finally:
        arb.knobs.idle_atom_us, arb.knobs.atom_us = 2000.0, 400.0
        arb.remove_tenant(be)


@pytest.mark.parametrize("inline", [False, True])
def test_training_step_under_the_atomizer_matches(arb, inline: bool) -> None:  # type: ignore[no-untyped-def]
    """A training step's gradients through the atomizer equal the direct
    step's; with ``inline_backward`` its backward's atoms open on the job's
    own thread (not autograd's), and the setting does not outlive be()."""
    from laked.sched.knobs import Knobs
    from laked.tenants import TenantSpec
    arb.knobs.idle_atom_us = arb.knobs.atom_us = 50.0
    arb.knobs.inline_backward = inline
    be = arb.add_tenant(TenantSpec("t-train", "BE", 0, kind="job"))
    threads: set[int] = set()
    boundary = be.pacer._boundary

    def seen(*a, **k):  # type: ignore[no-untyped-def]
        threads.add(threading.get_ident())
        return boundary(*a, **k)
    be.pacer._boundary = seen

    def step(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        loss = model(x).float().pow(2).mean()
        loss.backward()
        return [p.grad.clone() for p in model.parameters()]
    try:
        torch.manual_seed(3)
        m = torch.nn.Sequential(torch.nn.Linear(1024, 2048), torch.nn.ReLU(),
                                torch.nn.Linear(2048, 1024)).cuda()
        x = torch.randn(4096, 1024, device="cuda")
        ref = step(m, x)
        atoms0 = be.atoms
        with arb.be(be):
            got = step(m, x)
        torch.cuda.synchronize()
        assert be.atoms - atoms0 > 10
        for r, g_ in zip(ref, got, strict=True):
            assert torch.allclose(r, g_, rtol=1e-5, atol=1e-6), (r - g_).abs().max()
        assert (threads == {threading.get_ident()}) == inline, threads
        assert torch.autograd.is_multithreading_enabled()
    finally:
        arb.knobs.idle_atom_us, arb.knobs.atom_us = 2000.0, 400.0
        arb.knobs.inline_backward = Knobs().inline_backward
        arb.remove_tenant(be)


def _due_in(arb, lc, s: float) -> None:  # type: ignore[no-untyped-def]
    """Make LC tenant ``lc`` look as if its next request were ``s`` seconds away."""
    now = time.perf_counter()
    lc.last_start, lc.gap, lc.due = now - 1e-3, 5e-3, now + s
    arb.last_lc = now


def test_a_pointwise_op_is_cut_to_fill_the_room_before_lc(arb) -> None:  # type: ignore[no-untyped-def]
    """fill_pointwise: a pointwise op that would run whole (~1.7 ms, under
    1.5 atoms of 2 ms) but does not fit the room before LC's predicted request
    is cut so a first piece fills that room; the result is the whole op's.
    Off, the op waits whole behind the prediction.  (With no BE work queued
    the room shrinks as the host runs: a room of a few hundred microseconds
    is gone before the op's first piece is planned.)"""
    from laked.sched.knobs import Knobs
    from laked.tenants import TenantSpec
    lc = arb.add_tenant(TenantSpec("t-fill-lc", "LC", 0, kind="model"))
    be = arb.add_tenant(TenantSpec("t-fill-be", "BE", 0, kind="job"))
    x = torch.randn(1 << 30, device="cuda")      # 4 GiB: estimated ~1.7 ms
    want = x * 0.5
    lc.allow_partition = False
    atoms, rooms = {}, {}
    arb.knobs.learn_whole = False               # the byte estimate sizes it
    arb.knobs.atom_us = 2000.0
    arb.knobs.light_atom_us = 0.0               # atoms of 2 ms, light issuer or not
    try:
        for fill in (True, False):
            arb.knobs.fill_pointwise = fill
            torch.cuda.synchronize()
            n0 = be.atoms
            with arb.be(be):
                # set here: entering the mode takes a good part of a room this short
                _due_in(arb, lc, 1e-3)           # room for about half of it
                rooms[fill] = arb.room_hint(be.pacer)
                got = x * 0.5
            torch.cuda.synchronize()
            atoms[fill] = be.atoms - n0
            assert torch.equal(got, want)
        assert atoms[False] == 1 and 2 <= atoms[True] <= 3, (atoms, rooms)
    finally:
        arb.knobs.fill_pointwise = True
        arb.knobs.learn_whole = True
        arb.knobs.atom_us = 400.0
        arb.knobs.light_atom_us = Knobs.light_atom_us
        arb.last_lc = lc.last_start = lc.last_end = lc.due = 0.0
        arb.remove_tenant(lc)
        arb.remove_tenant(be)


def test_issue_x_tells_a_light_issuer_from_a_heavy_one(arb) -> None:  # type: ignore[no-untyped-def]
    """The pacer's host seconds per GPU second (park_one): a loop of large
    GEMMs issues its atoms in a small share of their GPU time; a job that
    spends host time between small ops does not."""
    from laked.tenants import TenantSpec
    light = arb.add_tenant(TenantSpec("t-issue-light", "BE", 0, kind="job"))
    heavy = arb.add_tenant(TenantSpec("t-issue-heavy", "BE", 0, kind="job"))
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(1 << 27, device="cuda")      # ~0.25 ms a pass: an op of its own
    try:
        with arb.be(light):
            for _ in range(40):
                a @ a
        with arb.be(heavy):
            for _ in range(400):                 # a few ops an atom of 2 ms
                x.mul_(1.0)
                time.sleep(500e-6)               # the job's own Python, say
        torch.cuda.synchronize()
        lx, hx = light.pacer.issue_x, heavy.pacer.issue_x
        assert light.atoms >= 20 and heavy.atoms >= 20, (light.atoms, heavy.atoms)
        assert lx < arb.knobs.park_one < 1.0 < hx, (lx, hx)
    finally:
        arb.remove_tenant(light)
        arb.remove_tenant(heavy)


def test_a_light_issuer_gets_shorter_atoms_beside_lc(arb) -> None:  # type: ignore[no-untyped-def]
    """light_atom_us: beside active LC, an issuer at or under park_one (a
    GEMM loop) has its GEMMs cut into atoms of light_atom_us, a heavier or
    unmeasured one into atoms of atom_us."""
    from laked.sched.knobs import Knobs
    from laked.tenants import TenantSpec
    k = arb.knobs
    light_us = k.light_atom_us
    assert 0 < light_us < k.atom_us and k.park_one > 0
    be = arb.add_tenant(TenantSpec("t-light-be", "BE", 0, kind="job"))
    lc = arb.add_tenant(TenantSpec("t-light-lc", "LC", 0, kind="model"))
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    try:
        assert be.pacer.budget_hint() == pytest.approx(k.idle_atom_us / 1e6)
        arb.last_lc = 0.0                        # no LC yet: measure the issuer
        with arb.be(be):
            for _ in range(20):
                a @ a
        torch.cuda.synchronize()
        assert be.pacer.issue_x <= k.park_one, be.pacer.issue_x
        # each run below measures issue_x again, and on a stolen host a GEMM
        # loop's once read past park_one (stop 31, H200): what issue_x reads
        # is test_issue_x_tells_...'s business; this one is the atoms it gets
        k.park_one = 4.0                         # issue_x is at most 4 (pacer.ISSUE_MAX)
        atoms = {}
        for us in (light_us, 0.0, light_us):
            k.light_atom_us = us
            _due_in(arb, lc, 10.0)               # LC active, its request far off
            want = (us or k.atom_us) / 1e6
            assert be.pacer.budget_hint() == pytest.approx(want)
            n0 = be.atoms
            with arb.be(be):
                for _ in range(10):
                    a @ a
            torch.cuda.synchronize()
            atoms[us] = be.atoms - n0
        # 400/300 more atoms for the same GEMMs (the first light run's count is
        # overwritten by the second, after the rates were learned)
        assert atoms[light_us] > 1.15 * atoms[0.0], atoms
    finally:
        k.light_atom_us, k.park_one = light_us, Knobs().park_one
        arb.last_lc = 0.0
        arb.remove_tenant(lc)
        arb.remove_tenant(be)


def test_be_sms_keeps_be_on_its_partition_while_lc_is_active(arb) -> None:  # type: ignore[no-untyped-def]
    from laked.sched.fast import raw_stream
    from laked.tenants import TenantSpec
    arb.knobs.be_sms = 60
    parts = arb.parts
    lc = arb.add_tenant(TenantSpec("t-cap-lc", "LC", 0, kind="model"))
    be = arb.add_tenant(TenantSpec("t-cap-be", "BE", 0, kind="job"))
    x = torch.randn(1 << 25, device="cuda")      # ~50 us: an atom of its own
    try:
        seen = []
        for due_s in (0.05, None):       # LC active, then idle
            if due_s is None:
                arb.last_lc = lc.last_start = lc.last_end = lc.due = 0.0
            else:
                _due_in(arb, lc, due_s)
            with arb.be(be):
                y = x * 2.0              # an atom boundary: the pacer picks the stream
                seen.append(raw_stream())
            torch.cuda.synchronize()
            assert torch.equal(y, x * 2.0)
        cap = next(p for p in parts._cache.values() if p.sms <= 60 and p.units[1] ==
                   parts.n_units and p.streams.get(arb.prio_lo) is not None
                   and int(p.streams[arb.prio_lo]) == seen[0])
        assert 52 < cap.sms <= 60 and cap.units[0] > 0
        assert seen[1] == int(arb.full.stream(arb.prio_lo))
        assert len(smids(parts, cap)) <= cap.sms < len(smids(parts, arb.full))
    finally:
        arb.knobs.be_sms = 0
        arb.remove_tenant(lc)
        arb.remove_tenant(be)


def _be_matmuls(arb, be, lc, a, n: int) -> float:  # type: ignore[no-untyped-def]
    """Seconds ``n`` BE matmuls take through the pacer, LC looking active."""
    _due_in(arb, lc, 10.0)                   # active, but no request due soon
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with arb.be(be):
        for _ in range(n):
            y = a @ a
    torch.cuda.synchronize()
    assert torch.allclose(y.float(), (a @ a).float(), rtol=1e-2, atol=1e-1)
    return time.perf_counter() - t0


def _wait_duty(arb, be, lc, a, want: float) -> None:  # type: ignore[no-untyped-def]
    """Until the governor has read the clock with the knobs as now set.  BE
    keeps the GPU busy meanwhile: an idle H200 sits at its top clock, which
    is no reason to take BE's share."""
    deadline = time.monotonic() + 3.0
    while arb.gov.duty != want and time.monotonic() < deadline:
        _be_matmuls(arb, be, lc, a, 50)
    assert arb.gov.duty == want, (arb.gov.duty, arb.gov.mhz, arb.gov.target_mhz)


def test_be_duty_leaves_the_gpu_idle_while_the_clock_is_under_target(arb) -> None:  # type: ignore[no-untyped-def]
    from laked.tenants import TenantSpec
    if arb.nvml is None or not arb.gov.target_mhz:
        pytest.skip("no NVML clocks: the governor has nothing to read")
    lc = arb.add_tenant(TenantSpec("t-duty-lc", "LC", 0, kind="model"))
    be = arb.add_tenant(TenantSpec("t-duty-be", "BE", 0, kind="job"))
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)    # ~0.1 ms each
    was = arb.knobs.be_duty, arb.knobs.clock_slip
    arb.knobs.be_duty = 1.0                  # first, BE's whole share
    try:
        _wait_duty(arb, be, lc, a, 1.0)
        _be_matmuls(arb, be, lc, a, 50)      # warm: rates learned, atoms sized
        whole = _be_matmuls(arb, be, lc, a, 400)
        gap0 = be.pacer.gap_s
        # clock_slip 0: the target is the top clock, never held under a GEMM
        # loop, so the governor keeps BE at its floor
        arb.knobs.be_duty, arb.knobs.clock_slip = 0.5, 0.0
        _wait_duty(arb, be, lc, a, 0.5)
        half = _be_matmuls(arb, be, lc, a, 400)
        assert be.pacer.gap_s - gap0 > 0.2 * whole
        assert half > 1.4 * whole, (half, whole)
        assert arb.status()["be_duty"]["now"] == 0.5
    finally:
        arb.knobs.be_duty, arb.knobs.clock_slip = was
        arb.remove_tenant(lc)
        arb.remove_tenant(be)


def test_lc_tenant_is_right_sized_and_predicted(arb) -> None:  # type: ignore[no-untyped-def]
    from laked.tenants import TenantSpec
    lc = arb.add_tenant(TenantSpec("t-rs", "LC", 48, kind="model"))
    x = torch.randn(256, 1024, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(1024, 1024, device="cuda", dtype=torch.bfloat16)
    try:
        for _ in range(arb.knobs.probe_after + 20):
            arb.run_lc(lc, lambda: [torch.relu(x @ w) for _ in range(4)])
        rs = {r["kernel"]: r for r in arb.status()["rightsizing"]}["t-rs"]
        print(rs)
        assert lc.probed and lc.model.fitted
        assert rs["predictions"] >= 15 and 0 <= rs["misses"] <= rs["predictions"]
        assert rs["sms"] in [arb.parts.get(0, u).sms for u in range(1, arb.parts.n_units)] + [
            arb.parts.total_sms]
        assert rs["fit_error"] == rs["fit_error"]            # a number, not NaN
    finally:
        arb.remove_tenant(lc)


ATOM_SRC = r'''
extern "C" __global__ void add2d(const float *a, float *b, int w, int h)
{
    int x = blockIdx.x * blockDim.x + threadIdx.x;
    int y = blockIdx.y * 2 + blockIdx.z;
    if (x < w && y < h)
        b[y * w + x] = a[y * w + x] * 2.0f + (float)gridDim.y;
}
'''


def test_kernel_atoms_give_the_unatomized_result(parts: "Partitions") -> None:
    from laked.sched.kernel_atoms import AtomLauncher, compile_atomized
    cu = parts.cu
    major, minor = torch.cuda.get_device_capability()
    ptx = compile_atomized(ATOM_SRC, f"compute_{major}{minor}")
    ctx = check(cu.cuDevicePrimaryCtxRetain(parts.dev), "cuDevicePrimaryCtxRetain")
    check(cu.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
    mod = check(cu.cuModuleLoadData(ptx), "cuModuleLoadData")
    cu.cuDevicePrimaryCtxRelease(parts.dev)
    fn = check(cu.cuModuleGetFunction(mod, b"add2d"), "cuModuleGetFunction")
    w, h = 1000, 37
    a = torch.randn(h, w, device="cuda")
    outs = []
    for per_atom in (10**9, 7, 1):
        b = torch.full((h, w), -1.0, device="cuda")
        params = [ctypes.c_uint64(a.data_ptr()), ctypes.c_uint64(b.data_ptr()),
                  ctypes.c_int(w), ctypes.c_int(h)]
        ln = AtomLauncher(cu, fn, ((w + 127) // 128, 19, 2), (128, 1, 1), params)
        st = parts.full().stream()
        n = ln.launch_atoms(min(per_atom, ln.blocks), st)
        check(cu.cuStreamSynchronize(st), "cuStreamSynchronize")
        assert n == -(-ln.blocks // min(per_atom, ln.blocks))
        outs.append(b.clone())
    assert torch.equal(outs[0], a * 2 + 19)
    assert torch.equal(outs[1], outs[0]) and torch.equal(outs[2], outs[0])


def test_right_sizing_on_a_real_gemm(parts: "Partitions") -> None:
    from laked.sched.rightsize import KernelModel
    x = torch.randn(2048, 4096, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    k = KernelModel("gemm-2048x4096x4096")
    offers = []
    for units in (2, 4, 8, parts.n_units):
        p = parts.get(0, units, units == parts.n_units)
        s = p.torch_stream()
        with torch.cuda.stream(s):
            for _ in range(3):
                x @ w
            s.synchronize()
            for _ in range(15):
                t = time.perf_counter()
                x @ w
                s.synchronize()
                k.observe(p.sms, time.perf_counter() - t)
        offers.append(p.sms)
    summary = k.summary()
    print(summary)
    assert summary["fit_error"] < 0.3, summary
    chosen = k.right_size(offers, slip=1.1)
    assert chosen in offers
    assert k.predict(chosen) <= 1.1 * k.predict(max(offers)) + 1e-9
    assert k.predict(offers[0]) > k.predict(max(offers))      # fewer SMs: slower


def test_power_advice_reads_nvml_only() -> None:
    from laked.sched import power
    try:
        nv = power.Nvml()
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"NVML unusable: {e}")
    clocks = nv.supported_graphics_mhz()
    before = nv.clocks_mhz()
    meter = power.EnergyMeter(nv)
    meter.begin()
    x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < 1.0:   # the counter moves in coarse steps
        for _ in range(20):
            x @ x
        torch.cuda.synchronize()
    meter.end()
    assert meter.joules > 0
    a = power.advise(1.0, 0.1, clocks)
    assert a.advised_mhz in clocks and a.predicted_slowdown <= 0.1 + 1e-9
    assert abs(nv.clocks_mhz() - before) < 1000     # nothing was changed, only read


def _after_busy_python(windows: list[tuple[float, float]], then):  # type: ignore[no-untyped-def]
    """``then`` after 1.5 ms of the caller's Python, each such span kept in ``windows``."""
    def run(*a):  # type: ignore[no-untyped-def]
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 0.0015:
            pass
        windows.append((t0, time.perf_counter()))
        return then(*a)
    return run


def _be_ops_in_windows(arb, name: str, one_round, windows) -> tuple[int, int, int]:  # type: ignore[no-untyped-def]
    """A BE job's Python-bound ops beside ``one_round`` (LC requests whose
    Python spans go into ``windows``), run with host_first_us as set and
    then at 0: (BE ops inside the spans held, BE waits, ops inside them free)."""
    from laked.tenants import TenantSpec
    be = arb.add_tenant(TenantSpec(name, "BE", 0, kind="job"))
    stamps: list[float] = []
    stop = threading.Event()
    x = torch.zeros(1024, device="cuda")

    def be_loop() -> None:
        with arb.be(be):
            while not stop.is_set():
                x.add_(1.0)                     # a few us of GPU: Python-bound
                stamps.append(time.perf_counter())

    def inside() -> int:
        """BE ops stamped in this round's windows."""
        n = sum(1 for s in stamps for a, b in windows if a < s < b)
        windows.clear()
        return n
    th = threading.Thread(target=be_loop)
    was = arb.knobs.host_first_us
    try:
        th.start()
        time.sleep(0.05)
        waits0 = arb.host_first.waits
        one_round()
        held, waits = inside(), arb.host_first.waits - waits0
        arb.knobs.host_first_us = 0.0
        one_round()
        free = inside()
        assert arb.host_first.waits - waits0 == waits, "the knob at 0 still held BE"
    finally:
        arb.knobs.host_first_us = was
        stop.set()
        th.join(5)
        arb.remove_tenant(be)
    return held, waits, free


def test_be_python_waits_while_an_lc_request_runs_its_host_path(arb) -> None:  # type: ignore[no-untyped-def]
    """host_first_us: a BE job's ops (through the atomizer) do not run
    while an LC request's thread runs Python before its launch; with the
    knob at 0 they interleave with it (the GIL passes every switch interval)."""
    lc, one_lc = _lc_gemm(arb, "t-hostfirst-lc")
    windows: list[tuple[float, float]] = []
    busy_then_lc = _after_busy_python(windows, one_lc)

    def requests() -> None:
        for _ in range(20):
            arb.run_lc(lc, busy_then_lc)
            time.sleep(0.003)
    try:
        held, waits, free = _be_ops_in_windows(arb, "t-hostfirst", requests, windows)
    finally:
        arb.remove_tenant(lc)
    # held: at most the op a BE thread was in when the request came (its
    # waits end at CAP_S, 2 ms, longer than each window); a thread asleep
    # in the pacer through a whole window (holding for LC) reaches no wait
    assert waits >= 10 and held <= 20, (held, waits, free)
    assert free >= 5 * max(held, 4), (held, free)


def test_be_python_waits_while_the_kernels_infer_batch_runs(arb, kernel_side) -> None:  # type: ignore[no-untyped-def]
    """host_first_us covers an LC tenant's INFER batches (nearly all host
    time): a BE job's ops do not run during a batch's Python; with the knob
    at 0 they interleave with it, and the batches' results are the same."""
    from laked import mlp
    k, s, _spin, _t = kernel_side
    model = mlp.quantize(*mlp.linnos_like(5))
    blob = model.blob()
    boff = s.host_copy(blob)
    xq = mlp.to_fixed(np.random.default_rng(3).normal(size=(64, 31)), model.frac)
    want = model.run(xq)
    windows: list[tuple[float, float]] = []

    def batches() -> None:
        for _ in range(20):
            assert np.array_equal(s.infer_rows(1, 1, boff, len(blob), xq, 2), want)
            time.sleep(0.003)
    # an instance attribute: op_infer calls it inside the batch
    k.executor.run_mlp = _after_busy_python(windows, k.executor.run_mlp)
    try:
        held, waits, free = _be_ops_in_windows(arb, "t-hostfirst-infer", batches, windows)
    finally:
        del k.executor.run_mlp
    assert waits >= 10 and held <= 20, (held, waits, free)     # as in the test above
    assert free >= 5 * max(held, 4), (held, free)

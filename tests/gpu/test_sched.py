"""The arbiter's mechanisms on a real GPU (device machine only)."""
from __future__ import annotations

import ctypes
import threading
import time

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


def test_lc_waits_about_one_atom_behind_be(parts: "Partitions") -> None:
    from laked.sched import atoms
    from laked.sched.scheduler import Knobs, Scheduler
    s = Scheduler(parts, lc_quota_sms=24, knobs=Knobs(busy_rows=512, idle_rows=512))
    lc = s.tenant("lc", "LC", 24)
    be = s.tenant("be", "BE", parts.total_sms)
    x = torch.randn(512, 4096, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    big_a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    big_b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(8192, 8192, device="cuda", dtype=torch.bfloat16)

    def one_lc() -> None:
        torch.relu(x @ w)

    # the atom's own duration, alone
    t = time.perf_counter()
    op = atoms.matmul(big_a, big_b, out)
    for _ in range(4):
        op.next_atom(512)
    torch.cuda.synchronize()
    atom_s = (time.perf_counter() - t) / 4
    alone = sorted(s.run_lc(lc, one_lc) for _ in range(200))[100]
    stop = threading.Event()
    th = threading.Thread(target=s.run_be, args=(be, iter(
        atoms.matmul(big_a, big_b, out) for _ in range(10**6)), stop))
    th.start()
    try:
        time.sleep(0.2)
        shared = sorted(s.run_lc(lc, one_lc) for _ in range(200))
    finally:
        stop.set()
        th.join()
    s.drain()
    assert be.atoms > 10
    # median wait behind BE: at most about one atom (+ slack for the host)
    assert shared[100] - alone <= 1.5 * atom_s + 200e-6, (shared[100], alone, atom_s)


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

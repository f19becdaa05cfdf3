"""The scheduler's pure parts: source atomizer, right-sizing fit, DVFS advice."""
from __future__ import annotations

import pytest

from laked.sched import kernel_atoms, power, rightsize

SRC = r'''
extern "C" __global__ void add2d(const float *a, float *b, int w, int h)
{
    int x = blockIdx.x * blockDim.x + threadIdx.x;
    int y = blockIdx.y;
    if (x < w && y < h) { b[y * w + x] = a[y * w + x] + gridDim.y; }
}
'''


def test_atomizer_wraps_each_kernel() -> None:
    code, names = kernel_atoms.atomize_source(SRC)
    assert names == ["add2d"]
    assert "static __device__ __forceinline__ void add2d__lake(lake_dim3 lake_bid" in code
    assert ('extern "C" __global__ void add2d(const float *a, float *b, int w, int h, '
            "unsigned long long lake_lo") in code
    assert "add2d__lake(lake__b, lake__g, a, b, w, h);" in code
    assert code.count("#define blockIdx lake_bid") == 1


@pytest.mark.parametrize("bad", ["cg::this_grid().sync();", "__cluster_dims__(2,1,1)"])
def test_atomizer_refuses_grid_sync_and_clusters(bad: str) -> None:
    with pytest.raises(kernel_atoms.AtomizeError):
        kernel_atoms.atomize_source(SRC.replace("int y = blockIdx.y;", f"int y = 0; {bad}"))


def test_right_sizing_fits_m_over_t_plus_b() -> None:
    k = rightsize.KernelModel("gemm")
    m, b = 2e-3 * 132, 30e-6          # 2 ms on the whole GPU, 30 us fixed
    for t in (8, 16, 32, 64, 132):
        k.observe(t, m / t + b)
    assert k.fit_error() < 1e-6
    assert k.right_size([8, 16, 32, 64, 96, 132], slip=1.1) == 132
    k2 = rightsize.KernelModel("small")
    for t in (8, 132):                 # mostly fixed cost: few SMs suffice
        k2.observe(t, 1e-6 * 132 / t + 200e-6)
    assert k2.right_size([8, 16, 32, 64, 132], slip=1.1) == 8
    k2.observe(16, 1.0)                # a wild run: a predicted miss
    assert k2.misses == 1 and k2.summary()["predictions"] == 1


def test_dvfs_advice_is_bounded_by_the_slip() -> None:
    clocks = list(range(345, 1981, 15))
    a = power.advise(1.0, 0.1, clocks)
    assert a.advised_mhz in clocks and a.predicted_slowdown <= 0.1 + 1e-9
    assert a.advised_mhz < max(clocks) and a.predicted_energy_saving > 0
    mem_bound = power.advise(0.05, 0.1, clocks)
    assert mem_bound.advised_mhz < a.advised_mhz
    assert power.advise(0.0, 0.1, clocks).advised_mhz == min(clocks)

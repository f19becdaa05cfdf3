"""Kernel atoms: one launch of an NVRTC-compiled kernel as block ranges.

laked compiles CUDA C kernels it hosts with a prelude: each ``extern "C"
__global__`` kernel becomes a device body that reads ``blockIdx`` and
``gridDim`` from arguments, plus a wrapper kernel that runs only blocks
[lo, lo + gridDim.x) of the original grid's linear block index.  A launch
of G blocks can then be issued as atoms of any size, in order, on any
stream, with the same result.  Kernels using grid-wide synchronisation or
clusters are refused: a block range would deadlock or split a cluster.
"""
from __future__ import annotations

import ctypes
import re
from dataclasses import dataclass
from typing import Any, Sequence

from .partition import check

_KERNEL = re.compile(
    r'extern\s+"C"\s+__global__\s+void\s+(\w+)\s*\(([^)]*)\)\s*\{', re.S)
_FORBIDDEN = ("this_grid", "grid_group", "__cluster_dims__", "cluster_group",
              "cudaLaunchCooperativeKernel")

PRELUDE = r"""
struct lake_dim3 { unsigned int x, y, z; };
static __device__ __forceinline__ lake_dim3 lake_unlinear(unsigned long long i,
                                                          lake_dim3 g)
{
    lake_dim3 b;
    b.x = (unsigned int)(i % g.x);
    b.y = (unsigned int)((i / g.x) % g.y);
    b.z = (unsigned int)(i / ((unsigned long long)g.x * g.y));
    return b;
}
"""


class AtomizeError(ValueError):
    pass


def atomize_source(src: str) -> tuple[str, list[str]]:
    """The source with every kernel made range-launchable; their names."""
    for word in _FORBIDDEN:
        if word in src:
            raise AtomizeError(f"kernel uses {word}: block ranges would break it")
    names: list[str] = []
    out, pos = [PRELUDE], 0
    for m in _KERNEL.finditer(src):
        name, params = m.group(1), m.group(2).strip()
        names.append(name)
        body_start = m.end()
        body_end = _match_brace(src, body_start - 1)
        body = src[body_start:body_end]
        args = ", ".join(_param_names(params))
        sep = ", " if params else ""
        out.append(src[pos:m.start()])
        out.append(
            f"static __device__ __forceinline__ void {name}__lake(lake_dim3 lake_bid, "
            f"lake_dim3 lake_gdim{sep}{params})\n{{\n"
            "#define blockIdx lake_bid\n#define gridDim lake_gdim\n"
            f"{body}\n#undef blockIdx\n#undef gridDim\n}}\n"
            f'extern "C" __global__ void {name}({params}{sep}unsigned long long lake_lo, '
            "unsigned int lake_gx, unsigned int lake_gy, unsigned int lake_gz)\n{\n"
            "    lake_dim3 lake__g = { lake_gx, lake_gy, lake_gz };\n"
            "    lake_dim3 lake__b = lake_unlinear(lake_lo + blockIdx.x, lake__g);\n"
            f"    {name}__lake(lake__b, lake__g{', ' + args if args else ''});\n}}\n")
        pos = body_end + 1
    if not names:
        raise AtomizeError('no extern "C" __global__ kernel found')
    out.append(src[pos:])
    return "".join(out), names


def _match_brace(src: str, open_at: int) -> int:
    depth = 0
    for i in range(open_at, len(src)):
        if src[i] == "{":
            depth += 1
        elif src[i] == "}":
            depth -= 1
            if depth == 0:
                return i
    raise AtomizeError("unbalanced braces in kernel source")


def _param_names(params: str) -> list[str]:
    if not params or params == "void":
        return []
    names = []
    for p in params.split(","):
        m = re.search(r"(\w+)\s*(\[\s*\])?\s*$", p.strip())
        if not m:
            raise AtomizeError(f"cannot read parameter {p!r}")
        names.append(m.group(1))
    return names


def compile_atomized(src: str, arch: str, name: str = "lake_atoms.cu") -> bytes:
    """NVRTC: the atomized source to PTX for ``arch`` (e.g. "compute_90")."""
    try:
        from cuda.bindings import nvrtc
    except ImportError:
        from cuda import nvrtc  # type: ignore[no-redef]
    code, _ = atomize_source(src)
    err, prog = nvrtc.nvrtcCreateProgram(code.encode(), name.encode(), 0, [], [])
    opts = [f"--gpu-architecture={arch}".encode()]
    err, = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
    if int(err) != 0:
        _, n = nvrtc.nvrtcGetProgramLogSize(prog)
        log = b" " * n
        nvrtc.nvrtcGetProgramLog(prog, log)
        raise AtomizeError(f"NVRTC: {log.decode(errors='replace')}")
    _, size = nvrtc.nvrtcGetPTXSize(prog)
    ptx = b" " * size
    nvrtc.nvrtcGetPTX(prog, ptx)
    return ptx


@dataclass
class AtomLauncher:
    """Launches an atomized kernel's grid as block ranges."""
    cu: Any
    fn: Any
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    params: Sequence[ctypes._SimpleCData]
    shared: int = 0

    @property
    def blocks(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]

    def launch(self, lo: int, hi: int, stream: Any) -> None:
        """Blocks [lo, hi) of the linear block index, on ``stream``."""
        if not 0 <= lo < hi <= self.blocks:
            raise ValueError(f"block range [{lo}, {hi}) outside 0..{self.blocks}")
        extra = [ctypes.c_uint64(lo), ctypes.c_uint32(self.grid[0]),
                 ctypes.c_uint32(self.grid[1]), ctypes.c_uint32(self.grid[2])]
        vals = list(self.params) + extra
        ptrs = (ctypes.c_void_p * len(vals))(*[ctypes.addressof(v) for v in vals])
        check(self.cu.cuLaunchKernel(self.fn, hi - lo, 1, 1, *self.block, self.shared,
                                     stream, ctypes.addressof(ptrs), 0), "cuLaunchKernel")

    def launch_atoms(self, blocks_per_atom: int, stream: Any) -> int:
        """The whole grid in atoms of ``blocks_per_atom``; returns how many."""
        n = 0
        for lo in range(0, self.blocks, blocks_per_atom):
            self.launch(lo, min(self.blocks, lo + blocks_per_atom), stream)
            n += 1
        return n

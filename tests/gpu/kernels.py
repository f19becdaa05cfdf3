"""PTX for the GPU tests (sm_50: the driver JITs it for any newer GPU)."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts" / "bench"))
from vecadd_ptx import VECADD_PTX  # noqa: E402  (one copy, shared with the benchmark)

# Busy-waits ``cycles`` SM clock cycles: a kernel that keeps one stream busy.
SPIN_PTX = b"""
.version 7.0
.target sm_50
.address_size 64
.visible .entry spin(.param .u64 cycles)
{
  .reg .pred %p;
  .reg .b64 %rd<5>;
  ld.param.u64 %rd1, [cycles];
  mov.u64 %rd2, %clock64;
LOOP:
  mov.u64 %rd3, %clock64;
  sub.s64 %rd4, %rd3, %rd2;
  setp.lt.s64 %p, %rd4, %rd1;
  @%p bra LOOP;
  ret;
}
"""

# Stores through the pointer it is given: with 0, an illegal address (700),
# which poisons the CUDA context.
CRASH_PTX = b"""
.version 7.0
.target sm_50
.address_size 64
.visible .entry crash(.param .u64 p)
{
  .reg .b32 %r<2>;
  .reg .b64 %rd<2>;
  ld.param.u64 %rd1, [p];
  mov.u32 %r1, 1;
  st.global.u32 [%rd1], %r1;
  ret;
}
"""

__all__ = ["CRASH_PTX", "SPIN_PTX", "VECADD_PTX"]

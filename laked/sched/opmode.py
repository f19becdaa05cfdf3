"""Op-level atomizer for torch work: the big ops a BE job issues, cut into atoms.

Installed (as a TorchDispatchMode) on a best-effort job's thread by
``GpuArbiter.be()``; a training step's backward runs on the same thread
(``inline_backward``; off, autograd carries the mode to its device
thread), so its ops are paced like its forward ops.  Every aten op
that launches GPU work goes through the tenant's ``Pacer``:

- matmuls (mm, addmm along M; bmm along the batch), convolutions along the
  batch, and pointwise ops on large contiguous tensors (by range of the
  flattened tensors) are split into pieces of about one atom each; every
  piece writes a disjoint slice of one output, so the result is the whole
  op's (tests/gpu check it);
- other ops are grouped: consecutive small ops form one atom until their
  estimated time reaches the atom budget;
- an op up to 1.5 budgets runs whole, except a pointwise op that does not
  fit the room before LC's next predicted request: its first piece fills
  that room (``fill_pointwise``, Pacer.fill_s).
View and metadata ops, and ops on CPU tensors, pass straight through.
Costs are estimated from FLOPs or bytes and refined from measured atoms.
"""
from __future__ import annotations

from dataclasses import dataclass
from time import perf_counter
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

if TYPE_CHECKING:
    from .pacer import Pacer

aten = torch.ops.aten

# Ops that launch nothing (allocation, metadata); views are caught by is_view.
_NO_KERNEL = {aten.empty.memory_format, aten.empty_strided.default, aten.empty_like.default,
              aten.detach.default, aten.lift_fresh.default, aten._local_scalar_dense.default,
              aten.is_same_size.default, aten.sym_size.int, aten.sym_stride.int,
              aten.sym_numel.default, aten.sym_storage_offset.default}

WHOLE_X = 1.5        # ops up to this many atom budgets run whole

# Below this many rows (or elements for pointwise ops) an op is never split.
MIN_SPLIT_ROWS = 256
MIN_SPLIT_ELEMS = 1 << 22

_RATE = {torch.bfloat16: 600e12, torch.float16: 600e12, torch.float32: 50e12,
         torch.float64: 30e12}
BANDWIDTH = 2.5e12       # bytes/s: the first guess for memory-bound work


def flops_rate(dtype: torch.dtype) -> float:
    return _RATE.get(dtype, 20e12)


@dataclass
class Split:
    """An op as ``rows`` independent pieces: ``piece(i0, i1)`` issues rows [i0, i1)."""
    key: tuple[Any, ...]          # cost model key (op, dtype, shape of a row)
    rows: int
    est_row_s: float              # first guess of seconds per row on the whole GPU
    piece: Callable[[int, int], None]
    result: Any
    guessed: bool = True          # est_row_s comes from FLOPs or bytes (bounds what is learned)


def _tensors(args: Any, kwargs: dict[str, Any]) -> list[torch.Tensor]:
    out = [a for a in args if isinstance(a, torch.Tensor)]
    out += [a for a in kwargs.values() if isinstance(a, torch.Tensor)]
    for a in args:
        if isinstance(a, (list, tuple)):
            out += [x for x in a if isinstance(x, torch.Tensor)]
    return out


def est_seconds(args: Any, kwargs: dict[str, Any]) -> float:
    """Memory-bound guess for an op we do not model: its tensors' bytes once."""
    return sum(t.nbytes for t in _tensors(args, kwargs)) / BANDWIDTH + 2e-6


def whole_seconds(func: Any, args: Any, kwargs: dict[str, Any]) -> float:
    """A cheap estimate of the whole op's GPU time (no allocation, no meta run)."""
    return _whole(func.overloadpacket.__name__, args, kwargs)


def _whole(name: str, args: Any, kwargs: dict[str, Any]) -> float:
    try:
        if name in ("mm", "addmm", "bmm"):
            a, b = (args[1], args[2]) if name == "addmm" else (args[0], args[1])
            flops = 2.0 * a.numel() * b.shape[-1]
            return flops / flops_rate(a.dtype)
        if name == "convolution":
            x, w, stride = args[0], args[1], args[3]
            out_px = x[0, 0].numel() / max(1, stride[0] * (stride[1] if len(stride) > 1 else 1))
            return 2.0 * x.shape[0] * w.numel() * out_px / flops_rate(x.dtype)
    except (AttributeError, IndexError, TypeError):
        pass
    return est_seconds(args, kwargs)


def _meta_result(func: Any, args: Any, kwargs: dict[str, Any]) -> Any:
    """The op's result shape and dtype, computed on meta tensors (launches nothing)."""
    def meta(a: Any) -> Any:
        return torch.empty_like(a, device="meta") if isinstance(a, torch.Tensor) else a
    return func(*[meta(a) for a in args], **{k: meta(v) for k, v in kwargs.items()})


def _mm(func: Any, args: Any, kwargs: dict[str, Any]) -> Split | None:
    a, b = args[0], args[1]
    if a.dim() != 2 or a.shape[0] < MIN_SPLIT_ROWS:
        return None
    out = kwargs.get("out")
    if out is None:
        out = torch.empty((a.shape[0], b.shape[1]), dtype=a.dtype, device=a.device)
    elif out.shape != (a.shape[0], b.shape[1]) or not out.is_contiguous():
        return None

    def piece(i0: int, i1: int) -> None:
        aten.mm.out(a[i0:i1], b, out=out[i0:i1])
    return Split(("mm", a.dtype, a.shape[1], b.shape[1]), a.shape[0],
                 2 * a.shape[1] * b.shape[1] / flops_rate(a.dtype), piece, out)


def _addmm(func: Any, args: Any, kwargs: dict[str, Any]) -> Split | None:
    bias, a, b = args[0], args[1], args[2]
    beta, alpha = kwargs.get("beta", 1), kwargs.get("alpha", 1)
    if a.dim() != 2 or a.shape[0] < MIN_SPLIT_ROWS:
        return None
    out = torch.empty((a.shape[0], b.shape[1]), dtype=a.dtype, device=a.device)
    per_row_bias = bias.dim() == 2 and bias.shape[0] == a.shape[0] and a.shape[0] > 1

    def piece(i0: int, i1: int) -> None:
        bb = bias[i0:i1] if per_row_bias else bias
        aten.addmm.out(bb, a[i0:i1], b, beta=beta, alpha=alpha, out=out[i0:i1])
    return Split(("addmm", a.dtype, a.shape[1], b.shape[1]), a.shape[0],
                 2 * a.shape[1] * b.shape[1] / flops_rate(a.dtype), piece, out)


def _bmm(func: Any, args: Any, kwargs: dict[str, Any]) -> Split | None:
    a, b = args[0], args[1]
    if a.dim() != 3 or a.shape[0] < 2:
        return None
    out = torch.empty((a.shape[0], a.shape[1], b.shape[2]), dtype=a.dtype, device=a.device)

    def piece(i0: int, i1: int) -> None:
        aten.bmm.out(a[i0:i1], b[i0:i1], out=out[i0:i1])
    return Split(("bmm", a.dtype, a.shape[1], a.shape[2], b.shape[2]), a.shape[0],
                 2 * a.shape[1] * a.shape[2] * b.shape[2] / flops_rate(a.dtype), piece, out)


def _conv(func: Any, args: Any, kwargs: dict[str, Any]) -> Split | None:
    x, w = args[0], args[1]
    if x.dim() < 3 or x.shape[0] < 2 or args[6]:        # transposed convs stay whole
        return None
    shape = _meta_result(func, (x[:1],) + tuple(args[1:]), kwargs)
    out = torch.empty((x.shape[0],) + tuple(shape.shape[1:]), dtype=shape.dtype, device=x.device)
    flops_row = 2 * shape[0].numel() * w[0].numel()      # w: [Cout, Cin/groups, k...]

    def piece(i0: int, i1: int) -> None:
        # convolution has no out= form: the piece's result is copied in
        out[i0:i1].copy_(func(x[i0:i1], *args[1:], **kwargs))
    return Split(("conv", x.dtype, tuple(x.shape[1:]), tuple(w.shape)), x.shape[0],
                 flops_row / flops_rate(x.dtype), piece, out)


def _pointwise(func: Any, args: Any, kwargs: dict[str, Any]) -> Split | None:
    tens = _tensors(args, kwargs)
    if not tens:
        return None
    n = tens[0].numel()
    if n < MIN_SPLIT_ELEMS or any(t.numel() not in (n, 1) or not t.is_contiguous()
                                  for t in tens):
        return None

    def cut(a: Any, i0: int, i1: int) -> Any:
        return a.view(-1)[i0:i1] if isinstance(a, torch.Tensor) and a.numel() == n else a
    key = ("pw", str(func), tens[0].dtype)
    est_row = 2 * sum(t.nbytes for t in tens) / n / BANDWIDTH
    given = kwargs.get("out")
    rest = {k: v for k, v in kwargs.items() if k != "out"}
    if given is not None:                       # an .out overload: slices of its out
        def piece_out(i0: int, i1: int) -> None:
            func(*[cut(a, i0, i1) for a in args], **rest, out=cut(given, i0, i1))
        return Split(key, n, est_row, piece_out, given)
    if func._schema.is_mutable:                 # in place: slices of the first argument
        def piece_inplace(i0: int, i1: int) -> None:
            func(*[cut(a, i0, i1) for a in args], **rest)
        return Split(key, n, est_row, piece_inplace, args[0])
    out_op = getattr(func.overloadpacket, "out", None)
    if out_op is None or func.overloadpacket.__name__ not in _ARITH:
        return None
    shape = next(t.shape for t in tens if t.numel() == n)
    out = torch.empty(shape, dtype=torch.result_type(*[a for a in args[:2] if isinstance(
        a, (torch.Tensor, int, float))]) if len(args) > 1 else tens[0].dtype,
        device=tens[0].device)

    def piece(i0: int, i1: int) -> None:
        out_op(*[cut(a, i0, i1) for a in args], **rest, out=cut(out, i0, i1))
    return Split(key, n, est_row, piece, out)


# functional pointwise ops whose result dtype is torch.result_type of the inputs
_ARITH = {"add", "sub", "mul", "div", "relu", "gelu", "silu", "sigmoid", "tanh", "exp",
          "neg", "abs", "sqrt", "rsqrt", "threshold_backward", "clamp", "maximum", "minimum"}

_SPLITTERS: dict[Any, Callable[[Any, Any, dict[str, Any]], Split | None]] = {
    aten.mm.default: _mm,
    aten.mm.out: _mm,
    aten.addmm.default: _addmm,
    aten.bmm.default: _bmm,
    aten.convolution.default: _conv,
}


def _on_gpu(args: Any) -> bool:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.is_cuda
        if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor):
            return a[0].is_cuda
    return False


PASS, SPLIT, ONE = 0, 1, 2
# op -> (what to do, splitter, op name): decided once
_KIND: dict[Any, tuple[int, Any, str]] = {}


def _classify(func: Any) -> tuple[int, Any, str]:
    kind = _KIND.get(func)
    if kind is None:
        name = func.overloadpacket.__name__
        if func.is_view or func in _NO_KERNEL:
            kind = (PASS, None, name)
        else:
            splitter = _SPLITTERS.get(func)
            if splitter is None and torch.Tag.pointwise in func.tags:
                splitter = _pointwise
            kind = (SPLIT, splitter, name) if splitter is not None else (ONE, None, name)
        _KIND[func] = kind
    return kind


class AtomizeMode(TorchDispatchMode):
    """Routes a BE tenant's aten ops through its pacer (see the module docstring)."""

    def __init__(self, pacer: "Pacer") -> None:
        super().__init__()
        self.pacer = pacer
        self.host_first = pacer.arb.host_first

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        # every aten op of the job comes here: each Python step is paid per op
        if perf_counter() >= self.host_first.after:
            self.host_first.pause()         # an LC request's host path runs (hostfirst.py)
        what, splitter, name = _KIND.get(func) or _classify(func)
        kwargs = kwargs or {}
        if what == PASS or not (_on_gpu(args) or (kwargs and _on_gpu(kwargs.values()))):
            return func(*args, **kwargs)
        p = self.pacer
        if what == SPLIT:
            est = _whole(name, args, kwargs)
            # an op up to half again an atom is an atom already: splitting it
            # would cost more Python than the wait it saves LC (unless it
            # fills the room before LC's next request: Pacer.fill_s)
            fill = 0.0
            if est <= WHOLE_X * p.budget_hint():
                if splitter is not _pointwise or not (fill := p.fill_s(func, args, est)):
                    return p.run_op(func, args, kwargs, est)
            plan = splitter(func, args, kwargs)
            if plan is not None:
                p.run_split(plan, fill)
                return plan.result
            return p.run_op(func, args, kwargs, est)
        return p.run_op(func, args, kwargs, est_seconds(args, kwargs))

"""Op-level atomizer: big torch ops cut into atom-sized pieces.

A BE job hands the scheduler ops; the scheduler decides how many rows an
atom gets (large when no LC work is pending or expected, small when it is)
and launches the pieces one by one on the stream it chooses.  Matmul and
linear split along M (rows of the output), elementwise ops by range: each
piece writes a disjoint slice of the same output tensor, so the result is
the unsplit op's (tests/gpu check it bit for bit).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass
class RowOp:
    """out[i0:i1] = fn(i0, i1) for rows of an op with ``rows`` output rows."""
    rows: int
    piece: Callable[[int, int], None]
    done_rows: int = 0

    @property
    def finished(self) -> bool:
        return self.done_rows >= self.rows

    def next_atom(self, max_rows: int) -> tuple[int, int]:
        """Launch the next piece of at most ``max_rows`` rows; returns its range."""
        i0 = self.done_rows
        i1 = min(self.rows, i0 + max(1, max_rows))
        self.piece(i0, i1)
        self.done_rows = i1
        return i0, i1


def matmul(a: Any, b: Any, out: Any) -> RowOp:
    """out = a @ b, cut along a's rows."""
    import torch

    def piece(i0: int, i1: int) -> None:
        torch.matmul(a[i0:i1], b, out=out[i0:i1])
    return RowOp(a.shape[0], piece)


def linear_relu(x: Any, w: Any, out: Any) -> RowOp:
    """out = relu(x @ w.T), cut along x's rows (a layer of an MLP or FFN)."""
    import torch

    def piece(i0: int, i1: int) -> None:
        torch.matmul(x[i0:i1], w.t(), out=out[i0:i1])
        torch.relu_(out[i0:i1])
    return RowOp(x.shape[0], piece)


def elementwise(fn: Callable[[Any, Any], None], x: Any, out: Any) -> RowOp:
    """out[i] = fn(x[i]) by ranges of the flattened tensors."""
    xf, of = x.view(-1), out.view(-1)

    def piece(i0: int, i1: int) -> None:
        fn(xf[i0:i1], of[i0:i1])
    return RowOp(xf.numel(), piece)

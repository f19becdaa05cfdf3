"""Fixed-point multilayer perceptrons, exactly as lake.ko computes them.

The arithmetic is the ABI's (struct lake_layer in lakelib/uapi/lake.h):
out = sat32(((W . in) >> frac) + b), 64-bit wrapping sums, arithmetic
shift, ReLU on every layer but the last.  This module quantises float
models, packs them for the kernel (netlink layers, region blobs), unpacks
blobs laked finds in the region, and runs the reference computation that
the kernel's CPU path, laked's CPU executor and its GPU kernel must match
bit for bit.  numpy only: it runs on the device machine too.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import abi

LAYER_HDR = struct.Struct("<II")      # struct lake_layer
BLOB_HDR = struct.Struct("<II")       # struct lake_model_blob
DEFAULT_FRAC = 16


class ModelError(ValueError):
    """A model file or blob that lake cannot use; the message says why."""


@dataclass
class FixedMLP:
    """Integer weights: w[i] is [n_out, n_in] int32, b[i] is [n_out] int32."""
    frac: int
    w: list[np.ndarray]
    b: list[np.ndarray]

    @property
    def shape(self) -> list[int]:
        return [self.w[0].shape[1]] + [w.shape[0] for w in self.w]

    def check(self) -> None:
        if not 1 <= len(self.w) <= abi.LAKE_MODEL_LAYERS_MAX or len(self.w) != len(self.b):
            raise ModelError(f"a model has 1..{abi.LAKE_MODEL_LAYERS_MAX} layers "
                             f"with a bias each (got {len(self.w)} and {len(self.b)})")
        if not 0 <= self.frac <= abi.LAKE_MODEL_FRAC_MAX:
            raise ModelError(f"frac must be 0..{abi.LAKE_MODEL_FRAC_MAX}")
        prev = None
        for i, (w, b) in enumerate(zip(self.w, self.b)):
            if w.ndim != 2 or b.shape != (w.shape[0],):
                raise ModelError(f"layer {i}: weights must be [out, in], bias [out]")
            if not all(1 <= d <= abi.LAKE_MODEL_DIM_MAX for d in w.shape):
                raise ModelError(f"layer {i}: sizes must be 1..{abi.LAKE_MODEL_DIM_MAX}")
            if prev is not None and w.shape[1] != prev:
                raise ModelError(f"layer {i} takes {w.shape[1]} inputs, "
                                 f"layer {i - 1} gives {prev}")
            prev = w.shape[0]

    # -- packing ---------------------------------------------------------------
    def layers(self) -> list[bytes]:
        """One struct lake_layer (with weights and biases) per layer."""
        return [LAYER_HDR.pack(w.shape[1], w.shape[0])
                + np.ascontiguousarray(w, dtype="<i4").tobytes()
                + np.ascontiguousarray(b, dtype="<i4").tobytes()
                for w, b in zip(self.w, self.b)]

    def blob(self) -> bytes:
        return BLOB_HDR.pack(len(self.w), self.frac) + b"".join(self.layers())

    @classmethod
    def from_blob(cls, data: bytes | memoryview) -> "FixedMLP":
        buf = bytes(data)
        if len(buf) < BLOB_HDR.size:
            raise ModelError("blob shorter than its header")
        n_layers, frac = BLOB_HDR.unpack_from(buf)
        if not 1 <= n_layers <= abi.LAKE_MODEL_LAYERS_MAX:
            raise ModelError(f"blob says {n_layers} layers")
        off, ws, bs = BLOB_HDR.size, [], []
        for i in range(n_layers):
            if off + LAYER_HDR.size > len(buf):
                raise ModelError(f"blob ends inside layer {i}")
            n_in, n_out = LAYER_HDR.unpack_from(buf, off)
            off += LAYER_HDR.size
            end = off + 4 * (n_in * n_out + n_out)
            if end > len(buf) or not (n_in and n_out):
                raise ModelError(f"blob ends inside layer {i}")
            flat = np.frombuffer(buf, dtype="<i4", count=n_in * n_out + n_out, offset=off)
            ws.append(flat[:n_in * n_out].reshape(n_out, n_in).astype(np.int32))
            bs.append(flat[n_in * n_out:].astype(np.int32))
            off = end
        model = cls(frac, ws, bs)
        model.check()
        return model

    # -- the reference computation ------------------------------------------------
    def run(self, x: np.ndarray) -> np.ndarray:
        """x: [batch, n_in] int32 -> [batch, n_out] int32, the ABI's bits."""
        a = np.asarray(x, dtype=np.int32).astype(np.int64)
        last = len(self.w) - 1
        with np.errstate(over="ignore"):
            for i, (w, b) in enumerate(zip(self.w, self.b)):
                acc = a @ w.astype(np.int64).T          # wraps like the kernel's u64
                v = (acc >> self.frac) + b.astype(np.int64)
                v = np.clip(v, -2**31, 2**31 - 1)
                if i != last:
                    v = np.maximum(v, 0)
                a = v
        return a.astype(np.int32)


def to_fixed(x: np.ndarray, frac: int) -> np.ndarray:
    """Floats to saturated int32 with @frac fraction bits."""
    return np.clip(np.rint(np.asarray(x, dtype=np.float64) * (1 << frac)),
                   -2**31, 2**31 - 1).astype(np.int32)


def quantize(weights: list[np.ndarray], biases: list[np.ndarray],
             frac: int = DEFAULT_FRAC) -> FixedMLP:
    """Float layers ([out, in] weights) to fixed point with @frac bits."""
    model = FixedMLP(frac, [to_fixed(w, frac) for w in weights],
                     [to_fixed(b, frac) for b in biases])
    model.check()
    return model


def float_reference(weights: list[np.ndarray], biases: list[np.ndarray],
                    x: np.ndarray) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    for i, (w, b) in enumerate(zip(weights, biases)):
        a = a @ np.asarray(w, dtype=np.float64).T + b
        if i != len(weights) - 1:
            a = np.maximum(a, 0)
    return a


def load_file(path: Path, frac: int = DEFAULT_FRAC) -> FixedMLP:
    """An .npz with float arrays w0, b0, w1, b1, ... ([out, in] weights)."""
    try:
        with np.load(path) as z:
            n = sum(1 for k in z.files if k.startswith("w"))
            ws = [z[f"w{i}"] for i in range(n)]
            bs = [z[f"b{i}"] for i in range(n)]
    except (OSError, KeyError, ValueError) as e:
        raise ModelError(f"{path}: not a model file (.npz with w0, b0, w1, b1, ...): {e}") \
            from None
    if not ws:
        raise ModelError(f"{path}: no layers (arrays w0, b0, ...)")
    return quantize(ws, bs, frac)


def linnos_like(seed: int = 0, shape: tuple[int, ...] = (31, 256, 2)) -> tuple[
        list[np.ndarray], list[np.ndarray]]:
    """Random float weights of LinnOS's shape, for tests and benchmarks."""
    rng = np.random.default_rng(seed)
    ws, bs = [], []
    for n_in, n_out in zip(shape, shape[1:]):
        ws.append(rng.normal(0, 1 / np.sqrt(n_in), (n_out, n_in)))
        bs.append(rng.normal(0, 0.1, n_out))
    return ws, bs

"""The fixed-point reference laked shares with lake.ko."""
from __future__ import annotations

import struct

import numpy as np
import pytest

from laked import features, mlp


def test_quantized_model_tracks_the_float_one() -> None:
    ws, bs = mlp.linnos_like(0)
    fixed = mlp.quantize(ws, bs, frac=16)
    x = np.random.default_rng(1).normal(size=(200, 31))
    y = fixed.run(mlp.to_fixed(x, 16)) / 65536
    assert np.abs(y - mlp.float_reference(ws, bs, x)).max() < 2e-3


def test_blob_round_trip_and_layers() -> None:
    fixed = mlp.quantize(*mlp.linnos_like(2, (5, 7, 3)))
    back = mlp.FixedMLP.from_blob(fixed.blob())
    assert back.shape == [5, 7, 3] and back.frac == fixed.frac
    assert all(np.array_equal(a, b) for a, b in zip(back.w, fixed.w))
    assert [len(layer) for layer in fixed.layers()] == [8 + 4 * (35 + 7), 8 + 4 * (21 + 3)]


def test_arithmetic_is_the_abis() -> None:
    """Wrapping 64-bit sums, arithmetic shift, saturation, ReLU but last."""
    m = mlp.FixedMLP(1, [np.array([[2**31 - 1, 2**31 - 1]], np.int32),
                         np.array([[-1]], np.int32)],
                     [np.array([0], np.int32), np.array([0], np.int32)])
    x = np.array([[2**31 - 1, 2**31 - 1], [-3, 0]], np.int32)
    # item 0: (2*(2^31-1)^2) >> 1 saturates to 2^31-1; then -1 * that >> 1
    # item 1: (-3*(2^31-1)) >> 1 is negative -> ReLU 0 -> 0
    assert m.run(x).tolist() == [[-(2**31 - 1) >> 1], [0]]


@pytest.mark.parametrize("blob", [b"", struct.pack("<II", 0, 16), struct.pack("<II", 1, 16),
                                  struct.pack("<IIII", 1, 16, 2, 2) + b"\0" * 8])
def test_bad_blobs_are_refused(blob: bytes) -> None:
    with pytest.raises(mlp.ModelError):
        mlp.FixedMLP.from_blob(blob)


def test_feature_records_decode_with_types() -> None:
    feat = features.Feature("f", [("a", "u32"), ("b", "s32"), ("c", "s64")], 16, 0, 0)
    raw = struct.pack("<QII3Q", 5, 1, 3, 7, (-2) & (2**64 - 1), (-9) & (2**64 - 1))
    [r] = features.decode(feat, raw + b"\0" * 3)     # a partial record is ignored
    assert (r.ts_ns, r.cpu, r.values) == (5, 1, [7, -2, -9])

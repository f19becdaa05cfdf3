"""The model store: pushes, fixed-point inference against numpy, swaps and
policy switches during inference, the GPU side through laked."""
from __future__ import annotations

import errno
import threading
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from conftest import ROOT, SYSFS, Laked, sh

from laked import abi, mlp
from laked.genl import Control, ControlError

LINNOS_KO = ROOT / "lakelib" / "examples" / "lake_linnos.ko"
LINNOS = Path("/sys/kernel/lake_linnos")
EBPF = ROOT / "ebpf"


def push(name: str, seed: int, shape: tuple[int, ...] = (31, 256, 2)) -> mlp.FixedMLP:
    ws, bs = mlp.linnos_like(seed, shape)
    fixed = mlp.quantize(ws, bs)
    with Control() as c:
        c.model_push(name, fixed.frac, fixed.layers())
    return fixed


def infer(name: str, x: np.ndarray, mode: int) -> tuple[np.ndarray, str, bool]:
    with Control() as c:
        r = c.infer(name, x.shape[0], x.astype("<i4").tobytes(), mode)
    return np.frombuffer(r.out, dtype="<i4").reshape(x.shape[0], -1), r.target, r.fallback


def weights_line(name: str) -> str:
    return (SYSFS / "models" / name / "weights").read_text().strip()


@pytest.fixture
def model(module: None) -> Iterator[str]:
    yield "t_mlp"
    with Control() as c:
        try:
            c.model_del("t_mlp")
        except ControlError:
            pass


def test_cpu_inference_matches_numpy_bit_for_bit(model: str) -> None:
    ws, bs = mlp.linnos_like(1)
    fixed = push(model, 1)
    rng = np.random.default_rng(2)
    for batch in (1, 7, 64, 300):
        xf = rng.normal(0, 1, (batch, 31))
        x = mlp.to_fixed(xf, fixed.frac)
        y, target, fallback = infer(model, x, abi.LAKE_INFER_CPU)
        assert target == "cpu" and not fallback
        assert np.array_equal(y, fixed.run(x)), batch
        # and the float model within the quantisation error
        ref = mlp.float_reference(ws, bs, xf)
        assert np.allclose(y / (1 << fixed.frac), ref, atol=2e-3), batch
    stats = dict(line.split() for line in
                 (SYSFS / "models" / model / "stats").read_text().splitlines())
    assert int(stats["cpu_runs"]) == 4 and int(stats["cpu_items"]) == 372


def test_saturation_and_wrapping_agree(model: str) -> None:
    """Extreme weights and inputs: the kernel saturates and wraps as numpy does."""
    big = mlp.FixedMLP(0, [np.full((3, 4), 2**31 - 1, np.int32),
                           np.array([[-2**31, 2**31 - 1, 7]], np.int32)],
                       [np.array([5, -5, 2**31 - 1], np.int32), np.array([3], np.int32)])
    with Control() as c:
        c.model_push(model, big.frac, big.layers())
    x = np.array([[2**31 - 1, -2**31, 123456789, -1], [1, 2, 3, 4]], np.int32)
    y, _, _ = infer(model, x, abi.LAKE_INFER_CPU)
    assert np.array_equal(y, big.run(x))


@pytest.mark.parametrize("case", ["unchained", "too_many", "short", "frac", "empty"])
def test_bad_models_are_refused_and_change_nothing(model: str, case: str) -> None:
    push(model, 3)
    before = weights_line(model)
    good = mlp.quantize(*mlp.linnos_like(4))
    layers = good.layers()
    frac = good.frac
    if case == "unchained":
        layers = [layers[0], mlp.quantize(*mlp.linnos_like(5, (7, 2, 2))).layers()[1]]
    elif case == "too_many":       # built by hand: quantize() refuses it too
        layers = [mlp.LAYER_HDR.pack(4, 4) + bytes(4 * 20)] * 9
    elif case == "short":
        layers = [layers[0][:-4], layers[1]]
    elif case == "frac":
        frac = 30
    elif case == "empty":
        layers = []
    with Control() as c, pytest.raises(ControlError) as e:
        c.model_push(model, frac, layers)
    # the attribute policy answers ERANGE for an out-of-range frac
    assert e.value.code == (errno.ERANGE if case == "frac" else errno.EINVAL)
    assert weights_line(model) == before


def test_bad_names_and_inputs(model: str) -> None:
    push(model, 7)
    with Control() as c:
        for name in ("a/b", "", "x" * 40):
            with pytest.raises(ControlError) as e:
                c.model_push(name, 16, mlp.quantize(*mlp.linnos_like(1)).layers())
            assert e.value.code == errno.EINVAL
        with pytest.raises(ControlError) as e:
            c.infer(model, 2, b"\0" * (31 * 4 * 2 + 4))        # not batch rows
        assert e.value.code == errno.EINVAL
        with pytest.raises(ControlError) as e:
            c.infer(model, 2, b"\0" * (30 * 4 * 2))            # wrong width
        assert e.value.code == errno.EINVAL
        with pytest.raises(ControlError) as e:
            c.infer("no_such_model", 1, b"\0" * 124)
        assert e.value.code == errno.ENOENT


def kernel_tenant(laked: Laked) -> dict:  # type: ignore[type-arg]
    st = laked.request({"op": "status"})["status"]  # type: ignore[index]
    return {t["name"]: t for t in st["arbiter"]["tenants"]}["kernel"]


def test_gpu_side_through_laked(laked: Laked, model: str) -> None:
    """No GPU here: laked's CPU executor runs the INFER request, same bits,
    and counts it as the kernel tenant's work in the arbiter."""
    fixed = push(model, 8)
    before = kernel_tenant(laked)
    assert (before["class"], before["kind"]) == ("LC", "kernel")
    x = mlp.to_fixed(np.random.default_rng(9).normal(0, 1, (96, 31)), fixed.frac)
    y, target, fallback = infer(model, x, abi.LAKE_INFER_GPU)
    assert target == "gpu" and not fallback
    assert np.array_equal(y, fixed.run(x))
    # the policy's choice: 96 >= 32 with the built-in rule
    y, target, fallback = infer(model, x, abi.LAKE_INFER_POLICY)
    assert (target, fallback) == ("gpu", False) and np.array_equal(y, fixed.run(x))
    y, target, _ = infer(model, x[:4], abi.LAKE_INFER_POLICY)
    assert target == "cpu" and np.array_equal(y, fixed.run(x[:4]))
    after = kernel_tenant(laked)
    # two batches of 96 went to laked; the 4-row one stayed in the kernel
    assert after["requests"] - before["requests"] == 2
    assert after["items"] - before["items"] == 192
    assert after["p50_ms"] is not None and after["errors"] == before["errors"]


def test_gpu_failure_falls_back_to_cpu(no_laked: None, model: str) -> None:
    fixed = push(model, 10)
    x = mlp.to_fixed(np.random.default_rng(11).normal(0, 1, (40, 31)), fixed.frac)
    y, target, fallback = infer(model, x, abi.LAKE_INFER_GPU)
    assert target == "gpu" and fallback
    assert np.array_equal(y, fixed.run(x))
    stats = (SYSFS / "models" / model / "stats").read_text()
    assert "fallbacks 1" in stats


@pytest.fixture
def linnos(module: None) -> Iterator[None]:
    sh("insmod", str(LINNOS_KO))
    yield
    sh("rmmod", "lake_linnos", check=False)


def run_infer_stress(threads: int, iters: int) -> dict[str, object]:
    (LINNOS / "infer").write_text(f"{threads} {iters}")
    out: dict[str, object] = {"seen": []}
    for line in (LINNOS / "result").read_text().splitlines():
        key, *vals = line.split()
        if key == "seen":
            out["seen"].append(tuple(int(v) for v in vals))  # type: ignore[union-attr]
        else:
            out[key] = int(vals[0])
    return out


def linnos_input() -> np.ndarray:
    """The fixed input lake_linnos feeds (ln_input)."""
    return np.array([[(i - 15) * 4096 for i in range(31)]], np.int32)


def test_weight_swap_during_inference(linnos: None) -> None:
    a, b = push("linnos", 20), push("linnos", 21)
    expect = {tuple(m.run(linnos_input())[0]) for m in (a, b)}
    stop = threading.Event()

    def swapper() -> None:
        i = 0
        while not stop.is_set():
            push("linnos", 20 + i % 2)
            i += 1
    t = threading.Thread(target=swapper)
    t.start()
    try:
        res = run_infer_stress(4, 300)
    finally:
        stop.set()
        t.join()
    assert res["errors"] == 0 and res["runs"] == 1200 and res["overflow"] == 0
    assert set(res["seen"]) <= expect, (res["seen"], expect)  # type: ignore[arg-type]


def test_policy_switch_during_inference(laked: Laked, linnos: None) -> None:
    m = push("linnos", 30)
    expect = tuple(m.run(linnos_input())[0])
    stop = threading.Event()
    policies = ["threshold", "cpu-only", "gpu-only", "cost"]

    def switcher() -> None:
        i = 0
        while not stop.is_set():
            reply = laked.request({"op": "policy_load",
                                   "path": str(EBPF / f"{policies[i % 4]}.bpf.c"),
                                   "defines": {}})
            assert reply["ok"], reply
            i += 1
    t = threading.Thread(target=switcher)
    t.start()
    try:
        res = run_infer_stress(4, 200)
    finally:
        stop.set()
        t.join()
    assert res["errors"] == 0 and res["runs"] == 800
    assert res["seen"] == [expect]
    assert res["gpu"] > 0       # some batches went through laked


def test_cost_policy_follows_the_table(laked: Laked, model: str) -> None:
    push(model, 40)
    mid = int((SYSFS / "models" / model / "id").read_text())
    laked.cli("policy", "load", str(EBPF / "cost.bpf.c"))
    # nothing measured: the threshold fallback
    assert laked.decide(64, model=mid) == ("gpu", "policy")
    laked.cli("cost", "set", str(mid), "2000", "50000", "100")   # GPU wins from 26
    assert laked.decide(25, model=mid) == ("cpu", "policy")
    assert laked.decide(27, model=mid) == ("gpu", "policy")
    laked.cli("cost", "set", str(mid), "100", "50000", "100")    # GPU never wins
    assert laked.decide(4096, model=mid) == ("cpu", "policy")
    laked.cli("cost", "auto", str(mid))


def test_measured_costs_reach_laked(laked: Laked, model: str) -> None:
    fixed = push(model, 41)
    x = mlp.to_fixed(np.random.default_rng(1).normal(0, 1, (64, 31)), fixed.frac)
    for batch in (8, 64):
        for mode in (abi.LAKE_INFER_CPU, abi.LAKE_INFER_GPU):
            infer(model, x[:batch], mode)
            laked.request({"op": "status"})
    import time
    time.sleep(1.5)     # a couple of ticks
    mid = (SYSFS / "models" / model / "id").read_text().strip()
    costs = laked.request({"op": "status"})["status"]["costs"]  # type: ignore[index]
    assert mid in costs and costs[mid]["cpu_ns_per_item"] > 0


def test_model_cli(laked: Laked, tmp_path: Path) -> None:
    ws, bs = mlp.linnos_like(50, (5, 8, 3))
    f = tmp_path / "m.npz"
    np.savez(f, **{f"w{i}": w for i, w in enumerate(ws)}, **{f"b{i}": b for i, b in enumerate(bs)})
    out = laked.cli("model", "push", "cli_m", str(f)).stdout
    assert "shape 5x8x3" in out
    assert "cli_m" in laked.cli("model", "list").stdout
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a model")
    res = laked.cli("model", "push", "cli_m", str(bad), check=False)
    assert res.returncode == 1 and "not a model file" in res.stderr
    laked.cli("model", "del", "cli_m")
    assert not (SYSFS / "models" / "cli_m").exists()
    res = laked.cli("model", "del", "cli_m", check=False)
    assert res.returncode == 1

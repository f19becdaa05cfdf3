"""The arbiter's queue delay reaches the policy: laked writes sched_delay_us
into the region header, lake_infer() hands it to the policy as
queue_delay_us, and ebpf/contended.bpf.c keeps kernel work off a GPU whose
queue is too long.  No GPU here: laked's CPU executor is "the GPU side"."""
from __future__ import annotations

import mmap
import os
import struct
from typing import Iterator

import numpy as np
import pytest
from conftest import ROOT, SYSFS, Laked, wait_for

from laked import abi, mlp
from laked.genl import Control, ControlError

CONTENDED = str(ROOT / "ebpf" / "contended.bpf.c")
_HDR = abi.STRUCTS["lake_region_hdr"]


def header_delay() -> int:
    """sched_delay_us as lake.ko sees it: the header of a fresh /dev/lake mapping."""
    fd = os.open("/dev/lake", os.O_RDONLY)
    try:
        with mmap.mmap(fd, mmap.PAGESIZE, mmap.MAP_SHARED, mmap.PROT_READ) as mm:
            fields = dict(zip(_HDR[1], struct.unpack_from(_HDR[0], mm, 0)))
    finally:
        os.close(fd)
    return int(fields["sched_delay_us"])


def pin(laked: Laked, us: int | None) -> None:
    """`laked sched delay set/auto` without a CLI process (slow under emulation)."""
    reply = laked.request({"op": "sched_delay", "value": us})
    assert reply["ok"], reply


def load_contended(laked: Laked, **defines: int) -> None:
    reply = laked.request({"op": "policy_load", "path": CONTENDED,
                           "defines": {k: str(v) for k, v in defines.items()}})
    assert reply["ok"], reply


def mstats(name: str) -> dict[str, int]:
    return {k: int(v) for k, v in (line.split() for line in
                                   (SYSFS / "models" / name / "stats").read_text().splitlines())}


@pytest.fixture
def model(module: None) -> Iterator[str]:
    yield "t_cont"
    with Control() as c:
        try:
            c.model_del("t_cont")
        except ControlError:
            pass


@pytest.fixture
def pinned(laked: Laked) -> Iterator[Laked]:
    """The shared laked, handed back with its sched delay automatic again."""
    yield laked
    if laked.running():
        laked.request({"op": "sched_delay", "value": None})


class Infer:
    """One batch of 64 through lake_infer() with the policy deciding."""

    def __init__(self, name: str, seed: int) -> None:
        ws, bs = mlp.linnos_like(seed, (31, 16, 2))
        self.fixed = mlp.quantize(ws, bs)
        with Control() as c:
            c.model_push(name, self.fixed.frac, self.fixed.layers())
        self.name = name
        self.x = mlp.to_fixed(np.random.default_rng(seed).normal(0, 1, (64, 31)),
                              self.fixed.frac)

    def __call__(self, batch: int = 64) -> str:
        """Runs it; returns the side that answered, checking the bits and counters."""
        x = self.x[:batch]
        before = mstats(self.name)
        with Control() as c:
            r = c.infer(self.name, batch, x.astype("<i4").tobytes(), abi.LAKE_INFER_POLICY)
        y = np.frombuffer(r.out, dtype="<i4").reshape(batch, -1)
        assert np.array_equal(y, self.fixed.run(x))
        assert not r.fallback and r.by == "policy", r
        after = mstats(self.name)
        ran = {side: after[f"{side}_runs"] - before[f"{side}_runs"] for side in ("cpu", "gpu")}
        assert ran == {"cpu": int(r.target == "cpu"), "gpu": int(r.target == "gpu")}, ran
        return r.target


def test_contended_policy_follows_the_delay(pinned: Laked, model: str) -> None:
    run = Infer(model, 60)
    pinned.cli("policy", "load", CONTENDED, "-D", "DELAY_MAX_US=1000")
    assert (SYSFS / "policy").read_text().startswith("contended id=")

    pinned.cli("sched", "delay", "set", "0")
    assert header_delay() == 0
    assert run() == "gpu"
    assert run(8) == "cpu"                  # below BATCH_MIN whatever the delay

    out = pinned.cli("sched", "delay", "set", "5000").stdout
    assert "pinned at 5000 us" in out
    assert header_delay() == 5000
    assert run() == "cpu"
    assert "sched_delay: 5000 us (pinned)" in pinned.cli("status").stdout

    pin(pinned, 1000)                       # the limit itself still goes
    assert run() == "gpu"
    pin(pinned, 1001)
    assert run() == "cpu"

    # automatic: the arbiter's delay, if laked has one; nothing waits on a GPU here
    out = pinned.cli("sched", "delay", "auto").stdout
    st = pinned.request({"op": "status"})["status"]["sched_delay_us"]  # type: ignore[index]
    assert st["value"] == 0 and st["source"] in ("none", "arbiter"), st
    assert f"0 us ({st['source']})" in out
    assert header_delay() == 0
    assert run() == "gpu"


def test_decide_path_reads_the_context(pinned: Laked) -> None:
    """LAKE_CMD_DECIDE takes queue_delay_us from the request, not the header."""
    load_contended(pinned)                  # DELAY_MAX_US=2000
    pin(pinned, 9999)
    assert pinned.decide(64, queue_delay_us=2000) == ("gpu", "policy")
    assert pinned.decide(64, queue_delay_us=2001) == ("cpu", "policy")
    assert pinned.decide(31, queue_delay_us=0) == ("cpu", "policy")


def test_bad_delays_are_refused_and_change_nothing(pinned: Laked) -> None:
    pin(pinned, 300)
    for bad in ("-1", "20000000"):
        res = pinned.cli("sched", "delay", "set", bad, check=False)
        assert res.returncode == 2, res
        assert "Invalid value for 'MICROSECONDS'" in res.stderr, res.stderr
    for bad_value in (-1, 20_000_000, "5"):     # other clients of the socket
        reply = pinned.request({"op": "sched_delay", "value": bad_value})
        assert not reply["ok"] and "sched delay" in str(reply["error"]), reply
    res = pinned.cli("sched", "delay", "set", "7", check=False, user="65534")
    assert res.returncode == 1 and "needs root" in res.stderr
    assert header_delay() == 300
    st = pinned.request({"op": "status"})["status"]
    assert st["sched_delay_us"] == {"value": 300, "source": "pinned"}  # type: ignore[index]


def test_delay_does_not_outlive_laked(laked_cli: Laked, model: str) -> None:
    laked_cli.start()
    run = Infer(model, 61)
    load_contended(laked_cli, DELAY_MAX_US=1000)
    pin(laked_cli, 4000)
    assert header_delay() == 4000
    assert run() == "cpu"
    laked_cli.cli("stop")
    assert (SYSFS / "daemon").read_text().strip() == "disconnected"
    # the kernel zeroed it when laked's /dev/lake file went away
    assert wait_for(lambda: header_delay() == 0, timeout=5)
    assert (SYSFS / "policy").read_text().strip() == "builtin"

    laked_cli.start()                                  # a fresh serve starts from 0
    assert header_delay() == 0
    st = laked_cli.request({"op": "status"})["status"]["sched_delay_us"]  # type: ignore[index]
    assert st["value"] == 0 and st["source"] != "pinned", st
    load_contended(laked_cli, DELAY_MAX_US=1000)
    assert run() == "gpu"

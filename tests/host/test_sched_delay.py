"""The arbiter's queue delay on its way to the policies: the region header
word sched_delay_us (where gcc puts it), and laked's pin/auto logic that
writes it (no module, no GPU, no root)."""
from __future__ import annotations

import shutil
import struct
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from laked import cli
from laked.config import Config
from laked.ctl import Peer
from laked.daemon import SCHED_DELAY_MAX_US, Daemon
from laked.region import Region, init_region

ROOT = Path(__file__).resolve().parents[2]
ROOT_PEER = Peer(pid=1, uid=0, gid=0)


@pytest.fixture(scope="module")
def gcc_offsets(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, int]:
    """(offsetof sched_delay_us, offsetof daemon_flags) as gcc lays out lake.h."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    d = tmp_path_factory.mktemp("hdr")
    (d / "off.c").write_text(
        '#include <stdio.h>\n#include <stddef.h>\n#include "uapi/lake.h"\n'
        "int main(void) {\n"
        '  printf("%zu %zu\\n", offsetof(struct lake_region_hdr, sched_delay_us),\n'
        "         offsetof(struct lake_region_hdr, daemon_flags));\n"
        "  return 0;\n}\n")
    subprocess.run(["gcc", "-Wall", "-Werror", f"-I{ROOT / 'lakelib'}", "-o", str(d / "off"),
                    str(d / "off.c")], check=True)
    out = subprocess.run([str(d / "off")], check=True, capture_output=True, text=True).stdout
    delay, flags = (int(v) for v in out.split())
    return delay, flags


@pytest.fixture
def region() -> tuple[bytearray, Region]:
    buf = bytearray(2 << 20)
    init_region(buf)
    return buf, Region(buf)


def test_fresh_region_reads_zero(region: tuple[bytearray, Region]) -> None:
    assert region[1].sched_delay_us == 0


def test_round_trip_at_gcc_offset(region: tuple[bytearray, Region],
                                  gcc_offsets: tuple[int, int]) -> None:
    buf, r = region
    delay_off, flags_off = gcc_offsets
    r.daemon_flags = 0x5A5A5A5A
    for us in (1, 1999, 2001, SCHED_DELAY_MAX_US, 0xFFFFFFFF, 0):
        r.sched_delay_us = us
        assert r.sched_delay_us == us
        assert struct.unpack_from("<I", buf, delay_off)[0] == us
    # its neighbour is untouched, and the kernel's write reaches us
    assert struct.unpack_from("<I", buf, flags_off)[0] == 0x5A5A5A5A
    struct.pack_into("<I", buf, delay_off, 777)
    assert r.sched_delay_us == 777


def test_out_of_range_is_refused(region: tuple[bytearray, Region]) -> None:
    r = region[1]
    r.sched_delay_us = 5
    for bad in (-1, 1 << 32):
        with pytest.raises(ValueError):
            r.sched_delay_us = bad
    assert r.sched_delay_us == 5


@dataclass
class FakeExecutor:
    name: str = "cpu"


@dataclass
class FakePlane:
    """What Daemon touches of a DataPlane here: its region, and what status() shows."""

    region: Region
    executor: FakeExecutor = field(default_factory=FakeExecutor)

    def info(self) -> dict[str, object]:
        return {"region_copies": None}


@pytest.fixture
def daemon(tmp_path: Path, region: tuple[bytearray, Region]) -> Daemon:
    d = Daemon(Config(run_dir=tmp_path))
    d.dataplane = FakePlane(region[1])  # type: ignore[assignment]
    return d


def test_pin_and_auto(daemon: Daemon, region: tuple[bytearray, Region]) -> None:
    r = region[1]
    assert daemon.status()["sched_delay_us"] == {"value": 0, "source": "none"}
    reply = daemon.handle({"op": "sched_delay", "value": 5000}, ROOT_PEER)
    assert reply == {"ok": True, "sched_delay_us": 5000, "source": "pinned"}
    assert r.sched_delay_us == 5000          # written at once, not at the next tick
    assert daemon.status()["sched_delay_us"] == {"value": 5000, "source": "pinned"}
    daemon.sched_delay_source = lambda: 1234
    daemon._write_sched_delay()              # what tick() does
    assert r.sched_delay_us == 5000          # a pin beats the arbiter
    reply = daemon.handle({"op": "sched_delay", "value": None}, ROOT_PEER)
    assert reply == {"ok": True, "sched_delay_us": 1234, "source": "arbiter"}
    assert r.sched_delay_us == 1234
    daemon.sched_delay_source = None
    daemon._write_sched_delay()
    assert r.sched_delay_us == 0
    assert daemon.status()["sched_delay_us"] == {"value": 0, "source": "none"}


@pytest.mark.parametrize("bad", [-1, SCHED_DELAY_MAX_US + 1, 20_000_000, "5", 1.5, True])
def test_bad_values_change_nothing(daemon: Daemon, region: tuple[bytearray, Region],
                                   bad: object) -> None:
    daemon.handle({"op": "sched_delay", "value": 300}, ROOT_PEER)
    reply = daemon.handle({"op": "sched_delay", "value": bad}, ROOT_PEER)
    assert not reply["ok"] and "sched delay" in reply["error"]
    assert region[1].sched_delay_us == 300
    assert daemon.status()["sched_delay_us"] == {"value": 300, "source": "pinned"}


def test_needs_root(daemon: Daemon, region: tuple[bytearray, Region]) -> None:
    reply = daemon.handle({"op": "sched_delay", "value": 9}, Peer(pid=1, uid=1000, gid=1000))
    assert not reply["ok"] and "needs root" in reply["error"]
    assert region[1].sched_delay_us == 0


def test_arbiter_values_are_clamped_and_failures_read_zero(
        daemon: Daemon, region: tuple[bytearray, Region]) -> None:
    r = region[1]
    daemon.sched_delay_source = lambda: -5
    daemon._write_sched_delay()
    assert r.sched_delay_us == 0
    daemon.sched_delay_source = lambda: 1 << 40
    daemon._write_sched_delay()
    assert r.sched_delay_us == 0xFFFFFFFF

    def broken() -> int:
        raise RuntimeError("arbiter not started")
    daemon.sched_delay_source = broken
    daemon._write_sched_delay()
    assert r.sched_delay_us == 0
    assert daemon.status()["sched_delay_us"] == {"value": 0, "source": "arbiter"}


def test_no_dataplane_is_fine(tmp_path: Path) -> None:
    d = Daemon(Config(run_dir=tmp_path))
    assert d.handle({"op": "sched_delay", "value": 42}, ROOT_PEER)["ok"]
    assert d.sched_delay() == (42, "pinned")


def test_cli_and_daemon_agree_on_the_range() -> None:
    assert cli.SCHED_DELAY_MAX_US == SCHED_DELAY_MAX_US

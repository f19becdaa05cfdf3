"""lake.ko loads, unloads and guards /sys/kernel/lake."""
from __future__ import annotations

import errno

import pytest
from conftest import SYSFS, dmesg, insmod, module_loaded, rmmod

KNOBS = {"enabled": (0, 1), "gpu_batch_threshold": (1, 1 << 20), "timeout_ms": (1, 600000)}


def write(name: str, value: str) -> None:
    with open(SYSFS / name, "w") as f:
        f.write(value)


def read(name: str) -> str:
    return (SYSFS / name).read_text().strip()


def test_load_unload_cycles(no_module: None) -> None:
    for _ in range(3):
        insmod()
        assert module_loaded()
        assert rmmod().returncode == 0
        assert not module_loaded()
    assert "lake: loaded" in dmesg() and "lake: unloaded" in dmesg()


def test_sysfs_status_files(no_laked: None) -> None:
    assert read("daemon") == "disconnected"
    assert read("policy") == "builtin"
    assert read("version") == "1"
    stats = dict(line.split() for line in read("stats").splitlines())
    assert set(stats) == {"cpu", "gpu", "policy_runs", "errors", "no_daemon", "requests",
                          "timeouts", "sq_full_waits"}
    assert (SYSFS / "features").is_dir() and (SYSFS / "models").is_dir()
    for name in ("daemon", "policy", "stats", "version"):
        with pytest.raises(PermissionError):
            write(name, "1")


@pytest.mark.parametrize("knob", sorted(KNOBS))
def test_knob_accepts_its_range(module: None, knob: str) -> None:
    lo, hi = KNOBS[knob]
    old = read(knob)
    for v in (lo, hi):
        write(knob, f"{v}\n")
        assert read(knob) == str(v)
    write(knob, old)


@pytest.mark.parametrize("knob", sorted(KNOBS))
@pytest.mark.parametrize("bad", ["-1", "abc", "\n", "1x", "99999999999", "0x100000001"])
def test_knob_rejects_bad_values(module: None, knob: str, bad: str) -> None:
    before = read(knob)
    with pytest.raises(OSError) as e:
        write(knob, bad)
    assert e.value.errno == errno.EINVAL
    assert read(knob) == before


@pytest.mark.parametrize("knob,value", [("enabled", "2"), ("gpu_batch_threshold", "0"),
                                        ("gpu_batch_threshold", str((1 << 20) + 1)),
                                        ("timeout_ms", "0"), ("timeout_ms", "600001")])
def test_knob_rejects_out_of_range(module: None, knob: str, value: str) -> None:
    before = read(knob)
    with pytest.raises(OSError) as e:
        write(knob, value)
    assert e.value.errno == errno.EINVAL
    assert read(knob) == before

"""Policies change decisions; bad ones are refused and change nothing."""
from __future__ import annotations

from pathlib import Path

from conftest import ROOT, SYSFS, Laked

EBPF = ROOT / "ebpf"
BAD = Path(__file__).resolve().parent / "policies"


def policy() -> str:
    return (SYSFS / "policy").read_text().strip()


def stats() -> dict[str, int]:
    return {k: int(v) for k, v in (line.split() for line in
                                   (SYSFS / "stats").read_text().splitlines())}


def test_builtin_rule_follows_threshold_knob(laked: Laked) -> None:
    assert laked.decide(64) == ("gpu", "builtin")
    assert laked.decide(8) == ("cpu", "builtin")
    (SYSFS / "gpu_batch_threshold").write_text("128")
    assert laked.decide(64) == ("cpu", "builtin")
    (SYSFS / "gpu_batch_threshold").write_text("32")


def test_no_daemon_means_cpu(module: None, laked_cli: Laked) -> None:
    assert laked_cli.decide(4096) == ("cpu", "builtin")


def test_disabled_means_cpu(laked: Laked) -> None:
    (SYSFS / "enabled").write_text("0")
    try:
        assert laked.decide(4096) == ("cpu", "disabled")
    finally:
        (SYSFS / "enabled").write_text("1")


def test_threshold_policy_flips_decisions(laked: Laked) -> None:
    before = stats()
    laked.cli("policy", "load", str(EBPF / "threshold.bpf.c"))
    assert policy().startswith("threshold id=")
    assert laked.decide(64) == ("gpu", "policy")
    assert laked.decide(8) == ("cpu", "policy")
    laked.cli("util", "set", "95")
    assert laked.decide(64) == ("cpu", "policy")
    laked.cli("util", "auto")          # no GPU here: NVML absent, util 0
    assert laked.decide(64) == ("gpu", "policy")
    after = stats()
    assert after["policy_runs"] - before["policy_runs"] == 4
    assert after["gpu"] - before["gpu"] == 2 and after["cpu"] - before["cpu"] == 2


def test_policy_parameters(laked: Laked) -> None:
    laked.cli("policy", "load", str(EBPF / "threshold.bpf.c"), "-D", "BATCH_MIN=128")
    assert laked.decide(64) == ("cpu", "policy")
    assert laked.decide(128) == ("gpu", "policy")


def test_cpu_only_and_gpu_only(laked: Laked) -> None:
    laked.cli("policy", "load", str(EBPF / "cpu-only.bpf.c"))
    assert laked.decide(4096) == ("cpu", "policy")
    laked.cli("policy", "load", str(EBPF / "gpu-only.bpf.c"))
    assert policy().startswith("gpu-only id=")
    assert laked.decide(1) == ("gpu", "policy")


def test_context_reaches_policy(laked: Laked) -> None:
    laked.cli("policy", "load", str(BAD / "echo-ctx.bpf.c"))
    assert laked.decide(5, model=7, queue_depth=7) == ("gpu", "policy")
    assert laked.decide(5, model=7, queue_depth=8) == ("cpu", "policy")


def test_unload_falls_back_to_builtin(laked: Laked) -> None:
    laked.cli("policy", "load", str(EBPF / "cpu-only.bpf.c"))
    assert laked.decide(64) == ("cpu", "policy")
    laked.cli("policy", "unload")
    assert policy() == "builtin"
    assert laked.decide(64) == ("gpu", "builtin")


def test_rejected_policies_leave_the_old_one(laked: Laked) -> None:
    laked.cli("policy", "load", str(EBPF / "cpu-only.bpf.c"))
    attached = policy()
    res = laked.cli("policy", "load", str(BAD / "bad-verifier.bpf.c"), check=False)
    assert res.returncode == 1
    assert "Failed to load BPF program" in res.stderr
    assert "invalid mem access" in res.stderr      # the verifier's own words
    res = laked.cli("policy", "load", str(BAD / "bad-syntax.bpf.c"), check=False)
    assert res.returncode == 1 and "undefined_symbol" in res.stderr
    assert policy() == attached
    assert laked.decide(4096) == ("cpu", "policy")
    assert "refused" in laked.log()


def test_bad_verdict_falls_back_and_counts(laked: Laked) -> None:
    laked.cli("policy", "load", str(BAD / "bad-verdict.bpf.c"))
    errors = stats()["errors"]
    assert laked.decide(64) == ("gpu", "fallback")
    assert laked.decide(1) == ("cpu", "fallback")
    assert stats()["errors"] == errors + 2


def test_stop_detaches_policy(laked: Laked) -> None:
    laked.cli("policy", "load", str(EBPF / "threshold.bpf.c"))
    laked.cli("stop")
    assert policy() == "builtin"
    assert (SYSFS / "daemon").read_text().strip() == "disconnected"

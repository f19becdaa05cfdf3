"""sched_gpu.py's --variant parsing and report.py's table of interleaved runs (no GPU)."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch", reason="the benchmark scripts import torch")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts" / "bench"))

import report as R  # noqa: E402
import sched_gpu as S  # noqa: E402


def test_variants_parse_into_labels_and_knobs() -> None:
    got = S.parse_variants(["base:", "lead:lead_us=60,park=false", "deep:depth=6"])
    assert got == [("base", {}), ("lead", {"lead_us": 60, "park": False}),
                   ("deep", {"depth": 6})]


@pytest.mark.parametrize("spec", ["base", ":lead_us=60", "g:gil_switch_us=10",
                                  "r:depth=2,reserve_mb=10"])
def test_a_variant_without_a_label_or_with_a_start_only_knob_is_refused(spec: str) -> None:
    with pytest.raises(SystemExit, match="--variant"):
        S.parse_variants([spec])


def _run(variant: str, p99: float, be: float) -> dict[str, Any]:
    return {"config": "lake", "lc_work": "gemm", "be_work": "train", "variant": variant,
            "lc_p99_ratio": p99, "be_ratio": be}


def test_variant_rows_show_every_run_the_medians_and_the_runs_that_met() -> None:
    d = {"provenance": "test.",
         "runs": [{"config": "isolated-lc", "lc_work": "gemm", "lc": {"p99_ms": 0.6}},
                  _run("z", 1.30, 0.85), _run("a", 1.10, 0.79),
                  _run("z", 1.20, 0.82), _run("a", 1.12, 0.81),
                  _run("z", 1.24, 0.80), _run("a", 1.40, 0.83)]}
    rows = [r for r in R.variants_section(d, "t") if r.startswith("| gemm+train")]
    # in the order first run, not sorted by label
    assert rows == [
        "| gemm+train | 0.600 | z | 1.300, 1.200, 1.240 | 1.240x | 0.850, 0.820, 0.800 | "
        "0.820 | 2 of 3 |",
        "| gemm+train | 0.600 | a | 1.100, 1.120, 1.400 | 1.120x | 0.790, 0.810, 0.830 | "
        "0.810 | 1 of 3 |"]


def test_isolated_runs_of_each_rep_are_all_shown_and_named_so() -> None:
    d = {"provenance": "test.",
         "runs": [{"config": "isolated-lc", "lc_work": "gemm", "lc": {"p99_ms": 0.6}},
                  _run("d", 1.30, 0.85),
                  {"config": "isolated-lc", "lc_work": "gemm", "rep": 1, "lc": {"p99_ms": 0.7}},
                  _run("d", 1.10, 0.83)]}
    out = R.variants_section(d, "t")
    assert "Isolated p99: one per rep, measured just before it" in out[2]
    assert [r for r in out if r.startswith("| gemm+train")] == [
        "| gemm+train | 0.600, 0.700 | d | 1.300, 1.100 | 1.200x | 0.850, 0.830 | 0.840 | "
        "1 of 2 |"]


def test_one_isolated_run_per_process_is_named_so() -> None:
    d = {"provenance": "test.",
         "runs": [{"config": "isolated-lc", "lc_work": "gemm", "lc": {"p99_ms": 0.6}},
                  _run("d", 1.30, 0.85)]}
    assert "Isolated p99: one per process." in R.variants_section(d, "t")[2]


def test_gate_counts_are_each_processes_totals_summed() -> None:
    """A merged run's counters are cumulative within each process: the
    processes' final statuses are summed, not the rows."""
    runs = [{"config": "lake", "lc_work": w, "gates_forced_open": n}
            for w, n in (("gemm", 1), ("conv", 3), ("attn", 0), ("kinfer", 2))]
    two = {"runs": runs, "scheduler": [{"gates_forced_open": 3, "gates_opened_early": 4},
                                       {"gates_forced_open": 2, "gates_opened_early": 1}]}
    assert R._gate_counts(two) == (5, 5)
    # one process per LC workload, from before the statuses were kept: the rows
    assert R._gate_counts({"runs": runs}) == (6, 0)


def test_host_noise_sees_the_run_queue_wait_of_a_busy_host() -> None:
    """Twice as many CPU hogs as CPUs: a spinning thread of this process
    waits on a run queue for a good share of the window."""
    import os
    import time
    if not Path("/proc/self/task").exists() or \
            not any(Path("/proc/self/task").glob("*/schedstat")):
        pytest.skip("no per-thread schedstat here")
    quiet = S.HostNoise()
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < 0.3:
        pass
    calm = quiet.read(0.3)
    with S.Hogs(2 * (os.cpu_count() or 1)) as hogs:
        time.sleep(0.2)                          # the hogs are running
        assert all(h.poll() is None for h in hogs.procs)
        busy = S.HostNoise()
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 0.5:
            pass
        got = busy.read(0.5)
    assert not hogs.procs
    assert got["runq_wait_ms"] > max(50.0, 3 * calm["runq_wait_ms"]), (calm, got)
    assert got["runq_wait_ms_per_s"] == pytest.approx(got["runq_wait_ms"] / 0.5, rel=0.01)
    assert got["ivcsw"] > 0 and got["steal_s"] >= 0


def test_hogs_end_with_the_process_that_started_them() -> None:
    """A benchmark that exits without cleanup (faulthandler's stall exit) must
    not leave its hogs spinning."""
    import os
    import subprocess
    import time
    bench = Path(__file__).resolve().parents[2] / "scripts" / "bench"
    code = ("import os, sys; sys.argv = ['x', '--merge']; sys.path.insert(0, %r)\n"
            "import sched_gpu as S\nh = S.Hogs(2).__enter__()\n"
            "print(' '.join(str(p.pid) for p in h.procs), flush=True)\nos._exit(0)\n" % str(bench))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    pids = [int(x) for x in out.split()]
    assert len(pids) == 2

    def alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        # a zombie left to init counts as gone
        stat = Path(f"/proc/{pid}/stat")
        return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    deadline = time.monotonic() + 10
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(p) for p in pids)


def _window(steal_s: float) -> Any:
    return S.Window([0.001, 0.002], 10, 2.0, 5.0, {"steal_s": steal_s, "runq_wait_ms_per_s": 0.1})


@pytest.mark.parametrize("limit,retries,kept,aside", [
    (0.1, 1, 0.5, [0.9]),               # one more window at most: kept even with steal
    (0.1, 2, 0.0, [0.9, 0.5]),          # the first window under the limit is kept
    (0.0, 2, 0.9, []),                  # 0: never measured again
    (1.0, 2, 0.9, []),                  # under the limit: kept at once
])
def test_windows_with_steal_are_measured_again_and_kept_aside(
        limit: float, retries: int, kept: float, aside: list[float]) -> None:
    steals = iter([0.9, 0.5, 0.0, 0.0])
    w, out = S.steal_free(lambda: _window(next(steals)), limit, retries)
    assert w.host["steal_s"] == kept
    assert [x.host["steal_s"] for x in out] == aside


def test_a_row_shows_the_windows_set_aside_for_steal() -> None:
    r = {"host": {"steal_s": 0.02, "runq_wait_ms_per_s": 0.3},
         "set_aside": [_window(0.9).summary()]}
    assert R._host(r) == "0.02 / 0.3; set aside: steal 0.90 s, LC p99 2.000 ms"
    assert _window(0.9).summary()["be_steps_per_s"] == 5.0


def test_measure_keeps_the_window_without_steal_and_sets_the_other_aside(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """measure()'s own wiring, on the CPU: the GPU's synchronise is the one
    call left out, and the host's steal comes from a stand-in."""
    import types
    steals = iter([0.8, 0.0])

    class Noise:
        def read(self, seconds: float) -> dict[str, float]:
            return {"steal_s": next(steals), "runq_wait_ms_per_s": 0.0}
    monkeypatch.setattr(S, "HostNoise", Noise)
    monkeypatch.setattr(S.torch.cuda, "synchronize", lambda: None)
    calls = []

    def lc_one() -> float:
        calls.append(1)
        return 0.001 * len(calls)
    args = types.SimpleNamespace(warm=2, requests=5, period_ms=0.1, steal_retry=0.1, retries=1)
    r = S.measure("lake", lc_one, None, args, lambda: 0.0)
    assert len(calls) == 2 + 5 + 5                  # warm-up, the window set aside, the kept one
    assert r["host"]["steal_s"] == 0.0 and r["lc"]["n"] == 5
    assert r["lc"]["max_ms"] == pytest.approx(12.0)     # the kept window's last request
    assert [a["host"]["steal_s"] for a in r["set_aside"]] == [0.8]
    assert r["set_aside"][0]["lc"]["p99_ms"] == pytest.approx(7.0)

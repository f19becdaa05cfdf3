#!/usr/bin/env python3
"""LC tail next to BE work, side by side in one run (device machine).

For every LC x BE pair (scripts/bench/workloads.py), in one process:
  isolated-lc  LC alone, direct, on a high-priority stream
  isolated-be  BE alone, direct (the solo throughput)
  shared       both direct on two streams, LC high priority (the MPS-like baseline)
  static       green contexts: LC on --quota-sms SMs, BE on the rest
  lake         laked's GpuArbiter: LC through run_lc, BE inside arb.be() (atoms, gates)
and once per LC workload: lake-lc-alone (LC through the arbiter, nothing else:
the scheduler's own cost; then again, interleaved with direct runs in
blocks, which the machine's drift touches alike), and once per BE workload
lake-be-alone (likewise).
LC requests arrive every --period-ms (open loop, paced by sleep + a short
spin); LC work is a CUDA graph replay in every config (static's graph is
captured on its partition's stream: a graph keeps the SMs of the green
context it was captured on, whatever stream replays it, as
probe_graph_part.py measured).  GC is paused while measuring.  Reports LC
p50/p99 and their ratios to isolated, BE throughput ratio to solo, LC goodput (share within
1.25x isolated p99), GPU energy per LC request (BE's included), per-tenant
energy (lake), and writes JSON (+ a plot with --plot).  With --variant (and
--reps) each pair runs through lake alone, under every knob set in turn, so
variants meet the same machine state (single runs move p99 by about 0.1x).
Every window records what the host took from it (run-queue wait, steal);
one with more than --steal-retry seconds of steal (0.1) is measured again,
--retries times at most (1), the windows set aside kept in the JSON beside
the one kept; --hogs N spins N processes for the whole run, for host
contention on demand.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "32")     # as laked sets it
ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "python"), str(ROOT / "scripts" / "bench")]

if "--merge" not in sys.argv and "--ab" not in sys.argv:
    import faulthandler

    import torch

    import workloads as W
    from laked.sched import power
    from laked.sched.arbiter import GpuArbiter
    from laked.sched.base import Tenancy
    from laked.sched.fast import Events, raw_stream
    from laked.tenants import TenantSpec

from laked.sched.knobs import AT_START, Knobs  # noqa: E402 - pure: no torch

SLO_X = 1.25
T = TypeVar("T")


def nvml_reader(what: str) -> Callable[[], float]:
    """A reading of laked's NVML reader (``energy_mj``, ``clocks_mhz``), or 0
    without NVML: energy and clocks are optional."""
    try:
        return getattr(power.Nvml(), what)
    except Exception:  # noqa: BLE001 - no NVML, or no such counter here
        return lambda: 0.0


def paced(run_one: Callable[[], T], n: int, period: float) -> list[T]:
    """``run_one()`` ``n`` times, one every ``period`` seconds (open loop); its results."""
    lat = []
    nxt = time.perf_counter()
    for _ in range(n):
        # sleep most of the gap, then yield (not spin holding the GIL, which
        # would starve the arbiter's BE threads as no real LC client does):
        # sleep's wake-up jitter would otherwise land in LC's measured tail
        now = time.perf_counter()
        if nxt - now > 200e-6:
            time.sleep(nxt - now - 200e-6)
        while time.perf_counter() < nxt:
            time.sleep(0)
        lat.append(run_one())
        nxt = max(nxt + period, time.perf_counter())
    return lat


def direct_lc(lc: W.LcWork, stream: Any) -> Callable[[], float]:
    if isinstance(lc, W.KernelInfer):
        return lc.runner(Tenancy())             # laked's executor bound to no tenant

    def one() -> float:
        t = time.perf_counter()
        with torch.cuda.stream(stream):
            lc.run()
        stream.synchronize()
        return time.perf_counter() - t
    return one


def lake_lc(arb: GpuArbiter, t: Any, lc: W.LcWork, trace: "Trace | None" = None
            ) -> Callable[[], float]:
    if isinstance(lc, W.KernelInfer):
        return lc.runner(arb.tenancy(t))        # as laked binds the kernel's tenant
    if trace is not None:
        return trace.wrap(arb, t, lc)

    def one() -> float:
        t0 = time.perf_counter()
        arb.run_lc(t, lc.run)
        return time.perf_counter() - t0
    return one


class Trace:
    """--trace: where each LC request's time goes (host before the issue, the
    issue, GPU time from its first kernel's queueing to its last's end), what
    BE had queued and still running when it arrived, and how far its arrival
    was from the arbiter's prediction (> 0: later than predicted).
    Diagnostics only: the events it records cost a few microseconds, so
    traced runs are not the table's."""

    FIELDS = ("total", "before_issue", "issue", "gpu", "be_queued", "be_running",
              "be_head_est", "pred_err", "sm_mhz")
    SCALE = (1e3, 1e3, 1e3, 1e3, 1.0, 1.0, 1e3, 1e3, 1.0)  # seconds to ms; counts, MHz

    def __init__(self, be: Any = None) -> None:
        self.ev = Events(timing=True)
        self.rows: list[tuple[float, ...]] = []
        self.be = be                            # the BE tenant, when one runs
        self.clock = nvml_reader("clocks_mhz")

    def wrap(self, arb: GpuArbiter, t: Any, lc: W.LcWork) -> Callable[[], float]:
        box: dict[str, Any] = {}

        def issue() -> None:
            box["i0"] = time.perf_counter()
            s = raw_stream(arb.dev)
            box["e0"] = self.ev.record(s)
            lc.run()
            box["e1"] = self.ev.record(s)
            box["i1"] = time.perf_counter()

        def one() -> float:
            p = self.be.pacer if self.be is not None else None
            queued = list(p.inflight) if p is not None else []
            running = sum(1 for a in queued if not self.ev.done(a.end))
            predicted = t.due
            t0 = time.perf_counter()
            arb.run_lc(t, issue)
            t1 = time.perf_counter()
            gpu = self.ev.elapsed_s(box["e0"], box["e1"])
            self.ev.put(box["e0"], box["e1"])
            self.rows.append((t1 - t0, box["i0"] - t0, box["i1"] - box["i0"], gpu,
                              len(queued), running, queued[0].est_s if queued else 0.0,
                              t0 - predicted if predicted else 0.0, self.clock()))
            return t1 - t0
        return one

    def report(self, r: dict[str, Any], label: str) -> None:
        """Mean of each part over the slowest 1 % and the middle 50 %, into ``r``."""
        rows = sorted(self.rows)
        n = len(rows)
        if not n:       # kinfer: its requests do not go through wrap()
            print(f"  trace {label}: no traced requests", flush=True)
            return

        def mean(sel: list[tuple[float, ...]]) -> dict[str, float]:
            return {k: round(statistics.fmean(row[i] for row in sel) * self.SCALE[i], 3)
                    for i, k in enumerate(self.FIELDS)}
        err = sorted(row[7] * 1e3 for row in rows)
        r["trace"] = {"slowest_1pct": mean(rows[-max(1, n // 100):]),
                      "middle_50pct": mean(rows[n // 4: 3 * n // 4]),
                      "be_running_share": round(sum(1 for row in rows if row[5]) / n, 3),
                      "pred_err_ms": {f"p{q}": round(pctl(err, q / 100), 3)
                                      for q in (1, 10, 50, 90, 99)}}
        print(f"  trace {label}: {r['trace']}", flush=True)


class BeRunner:
    """Runs BE steps on a thread; ``direct`` keeps two steps in flight at most."""

    def __init__(self, be: W.BeWork, stream: Any = None, arb: GpuArbiter | None = None,
                 tenant: Any = None) -> None:
        self.be, self.stream, self.arb, self.tenant = be, stream, arb, tenant
        self.steps = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.error: BaseException | None = None

    def _run(self) -> None:
        try:
            if self.arb is not None:
                with self.arb.be(self.tenant):
                    while not self.stop.is_set():
                        self.be.step()
                        self.steps += 1
                return
            evs: list[Any] = []
            with torch.cuda.stream(self.stream):
                while not self.stop.is_set():
                    self.be.step()
                    ev = torch.cuda.Event()
                    ev.record(self.stream)
                    evs.append(ev)
                    while len(evs) > 2:
                        if evs[0].query():
                            evs.pop(0)
                            self.steps += 1
                        else:
                            time.sleep(50e-6)
                for ev in evs:
                    ev.synchronize()
                    self.steps += 1
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            self.error = e

    def __enter__(self) -> "BeRunner":
        self.thread.start()
        deadline = time.monotonic() + 20
        while self.steps < 3 and self.error is None and time.monotonic() < deadline:
            time.sleep(0.01)                   # measure a running job, not its start
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        if self.error is not None:
            raise self.error


def parse_knobs(pairs: list[str]) -> dict[str, Any]:
    """``--knob NAME=VALUE`` arguments as a knob dict (true/false, int or float)."""
    knobs: dict[str, Any] = {}
    for kv in pairs:
        k, _, v = kv.partition("=")
        knobs[k] = {"true": True, "false": False}.get(v.lower(), None)
        if knobs[k] is None:
            knobs[k] = float(v) if "." in v else int(v)
    return knobs


def parse_variants(specs: list[str]) -> list[tuple[str, dict[str, Any]]]:
    """``--variant LABEL:NAME=VALUE,...`` arguments as (label, knob dict);
    ``LABEL:`` alone is laked's defaults with --knob applied."""
    out = []
    for spec in specs:
        label, sep, kvs = spec.partition(":")
        if not sep or not label:
            raise SystemExit(f"--variant: {spec!r} is not LABEL:NAME=VALUE,...")
        kn = parse_knobs([kv for kv in kvs.split(",") if kv])
        fixed = sorted(set(kn) & AT_START)
        if fixed:
            raise SystemExit(f"--variant {label}: {', '.join(fixed)} take effect only when "
                             "the arbiter starts (use --knob)")
        out.append((label, kn))
    return out


def pctl(s: list[float], q: float) -> float:
    return s[min(len(s) - 1, int(len(s) * q))]


class HostNoise:
    """What the host took from this process over a window: its threads' time
    waiting on a run queue (schedstat), its involuntary context switches,
    and the machine's steal time (a hypervisor running someone else).  The
    table's bad rows come and go between processes on the same code; these
    say whether the host was busy then.  Zeros where /proc lacks a counter."""

    def __init__(self) -> None:
        self.wait0 = self._runq_wait()
        self.steal0 = self._steal()
        self.ivcsw0 = resource.getrusage(resource.RUSAGE_SELF).ru_nivcsw

    @staticmethod
    def _runq_wait() -> dict[str, int]:
        out = {}
        for d in Path("/proc/self/task").iterdir():
            with contextlib.suppress(OSError, ValueError, IndexError):
                out[d.name] = int((d / "schedstat").read_text().split()[1])
        return out

    @staticmethod
    def _steal() -> float:
        """Steal seconds summed over the CPUs (USER_HZ ticks)."""
        with contextlib.suppress(OSError, ValueError, IndexError):
            with open("/proc/stat") as f:
                return int(f.readline().split()[8]) / os.sysconf("SC_CLK_TCK")
        return 0.0

    def read(self, seconds: float) -> dict[str, float]:
        wait = self._runq_wait()
        waited = sum(v - self.wait0.get(k, 0) for k, v in wait.items())
        return {"runq_wait_ms": round(waited / 1e6, 3),
                "runq_wait_ms_per_s": round(waited / 1e6 / seconds, 3),
                "ivcsw": resource.getrusage(resource.RUSAGE_SELF).ru_nivcsw - self.ivcsw0,
                "steal_s": round(self._steal() - self.steal0, 3)}


def host_line(h: dict[str, float]) -> str:
    """HostNoise.read's numbers as a progress line shows them."""
    return f"runq {h['runq_wait_ms_per_s']:.1f} ms/s steal {h['steal_s']:.2f} s"


class Hogs:
    """``n`` processes spinning on a CPU each, for the block: host contention
    on demand (--hogs), a stand-in for the steal time that came with the
    table's worst rows.  Each hog also ends by itself once this process is
    gone (a stall's faulthandler exit runs no cleanup) or after ``limit_s``."""

    def __init__(self, n: int, limit_s: float = 900.0) -> None:
        self.n, self.limit_s = n, limit_s
        self.procs: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> "Hogs":
        code = (f"import os, time\nend = time.monotonic() + {self.limit_s}\n"
                f"while time.monotonic() < end and os.getppid() == {os.getpid()}: pass\n")
        self.procs = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(self.n)]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.procs:
            h.kill()
            h.wait()
        self.procs = []


def lc_stats(lat: list[float]) -> dict[str, float]:
    """Latencies (s) as their count, p50, p99 and max in ms."""
    s = sorted(lat)
    return {"n": len(s), "p50_ms": statistics.median(s) * 1e3,
            "p99_ms": pctl(s, 0.99) * 1e3, "max_ms": s[-1] * 1e3}


def interleaved(run_block: Callable[[str, int], None], modes: list[str], rounds: int,
                block: int) -> None:
    """``rounds`` rounds of ``run_block(mode, block)`` for each mode in turn, GC
    paused: modes compared this way meet the same machine state."""
    gc.disable()
    try:
        for _ in range(rounds):
            for m in modes:
                run_block(m, block)
    finally:
        gc.enable()


@dataclass
class Window:
    """One measured window: LC latencies (s), BE steps, seconds, energy (mJ), host."""
    lat: list[float]
    steps: int
    seconds: float
    energy_mj: float
    host: dict[str, float]

    def lc(self) -> dict[str, float]:
        """LC's latency over the window, in ms."""
        return lc_stats(self.lat)

    def summary(self) -> dict[str, Any]:
        """What a window set aside for steal keeps in the JSON."""
        out: dict[str, Any] = {"host": self.host, "seconds": round(self.seconds, 3)}
        if self.lat:
            lc = self.lc()
            out["lc"] = {k: round(lc[k], 4) for k in ("p50_ms", "p99_ms")}
        if self.steps:
            out["be_steps_per_s"] = round(self.steps / self.seconds, 2)
        return out


def steal_free(take: Callable[[], Window], limit_s: float, retries: int
               ) -> tuple[Window, list[Window]]:
    """``take()`` a window, and again while its steal time is over ``limit_s``
    (0: never), ``retries`` more times at most: (the window kept, those set
    aside).  Steal is the hypervisor's, not the run's: the table's worst rows
    were the ones with it, so such a window is measured again, and the ones
    set aside stay in the JSON beside the one kept."""
    aside: list[Window] = []
    w = take()
    while limit_s and w.host["steal_s"] > limit_s and len(aside) < retries:
        aside.append(w)
        w = take()
    return w, aside


def measure(name: str, lc_one: Callable[[], float] | None, be: BeRunner | None,
            args: argparse.Namespace, energy: Callable[[], float], seconds: float | None = None
            ) -> dict[str, Any]:
    res: dict[str, Any] = {"config": name}
    ctx = be if be is not None else contextlib.nullcontext()

    def take() -> Window:
        steps0 = be.steps if be else 0
        noise = HostNoise()
        e0, t0 = energy(), time.perf_counter()
        gc.disable()
        try:
            if lc_one is not None:
                lat = paced(lc_one, args.requests, args.period_ms / 1e3)
            else:
                time.sleep(seconds or 3.0)
                lat = []
        finally:
            gc.enable()
        dt = time.perf_counter() - t0
        w = Window(lat, (be.steps - steps0) if be else 0, dt, energy() - e0, noise.read(dt))
        if w.host["steal_s"] > args.steal_retry > 0:
            print(f"  {name}: {w.host['steal_s']:.2f} s of steal in the window", flush=True)
        return w

    with ctx:
        if lc_one is not None:        # steady state: LC's arrival history, caches
            paced(lc_one, args.warm, args.period_ms / 1e3)
        w, aside = steal_free(take, args.steal_retry, args.retries)
    torch.cuda.synchronize()
    res["host"] = w.host
    res["seconds"] = w.seconds
    if aside:
        res["set_aside"] = [x.summary() for x in aside]
    if w.lat:
        res["lc"] = w.lc()
        res["lat_ms"] = [round(x * 1e3, 4) for x in w.lat]
        res["worst"] = sorted(((round(x * 1e3, 3), i) for i, x in enumerate(w.lat)),
                              reverse=True)[:12]
        res["energy_mj_per_lc"] = w.energy_mj / len(w.lat)
    if be is not None:
        res["be_steps_per_s"] = w.steps / w.seconds
    return res


def alone_interleaved(direct: Callable[[], float], lake: Callable[[], float],
                      args: argparse.Namespace, block: int = 100) -> dict[str, Any]:
    """LC alone, run directly and through the arbiter in alternating blocks of
    ``block`` requests (``--requests`` each): the scheduler's own cost with
    the machine's drift touching both alike.  Two windows of the same code,
    one after the other, have read 10 % apart (kinfer, 2026-12-02), more
    than the cost measured."""
    fns = {"direct": direct, "lake": lake}
    lat: dict[str, list[float]] = {k: [] for k in fns}

    def run_block(k: str, n: int) -> None:
        lat[k].extend(paced(fns[k], n, args.period_ms / 1e3))
    interleaved(run_block, list(fns), max(1, args.requests // block), block)
    res: dict[str, Any] = {k: lc_stats(v) for k, v in lat.items()}
    res["p50_ratio"] = res["lake"]["p50_ms"] / res["direct"]["p50_ms"]
    res["p99_ratio"] = res["lake"]["p99_ms"] / res["direct"]["p99_ms"]
    res["block"] = block
    return res


def pacer_stats(t: Any) -> dict[str, float]:
    """Where a BE tenant's issuing time went (cumulative seconds, atoms)."""
    p = t.pacer
    return {"atoms": t.atoms, "busy_s": round(t.busy_s, 4), "hold_s": round(p.hold_s, 4),
            "wait_depth_s": round(p.wait_depth_s, 4), "gap_s": round(p.gap_s, 4),
            "boundary_s": round(p.boundary_s, 4), "lc_wait_s": round(p.lc_wait_s, 4),
            "issue_x": round(p.issue_x, 3)}


def run_variants(lc: W.LcWork, bes: list[W.BeWork], variants: list[tuple[str, dict[str, Any]]],
                 arb: GpuArbiter, iso: dict[str, Any], args: argparse.Namespace,
                 energy: Callable[[], float], streams: dict[str, Any]) -> list[dict[str, Any]]:
    """The lake run of each pair of ``lc`` under each variant's knobs,
    ``--reps`` times, interleaved (a drifting machine touches each alike).
    Each rep after the first measures isolated LC again and its runs'
    ratios are to that: one isolated run per process can land on a jittery
    stretch (kernel INFER's p99 read 0.62 ms in one process, 2.1 in another)."""
    base = dict(vars(arb.knobs))
    first = iso["lc"]                   # the process's first isolated run
    out = []
    try:
        for rep in range(args.reps):
            if rep:
                r_iso = measure("isolated-lc", direct_lc(lc, streams["hi"]), None, args, energy)
                r_iso |= {"lc_work": lc.name, "rep": rep,
                          "lc_p50_ratio": r_iso["lc"]["p50_ms"] / first["p50_ms"],
                          "lc_p99_ratio": r_iso["lc"]["p99_ms"] / first["p99_ms"]}
                out.append(r_iso)
                iso = iso | {"lc": r_iso["lc"]}
                print(f"  isolated LC {lc.name}, rep {rep}: p50 {r_iso['lc']['p50_ms']:.3f} "
                      f"p99 {r_iso['lc']['p99_ms']:.3f} ms", flush=True)
            for be in bes:
                for label, kn in variants:
                    arb.knobs = Knobs.from_dict(base | kn)
                    for r in run_pair(lc, be, arb, iso, args, energy, streams, label):
                        out.append(r | {"variant": label, "rep": rep, "knobs_set": kn})
    finally:
        arb.knobs = Knobs.from_dict(base)
    return out


def run_pair(lc: W.LcWork, be: W.BeWork, arb: GpuArbiter, iso: dict[str, Any],
             args: argparse.Namespace, energy: Callable[[], float], streams: dict[str, Any],
             label: str = "") -> list[dict[str, Any]]:
    out = []
    hi, lo = streams["hi"], streams["lo"]
    if "shared" in args.configs:
        out.append(measure("shared", direct_lc(lc, hi), BeRunner(be, lo), args, energy))
    if "static" in args.configs and getattr(lc, "partitionable", True):
        out.append(measure("static", direct_lc(lc.on_partition, streams["st_lc"]),
                           BeRunner(be, streams["st_be"]), args, energy))
    if "lake" in args.configs:
        kind = "kernel" if isinstance(lc, W.KernelInfer) else "model"
        tl = arb.add_tenant(TenantSpec(f"lc-{lc.name}", "LC", args.quota_sms, kind=kind))
        tl.allow_partition = False              # a graph: the whole GPU
        tb = arb.add_tenant(TenantSpec(f"be-{be.name}", "BE", 0, kind="job"))
        trace = Trace(tb) if args.trace else None
        parks0 = arb.parks.stats() | arb.host_first.stats()
        try:
            r = measure("lake", lake_lc(arb, tl, lc, trace), BeRunner(be, arb=arb, tenant=tb),
                        args, energy)
            if trace is not None:
                trace.report(r, f"{lc.name}+{be.name}")
            st = {t["name"]: t for t in arb.status()["tenants"]}
            r["tenants"] = {k: {x: st[k][x] for x in ("energy_j", "busy_s", "atoms",
                                                       "requests", "p50_ms", "p99_ms")}
                            for k in (tl.name, tb.name)}
            r["gates_forced_open"] = arb.gates.forced_opens
            r["gates_opened_early"] = arb.gates.early_opens
            # a thread left from an earlier pair would compete with this one's
            r["threads"] = sorted(th.name for th in threading.enumerate())
            r["be_pacer"] = pacer_stats(tb) | {
                k: round(v - parks0[k], 6)
                for k, v in (arb.parks.stats() | arb.host_first.stats()).items()}
            out.append(r)
        finally:
            arb.remove_tenant(tl)
            arb.remove_tenant(tb)
    if isinstance(lc, W.KernelInfer):
        lc.check()                              # the last request's output is still right
    for r in out:
        r["lc_work"], r["be_work"] = lc.name, be.name
        base = iso["lc"]
        r["lc_p50_ratio"] = r["lc"]["p50_ms"] / base["p50_ms"]
        r["lc_p99_ratio"] = r["lc"]["p99_ms"] / base["p99_ms"]
        r["iso_p99_ms"] = base["p99_ms"]       # the isolated run the ratios are to
        slo = SLO_X * base["p99_ms"]
        r["goodput"] = sum(1 for x in r["lat_ms"] if x <= slo) / len(r["lat_ms"])
        r["be_ratio"] = r["be_steps_per_s"] / iso["be"][be.name]
        print(f"  {lc.name:>4}+{be.name:<5} {label or r['config']:>7}: LC p50 "
              f"{r['lc']['p50_ms']:.3f} p99 {r['lc']['p99_ms']:.3f} ms "
              f"(x{r['lc_p50_ratio']:.2f}/x{r['lc_p99_ratio']:.2f})"
              f" BE x{r['be_ratio']:.2f} goodput {r['goodput']:.3f}"
              f" | host {host_line(r['host'])}"
              f" | gates opened early {r.get('gates_opened_early', '-')}"
              f" forced {r.get('gates_forced_open', '-')}", flush=True)
    return out


def run_all(args: argparse.Namespace, arb: GpuArbiter, lcs: list[W.LcWork],
            bes: list[W.BeWork], streams: dict[str, Any], energy: Callable[[], float],
            variants: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Every config of every workload, in the table's order."""
    iso: dict[str, Any] = {"be": {}}
    runs: list[dict[str, Any]] = []
    for be in bes:
        r = measure("isolated-be", None, BeRunner(be, streams["lo"]), args, energy,
                    seconds=args.be_seconds)
        r["be_work"] = be.name
        iso["be"][be.name] = r["be_steps_per_s"]
        runs.append(r)
        print(f"  isolated BE {be.name}: {r['be_steps_per_s']:.1f} {be.unit}/s", flush=True)
        if "lake" in args.configs:
            # the scheduler's own cost for BE: the job alone through the arbiter
            tb = arb.add_tenant(TenantSpec(f"be-{be.name}-alone", "BE", 0, kind="job"))
            try:
                ra = measure("lake-be-alone", None, BeRunner(be, arb=arb, tenant=tb), args,
                             energy, seconds=args.be_seconds)
                ra["be_pacer"] = pacer_stats(tb)
            finally:
                arb.remove_tenant(tb)
            ra["be_work"] = be.name
            ra["be_ratio"] = ra["be_steps_per_s"] / r["be_steps_per_s"]
            runs.append(ra)
            print(f"  BE {be.name} alone through the arbiter: x{ra['be_ratio']:.3f} of direct",
                  flush=True)
    for lc in lcs:
        r_eager = measure("isolated-lc-eager", direct_lc(lc, streams["hi"]), None, args, energy)
        lc.capture(streams["hi"])
        if "static" in args.configs and getattr(lc, "partitionable", True):
            # captured on the partition's stream, a graph replays on its SMs
            lc.on_partition = W.LcWork(lc.name, lc.fn)
            lc.on_partition.capture(streams["st_lc"])
        r_iso = measure("isolated-lc", direct_lc(lc, streams["hi"]), None, args, energy)
        tl = arb.add_tenant(TenantSpec(f"lc-{lc.name}-alone", "LC", 0, kind="model"))
        tl.allow_partition = False
        trace = Trace() if args.trace else None
        r_alone = measure("lake-lc-alone", lake_lc(arb, tl, lc, trace), None, args, energy)
        if trace is not None:
            trace.report(r_alone, f"{lc.name} alone")
        else:
            r_alone["interleaved"] = il_cost = alone_interleaved(
                direct_lc(lc, streams["hi"]), lake_lc(arb, tl, lc), args)
            print(f"  {lc.name} alone, interleaved with direct in blocks of "
                  f"{il_cost['block']}: x{il_cost['p50_ratio']:.3f}/x{il_cost['p99_ratio']:.3f} "
                  f"(direct p50 {il_cost['direct']['p50_ms']:.3f} ms)", flush=True)
        arb.remove_tenant(tl)
        il = {"lc": r_iso["lc"], "lc_eager": r_eager["lc"], "be": iso["be"]}
        for r in (r_eager, r_iso, r_alone):
            r["lc_work"] = lc.name
            r["lc_p50_ratio"] = r["lc"]["p50_ms"] / r_iso["lc"]["p50_ms"]
            r["lc_p99_ratio"] = r["lc"]["p99_ms"] / r_iso["lc"]["p99_ms"]
            runs.append(r)
        print(f"  isolated LC {lc.name}: p50 {r_iso['lc']['p50_ms']:.3f} p99 "
              f"{r_iso['lc']['p99_ms']:.3f} ms (eager {r_eager['lc']['p50_ms']:.3f}/"
              f"{r_eager['lc']['p99_ms']:.3f}); through the arbiter alone x"
              f"{r_alone['lc_p50_ratio']:.3f}/x{r_alone['lc_p99_ratio']:.3f} | host "
              f"{host_line(r_iso['host'])}, alone {host_line(r_alone['host'])}", flush=True)
        if variants:
            runs.extend(run_variants(lc, bes, variants, arb, il, args, energy, streams))
        else:
            for be in bes:
                runs.extend(run_pair(lc, be, arb, il, args, energy, streams))
    return runs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--period-ms", type=float, default=5.0)
    ap.add_argument("--warm", type=int, default=40, help="LC requests before measuring")
    ap.add_argument("--lc", default="gemm,conv,attn")
    ap.add_argument("--be", default="gemm,mem,train")
    ap.add_argument("--configs", default="shared,static,lake")
    ap.add_argument("--quota-sms", type=int, default=64, help="static split: LC's SMs")
    ap.add_argument("--conv-batch", type=int, default=32,
                    help="images per conv request (64 was the table's before 2026-12-01)")
    ap.add_argument("--knob", action="append", default=[], metavar="NAME=VALUE",
                    help="scheduler knob (repeatable), e.g. atom_us=300")
    ap.add_argument("--variant", action="append", default=[], metavar="LABEL:NAME=VALUE,...",
                    help="run each pair through lake only, under each such knob set "
                    "(repeatable; 'LABEL:' alone is the defaults), interleaved, --reps times")
    ap.add_argument("--reps", type=int, default=1, help="with --variant: runs per variant")
    ap.add_argument("--be-seconds", type=float, default=3.0)
    ap.add_argument("--out", default=str(ROOT / "docs" / "bench" / "sched_gpu.json"))
    ap.add_argument("--steal-retry", type=float, default=0.1, metavar="S",
                    help="measure a window again when the host's steal time in it was over "
                    "S seconds (0: never); the windows set aside stay in the JSON")
    ap.add_argument("--retries", type=int, default=1,
                    help="with --steal-retry: windows measured again at most, per run")
    ap.add_argument("--hogs", type=int, default=0,
                    help="CPU-spinning processes for the whole run (host contention)")
    ap.add_argument("--plot", default="")
    ap.add_argument("--merge", nargs="+", default=[],
                    help="merge JSON files of runs (one per LC workload) into --out")
    ap.add_argument("--trace", action="store_true",
                    help="diagnostics: split each lake LC request's time (not for the "
                    "table; torch LC only: kinfer's requests go through the executor)")
    ap.add_argument("--ab", nargs="+", default=[], metavar="LABEL=FILE",
                    help="collect runs of variants (each FILE one run's JSON) into an A/B "
                    "file, --out, for report.py")
    ap.add_argument("--note", default="", help="with --merge or --ab: where the runs came from")
    ap.add_argument("--stall-s", type=float, default=0,
                    help="dump every thread's stack and exit if the run lasts this long")
    args = ap.parse_args()
    if args.merge:
        return merge(args)
    if args.ab:
        return ab(args)
    if args.stall_s:
        faulthandler.dump_traceback_later(args.stall_s, exit=True)
    args.configs = args.configs.split(",")
    variants = parse_variants(args.variant)
    if variants:
        args.configs = ["lake"]
    knobs = parse_knobs(args.knob)
    torch.backends.cudnn.benchmark = False
    energy = nvml_reader("energy_mj")
    arb = GpuArbiter(knobs)
    parts = arb.parts
    lc_units = parts.units_for(args.quota_sms)
    streams = {"hi": torch.cuda.Stream(priority=arb.prio_hi),
               "lo": torch.cuda.Stream(priority=arb.prio_lo),
               "st_lc": parts.get(0, lc_units).torch_stream(arb.prio_hi),
               "st_be": parts.get(lc_units, parts.n_units, True).torch_stream(arb.prio_lo)}
    lcs = [W.LC[n](args.conv_batch) if n == "conv" else W.LC[n]() for n in args.lc.split(",")]
    bes = [W.BE[n]() for n in args.be.split(",")]
    for s in streams.values():                 # warm cuBLAS/cuDNN on every stream
        with torch.cuda.stream(s):
            for lc in lcs:
                lc.run()
            for be in bes:
                be.step()
    torch.cuda.synchronize()
    with Hogs(args.hogs):
        runs = run_all(args, arb, lcs, bes, streams, energy, variants)
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "args": vars(args), "knobs": vars(arb.knobs),
           "runs": [{k: v for k, v in r.items() if k != "lat_ms"} for r in runs],
           "scheduler": arb.status()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    if args.plot:
        plot(out, args.plot)
    arb.close()
    return 0


def merge(args: argparse.Namespace) -> int:
    parts = [json.loads(Path(f).read_text()) for f in args.merge]
    out = dict(parts[0])
    out["runs"] = [r for p in parts for r in p["runs"]]
    out["args"] = dict(parts[0]["args"], lc=",".join(p["args"]["lc"] for p in parts))
    out["scheduler"] = [p["scheduler"] for p in parts]
    out["merged_from"] = [Path(f).name for f in args.merge]
    if args.note:
        out["provenance"] = args.note
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    if args.plot:
        plot(out, args.plot)
    return 0


def ab(args: argparse.Namespace) -> int:
    variants = []
    for spec in args.ab:
        label, sep, f = spec.partition("=")
        if not sep:
            raise SystemExit(f"--ab: {spec!r} is not LABEL=FILE")
        d = json.loads(Path(f).read_text())
        variants.append({"label": label, "args": d["args"], "knobs": d["knobs"],
                         "runs": d["runs"]})
    out = {"provenance": args.note, "variants": variants}
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    return 0


def plot(out: dict[str, Any], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    pairs = sorted({(r["lc_work"], r["be_work"]) for r in out["runs"]
                    if r["config"] in ("shared", "static", "lake")})
    configs = ["shared", "static", "lake"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2))
    width = 0.27
    for ci, c in enumerate(configs):
        p99 = []
        be = []
        for lc, bw in pairs:
            r = next((x for x in out["runs"] if x["config"] == c and x["lc_work"] == lc
                      and x["be_work"] == bw), None)
            p99.append(r["lc_p99_ratio"] if r else 0)
            be.append(r["be_ratio"] if r else 0)
        xs = [i + (ci - 1) * width for i in range(len(pairs))]
        axes[0].bar(xs, p99, width, label=c)
        axes[1].bar(xs, be, width, label=c)
    labels = [f"{lc}+{bw}" for lc, bw in pairs]
    for ax, title, line in ((axes[0], "LC p99 / isolated p99 (lower is better)", 1.25),
                            (axes[1], "BE throughput / solo (higher is better)", 0.8)):
        ax.set_xticks(range(len(pairs)), labels, rotation=30)
        ax.axhline(line, color="k", ls="--", lw=1)
        ax.set_title(title)
        ax.legend()
    axes[0].set_yscale("log")
    fig.suptitle(f"laked arbiter on {out['device']} (LC every "
                 f"{out['args']['period_ms']} ms, {out['args']['requests']} requests/point)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())

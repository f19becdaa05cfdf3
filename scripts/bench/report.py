#!/usr/bin/env python3
"""Writes docs/benchmarks.md from the JSON results under docs/bench/.

Every figure in the page comes from a file a benchmark script wrote; rerun
the script, then this, to refresh it.
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "docs" / "bench"


def load(name: str) -> Any:
    p = BENCH / name
    return json.loads(p.read_text()) if p.exists() else None


def f(x: float | None, nd: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{nd}f}"


def vm_section(rt: Any, feat: Any) -> list[str]:
    out = ["## In the VM (lake.ko + laked's CPU executor)", ""]
    if rt:
        out += [f"Where: {rt['where']}. Bare ioctl vs a null request kernel -> laked -> "
                "kernel, alternating blocks in one run.", "",
                "| | median (us) | p99 (us) |", "| --- | --- | --- |",
                f"| bare ioctl (LAKE_IOC_NOP) | {rt['bare_ioctl']['median_us']} | "
                f"{rt['bare_ioctl']['p99_us']} |",
                f"| null round trip (LAKE_IOC_NULL_RT) | {rt['null_round_trip']['median_us']} | "
                f"{rt['null_round_trip']['p99_us']} |",
                f"| **ratio** | **{rt['ratio_median']}x** | **{rt['ratio_p99']}x** |", "",
                f"Per-block ratio spread: {rt['block_ratio_spread']}. The VM emulates the CPU "
                "(no KVM), so absolute times are ~100x a real machine's; the ratio is what "
                "carries over.", ""]
    if feat:
        out += ["### Capture, decision and in-kernel inference costs", "",
                f"{feat['unit']}; {feat['where']}.", "",
                "| what | median (ns) | p99 (ns) | ratio (median) |", "| --- | --- | --- | --- |",
                f"| empty noinline call | {f(feat['empty_call'][0], 1)} | "
                f"{f(feat['empty_call'][1], 1)} | 1.0 |",
                f"| lake_feature_capture (31 fields) | {f(feat['capture'][0], 1)} | "
                f"{f(feat['capture'][1], 1)} | {feat['capture_ratio_median']}x |"]
        for pol, (med, p99) in feat["decide"].items():
            r = feat["decide_ratio_median_vs_builtin"][pol]
            out.append(f"| lake_decide, {pol} | {f(med, 1)} | {f(p99, 1)} | {r}x of builtin |")
        out += ["", "In-kernel CPU inference, 31->256->2 fixed-point MLP (per batch):", "",
                "| batch | median (us) | p99 (us) |", "| --- | --- | --- |"]
        for b, (med, p99) in feat["infer_cpu"].items():
            out.append(f"| {b} | {f(med / 1e3)} | {f(p99 / 1e3)} |")
        out.append("")
    return out


def gpu_section(d: Any) -> list[str]:
    """dataplane_gpu.py writes its own table (copies, round trips, inference)."""
    if not d:
        return []
    return ["## On the device machine (laked's GPU executor via the user-space stand-in)",
            "", d["table_md"].rstrip(), ""]


def crossover(feat: Any, gpu: Any) -> list[str]:
    if not feat or not gpu:
        return []
    cpu = {int(b): v[0] / 1e3 for b, v in feat["infer_cpu"].items()}
    g = {r["batch"]: r["median_us"] for r in gpu["infer_mlp_31_256_2"]}
    cross = next((b for b in sorted(cpu) if b in g and g[b] < cpu[b]), None)
    return [f"### CPU (in-kernel, VM) vs GPU (laked, {gpu['device']}) inference", "",
            "| batch | CPU median (us) | GPU median (us) |", "| --- | --- | --- |",
            *[f"| {b} | {f(cpu[b], 1)} | {f(g.get(b), 1)} |" for b in sorted(cpu)], "",
            f"Crossover (first batch where the GPU path is faster): **{cross}**. Caveat: the "
            "CPU side is measured on an emulated CPU (QEMU TCG), which is one to two orders "
            "of magnitude slower than real hardware, so on a real host the crossover moves "
            "to larger batches; both sides are the same code that runs there.", ""]


def _met(r: Any) -> bool:
    """The issue's target: LC p99 within 1.25x of isolated, BE at 0.8 of solo or more."""
    return r["lc_p99_ratio"] <= 1.25 and r["be_ratio"] >= 0.8


def _pair_rows(d: Any, configs: tuple[str, ...]) -> list[str]:
    rows = []
    for r in sorted((r for r in d["runs"] if r["config"] in configs),
                    key=lambda r: (r["lc_work"], r["be_work"], configs.index(r["config"]))):
        mark = " **met**" if r["config"] == "lake" and _met(r) else ""
        rows.append(f"| {r['lc_work']}+{r['be_work']} | {r['config']}{mark} | "
                    f"{f(r['lc']['p50_ms'], 3)} | {f(r['lc']['p99_ms'], 3)} | "
                    f"{f(r['lc']['max_ms'], 2)} | {f(r['lc_p50_ratio'])}x | "
                    f"{f(r['lc_p99_ratio'])}x | {f(r['be_ratio'])} | "
                    f"{f(r['goodput'], 3)} | {f(r.get('energy_mj_per_lc'), 0)} | "
                    f"{_host(r)} |")
    return rows


def _host(r: Any) -> str:
    """What the host took from the run (sched_gpu's HostNoise): the machine's
    steal seconds / the process's run-queue wait in ms per second; then the
    windows measured before it and set aside for their steal (--steal-retry)."""
    h = r.get("host")
    if not h:
        return "-"
    out = f"{h['steal_s']:.2f} / {h['runq_wait_ms_per_s']:.1f}"
    for a in r.get("set_aside", []):
        lc = f", LC p99 {a['lc']['p99_ms']:.3f} ms" if "lc" in a else ""
        out += f"; set aside: steal {a['host']['steal_s']:.2f} s{lc}"
    return out


SHOWN_KNOBS = ("atom_us", "light_atom_us", "idle_atom_us", "min_atom_us", "depth", "hold_us",
               "lead_us", "park", "park_one", "park_raw", "be_duty", "gil_switch_us",
               "host_first_us", "gate_timeout_ms", "unstick_ms", "inline_backward")

PAIR_HEAD = ["| LC+BE | config | LC p50 (ms) | LC p99 (ms) | LC max (ms) | p50 / isolated | "
             "p99 / isolated | BE / solo | LC goodput | GPU mJ per LC request (BE's included) | "
             "host: steal (s) / run-queue wait (ms/s) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]


def sched_section(d: Any) -> list[str]:
    if not d:
        return []
    a = d["args"]
    iso = [r for r in d["runs"] if r["config"] in ("isolated-lc", "isolated-lc-eager",
                                                    "lake-lc-alone")]
    out = ["## GPU arbiter (laked.sched) on the device machine", "",
           f"`scripts/bench/sched_gpu.py`, in the processes named below: {d['device']}, torch "
           f"{d['torch']}; {_provenance(d)} LC requests every {a['period_ms']} ms, "
           f"{a['requests']} per point after {a['warm']} discarded, GC paused; LC is a CUDA "
           "graph replay in every config (static's graph is captured on its partition's "
           "stream, which keeps it on those SMs: see the graph probe below). Workloads: "
           "scripts/bench/workloads.py. Static: LC on "
           f"{a['quota_sms']} SMs, BE on the rest. Goodput: share of LC requests within "
           "1.25x the isolated p99. Knobs: laked's defaults "
           f"(`{json.dumps({k: d['knobs'][k] for k in SHOWN_KNOBS if k in d['knobs']})}`).",
           "",
           "![LC p99 and BE throughput per pair](bench/sched_gpu.png)", "",
           "Isolated LC, and LC alone through the arbiter (the scheduler's own cost):", "",
           "| LC | config | p50 (ms) | p99 (ms) | p50 ratio | p99 ratio |",
           "| --- | --- | --- | --- | --- | --- |"]
    for r in sorted(iso, key=lambda r: (r["lc_work"], r["config"])):
        out.append(f"| {r['lc_work']} | {r['config']} | {f(r['lc']['p50_ms'], 3)} | "
                   f"{f(r['lc']['p99_ms'], 3)} | {f(r['lc_p50_ratio'], 3)}x | "
                   f"{f(r['lc_p99_ratio'], 3)}x |")
        il = r.get("interleaved")
        if il:      # ratios to the direct blocks between its own
            out.append(f"| {r['lc_work']} | lake-lc-alone, interleaved with direct in blocks "
                       f"of {il['block']} | {f(il['lake']['p50_ms'], 3)} | "
                       f"{f(il['lake']['p99_ms'], 3)} | {f(il['p50_ratio'], 3)}x | "
                       f"{f(il['p99_ratio'], 3)}x |")
    be = {}
    for r in d["runs"]:
        if r["config"] == "isolated-be":
            be.setdefault(r["be_work"], []).append(r["be_steps_per_s"])
    out += ["", "BE alone (steps/s, median of the per-process runs): " + ", ".join(
        f"{k} {statistics.median(v):.1f}" for k, v in sorted(be.items())) + ".", ""]
    alone = [r for r in d["runs"] if r["config"] == "lake-be-alone"]
    if alone:
        ratios: dict[str, list[float]] = {}
        for r in alone:
            ratios.setdefault(r["be_work"], []).append(r["be_ratio"])
        out += ["BE alone through the arbiter (idle atoms, no LC) over the same job run "
                "directly, per process (the scheduler's own cost for BE): " + "; ".join(
                    f"{k} " + ", ".join(f"{x:.3f}x" for x in v) for k, v in sorted(ratios.items()))
                + ".", ""]
    out += ["Side by side (target for lake: p99 / isolated <= 1.25 and BE / solo >= 0.8):", ""]
    out += PAIR_HEAD + _pair_rows(d, ("shared", "static", "lake"))
    lake = [r for r in d["runs"] if r["config"] == "lake"]
    forced, early = _gate_counts(d)
    out += ["", f"Gates the watchdog had to reopen during these runs: {forced}; opened early "
            f"by a BE issuer (`unstick_ms`): {early}."]
    out += _pacer_rows(lake)
    out += ["", "Per-tenant GPU energy in the lake runs (NVML counter split by device time): " +
            "; ".join(f"{r['lc_work']}+{r['be_work']}: " + ", ".join(
                f"{n} {v['energy_j']:.0f} J" for n, v in r.get("tenants", {}).items())
                for r in lake) + ".", ""]
    return out


def _gate_counts(d: Any) -> tuple[int, int]:
    """Gates reopened by the watchdog and opened early, over the processes of a
    (merged) run: each process's scheduler status at its end has its totals."""
    st = d.get("scheduler")
    procs = st if isinstance(st, list) else [st] if st else []
    if procs and all("gates_forced_open" in s for s in procs):
        return (sum(s["gates_forced_open"] for s in procs),
                sum(s.get("gates_opened_early", 0) for s in procs))
    lake = [r for r in d["runs"] if r["config"] == "lake"]     # one process per LC
    return (sum(max((r.get("gates_forced_open", 0) for r in lake if r["lc_work"] == w),
                    default=0) for w in {r["lc_work"] for r in lake}), 0)


def _pacer_rows(lake: list[Any]) -> list[str]:
    """Where each lake run's BE issuer spent its time, and its parks."""
    rows = [r for r in lake if "be_pacer" in r]
    if not rows:
        return []
    out = ["", "BE issuer in the lake runs (5 s each): atoms, seconds holding on the host "
           "before a predicted LC arrival, seconds waiting for room in its queue of atoms, "
           "atoms parked on the GPU behind the next LC request, and parks the host let go "
           "because that request came over hold_us late:", "",
           "| LC+BE | atoms | hold (s) | waiting for queue room (s) | parked | let go by host |",
           "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        p = r["be_pacer"]
        out.append(f"| {r['lc_work']}+{r['be_work']} | {p['atoms']} | {f(p['hold_s'])} | "
                   f"{f(p['wait_depth_s'])} | {p.get('parked', '-')} | "
                   f"{p.get('released_by_host', '-')} |")
    return out


def graph_section(d: Any) -> list[str]:
    """probe_graph_part.py: graphs on green contexts, and the right-sizing curves."""
    if not d:
        return []
    g = d["gemm8192_ms"]
    out = ["### CUDA graphs on green contexts, and each LC workload's SM curve", "",
           f"`{d['script']}`, {d['device']}, {d['provenance']}. An 8192^2 bf16 GEMM, "
           "eager and as a graph captured on a partition's stream, replayed on that stream "
           "and on a whole-GPU stream (ms):", "",
           "| captured on | eager | graph, own stream | graph, whole-GPU stream |",
           "| --- | --- | --- | --- |"]
    for k, v in g.items():
        name = "whole GPU" if k == "full" else f"{k} SMs"
        out.append(f"| {name} | {f(v['eager'], 3)} | {f(v['graph_own'], 3)} | "
                   f"{f(v['graph_on_full'], 3)} |")
    curves = d["curves_ms"]
    sms = list(next(iter(curves.values())).keys())
    out += ["", "A graph keeps the SMs of the green context it was captured on. Each LC "
            "workload's graph replay (ms) on its first N SMs:", "",
            "| LC | " + " | ".join(sms) + " |", "| --- |" + " --- |" * len(sms)]
    for w, c in curves.items():
        out.append(f"| {w} | " + " | ".join(f(c[k], 3) for k in sms) + " |")
    out += ["", "No LC workload here is within the 1.1x slip on fewer SMs than the whole "
            "GPU, so right-sizing keeps them on it; BE can only use the time between LC "
            "requests (a BE GEMM on the complement while LC runs costs LC far more: "
            "gemm LC on 64 SMs beside it, p99 " +
            f"{f(d['beside_be_gemm']['gemm']['64']['p99'], 3)} ms).", ""]
    return out


def _provenance(d: Any) -> str:
    """Which device calls the merged files came from (sched_gpu.py --merge)."""
    note = d.get("provenance")
    return f"{note} " if note else "all in one device call. "


def trace_section(d: Any) -> list[str]:
    """Where an LC request's time goes (sched_gpu.py --trace): tuning history."""
    if not d:
        return []
    out = ["### Where the LC tail goes (diagnostic runs, `--trace`)", "",
           d.get("provenance", ""), "",
           "Mean of each part over the slowest 1 % of requests / the middle 50 % (ms): "
           "host time before the request's first launch is queued (lock, gate close, "
           "GIL), the issue itself, and GPU time from the first kernel's queueing to the "
           "last one's end.", "",
           "BE running: share of requests that arrived while a BE atom was unfinished on "
           "the GPU (running, or queued behind a park: with parking, almost always). "
           "Arrival vs prediction: p1 / p99 of (arrival - predicted arrival), ms "
           "(< 0: earlier than predicted). SM clock: NVML's, read after each request, "
           "mean over the middle 50 %.", "",
           "| LC+BE | p99 / isolated | BE / solo | total | before issue | issue | GPU | "
           "BE running | arrival vs prediction | SM MHz |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in d["runs"]:
        tr = r.get("trace")
        if not tr:
            continue
        slow, mid = tr["slowest_1pct"], tr["middle_50pct"]
        pair = f"{r['lc_work']}+{r['be_work']}" if r.get("be_work") else f"{r['lc_work']} alone"
        cells = [f"{slow[k]:.3f} / {mid[k]:.3f}" for k in ("total", "before_issue", "issue",
                                                          "gpu")]
        err = tr.get("pred_err_ms")
        cells += [f(tr["be_running_share"]) if "be_running_share" in tr else "-",
                  f"{err['p1']:.3f} / {err['p99']:.3f}" if err else "-",
                  f"{mid['sm_mhz']:.0f}" if "sm_mhz" in mid else "-"]
        be = f(r["be_ratio"]) if "be_ratio" in r else "-"
        out.append(f"| {pair} | {f(r['lc_p99_ratio'])}x | {be} | " + " | ".join(cells) + " |")
    return out + [""]


def _conv_batch(d: Any) -> int:
    """Images per conv LC request (64 before sched_gpu.py had --conv-batch)."""
    return d["args"].get("conv_batch", 64)


def _iso_p99(d: Any) -> dict[str, float]:
    return {r["lc_work"]: r["lc"]["p99_ms"] for r in d["runs"] if r["config"] == "isolated-lc"}


def repeat_section(d: Any, main: Any, title: str) -> list[str]:
    """The lake rows of another run: how much a single run's ratios move,
    and the main run's p99 against the lower isolated p99 of the two (one
    noisy isolated run can flatter every ratio of its LC workload)."""
    if not d:
        return []
    out = [f"### {title}", "", f"The lake rows of {d.get('provenance', 'another run.')} "
           "Last column: the main table's lake p99 over the lower of the two runs' isolated "
           "p99s.", "",
           "| LC+BE | isolated p99 (ms) | LC p99 (ms) | p99 / isolated | BE / solo | "
           "main run: p99 / lower isolated p99 | host: steal (s) / run-queue wait (ms/s) |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
    iso, iso_main = _iso_p99(d), _iso_p99(main) if main else {}
    lake_main = {(r["lc_work"], r["be_work"]): r["lc"]["p99_ms"]
                 for r in (main or {}).get("runs", []) if r["config"] == "lake"}
    for r in d["runs"]:
        if r["config"] != "lake":
            continue
        w = r["lc_work"]
        m = lake_main.get((w, r["be_work"]))
        if w == "conv" and _conv_batch(d) != _conv_batch(main or d):
            m = None                # another conv workload: its isolated p99 is not ours
        own = r.get("iso_p99_ms", iso[w])      # its process's (files merge several)
        low = min(own, iso_main.get(w, own))
        out.append(f"| {w}+{r['be_work']} | {f(own, 3)} | {f(r['lc']['p99_ms'], 3)} | "
                   f"{f(r['lc_p99_ratio'])}x | {f(r['be_ratio'])} | "
                   f"{f(m / low) + 'x' if m else '-'} | {_host(r)} |")
    return out + [""]


def ab_section(d: Any, title: str) -> list[str]:
    """An A/B of scheduler variants, each against its own isolated run (with
    the SM clock of traced runs and be_duty's idle gaps where any run has them)."""
    if not d:
        return []
    lake = [r for v in d["variants"] for r in v["runs"] if r["config"] == "lake"]
    mhz = any("trace" in r for r in lake)
    gap = any(r.get("be_pacer", {}).get("gap_s") for r in lake)
    head = ["variant", "isolated p50 / p99 (ms)", "LC+BE", "LC p50 / p99 (ms)",
            "p99 / isolated", "BE / solo", "BE hold (s)", "parked"]
    head += ["SM MHz at LC (traced)"] * mhz + ["BE idle gaps (s)"] * gap
    out = [f"### {title}", "", d["provenance"], "", "| " + " | ".join(head) + " |",
           "|" + " --- |" * len(head)]
    for v in d["variants"]:
        iso = {r["lc_work"]: r["lc"] for r in v["runs"] if r["config"] == "isolated-lc"}
        for r in v["runs"]:
            if r["config"] != "lake":
                continue
            p, i = r.get("be_pacer", {}), iso[r["lc_work"]]
            cells = [v["label"], f"{f(i['p50_ms'], 3)} / {f(i['p99_ms'], 3)}",
                     f"{r['lc_work']}+{r['be_work']}",
                     f"{f(r['lc']['p50_ms'], 3)} / {f(r['lc']['p99_ms'], 3)}",
                     f"{f(r['lc']['p99_ms'] / i['p99_ms'])}x", f(r["be_ratio"]),
                     f(p.get("hold_s")), str(p.get("parked", "-"))]
            if mhz:
                t = r.get("trace", {}).get("middle_50pct", {})
                cells.append(f"{t['sm_mhz']:.0f}" if t else "-")
            if gap:
                cells.append(f(p.get("gap_s")))
            out.append("| " + " | ".join(cells) + " |")
    return out + [""]


def variants_section(d: Any, title: str) -> list[str]:
    """Variants run interleaved in one process (sched_gpu.py --variant/--reps):
    every sample, and the median of each, per pair and variant."""
    if not d:
        return []
    by: dict[tuple[str, str, str], list[Any]] = {}     # in the order first run
    iso: dict[str, list[float]] = {}
    for r in d["runs"]:
        if r["config"] == "lake" and "variant" in r:
            by.setdefault((r["lc_work"], r["be_work"], r["variant"]), []).append(r)
        elif r["config"] == "isolated-lc":
            iso.setdefault(r["lc_work"], []).append(r["lc"]["p99_ms"])
    per_rep = any(len(x) > 1 for x in iso.values())
    how = ("one per rep, measured just before it; each run's ratio is to its rep's."
           if per_rep else "one per process.")
    out = [f"### {title}", "", _provenance(d) + "Isolated p99: " + how, "",
           "| LC+BE | isolated p99 (ms) | variant | p99 / isolated, each run | median | "
           "BE / solo, each run | median | target met |",
           "|" + " --- |" * 8]
    for (lc, be, v), rs in sorted(by.items(), key=lambda x: x[0][:2]):   # stable
        p99 = [r["lc_p99_ratio"] for r in rs]
        bes = [r["be_ratio"] for r in rs]
        out.append(f"| {lc}+{be} | {', '.join(f(x, 3) for x in iso.get(lc, []))} | {v} | "
                   f"{', '.join(f(x, 3) for x in p99)} | {f(statistics.median(p99), 3)}x | "
                   f"{', '.join(f(x, 3) for x in bes)} | {f(statistics.median(bes), 3)} | "
                   f"{sum(map(_met, rs))} of {len(rs)} |")
    return out + [""]


def _idle(tl: dict[str, Any], kind: str) -> str:
    g = tl.get("idle_gaps_ms", {}).get(kind)
    return f"{g['ms']:.0f} ({g['n']})" if g else "-"


def timeline_section(d: Any) -> list[str]:
    """Where BE's GPU time goes beside LC (timeline_be.py): busy share, idle
    gaps by what ends them, and the pacer's boundary cost."""
    if not d:
        return []
    head = ["run", "config", "BE steps/s", "SM MHz", "GPU busy", "idle before LC, ms (gaps)",
            "idle after LC", "idle BE to BE", "BE kernel ms/step", "atoms",
            "boundary us/atom", "LC p99 (ms)"]
    out = ["### Where a training job's GPU time goes beside LC (timelines)", "",
           d["provenance"], ""] + [f"- {x}" for x in d.get("findings", [])]
    out += ["", "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for st in d["sets"]:
        for r in st["runs"]:
            if r["config"] == "lake-lc-alone":
                continue
            tl, p = r["timeline"], r.get("be_pacer", {})
            idle = (_idle(tl, "before_lc"), _idle(tl, "after_lc"), _idle(tl, "be_be"))
            if "idle_gaps_ms" not in tl:        # the script's first version: one total
                idle = ("-", "-", f"{tl.get('idle_in_them_ms', 0):.0f} (all)")
            per_atom = (f"{p['boundary_s'] / p['atoms'] * 1e6:.0f}"
                        if p.get("boundary_s") and p.get("atoms") else "-")
            cells = [st["label"], f"{st['lc']}+{st['be']} {r['config']}",
                     f"{r['be_steps_per_s']:.0f}", f"{r['sm_mhz']:.0f}",
                     f"{tl['gpu_busy_share']:.2f}", *idle,
                     f(tl.get("be_kernel_ms_per_step"), 3), str(p.get("atoms", "-")), per_atom,
                     f(r.get("lc_p99_ms"), 3)]
            out.append("| " + " | ".join(cells) + " |")
    out += [""]
    plans = [(st["label"], r["plans"]) for st in d["sets"] for r in st["runs"] if "plans" in r]
    # runs whose only record kept is their plan decisions (printed, not saved)
    plans += [(x["label"], x["plans"]) for x in d.get("plans_experiments", [])]
    if plans:
        out += ["BE's plan decisions in the lake window (ms, p10 / p50 / p90): the predicted "
                "time to LC's arrival, BE's queued work (estimated) and the next op's need.", "",
                "| run | decision | n | to LC's arrival | queued | need |",
                "| --- | --- | --- | --- | --- | --- |"]
        for label, pl in plans:
            for what, x in pl.items():
                cells = [label, what, str(x["n"])]
                for k in ("until", "queued", "need"):
                    q = x.get(k)
                    cells.append(f"{q['p10']} / {q['p50']} / {q['p90']}" if q else "-")
                out.append("| " + " | ".join(cells) + " |")
        out += [""]
    return out


def tail_section(d: Any) -> list[str]:
    """The slowest LC requests one by one (timeline_be.py --events' ``tail``)."""
    if not d:
        return []
    cols = ("lat", "issue", "gpu", "after", "late", "be_beside", "be_longest",
            "be_longest_est", "be_left_at_arrival")
    out = ["### Where the slowest LC requests beside training lose their time", "",
           f"{d['provenance']} Each row is one request (us): its latency on the host, its "
           "arrival to its GPU start (issue), its GPU span, the host's time after it, how "
           "late it came against the prediction, and the BE atoms that ran on the GPU "
           "during it (how many, the longest one's measured and estimated time, what the "
           "one running at its arrival had left). In some windows the mapping of event "
           "time onto host time is off by about 0.1 ms (issue and after then move by as "
           "much in opposite directions; their sum holds).", ""]
    for r in d["runs"]:
        rows = r["tail"]["slowest"]
        beside = sum(1 for x in rows if x["be_beside"])
        out += [f"{r['label']} (call {r['call']}): LC p99 {f(r['lc_p99_ms'], 3)} ms (alone "
                f"through the arbiter {f(r['alone_p99_ms'], 3)}), BE {f(r['be_ratio'])} of "
                f"solo; {beside} of the slowest {len(rows)} had a BE atom beside them.", "",
                "| request | " + " | ".join(cols) + " |", "|" + " --- |" * (len(cols) + 1),
                "| middle half, median | " + " | ".join(
                    f(r["tail"]["middle_median"][c], 0) for c in cols) + " |"]
        for x in rows[-8:]:
            out.append("| slowest | " + " | ".join(f(x[c], 0) for c in cols) + " |")
        out.append("")
    out += ["`sched_gpu.py --trace` in call 1 (ms; the host part before the issue, the issue, "
            "GPU time from the first launch):", "",
            "| LC | config | slowest 1 %: before issue / issue / gpu | middle half |",
            "| --- | --- | --- | --- |"]
    for t in d["trace"]:
        a, b = t["slowest_1pct"], t["middle_50pct"]
        out.append(f"| {t['lc']} | {t['config']} | {f(a['before_issue'], 3)} / "
                   f"{f(a['issue'], 3)} / {f(a['gpu'], 3)} | {f(b['before_issue'], 3)} / "
                   f"{f(b['issue'], 3)} / {f(b['gpu'], 3)} |")
    return out + [""]


def events_section(d: Any) -> list[str]:
    """timeline_be.py --events beside profiled timelines: the idle before LC
    split at the predicted and host arrival, BE's own idle at its queueing."""
    if not d:
        return []
    head = ["run", "config", "BE steps/s", "GPU busy", "idle before LC, ms: dry / late / issue",
            "idle BE to BE, ms: issuer late / waited", "BE ms/step", "LC p99 (ms)",
            "arrival to LC's GPU start, us p50"]
    out = ["### Where a training job's GPU time goes, without the profiler (`--events`)", "",
           d["provenance"], ""] + [f"- {x}" for x in d.get("findings", [])]
    out += ["", "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for st in d["sets"]:
        for r in st["runs"]:
            tl = r["timeline"]
            if r["config"] == "lake-lc-alone" or "gpu_busy_share" not in tl:
                continue
            bl, bi = tl.get("before_lc", {}), tl.get("be_idle")
            ms = bl.get("ms")
            dry = (" / ".join(f"{ms[k]:.0f}" for k in ("queue_dry", "late", "issue")) if ms
                   else _idle(tl, "before_lc"))
            be = (f"{bi['issuer_late_ms']:.0f} / {bi['waited_ms']:.0f}" if bi and "waited_ms" in bi
                  else _idle(tl, "be_be"))
            a2k = bl.get("arrival_to_kernel_us", {}).get("p50")
            out.append("| " + " | ".join([
                st["label"], f"{st['lc']}+{st['be']} {r['config']}", f"{r['be_steps_per_s']:.0f}",
                f"{tl['gpu_busy_share']:.2f}", dry, be, f(tl.get("be_kernel_ms_per_step"), 3),
                f(r.get("lc_p99_ms"), 3), f"{a2k:.0f}" if a2k is not None else "-"]) + " |")
    return out + [""]


def duty_section(d: Any, main: Any) -> list[str]:
    """The lake rows at stop 21's defaults beside the main table of then (be_duty 1)."""
    if not d:
        return []
    old = {(r["lc_work"], r["be_work"]): r for r in (main or {}).get("runs", [])
           if r["config"] == "lake"}
    iso = _iso_p99(d)
    out = ["### lake at stop 21's defaults", "",
           f"The lake rows of {d.get('provenance', 'another run.')} Knobs: laked's defaults "
           f"(`be_duty` {d['knobs']['be_duty']}, `clock_slip` {d['knobs']['clock_slip']}, "
           f"`join_small` {d['knobs'].get('join_small', 'n/a')}, "
           f"`learn_whole` {d['knobs'].get('learn_whole', 'n/a')}). "
           "Last columns: the main table of then (e03f104: `be_duty` 1, LC's gate shut by a "
           "driver call), and the time be_duty's gaps left the GPU idle.", "",
           "| LC+BE | isolated p99 (ms) | LC p50 / p99 (ms) | p99 / isolated | BE / solo | "
           "target | e03f104: p99 / isolated, BE | BE idle gaps (s) |",
           "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    met = 0
    for r in d["runs"]:
        if r["config"] != "lake":
            continue
        ok = _met(r)
        met += ok
        o = old.get((r["lc_work"], r["be_work"]))
        prev = f"{f(o['lc_p99_ratio'])}x, {f(o['be_ratio'])}" if o else "-"
        out.append(f"| {r['lc_work']}+{r['be_work']} | {f(iso[r['lc_work']], 3)} | "
                   f"{f(r['lc']['p50_ms'], 3)} / {f(r['lc']['p99_ms'], 3)} | "
                   f"{f(r['lc_p99_ratio'])}x | {f(r['be_ratio'])} | "
                   f"{'**met**' if ok else 'missed'} | {prev} | "
                   f"{f(r.get('be_pacer', {}).get('gap_s'))} |")
    n = sum(1 for r in d["runs"] if r["config"] == "lake")
    return out + ["", f"Target met on {met} of {n} pairs in this run.", ""]


def sm_target_section(d: Any) -> list[str]:
    """probe_sm_target.py: GEMM pieces on a partition, with and without
    cuBLAS's SM count target."""
    if not d:
        return []
    out = ["### GEMM pieces on fewer SMs, and cuBLAS's SM count target", "",
           d["provenance"], "",
           "Time on the partition over time on all SMs (one wave would be "
           "132 / SMs: 1.06 for 124, 1.32 for 100):", "",
           "| M | SMs | mm on all SMs (ms) | mm | mm, target set | addmm | addmm, target set |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in d["rows"]:
        out.append(f"| {r['m']} | {r['sms']} | {f(r['mm_all_ms'], 3)} | "
                   f"{f(r['mm_part_ratio'])} | {f(r['mm_part_target_ratio'])} | "
                   f"{f(r['addmm_part_ratio'])} | {f(r['addmm_part_target_ratio'])} |")
    return out + [""]


def power_section(d: Any) -> list[str]:
    """probe_power_sms.py: a BE GEMM loop's rate, clock and power on fewer SMs."""
    if not d:
        return []
    out = ["### The SM clock beside a BE GEMM loop, on fewer SMs and after it stops", "",
           d["provenance"], "",
           "| BE's SMs | GEMMs/s (share of all SMs') | SM MHz | W | LC after (ms) |",
           "| --- | --- | --- | --- | --- |"]
    for r in d["rows"]:
        out.append(f"| {r['sms']} | {f(r['steps_per_s'], 1)} ({f(r['rate_vs_all'])}) | "
                   f"{r['sm_mhz']:.0f} | {r['watts']:.0f} | {f(r['lc_after_ms'], 3)} |")
    out += ["", "After the loop on every SM stops (LC alone after the gap):", "",
            "| gap (ms) | SM MHz | LC (ms) |", "| --- | --- | --- |"]
    for r in d["recovery"]:
        out.append(f"| {r['gap_ms']:g} | {r['sm_mhz']:.0f} | {f(r['lc_ms'], 3)} |")
    return out + [""]


def issue_section(d: Any) -> list[str]:
    """issue_cost.py: what a BE job's issuer pays per op and per atom boundary."""
    if not d:
        return []
    out = ["### What the BE issuer pays per op and per atom boundary", "", d["provenance"], "",
           "Driver calls and dispatch (ns per call, median of 7 batches):", "",
           "| call | " + " | ".join(d["runs"]) + " |", "| --- |" + " --- |" * len(d["runs"])]
    runs = list(d["runs"].values())
    for sect in ("driver_ns", "dispatch_ns"):
        for k in runs[0][sect]:
            out.append(f"| {k} | " + " | ".join(f"{r[sect][k]:.0f}" for r in runs) + " |")
    out += ["", "Training steps (ms per step; boundary: issuer time per atom boundary, "
            "queue waits included):", "",
            "| code | config | wall | CPU | atoms | boundary (us) | waiting for queue room |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in d["runs"].items():
        for s in r["steps"]:
            b = s.get("boundary_us_atom")
            out.append(f"| {name} | {s['config']} | {f(s['ms_step'], 3)} | "
                       f"{f(s['cpu_ms_step'], 3)} | {f(s.get('atoms_step'), 1)} | "
                       f"{f(b, 0) if b else '-'} | {f(s.get('wait_depth_ms_step'), 3)} |")
    out += ["", "Timed (us per step, at 400 us atoms):", "",
            "| function | " + " | ".join(d["runs"]) + " |", "| --- |" + " --- |" * len(d["runs"])]
    timed = [next(s for s in r["steps_timed"] if s["config"].endswith("400 us")) for r in runs]
    for k in timed[0]["us_per_step"]:
        out.append(f"| {k} | " + " | ".join(
            f"{t['us_per_step'][k]:.0f} ({t['calls_per_step'][k]:g} calls)" for t in timed) + " |")
    return out + [""]


def split_section(d: Any, title: str) -> list[str]:
    """kinfer_split.py: kernel INFER's round trip cut into its steps, per mode."""
    if not d:
        return []
    parts = list(d["runs"][0]["result"]["interleaved"]["direct"]["parts_p50_us"])
    head = "| code | BE | mode | p50 ms | p99 ms | p50 x | p99 x | " + " | ".join(parts) + " |"
    rule = "| --- " * (7 + len(parts)) + "|"
    out = [f"### {title}", "", d["provenance"], "",
           "Medians of each step (us), interleaved rounds:", "", head, rule]
    tails = ["", "Mean of each step (us) over the slowest 1 % of round trips:", "", head, rule]
    for r in d["runs"]:
        for mode, m in r["result"]["interleaved"].items():
            cells = (f"| {r['label'].split(':')[0]} | {r['be']} | {mode} | {f(m['p50_ms'], 3)} | "
                     f"{f(m['p99_ms'], 3)} | {f(m['p50_x'])} | {f(m['p99_x'])} | ")
            out.append(cells + " | ".join(f"{v:.0f}" for v in m["parts_p50_us"].values()) + " |")
            tails.append(cells + " | ".join(f"{v:.0f}" for v in
                                            m["parts_slowest_1pct_us"].values()) + " |")
    return out + tails + [""]


def main() -> int:
    lines = ["# lake benchmarks", "",
             "Generated by `scripts/bench/report.py` from the JSON files in `docs/bench/` "
             "(each written by the script named in it). Every figure is a ratio against a "
             "baseline measured in the same run, with median and p99 over many samples.", ""]
    rt, feat, gpu = load("vm_roundtrip.json"), load("vm_features.json"), load("dataplane_gpu.json")
    lines += vm_section(rt, feat)
    lines += gpu_section(gpu)
    lines += crossover(feat, gpu)
    sched = load("sched_gpu.json")
    # the main table before stop 26's: the older sections were measured against it
    before = load("sched_gpu_e03f104.json")
    lines += sched_section(sched)
    ab = ab_section

    def against(main: Any) -> Callable[[Any, str], list[str]]:
        """A run's lake rows beside the main table they were measured against."""
        return lambda d, title: repeat_section(d, main, title)
    rep, rep_now = against(before), against(sched)
    rep_s26 = against(load("sched_gpu_a04b716.json"))
    rep_s27 = against(load("sched_gpu_dc77b5d.json"))
    rep_s28 = against(load("sched_gpu_7d802b1.json"))
    rep_s30 = against(load("sched_gpu_b8fb4cf.json"))
    rep_s32 = against(load("sched_gpu_61685c3.json"))
    rep_s33 = against(load("sched_gpu_f073392.json"))
    branch = against(load("sched_gpu_previous.json"))

    def untitled(section: Callable[[Any], list[str]]) -> Callable[[Any, str], list[str]]:
        return lambda d, _title: section(d)

    # (renderer, results file, title), in the page's order
    sections: list[tuple[Callable[[Any, str], list[str]], str, str]] = [
        (rep_now, "sched_gpu_s34_rep.json",
         "Stop 34: the whole table again, same code (4907adb), a fresh machine start"),
        (rep_now, "sched_gpu_s34_third.json",
         "Stop 34: attn and gemm LC a third time, same code (4907adb)"),
        (split_section, "kinfer_split_s34.json",
         "Stop 34: kernel INFER alone, bare (no BE tenant) against gated, same code"),
        (rep_now, "sched_gpu_f073392.json",
         "Stop 33's main table (f073392, `atom_us` 400): its lake rows"),
        (rep_s33, "sched_gpu_d6cb55e_gemm_train.json",
         "Stop 33: gemm LC beside training at HEAD's defaults (d6cb55e, `atom_us` 500)"),
        (variants_section, "atom500_ab.json",
         "Stop 33: a heavy issuer's atoms of 500 us (`atom_us` 500), interleaved A/B beside "
         "training and the GEMM loop (adopted)"),
        (split_section, "kinfer_split_s33.json",
         "Stop 33: kernel INFER alone, bare (no BE tenant) against gated"),
        (rep_s33, "sched_gpu_79dd8da_half.json",
         "Stop 33: attn and kinfer LC on stop 32's HEAD (79dd8da), another process"),
        (rep_now, "sched_gpu_61685c3.json", "Stop 32's main table (61685c3): its lake rows"),
        (rep_s32, "sched_gpu_f477b29.json",
         "Stop 32: the whole table again, 61685c3's scheduler (f477b29), other processes"),
        (rep_s32, "sched_gpu_ab90327.json",
         "Stop 32: the whole table with the watchdog scanning every 50 ms (ab90327, "
         "not kept)"),
        (split_section, "kinfer_split_s32.json",
         "Stop 32: kernel INFER step by step, stop 31's tree against the bookkeeping off the "
         "kernel's path"),
        (rep_now, "sched_gpu_52a27fe.json", "Stop 31's main table (52a27fe): its lake rows"),
        (variants_section, "inline_backward_ab.json",
         "Stop 31: a BE job's backward on its own thread (`inline_backward`), interleaved "
         "A/B beside gemm, conv and kinfer LC (adopted)"),
        (variants_section, "raw_overrun_ab.json",
         "Stop 31: BE planning past kernel INFER's predicted arrival (`raw_overrun_us`, "
         "branch exp/raw-overrun), interleaved A/B on a stolen host (not merged)"),
        (rep_now, "sched_gpu_b8fb4cf.json", "Stop 30's main table (b8fb4cf): its lake rows"),
        (rep_s30, "sched_gpu_s30_rep.json",
         "Stop 30: the whole table again, same tree (b8fb4cf), other processes"),
        (split_section, "kinfer_split_s30.json",
         "Stop 30: kernel INFER step by step, stop 29's tree against the flat INFER batch"),
        (variants_section, "kinfer_knobs_s30_ab.json",
         "Stop 30: kernel INFER beside BE under park_raw and without the hold, "
         "interleaved A/B (defaults kept)"),
        (rep_now, "sched_gpu_7d802b1.json", "Stop 28's main table (7d802b1): its lake rows"),
        (rep_s28, "sched_gpu_s29_kinfer.json",
         "Stop 29: kinfer LC on the INFER gate's host store, three processes (all with steal)"),
        (split_section, "kinfer_split.json",
         "Kernel INFER through the arbiter alone and beside BE: its round trip step by step"),
        (variants_section, "kinfer_hold_ab2.json",
         "Kernel INFER: BE's Python held through each batch, again beside the gate's host "
         "store, interleaved A/B (kept)"),
        (variants_section, "unstick_ab.json",
         "A held BE issuer opening a stuck LC request's gates (`unstick_ms` 5), interleaved "
         "A/B (adopted)"),
        (rep_s28, "sched_gpu_steal.json",
         "The training pairs in four processes, with the host's steal time"),
        (rep_s28, "sched_gpu_s28_call3.json",
         "Every pair once more, the call before the table's (stop 27's scheduler)"),
        (rep_now, "sched_gpu_dc77b5d.json", "Stop 27's main table (dc77b5d): its lake rows"),
        (rep_s27, "sched_gpu_s27_call3.json",
         "Stop 27: gemm and attn LC beside mem and train again, on a fresh machine"),
        (variants_section, "kinfer_hostfirst_ab.json",
         "Kernel INFER: BE's Python held through each batch (`host_first_us`), interleaved "
         "A/B (adopted)"),
        (variants_section, "be_duty90_ab.json",
         "`be_duty` 0.9 beside the GEMM loop, interleaved A/B (not adopted)"),
        (rep_now, "sched_gpu_a04b716.json", "Stop 26's main table (a04b716): its lake rows"),
        (rep_s26, "sched_gpu_a04b716_call3.json",
         "Stop 26: conv and attn LC in the call before its table's (same code, same machine)"),
        (variants_section, "host_first_ab.json",
         "LC requests' host paths before BE's Python (`host_first_us` 100), interleaved "
         "A/B (adopted)"),
        (untitled(tail_section), "timeline_tail.json", ""),
        (rep_now, "sched_gpu_e03f104.json",
         "The main table before stop 26 (e03f104): its lake rows"),
        (untitled(lambda d: duty_section(d, before)), "sched_gpu_duty.json", ""),
        (variants_section, "sched_gpu_reps3.json",
         "lake at the defaults with `fill_pointwise`, every pair three times in one process"),
        (variants_section, "sched_gpu_reps3_gemm.json",
         "The same for gemm LC, once more"),
        (variants_section, "light_atom_ab.json",
         "Shorter atoms for light issuers (`light_atom_us` 300), interleaved A/B (adopted; "
         "the kinfer rows are from a machine whose isolated kinfer p99 ran 0.7-2.5 ms)"),
        (variants_section, "fill_ab.json",
         "Cutting a pointwise op to fill the room before LC (`fill_pointwise`), "
         "interleaved A/B (adopted)"),
        (variants_section, "park_one_light_ab.json",
         "`park_one` for light issuers only (host time per GPU second at most 0.5), "
         "interleaved A/B (adopted; the kinfer rows are an A/A)"),
        (variants_section, "issue_guard_ab.json",
         "A heavy issuer stopped before LC's arrival and resumed once LC's request was "
         "queued (`issue_guard`), interleaved A/B (tried, dropped)"),
        (variants_section, "atom300_ab.json",
         "BE atoms of 300 us, a probe (not adopted: training collapses)"),
        (variants_section, "park_one_ab.json",
         "One atom parked behind LC, the issuer asleep until LC came (`park_one` for every "
         "issuer), interleaved A/B (stop 23: off; now keyed to the issuer's weight)"),
        (variants_section, "sched_gpu_reps.json",
         "lake at the defaults, every pair three times in one process"),
        (variants_section, "sched_gpu_reps2.json",
         "The same, on another machine (training's BE lower on it)"),
        (variants_section, "lead_ab.json",
         "A lead before LC's predicted arrival (`lead_us`), interleaved A/B (not adopted)"),
        (variants_section, "kinfer_gil_ab.json",
         "Kernel INFER beside training: a shorter GIL switch interval, A/B (not adopted)"),
        (rep, "sched_gpu_duty_repeat.json",
         "lake at the defaults: the training pairs and gemm+gemm again"),
        (ab, "join_learn_ab.json",
         "Small ops joining the atom before them, and learned whole-op estimates, A/B"),
        (ab, "join_learn_parts_ab.json", "The same two changes one at a time (first version), A/B"),
        (rep, "sched_gpu_duty_prev.json",
         "The previous stop's defaults run (8fd9bdf: neither change)"),
        (ab, "gate_host_ab.json",
         "LC's gate shut by a host store instead of a driver call, same machine, A/B"),
        (ab, "be_duty_host_ab.json", "`be_duty` once LC's gate is shut from the host, A/B"),
        (untitled(events_section), "timeline_events.json", ""),
        (ab, "gil_switch_ab.json",
         "A shorter GIL switch interval (`gil_switch_us`, tried, dropped), A/B"),
        (ab, "issuer_ab.json", "The previous stop's pacer against main's then, same machine, A/B"),
        (untitled(issue_section), "issue_cost.json", ""),
        (ab, "depth_ab.json", "A deeper BE queue beside LC (`depth`), A/B"),
        (ab, "fill_hold_ab.json", "Issuing beside a running LC request, and filling the room "
         "with a cut op (tried, dropped), A/B"),
        (ab, "be_duty_ab.json",
         "BE's duty while LC is active (`be_duty`), fixed and governed, A/B"),
        (untitled(timeline_section), "timeline_train.json", ""),
        (ab, "train_tried_ab.json",
         "Training as BE: estimates, atom grouping and cutting, A/B (tried, dropped)"),
        (rep, "sched_gpu_repeat.json", "Another run, same code"),
        (rep, "sched_gpu_previous.json", "The previous table"),
        (ab, "be_sms_ab.json",
         "BE on fewer SMs while LC is active (`be_sms`, off by default), A/B"),
        (ab, "be_sms_target_ab.json", "`be_sms` with cuBLAS's SM count target, A/B"),
        (untitled(sm_target_section), "sm_target.json", ""),
        (untitled(power_section), "power_sms.json", ""),
        (ab, "room_split_ab.json", "Cutting an op to fill the room before LC's next request "
         "(branch exp/room-split, not landed), A/B"),
        (ab, "kinfer_child_ab.json", "Kernel INFER: lake.ko's side out of laked's process, "
         "INFER ends once done, A/B"),
        (ab, "park_raw_child_ab.json", "Parking behind kernel INFER (`park_raw`), with the "
         "kernel side out of process, A/B"),
        (ab, "steady_atoms_ab.json", "Longer BE atoms while LC keeps its rhythm (tried, dropped)"),
        (ab, "park_raw_ab.json",
         "Parking behind kernel INFER (`park_raw`), kernel side in process, A/B"),
        (ab, "hold_wake_ab.json", "When a held issuer wakes beside kernel INFER, A/B"),
        (ab, "held_gil_ab.json",
         "Keeping the GIL on LC's issue path (branch exp/held-gil, not landed), A/B"),
        (branch, "sched_gpu_branch.json", "Branch exp/held-gil: its full run (not landed)"),
        (untitled(graph_section), "graph_partition.json", ""),
        (untitled(trace_section), "sched_gpu_trace.json", ""),
    ]
    for render, name, title in sections:
        lines += render(load(name), title)
    (ROOT / "docs" / "benchmarks.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {ROOT / 'docs' / 'benchmarks.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

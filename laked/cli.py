"""laked's command line (click).  Every command has examples in its --help."""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import click

from . import ctl, sysfs
from .config import DEFAULT_CONFIG, DEFAULT_RUN_DIR, Config, ConfigError

log = logging.getLogger("laked")

LOG_FORMAT = "%(asctime)s laked[%(process)d] %(levelname)s %(name)s: %(message)s"


def _fail(msg: str, code: int = 1) -> None:
    click.echo(f"laked: {msg}", err=True)
    sys.exit(code)


def _need_root(what: str) -> None:
    if os.geteuid() != 0:
        _fail(f"{what} needs root (lake's netlink commands need CAP_NET_ADMIN)")


def _cfg(ctx: click.Context) -> Config:
    return Config(run_dir=Path(ctx.obj["run_dir"]))


def _call(cfg: Config, request: dict[str, Any], timeout: float = 120.0) -> dict[str, Any]:
    try:
        reply = ctl.call(cfg.sock_path, request, timeout)
    except ctl.NotRunning as e:
        _fail(f"{e}; start it with: laked start --daemon")
        raise AssertionError("unreachable")
    if not reply.get("ok"):
        _fail(str(reply.get("error", "request failed")))
    return reply


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--run-dir", default=str(DEFAULT_RUN_DIR), show_default=True,
              envvar="LAKED_RUN_DIR", help="Where the socket, pid file and log live.")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@click.pass_context
def main(ctx: click.Context, run_dir: str, verbose: bool) -> None:
    """laked: the lake daemon, lake.ko's GPU server and policy loader.

    \b
    Examples:
      insmod kmod/lake.ko && laked start --daemon
      laked policy load ebpf/threshold.bpf.c -D BATCH_MIN=16
      laked status
      laked stop
    """
    ctx.ensure_object(dict)
    ctx.obj["run_dir"] = run_dir
    ctx.obj["verbose"] = verbose


def _setup_logging(verbose: bool, path: Path | None) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    handler: logging.Handler = (logging.FileHandler(path) if path
                                else logging.StreamHandler(sys.stderr))
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logging.basicConfig(level=level, handlers=[handler], force=True)


def _running_pid(cfg: Config) -> int | None:
    try:
        pid = int(cfg.pid_path.read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


def _daemonize(cfg: Config, verbose: bool) -> None:
    """Fork twice; the parent exits once the child is ready or failed."""
    rfd, wfd = os.pipe()
    if os.fork() > 0:
        os.close(wfd)
        with os.fdopen(rfd) as r:
            msg = r.read()
        if msg != "ready":
            _fail(msg or "daemon exited before it was ready; see " + str(cfg.log_path))
        click.echo(f"laked: started (pid {cfg.pid_path.read_text().strip()}, "
                   f"log {cfg.log_path})")
        sys.exit(0)
    os.close(rfd)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    _setup_logging(verbose, cfg.log_path)
    cfg.pid_path.write_text(f"{os.getpid()}\n")

    def ready(err: str | None) -> None:
        os.write(wfd, b"ready" if err is None else err.encode())
        os.close(wfd)

    try:
        from .daemon import Daemon  # BCC and friends: only the daemon pays
        code = Daemon(cfg).run(ready)
    except Exception as e:  # reported through the pipe and the log
        log.error("laked failed: %s", e)
        code = 1
    finally:
        cfg.pid_path.unlink(missing_ok=True)
    os._exit(code)


@main.command()
@click.option("--daemon", "background", is_flag=True,
              help="Run in the background with a pid file.")
@click.option("--executor", type=click.Choice(["auto", "gpu", "cpu"]), default="auto",
              show_default=True,
              help="Who carries out requests: gpu (CUDA), cpu, or gpu when one works.")
@click.option("--no-module", is_flag=True,
              help="Serve user clients (RUN_DIR/lake.sock) and the repository only: no "
                   "lake.ko, no /dev/lake, no netlink or BCC.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
              help=f"Configuration file (TOML) [default: {DEFAULT_CONFIG}, if it exists].")
@click.pass_context
def start(ctx: click.Context, background: bool, executor: str, no_module: bool,
          config_file: str | None) -> None:
    """Register with lake.ko and serve it and user clients (foreground unless --daemon).

    User programs connect through the lake library (lake.Client) on
    RUN_DIR/lake.sock; the configuration file sets their per-uid quotas,
    the kernel's tenant and the model repository.

    \b
    Examples:
      laked start              # foreground, logs on stderr, Ctrl-C stops
      laked start --daemon     # background, log in RUN_DIR/laked.log
      laked start --executor cpu
      laked start --no-module --executor gpu     # GPU machine without lake.ko
      laked start --config /etc/lake/laked.toml

    \b
    A configuration file (every key optional):
      [kernel]
      class = "LC"             # the kernel's tenant: LC or BE
      [repository]
      path = "/var/lib/lake/repo"
      [quota.default]
      classes = ["BE"]
      max_sms = 64
      [quota.uid.1000]
      classes = ["LC", "BE"]
    """
    if os.geteuid() != 0:
        _fail("laked start needs root (it serves every user's clients; with lake.ko, "
              "its netlink commands need CAP_NET_ADMIN)")
    try:
        cfg = Config.load(Path(config_file) if config_file else None,
                          run_dir=Path(ctx.obj["run_dir"]), executor=executor,
                          module=not no_module)
    except ConfigError as e:
        _fail(str(e))
        raise AssertionError("unreachable") from e
    if cfg.module and not sysfs.loaded():
        _fail("lake.ko is not loaded (/sys/kernel/lake is missing); "
              "run: insmod kmod/lake.ko (or serve user clients only: laked start --no-module)")
    pid = _running_pid(cfg)
    if pid is not None:
        _fail(f"laked is already running (pid {pid})")
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    if background:
        _daemonize(cfg, ctx.obj["verbose"])
        return
    _setup_logging(ctx.obj["verbose"], None)
    cfg.pid_path.write_text(f"{os.getpid()}\n")
    try:
        from .daemon import Daemon
        sys.exit(Daemon(cfg).run())
    except Exception as e:  # a clear line instead of a traceback
        _fail(str(e))
    finally:
        cfg.pid_path.unlink(missing_ok=True)


@main.command()
@click.option("--timeout", default=10.0, show_default=True, help="Seconds to wait.")
@click.pass_context
def stop(ctx: click.Context, timeout: float) -> None:
    """Stop the running laked (its policy is detached).

    \b
    Example:
      laked stop
    """
    cfg = _cfg(ctx)
    pid = _running_pid(cfg)
    try:
        ctl.call(cfg.sock_path, {"op": "stop"}, timeout)
    except ctl.NotRunning:
        click.echo("laked: not running", err=True)
        return
    deadline = time.monotonic() + timeout
    while pid is not None and time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except OSError:
            break
        time.sleep(0.05)
    else:
        if pid is not None:
            _fail(f"laked (pid {pid}) did not stop within {timeout}s")
    click.echo("laked: stopped")


def _module_status() -> dict[str, Any]:
    from .genl import Control, ControlError, ModuleNotLoaded
    try:
        with Control() as c:
            return c.status()
    except (ModuleNotLoaded, ControlError) as e:
        return {"error": str(e)}


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Show lake.ko's state (sysfs and netlink) and the daemon's.

    \b
    Examples:
      laked status
      laked status --json | jq .module.stat_gpu
    """
    cfg = _cfg(ctx)
    from . import features as feats
    out: dict[str, Any] = {"sysfs": sysfs.read_all(), "module": None, "daemon": None,
                           "models": sysfs.models(),
                           "features": [{"name": f.name, "captured": f.captured,
                                         "dropped": f.dropped} for f in feats.list_all()]}
    if sysfs.loaded():
        out["module"] = _module_status()
    try:
        reply = ctl.call(cfg.sock_path, {"op": "status"}, 10)
        out["daemon"] = reply.get("status")
    except ctl.NotRunning:
        pass
    if as_json:
        click.echo(json.dumps(out, indent=2, sort_keys=True))
        return
    _print_status(out)


def _print_status(out: dict[str, Any]) -> None:
    fs = out["sysfs"]
    if not fs:
        click.echo("lake.ko:   not loaded")
    else:
        click.echo(f"lake.ko:   loaded, ABI {fs.get('version')}, "
                   f"enabled={fs.get('enabled')}")
        click.echo(f"  daemon:  {fs.get('daemon')}")
        click.echo(f"  policy:  {fs.get('policy')}")
        for key in sorted(fs):
            if key not in ("version", "enabled", "daemon", "policy", "stats"):
                click.echo(f"  {key}: {fs[key]}")
        stats = " ".join(line.replace(" ", "=") for line in fs.get("stats", "").splitlines())
        click.echo(f"  stats:   {stats}")
    for m in out.get("models", []):
        st = m["stats"]
        click.echo(f"  model {m['name']} (id {m['id']}): {m['weights']}; cpu {st['cpu_runs']} "
                   f"runs, gpu {st['gpu_runs']} runs, fallbacks {st['fallbacks']}")
    for f in out.get("features", []):
        click.echo(f"  feature {f['name']}: captured {f['captured']}, dropped {f['dropped']}")
    d = out["daemon"]
    if d is None:
        click.echo("laked:     not running")
        return
    pol = d.get("policy")
    module = ("not used (--no-module)" if d.get("mode") == "no-module"
              else "connected" if d["module_connected"] else "waiting")
    executor = d["executor"] or "one per client"
    click.echo(f"laked:     pid {d['pid']}, up {d['uptime_s']}s, executor {executor}, "
               f"module {module}")
    dp = d.get("dataplane")
    if dp:
        reg = dp.get("region_copies") or (
            "registered with CUDA (zero-copy)" if dp["region_registered"]
            else "not registered (staging copies)" if dp["executor"] == "gpu"
            else "CPU executor")
        srv = dp["server"]
        if dp.get("executor_why"):
            click.echo(f"  executor: {dp['executor']} ({dp['executor_why']})")
        click.echo(f"  region:  {dp['region_mb']} MiB, {reg}; requests {srv['requests']}, "
                   f"errors {srv['errors']}, deferred {srv.get('deferred', 0)}")
    click.echo(f"  policy:  {pol['name'] + ' (' + pol['path'] + ')' if pol else 'none'}")
    util = d["gpu_util"]
    click.echo(f"  gpu_util: {util['value']}% ({util['source']})")
    delay = d.get("sched_delay_us")
    if delay:
        click.echo(f"  sched_delay: {delay['value']} us ({delay['source']})")
    _print_arbiter(d.get("arbiter"), d.get("clients") or [])


def _fmt(v: Any, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def _print_arbiter(arb: dict[str, Any] | None, clients: list[dict[str, Any]]) -> None:
    if not arb:
        return
    why = f" ({arb['why']})" if arb.get("why") else ""
    sms = f", {arb['total_sms']} SMs" if arb.get("total_sms") else ""
    click.echo(f"  arbiter: {arb['device']}{sms}{why}; queue delay "
               f"{arb.get('queue_delay_us', 0)} us, gates reopened by the watchdog "
               f"{arb.get('gates_forced_open', 0)}")
    for t in arb.get("tenants", []):
        click.echo(f"  tenant {t['name']} [{t['class']} {t['kind']} uid {t['uid']}]: "
                   f"{t['sms'] or 'cpu'} SMs ({t.get('partition', '-')}), requests "
                   f"{t['requests']}, p50 {_fmt(t['p50_ms'])} ms, p99 {_fmt(t['p99_ms'])} ms, "
                   f"atoms {t['atoms']}, launches {t.get('launches', 0)}, items {t['items']}, energy {t['energy_j']:.1f} J")
    for r in arb.get("rightsizing", []):
        click.echo(f"  right-size {r['kernel']}: {r['sms']} SMs; l(t)={r['m_us_sm']:.0f}/t"
                   f"+{r['b_us']:.0f} us, fit error {_fmt(r['fit_error'], '.1%')}, "
                   f"predictions {r['predictions']}, misses {r['misses']} (>50 us), mean "
                   f"error {r['mean_abs_err_us']:.0f} us")
    adv = (arb.get("power") or {}).get("advice")
    if adv:
        click.echo(f"  power (advice only): {adv['advised_mhz']} MHz of {adv['f_max_mhz']} "
                   f"for <= {adv['predicted_slowdown']:.1%} slowdown, about "
                   f"{adv['predicted_energy_saving']:.0%} less energy")
    duty = arb.get("be_duty")
    if duty and duty.get("target_mhz"):
        click.echo(f"  BE duty beside LC: {duty['now']:.2f} (SM clock {duty['sm_mhz']:.0f} MHz, "
                   f"the governor's target {duty['target_mhz']} MHz)")
    for c in clients:
        click.echo(f"  client {c['tenant']} (pid {c['pid']}, uid {c['uid']}): "
                   f"{c.get('device_bytes', 0) >> 20} MiB on the device")


@main.group()
def policy() -> None:
    """Load or unload the eBPF policy that picks CPU or GPU."""


def _parse_defines(defines: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for d in defines:
        name, sep, value = d.partition("=")
        if not sep or not name.isidentifier():
            raise click.BadParameter(f"{d!r}: expected NAME=VALUE", param_hint="-D")
        out[name] = value
    return out


@policy.command("load")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("-D", "defines", multiple=True, metavar="NAME=VALUE",
              help="Compile-time parameter of the policy (repeatable).")
@click.pass_context
def policy_load(ctx: click.Context, file: str, defines: tuple[str, ...]) -> None:
    """Compile FILE with BCC and attach it; the old policy stays if this fails.

    \b
    Examples:
      laked policy load ebpf/threshold.bpf.c
      laked policy load ebpf/threshold.bpf.c -D BATCH_MIN=64 -D UTIL_MAX=50
      laked policy load ebpf/cpu-only.bpf.c
    """
    reply = _call(_cfg(ctx), {"op": "policy_load", "path": str(Path(file).resolve()),
                              "defines": _parse_defines(defines)})
    p = reply["policy"]
    click.echo(f"laked: policy {p['name']} attached (prog id {p['prog_id']})")


@policy.command("unload")
@click.pass_context
def policy_unload(ctx: click.Context) -> None:
    """Detach the policy; lake.ko falls back to its built-in rule.

    \b
    Example:
      laked policy unload
    """
    _call(_cfg(ctx), {"op": "policy_unload"})
    click.echo("laked: policy detached (built-in rule in use)")


@main.group()
def util() -> None:
    """Pin or unpin the GPU utilisation that policies read (map gpu_util)."""


@util.command("set")
@click.argument("percent", type=click.IntRange(0, 100))
@click.pass_context
def util_set(ctx: click.Context, percent: int) -> None:
    """Pin gpu_util at PERCENT (e.g. to keep kernel work off a busy GPU).

    \b
    Example:
      laked util set 95
    """
    _call(_cfg(ctx), {"op": "util", "value": percent})
    click.echo(f"laked: gpu_util pinned at {percent}%")


@util.command("auto")
@click.pass_context
def util_auto(ctx: click.Context) -> None:
    """Measure gpu_util again (NVML, or 0 without a GPU).

    \b
    Example:
      laked util auto
    """
    reply = _call(_cfg(ctx), {"op": "util", "value": None})
    click.echo(f"laked: gpu_util measured ({reply['source']}): {reply['gpu_util']}%")


SCHED_DELAY_MAX_US = 10_000_000     # laked/daemon.py checks it too, for other clients


@main.group("sched")
def sched_group() -> None:
    """The GPU arbiter as kernel policies see it."""


@sched_group.group("delay")
def sched_delay() -> None:
    """Pin or unpin the queue delay for kernel work that policies read
    (context queue_delay_us, e.g. ebpf/contended.bpf.c)."""


# ignore_unknown_options: "-1" reaches the range check instead of "no such option"
@sched_delay.command("set", context_settings={"ignore_unknown_options": True})
@click.argument("us", metavar="MICROSECONDS", type=click.IntRange(0, SCHED_DELAY_MAX_US))
@click.pass_context
def sched_delay_set(ctx: click.Context, us: int) -> None:
    """Pin the queue delay kernel work sees at MICROSECONDS (0..10000000),
    e.g. to test a policy or to keep kernel work off a GPU you know is busy.

    \b
    Examples:
      laked sched delay set 5000     # contended.bpf.c (DELAY_MAX_US=2000) -> CPU
      laked sched delay set 0
    """
    if os.geteuid() != 0:
        _fail("laked sched delay set needs root (it changes what policies decide)")
    _call(_cfg(ctx), {"op": "sched_delay", "value": us})
    click.echo(f"laked: sched delay pinned at {us} us")


@sched_delay.command("auto")
@click.pass_context
def sched_delay_auto(ctx: click.Context) -> None:
    """Report the arbiter's own queue delay again (0 without an arbiter).

    \b
    Example:
      laked sched delay auto
    """
    if os.geteuid() != 0:
        _fail("laked sched delay auto needs root (it changes what policies decide)")
    reply = _call(_cfg(ctx), {"op": "sched_delay", "value": None})
    click.echo(f"laked: sched delay automatic: {reply['sched_delay_us']} us "
               f"({reply['source']})")


def _control() -> Any:
    from .genl import Control, ControlError, ModuleNotLoaded
    try:
        return Control()
    except (ModuleNotLoaded, ControlError) as e:
        _fail(str(e))


@main.group()
def model() -> None:
    """Push, list and delete the models lake.ko runs (fixed-point MLPs)."""


@model.command("push")
@click.argument("name")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--frac", type=click.IntRange(0, 24), default=16, show_default=True,
              help="Fixed-point fraction bits.")
def model_push(name: str, file: str, frac: int) -> None:
    """Quantise FILE (.npz with float w0,b0,w1,b1,...; w as [out, in]) and make
    it NAME's weights.  Inferences already running finish on the old ones.

    \b
    Example:
      laked model push linnos weights.npz
    """
    _need_root("laked model push")
    from .genl import ControlError
    from .mlp import ModelError, load_file
    try:
        fixed = load_file(Path(file), frac)
    except ModelError as e:
        _fail(str(e))
        return
    with _control() as c:
        try:
            mid, version = c.model_push(name, fixed.frac, fixed.layers())
        except ControlError as e:
            _fail(f"model push refused: {e}")
            return
    shape = "x".join(str(d) for d in fixed.shape)
    click.echo(f"laked: model {name} (id {mid}) now has weights version {version}, "
               f"shape {shape}, frac {fixed.frac}")


@model.command("del")
@click.argument("name")
def model_del(name: str) -> None:
    """Delete model NAME (kernel users keep theirs until they close it).

    \b
    Example:
      laked model del linnos
    """
    _need_root("laked model del")
    from .genl import ControlError
    with _control() as c:
        try:
            c.model_del(name)
        except ControlError as e:
            _fail(f"model del {name}: {e}")
    click.echo(f"laked: model {name} deleted")


@model.command("list")
def model_list() -> None:
    """Show models with their weights and per-side counters.

    \b
    Example:
      laked model list
    """
    for m in sysfs.models():
        click.echo(f"{m['name']:<16} id {m['id']:<3} {m['weights']}")
        click.echo("    " + " ".join(f"{k}={v}" for k, v in m["stats"].items()))


@main.group()
def cost() -> None:
    """Pin or unpin a model's latency table (map costs of cost policies)."""


@cost.command("set")
@click.argument("model_id", type=click.IntRange(1, 63))
@click.argument("cpu_ns_per_item", type=click.IntRange(0, 2**32 - 1))
@click.argument("gpu_ns_fixed", type=click.IntRange(0, 2**32 - 1))
@click.argument("gpu_ns_per_item", type=click.IntRange(0, 2**32 - 1))
@click.pass_context
def cost_set(ctx: click.Context, model_id: int, cpu_ns_per_item: int, gpu_ns_fixed: int,
             gpu_ns_per_item: int) -> None:
    """Pin MODEL_ID's costs instead of the measured ones.

    \b
    Example:
      laked cost set 1 2000 50000 100    # GPU wins from batch 26
    """
    _call(_cfg(ctx), {"op": "cost", "model": model_id,
                      "cost": [cpu_ns_per_item, gpu_ns_fixed, gpu_ns_per_item]})
    click.echo(f"laked: model {model_id} costs pinned")


@cost.command("auto")
@click.argument("model_id", type=click.IntRange(1, 63))
@click.pass_context
def cost_auto(ctx: click.Context, model_id: int) -> None:
    """Use measured costs for MODEL_ID again.

    \b
    Example:
      laked cost auto 1
    """
    _call(_cfg(ctx), {"op": "cost", "model": model_id, "cost": None})
    click.echo(f"laked: model {model_id} costs measured")


@main.command()
@click.option("--interval", type=click.FloatRange(0.1, 60), default=1.0, show_default=True)
@click.option("--count", type=click.IntRange(0), default=0, help="Stop after N screens (0: never).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per screen.")
@click.pass_context
def top(ctx: click.Context, interval: float, count: int, as_json: bool) -> None:
    """Live per-tenant view of the GPU arbiter, then lake.ko's and laked's counters.

    Per tenant: class, kind, SMs it runs on, requests/s, items/s (throughput),
    atoms/s, launches/s (cu* kernel launches: the kernel's tenant and user
    clients' sessions), p50/p99 latency (recent requests), watts and joules (its share of
    the GPU's energy counter).

    \b
    Examples:
      laked top
      laked top --interval 5 --count 3
      laked top --count 1 --json | jq '.tenants[] | {name, p99_ms}'
    """
    from . import features as feats
    cfg = _cfg(ctx)

    def snap() -> tuple[dict[str, float], list[dict[str, Any]]]:
        out: dict[str, float] = {}
        tenants: list[dict[str, Any]] = []
        if sysfs.loaded():
            out.update({f"lake.{k}": v for k, v in sysfs.stats().items()})
        for m in sysfs.models():
            for k, v in dict(m["stats"]).items():  # type: ignore[arg-type]
                out[f"model {m['name']}.{k}"] = v
        for f in feats.list_all():
            out[f"feature {f.name}.captured"] = f.captured
            out[f"feature {f.name}.dropped"] = f.dropped
        try:
            st = ctl.call(cfg.sock_path, {"op": "status"}, 5).get("status") or {}
            srv = (st.get("dataplane") or {}).get("server") or {}
            for k in ("requests", "errors"):
                if k in srv:
                    out[f"laked.{k}"] = srv[k]
            tenants = list((st.get("arbiter") or {}).get("tenants") or [])
        except ctl.NotRunning:
            pass
        return out, tenants

    (prev, prev_t), shown = snap(), 0
    while count == 0 or shown < count:
        time.sleep(interval)
        cur, cur_t = snap()
        rows = _tenant_rates(prev_t, cur_t, interval)
        if as_json:
            click.echo(json.dumps({"time": time.time(), "interval_s": interval,
                                   "tenants": rows, "counters": cur}, sort_keys=True))
        else:
            click.echo(f"--- {time.strftime('%H:%M:%S')}  (per second over {interval:g}s)")
            _print_tenant_rows(rows)
            for key in sorted(cur):
                if key.endswith("_ns"):
                    continue
                rate = (cur[key] - prev.get(key, 0)) / interval
                click.echo(f"  {key:<40} {cur[key]:>14.0f} {rate:>12.1f}/s")
        prev, prev_t, shown = cur, cur_t, shown + 1


def _tenant_rates(prev: list[dict[str, Any]], cur: list[dict[str, Any]],
                  interval: float) -> list[dict[str, Any]]:
    """Per-tenant rates between two arbiter snapshots (a new tenant counts from 0)."""
    before = {t["name"]: t for t in prev}
    rows = []
    for t in cur:
        p = before.get(t["name"], {})
        d = {k: (t.get(k, 0) - p.get(k, 0)) / interval
             for k in ("requests", "items", "atoms", "launches", "energy_j")}
        rows.append({"name": t["name"], "class": t["class"], "kind": t["kind"],
                     "sms": t["sms"], "requests_per_s": d["requests"],
                     "items_per_s": d["items"], "atoms_per_s": d["atoms"],
                     "launches_per_s": d["launches"],
                     "watts": d["energy_j"], "energy_j": t["energy_j"],
                     "p50_ms": t["p50_ms"], "p99_ms": t["p99_ms"]})
    return rows


def _print_tenant_rows(rows: list[dict[str, Any]]) -> None:
    if not rows:
        click.echo("  (no tenants: laked not running, or nothing registered)")
        return
    click.echo(f"  {'TENANT':<28} {'CLASS':<5} {'KIND':<6} {'SMS':>4} {'REQ/s':>8} "
               f"{'ITEMS/s':>9} {'ATOMS/s':>8} {'LAUNCH/s':>8} {'P50ms':>7} {'P99ms':>7} {'W':>6} {'J':>9}")
    for r in rows:
        click.echo(f"  {r['name'][:28]:<28} {r['class']:<5} {r['kind']:<6} {r['sms'] or 0:>4} "
                   f"{r['requests_per_s']:>8.1f} {r['items_per_s']:>9.1f} "
                   f"{r['atoms_per_s']:>8.1f} {r['launches_per_s']:>8.1f} {_fmt(r['p50_ms']):>7} {_fmt(r['p99_ms']):>7} "
                   f"{r['watts']:>6.1f} {r['energy_j']:>9.1f}")


@main.group()
def features() -> None:
    """Feature sets kernel code captures through lake."""


@features.command("list")
def features_list() -> None:
    """Show feature sets, their fields and capture/drop counts.

    \b
    Example:
      laked features list
    """
    from . import features as feats
    for f in feats.list_all():
        fields = ",".join(f"{n}:{t}" for n, t in f.fields)
        click.echo(f"{f.name:<16} captured {f.captured} dropped {f.dropped} "
                   f"capacity {f.capacity}/cpu fields {fields}")


@features.command("record")
@click.argument("name")
@click.argument("file", type=click.Path(dir_okay=False, writable=True))
@click.option("--seconds", type=click.FloatRange(0, 86400), default=5.0, show_default=True)
def features_record(name: str, file: str, seconds: float) -> None:
    """Drain NAME's records for SECONDS into FILE (msgpack: feature, fields,
    records as [ts_ns, cpu, values] in capture order).

    \b
    Example:
      laked features record linnos_io io.msgpack --seconds 10
    """
    _need_root("laked features record")
    from . import features as feats
    try:
        with open(file, "wb") as out:
            n = feats.record(name, out, seconds)
    except FileNotFoundError as e:
        _fail(str(e))
        return
    click.echo(f"laked: {n} records of {name} written to {file}")


@main.command()
@click.option("--batch", type=click.IntRange(0, 2**32 - 1), required=True)
@click.option("--model", type=click.IntRange(0, 2**32 - 1), default=0)
@click.option("--queue-depth", type=click.IntRange(0, 2**32 - 1), default=0)
@click.option("--json", "as_json", is_flag=True)
def decide(batch: int, model: int, queue_depth: int, as_json: bool) -> None:
    """Ask lake.ko for one decision on a given context (debugging).

    \b
    Examples:
      laked decide --batch 64        # -> gpu (by policy)
      laked decide --batch 8 --json
    """
    _need_root("laked decide")
    target, by = _decide(batch, model, queue_depth)
    if as_json:
        click.echo(json.dumps({"batch": batch, "target": target, "by": by}))
    else:
        click.echo(f"batch {batch:>6} -> {target} (by {by})")


def _decide(batch: int, model: int, queue_depth: int) -> tuple[str, str]:
    from .genl import ControlError
    with _control() as c:
        try:
            d = c.decide(batch, model=model, queue_depth=queue_depth)
        except ControlError as e:
            _fail(str(e))
            raise AssertionError("unreachable") from e
    return d.target, d.by


# ---------------------------------------------------------------- repo (hosted models, jobs)
# Through the lake client library (the client socket carries the file as an
# open descriptor, so laked never opens a path a user names); imported inside
# each command so the rest of the CLI does not depend on it.

def _repo_client(ctx: click.Context) -> Any:
    import lake
    return lake.Client(_cfg(ctx).client_sock_path, name="laked-repo", cls="BE")


def _repo_do(ctx: click.Context, what: Any) -> dict[str, Any]:
    """Run ``what(client)`` and return its reply; errors become one clear line."""
    import lake
    try:
        with _repo_client(ctx) as c:
            reply = what(c)
    except lake.NotRunning as e:
        _fail(f"{e}; start it with: laked start --daemon")
        raise AssertionError("unreachable") from e
    except lake.ClientError as e:
        _fail(str(e))
        raise AssertionError("unreachable") from e
    if isinstance(reply, dict) and reply.get("ok") is False:
        _fail(str(reply.get("error", "request failed")))
    return reply if isinstance(reply, dict) else {}


@main.group("repo")
def repo_group() -> None:
    """Hosted models and best-effort jobs in laked's repository (admins change it).

    \b
    Examples:
      laked repo add model resnet resnet.pt --class LC --max-batch 32
      laked repo add job nightly train.py
      laked repo list
      laked repo remove model resnet
    """


@repo_group.group("add")
def repo_add() -> None:
    """Add a model or a job (root or a member of the admin group)."""


def _given(**opts: Any) -> dict[str, Any]:
    """The options given on the command line; laked's defaults fill the rest."""
    return {k: v for k, v in opts.items() if v is not None}


@repo_add.command("model")
@click.argument("name")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--class", "cls", type=click.Choice(["LC", "BE"]),
              help="Latency-critical or best-effort (laked's default: BE).")
@click.option("--quota-sms", type=click.IntRange(0), help="Guaranteed SMs (0: the whole GPU).")
@click.option("--priority", type=int, help="Order among tenants of its class (higher first).")
@click.option("--max-batch", type=click.IntRange(1), help="Largest batch a request may send.")
@click.option("--dtype", help="What inputs are cast to (float32, float16, bfloat16, int64, ...).")
@click.option("--warmup/--no-warmup", default=None,
              help="One discarded run inside the first request (default: on).")
@click.pass_context
def repo_add_model(ctx: click.Context, name: str, file: str, cls: str | None,
                   quota_sms: int | None, priority: int | None, max_batch: int | None,
                   dtype: str | None, warmup: bool | None) -> None:
    """Add FILE (TorchScript from torch.jit.save, or torch.export.save's .pt2) as
    model NAME; laked loads it at once and says whether it is ready.

    \b
    Examples:
      laked repo add model mlp mlp.pt
      laked repo add model resnet resnet.pt2 --class LC --quota-sms 24 --max-batch 32
      laked repo add model bert bert.pt --dtype int64 --no-warmup
    """
    config = _given(**{"class": cls, "quota_sms": quota_sms,
                       "priority": priority, "max_batch": max_batch, "dtype": dtype,
                       "warmup": warmup})
    path = str(Path(file).resolve())
    reply = _repo_do(ctx, lambda c: c.repo_add("model", name, path, config))
    fmt = f" ({reply['format']})" if reply.get("format") else ""
    click.echo(f"laked: model {name}{fmt} added, {reply.get('state', 'added')}")


@repo_add.command("job")
@click.argument("name")
@click.argument("file", metavar="FILE.py", type=click.Path(exists=True, dir_okay=False))
@click.option("--class", "cls", type=click.Choice(["BE"]),
              help="Hosted jobs are best-effort (BE).")
@click.option("--quota-sms", type=click.IntRange(0), help="Guaranteed SMs (0: the whole GPU).")
@click.option("--priority", type=int, help="Order among best-effort tenants (higher first).")
@click.pass_context
def repo_add_job(ctx: click.Context, name: str, file: str, cls: str | None,
                 quota_sms: int | None, priority: int | None) -> None:
    """Add FILE.py (it defines run(ctx) and returns once ctx.stop is set) as job
    NAME; clients start it, and it runs inside laked on a best-effort partition.

    \b
    Examples:
      laked repo add job nightly train.py
      laked repo add job embed embed_batch.py --quota-sms 48
    """
    config = _given(**{"class": cls, "quota_sms": quota_sms, "priority": priority})
    path = str(Path(file).resolve())
    _repo_do(ctx, lambda c: c.repo_add("job", name, path, config))
    click.echo(f"laked: job {name} added")


def _ms(v: Any) -> str:
    return "-" if v is None else f"{v:.2f}"


@repo_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def repo_list(ctx: click.Context, as_json: bool) -> None:
    """Show hosted models (state, load errors, latency) and jobs (who runs them).

    \b
    Examples:
      laked repo list
      laked repo list --json | jq '.models[] | select(.state == "failed")'
    """
    data = _repo_do(ctx, lambda c: c.models())
    if as_json:
        click.echo(json.dumps(data, indent=2, sort_keys=True))
        return
    models, jobs = data.get("models", []), data.get("jobs", [])
    if data.get("error"):
        click.echo(f"repository: {data['error']}")
    click.echo(f"{'MODEL':<20} {'CLASS':<5} {'FORMAT':<11} {'STATE':<7} {'BATCH':>6} "
               f"{'REQS':>8} {'P50MS':>8} {'P99MS':>8}")
    for m in models:
        click.echo(f"{m['name']:<20} {m.get('class') or '-':<5} {m.get('format') or '-':<11} "
                   f"{m['state']:<7} {m.get('max_batch') or '-':>6} {m.get('requests', 0):>8} "
                   f"{_ms(m.get('p50_ms')):>8} {_ms(m.get('p99_ms')):>8}")
        if m.get("error"):
            click.echo(f"    {m['error']}")
    click.echo(f"\n{'JOB':<20} {'CLASS':<5} {'STATE':<10} {'OWNER':<16} {'ITEMS':>10}")
    for j in jobs:
        state = str(j["state"]).split(":", 1)[0]
        click.echo(f"{j['name']:<20} {j.get('class') or '-':<5} {state:<10} "
                   f"{j.get('owner') or '-':<16} {j.get('items', 0):>10}")
        if j.get("error"):
            click.echo(f"    {j['error']}")


@repo_group.command("remove")
@click.argument("kind", type=click.Choice(["model", "job"]))
@click.argument("name")
@click.pass_context
def repo_remove(ctx: click.Context, kind: str, name: str) -> None:
    """Remove model or job NAME (a model stops serving; a job's runs stop first).

    \b
    Examples:
      laked repo remove model resnet
      laked repo remove job nightly
    """
    _repo_do(ctx, lambda c: c.repo_remove(kind, name))
    click.echo(f"laked: {kind} {name} removed")


if __name__ == "__main__":
    main()

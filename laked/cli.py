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
from .config import DEFAULT_RUN_DIR, Config

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
@click.pass_context
def start(ctx: click.Context, background: bool, executor: str) -> None:
    """Register with lake.ko and serve it (foreground unless --daemon).

    \b
    Examples:
      laked start              # foreground, logs on stderr, Ctrl-C stops
      laked start --daemon     # background, log in RUN_DIR/laked.log
      laked start --executor cpu
    """
    _need_root("laked start")
    cfg = _cfg(ctx)
    cfg.executor = executor
    if not sysfs.loaded():
        _fail("lake.ko is not loaded (/sys/kernel/lake is missing); "
              "run: insmod kmod/lake.ko")
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
    click.echo(f"laked:     pid {d['pid']}, up {d['uptime_s']}s, executor {d['executor']}, "
               f"module {'connected' if d['module_connected'] else 'waiting'}")
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
@click.pass_context
def top(ctx: click.Context, interval: float, count: int) -> None:
    """Live rates: decisions, laked requests, per-model runs, per-feature captures.

    \b
    Examples:
      laked top
      laked top --interval 5 --count 3
    """
    from . import features as feats
    cfg = _cfg(ctx)

    def snap() -> dict[str, float]:
        out: dict[str, float] = {}
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
        except ctl.NotRunning:
            pass
        return out

    prev, shown = snap(), 0
    while count == 0 or shown < count:
        time.sleep(interval)
        cur = snap()
        click.echo(f"--- {time.strftime('%H:%M:%S')}  (per second over {interval:g}s)")
        for key in sorted(cur):
            if key.endswith("_ns"):
                continue
            rate = (cur[key] - prev.get(key, 0)) / interval
            click.echo(f"  {key:<40} {cur[key]:>14.0f} {rate:>12.1f}/s")
        prev, shown = cur, shown + 1


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


if __name__ == "__main__":
    main()

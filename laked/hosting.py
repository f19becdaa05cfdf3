"""Hosted models and best-effort jobs: laked runs what admins put in the repository.

``Host`` loads every model of the repository (laked/repo.py) at start and
registers one arbiter tenant per model; ``infer`` runs a request through the
arbiter (``run_lc`` for LC models, ``be()`` for BE ones), so hosted models
share the GPU under the same scheduler as the kernel's work and user
clients.  Hosted jobs (``REPO/jobs/NAME/job.py`` with ``run(ctx)``) run in
a thread of their own inside ``arbiter.be(tenant)``.

What it never does: run code that an admin did not place in the repository
(see repo.py's trust check, done at every load and every job start), or
stop serving because one model is broken (a model that fails to load is
listed as "failed" with the reason; one that raises at run time fails that
request only).

Warm-up: the input shapes of a TorchScript model are not known in general,
so nothing runs at load time; a model with ``warmup = true`` runs one
extra, discarded forward inside its first request (at that request's
shapes), which makes the first request slower and the rest steadier.

Threads: ``infer`` may run from many client threads at once; loads and
removals are serialised by one lock, and the table of models by another
that is never held while a model runs.
"""
from __future__ import annotations

import hashlib
import importlib.util
import itertools
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .repo import JobConfig, ModelConfig, RepoError, Repository, check_name, config_dict
from .sched.base import Arbiter, TenantState
from .tenants import LC, TenantSpec

log = logging.getLogger("laked.hosting")

STOP_TIMEOUT_S = 10.0
MAX_ERROR_CHARS = 2000   # torch's messages can be pages long; the client gets the start


class HostError(RuntimeError):
    """A hosting request that failed; the message goes to the client as is."""


def tenant_name(*parts: str) -> str:
    """``a:b:c`` as a tenant name (at most 64 characters: long ones end in a hash)."""
    s = ":".join(parts)
    if len(s) <= 64:
        return s
    return s[:55] + "~" + hashlib.sha1(s.encode()).hexdigest()[:8]


def _describe(e: BaseException) -> str:
    text = str(e) if isinstance(e, (RepoError, HostError)) else f"{type(e).__name__}: {e}"
    return text if len(text) <= MAX_ERROR_CHARS else text[:MAX_ERROR_CHARS] + " [...]"


def _run_error(e: Exception) -> str:
    """A model's run-time failure in one line: TorchScript wraps the model's own
    exception in pages of its traceback, ending "builtins.ValueError: msg"."""
    import torch
    if isinstance(e, torch.jit.Error):
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        if lines:
            return _describe(RepoError(lines[-1].removeprefix("builtins.")))
    return _describe(e)


# ---------------------------------------------------------------- models

@dataclass
class HostedModel:
    name: str
    config: ModelConfig | None = None
    format: str | None = None          # "torchscript" or "export"
    state: str = "loading"             # "ready" or "failed"
    error: str | None = None
    module: Any = None
    tenant: TenantState | None = None
    warmed: bool = False
    # BE requests of one model one at a time: an arbiter's be() paces one
    # thread's work per tenant (the GPU one keys its pacer to the thread)
    be_lock: threading.Lock = field(default_factory=threading.Lock)

    def summary(self) -> dict[str, Any]:
        c = self.config
        # its tenant counts its requests (the arbiter's view and this one agree)
        t = self.tenant.summary() if self.tenant is not None else {}
        return {"name": self.name, "class": c.cls if c else None,
                "quota_sms": c.quota_sms if c else None,
                "priority": c.priority if c else None,
                "max_batch": c.max_batch if c else None, "dtype": c.dtype if c else None,
                "format": self.format, "state": self.state, "error": self.error,
                "requests": t.get("requests", 0), "errors": t.get("errors", 0),
                "p50_ms": t.get("p50_ms"), "p99_ms": t.get("p99_ms")}


def _outputs(name: str, out: Any) -> list[np.ndarray]:
    """A tensor or a tuple/list of tensors -> contiguous CPU numpy arrays."""
    import torch
    outs = list(out) if isinstance(out, (tuple, list)) else [out]
    arrays = []
    for i, t in enumerate(outs):
        if not isinstance(t, torch.Tensor):
            raise HostError(f"model {name} returned {type(out).__name__}"
                            + (f" with a {type(t).__name__} at {i}" if t is not out else "")
                            + ": hosted models must return a tensor or a tuple of tensors")
        t = t.detach()
        if t.dtype == torch.bfloat16:
            t = t.float()            # numpy has no bfloat16
        arrays.append(np.asarray(t.to("cpu").numpy(), order="C"))   # keeps 0-d
    return arrays


# ---------------------------------------------------------------- jobs

@dataclass
class JobContext:
    """What a hosted job's ``run(ctx)`` gets."""
    device: Any                      # torch.device the job should use
    stop: threading.Event            # set when the job must return
    args: dict[str, Any] | list[Any]   # what the client sent (a map, or a list)
    log: logging.Logger
    tenant: TenantState = field(repr=False)

    def report(self, items: int) -> None:
        """Count ``items`` more done (laked status/top show the rate)."""
        self.tenant.items += int(items)


@dataclass
class JobRun:
    name: str
    owner: str
    uid: int
    config: JobConfig
    tenant: TenantState | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None
    state: str = "starting"          # running, stopping, stopped, finished, failed: ...
    error: str | None = None
    started: float = field(default_factory=time.time)
    ended: float | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def alive(self) -> bool:
        return self.thread is None or self.thread.is_alive()

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "class": self.config.cls, "state": self.state,
                "owner": self.owner, "uid": self.uid, "error": self.error,
                "items": self.tenant.items if self.tenant else 0,
                "started": self.started, "ended": self.ended}


_job_seq = itertools.count(1)


# ---------------------------------------------------------------- the host

class Host:
    def __init__(self, repo_path: Path, arbiter: Arbiter, admin_group: str | None = None,
                 *, stop_timeout: float = STOP_TIMEOUT_S) -> None:
        self.repo = Repository(repo_path, admin_group)
        self.arbiter = arbiter
        self.stop_timeout = stop_timeout
        self.repo_error: str | None = None
        self._models: dict[str, HostedModel] = {}
        self._jobs: dict[tuple[str, str], JobRun] = {}
        self._lock = threading.Lock()          # the tables; never held while work runs
        self._load_lock = threading.RLock()    # loads, adds and removals, one at a time
        self._device: Any = None

    @property
    def device(self) -> Any:
        if self._device is None:
            import torch  # only hosting needs torch: laked starts without it
            self._device = torch.device(self.arbiter.device)
        return self._device

    # start / close -------------------------------------------------------

    def start(self) -> None:
        """Load every model of the repository; failures are recorded, not raised."""
        try:
            self.repo.check_trusted(self.repo.path)
        except RepoError as e:
            self.repo_error = str(e)
            log.error("model repository: %s; hosting nothing", e)
            return
        self.repo_error = None
        names = self.repo.names("model")
        for name in names:
            self._load(name)
        with self._lock:
            ready = sum(1 for m in self._models.values() if m.state == "ready")
        log.info("repository %s: %d of %d models ready, %d jobs available",
                 self.repo.path, ready, len(names), len(self.repo.names("job")))

    def close(self) -> None:
        """Stop every job, drop every model, give their tenants back."""
        with self._lock:
            runs = list(self._jobs.values())
        self._stop_runs(runs)
        with self._load_lock, self._lock:
            models = list(self._models.values())
            self._models.clear()
        for m in models:
            if m.tenant is not None:
                self.arbiter.remove_tenant(m.tenant)

    # models --------------------------------------------------------------

    def _load_module(self, path: Path, fmt: str) -> Any:
        import torch
        if fmt == "torchscript":
            module = torch.jit.load(str(path), map_location=self.device)
            module.eval()
            return module
        module = torch.export.load(str(path)).module().to(self.device)
        try:
            module.eval()
        except NotImplementedError:
            pass  # exported graphs refuse eval() (they are traced in the mode saved)
        return module

    def _load(self, name: str) -> HostedModel:
        """(Re)load one model and swap it in; the old one's tenant goes."""
        with self._load_lock:
            m = HostedModel(name)
            try:
                check_name(name, "model name")
                m.config = self.repo.config("model", name)  # type: ignore[assignment]
                path, m.format = self.repo.model_file(name)
                m.module = self._load_module(path, m.format)
            except Exception as e:  # torch raises anything on a bad file: record, go on
                m.state, m.error = "failed", _describe(e)
                log.error("model %s failed to load: %s", name, m.error)
            with self._lock:
                old = self._models.pop(name, None)
            if old is not None and old.tenant is not None:
                self.arbiter.remove_tenant(old.tenant)
            if m.error is None:
                assert m.config is not None
                c = m.config
                try:
                    m.tenant = self.arbiter.add_tenant(TenantSpec(
                        name=tenant_name("model", name), cls=c.cls, quota_sms=c.quota_sms,
                        priority=c.priority, kind="model"))
                    m.state = "ready"
                    log.info("model %s ready (%s, %s, max_batch %d, on %s)", name, m.format,
                             c.cls, c.max_batch, self.device)
                except ValueError as e:
                    m.state, m.error, m.module = "failed", f"no tenant: {e}", None
                    log.error("model %s: %s", name, m.error)
            with self._lock:
                self._models[name] = m
            return m

    def _drop(self, name: str) -> bool:
        with self._load_lock:
            with self._lock:
                m = self._models.pop(name, None)
            if m is not None and m.tenant is not None:
                self.arbiter.remove_tenant(m.tenant)
            return m is not None

    def model(self, name: str) -> HostedModel:
        with self._lock:
            m = self._models.get(name)
        if m is None:
            raise HostError(f"no model {name!r} is hosted (laked repo list shows them)")
        if m.state != "ready":
            raise HostError(f"model {name} failed to load: {m.error}")
        return m

    def infer(self, name: str, inputs: list[np.ndarray]) -> list[np.ndarray]:
        m = self.model(name)
        c, module, tenant = m.config, m.module, m.tenant
        assert c is not None and tenant is not None
        if not isinstance(inputs, (list, tuple)) or not inputs:
            raise HostError(f"model {name}: give at least one input array")
        for i, a in enumerate(inputs):
            if not isinstance(a, np.ndarray):
                raise HostError(f"model {name}: input {i} is a {type(a).__name__}, "
                                f"not a numpy array")
            if a.dtype.kind not in "biufc":
                raise HostError(f"model {name}: input {i} has dtype {a.dtype}, not a number")
        if inputs[0].ndim == 0:
            raise HostError(f"model {name}: input 0 has no batch dimension")
        batch = int(inputs[0].shape[0])
        if batch > c.max_batch:
            raise HostError(f"model {name}: batch {batch} is larger than its max_batch "
                            f"{c.max_batch}")
        import torch
        dtype, device = getattr(torch, c.dtype), self.device

        def fn() -> list[np.ndarray]:
            # everything that touches the device runs here: the arbiter may
            # run fn on a stream (and a thread) of its choosing
            with torch.inference_mode():
                xs = [torch.from_numpy(a).to(device=device, dtype=dtype, non_blocking=True)
                      for a in inputs]
                if c.warmup and not m.warmed:
                    module(*xs)
                    m.warmed = True
                return _outputs(name, module(*xs))

        try:
            if c.cls == LC:
                return self.arbiter.run_lc(tenant, fn, items=batch)   # counts the request
            return self._run_be(m, tenant, fn, batch)
        except HostError:
            raise
        except Exception as e:  # the model's own failure: this request only
            why = _run_error(e)
            log.warning("model %s: request failed: %s", name, why)
            log.debug("model %s: the whole error: %s", name, e)
            raise HostError(f"model {name} failed: {why}") from None

    def _run_be(self, m: HostedModel, tenant: TenantState,
                fn: Callable[[], list[np.ndarray]], batch: int) -> list[np.ndarray]:
        """A BE model's request, paced by be(); counted here as run_lc counts an LC
        one (be() accounts device time, not requests)."""
        t0 = time.perf_counter()
        try:
            with m.be_lock, self.arbiter.be(tenant):
                out = fn()
        except Exception:
            tenant.errors += 1
            raise
        tenant.latencies.append(time.perf_counter() - t0)
        tenant.requests += 1
        tenant.items += batch
        return out

    # listing -------------------------------------------------------------

    def list(self) -> dict[str, Any]:
        with self._lock:
            models = [m.summary() for m in self._models.values()]
            runs = list(self._jobs.values())
        jobs = [r.summary() for r in runs]
        running = {r.name for r in runs}
        # jobs in the repository that no one runs now, so admins see them (and why
        # one could not start)
        for name in self.repo.names("job") if self.repo_error is None else []:
            if name in running:
                continue
            row: dict[str, Any] = {"name": name, "class": None, "state": "idle",
                                   "owner": None, "error": None, "items": 0}
            try:
                row["class"] = self.repo.config("job", name).cls
                self.repo.check_trusted(self.repo.entry_dir("job", name) / "job.py")
            except RepoError as e:
                row["state"], row["error"] = "invalid", str(e)
            jobs.append(row)
        return {"repository": str(self.repo.path), "error": self.repo_error,
                "device": str(self.arbiter.device),
                "models": sorted(models, key=lambda r: r["name"]),
                "jobs": sorted(jobs, key=lambda r: (r["name"], r["owner"] or ""))}

    # jobs ----------------------------------------------------------------

    def _import_job(self, name: str, path: Path, src: bytes) -> tuple[str, Any]:
        """A fresh module from the checked bytes (never from a second read of the file)."""
        modname = f"_laked_job_{name.replace('.', '_').replace('-', '_')}_{next(_job_seq)}"
        spec = importlib.util.spec_from_loader(modname, loader=None, origin=str(path))
        assert spec is not None
        module = importlib.util.module_from_spec(spec)
        module.__file__ = str(path)
        # in sys.modules while it runs: dataclasses, pickle and typing look it up
        sys.modules[modname] = module
        try:
            exec(compile(src, str(path), "exec"), module.__dict__)
        except Exception as e:  # its module-level code failed: the starter is told
            sys.modules.pop(modname, None)
            log.error("job %s: importing %s failed", name, path, exc_info=True)
            raise HostError(f"job {name}: importing {path} failed: {_describe(e)}") from None
        return modname, module

    def job_start(self, name: str, owner: str, uid: int,
                  args: dict[str, Any] | list[Any] | None = None) -> dict[str, Any]:
        """Start job NAME for ``owner``; one running instance per (name, owner)."""
        try:
            check_name(name, "job name")
        except RepoError as e:
            raise HostError(str(e)) from None
        if args is not None and not isinstance(args, (dict, list)):
            raise HostError(f"job {name}: args must be a map or a list, "
                            f"not {type(args).__name__}")
        key = (name, owner)
        with self._lock:
            old = self._jobs.get(key)
            if old is not None and old.alive:
                raise HostError(f"job {name} is already {old.state} for {owner}")
            # reserved: a second start for the same key is refused above
            run = self._jobs[key] = JobRun(name, owner, uid, JobConfig())
        try:
            try:
                cfg = self.repo.config("job", name)
                path, src = self.repo.job_source(name)
            except RepoError as e:
                log.error("job %s refused: %s", name, e)
                raise HostError(str(e)) from None
            assert isinstance(cfg, JobConfig)
            run.config = cfg
            modname, module = self._import_job(name, path, src)
            fn = getattr(module, "run", None)
            if not callable(fn):
                sys.modules.pop(modname, None)
                raise HostError(f"job {name}: {path} defines no run(ctx)")
            try:
                run.tenant = self.arbiter.add_tenant(TenantSpec(
                    name=tenant_name("job", name, owner), cls=cfg.cls,
                    quota_sms=cfg.quota_sms, priority=cfg.priority, uid=uid, kind="job"))
            except ValueError as e:
                sys.modules.pop(modname, None)
                raise HostError(f"job {name}: {e}") from None
        except BaseException:
            with self._lock:
                if self._jobs.get(key) is run:
                    del self._jobs[key]
            raise
        # a copy: the job must not see the caller change them
        job_args = list(args) if isinstance(args, list) else dict(args or {})
        ctx = JobContext(device=self.device, stop=run.stop, args=job_args,
                         log=logging.getLogger(f"laked.job.{name}"), tenant=run.tenant)
        run.state = "running"
        run.thread = threading.Thread(target=self._run_job, args=(run, fn, ctx, modname),
                                      name=f"laked-job-{name}", daemon=True)
        run.thread.start()
        log.info("job %s started for %s (uid %d, %s)", name, owner, uid,
                 ", ".join(f"{k}={v}" for k, v in config_dict(cfg).items()))
        return run.summary()

    def _run_job(self, run: JobRun, fn: Callable[[JobContext], None], ctx: JobContext,
                 modname: str) -> None:
        assert run.tenant is not None
        state, error = "finished", None
        try:
            with self.arbiter.be(run.tenant):
                fn(ctx)
            if run.stop.is_set():
                state = "stopped"
        except (Exception, SystemExit) as e:  # the job's failure, not laked's
            error = f"{type(e).__name__}: {e}"
            state = f"failed: {error}"
            run.tenant.errors += 1
            ctx.log.error("job %s (%s) failed", run.name, run.owner, exc_info=True)
        finally:
            self.arbiter.remove_tenant(run.tenant)
            sys.modules.pop(modname, None)
            with run.lock:
                run.state, run.error, run.ended = state, error, time.time()
        log.info("job %s of %s: %s", run.name, run.owner, state)

    def _stop_runs(self, runs: list[JobRun]) -> None:
        for r in runs:
            with r.lock:
                if r.alive and r.ended is None:
                    r.state = "stopping"
            r.stop.set()
        deadline = time.monotonic() + self.stop_timeout
        for r in runs:
            if r.thread is not None:
                r.thread.join(max(0.0, deadline - time.monotonic()))
            if r.alive:
                log.warning("job %s of %s did not stop within %.0f s; it is left "
                            "\"stopping\" (it must check ctx.stop)", r.name, r.owner,
                            self.stop_timeout)

    def _forget_ended(self, runs: list[JobRun]) -> None:
        with self._lock:
            for r in runs:
                if not r.alive and self._jobs.get((r.name, r.owner)) is r:
                    del self._jobs[(r.name, r.owner)]

    def job_stop(self, name: str, owner: str) -> dict[str, Any]:
        """Stop ``owner``'s instance of NAME (waits up to the stop timeout).

        An instance that has ended is forgotten after this reports it."""
        with self._lock:
            run = self._jobs.get((name, owner))
        if run is None:
            raise HostError(f"no job {name} runs for {owner}")
        self._stop_runs([run])
        out = run.summary()
        self._forget_ended([run])
        return out

    def jobs(self, owner: str | None = None) -> list[dict[str, Any]]:
        with self._lock:
            runs = [r for r in self._jobs.values() if owner is None or r.owner == owner]
        return [r.summary() for r in runs]

    def stop_owner(self, owner: str) -> list[dict[str, Any]]:
        """Stop every job of ``owner`` (e.g. its client left) and forget them."""
        with self._lock:
            runs = [r for r in self._jobs.values() if r.owner == owner]
        self._stop_runs(runs)
        out = [r.summary() for r in runs]
        self._forget_ended(runs)
        return out

    # repository changes --------------------------------------------------

    def repo_add(self, kind: str, name: str, fd: int, config: dict[str, Any] | None,
                 uid: int, gid: int) -> dict[str, Any]:
        """Add a model or job (admins; QuotaError otherwise); a model is loaded at once."""
        with self._load_lock:
            try:
                info = self.repo.add(kind, name, fd, config, uid, gid)
            except RepoError as e:
                raise HostError(str(e)) from None
            if kind == "job":
                return {"ok": True, "kind": kind, "name": name, "state": "idle",
                        "path": info["path"], "config": info["config"]}
            m = self._load(name)
        reply = {"ok": m.state == "ready", "kind": kind, "name": name, "state": m.state,
                 "format": m.format, "path": info["path"], "config": info["config"]}
        if m.state != "ready":
            # the file stays, so `laked repo list` shows the admin why
            reply["error"] = f"model {name} failed to load: {m.error}"
        return reply

    def repo_remove(self, kind: str, name: str, uid: int, gid: int) -> dict[str, Any]:
        """Remove a model (dropped with its tenant) or a job (its instances stop first)."""
        self.repo.require_admin(uid, gid, f"repo remove {kind} {name}")
        with self._load_lock:
            try:
                present = os.path.lexists(self.repo.entry_dir(kind, name))
            except RepoError as e:
                raise HostError(str(e)) from None
            if kind == "job":
                with self._lock:
                    runs = [r for r in self._jobs.values() if r.name == name]
                self._stop_runs(runs)
                self._forget_ended(runs)
            if present:
                try:
                    self.repo.remove(kind, name, uid, gid)
                except RepoError as e:
                    raise HostError(str(e)) from None
            # a model whose files an admin deleted by hand is still dropped
            dropped = kind == "model" and self._drop(name)
            if not present and not dropped:
                raise HostError(f"no {kind} {name!r} in the repository")
        return {"ok": True, "kind": kind, "name": name, "state": "removed"}

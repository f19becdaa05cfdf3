"""The laked main loop: register with lake.ko, serve the CLI, keep maps fresh.

laked also serves user-space clients (laked/clients.py) and, when a
repository is configured, hosted models and jobs (laked/hosting.py), all
scheduled by one arbiter.  ``laked start --no-module`` serves only those:
no lake.ko, no /dev/lake, and neither netlink (genl) nor BCC (policy) is
imported, so it runs where neither exists (the device machine).
"""
from __future__ import annotations

import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from . import ctl, sysfs
from .clients import ClientServer, executor_factory
from .config import Config
from .costs import Cost, CostTable
from .dataplane import DEV, DataPlane
from .gpustat import GpuUtil
from .sched.base import Arbiter, CpuArbiter, TenantState
from .tenants import MemoryLedger

if TYPE_CHECKING:   # imported for real only with lake.ko (not with --no-module)
    from .genl import Control
    from .policy import PolicyManager

log = logging.getLogger("laked")

SCHED_DELAY_MAX_US = 10_000_000    # what an admin may pin: ten seconds is already "never"
_U32 = 0xFFFFFFFF


def check_sched_delay(value: object) -> int | None:
    """A pinned sched delay from a request: int µs in range, or None (auto)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"sched delay must be whole microseconds, not {value!r}")
    if not 0 <= value <= SCHED_DELAY_MAX_US:
        raise ValueError(f"sched delay {value} us is outside 0..{SCHED_DELAY_MAX_US}")
    return value


def _nvidia_present() -> bool:
    return os.path.exists("/dev/nvidiactl") or os.path.exists("/proc/driver/nvidia/version")


def make_arbiter(cfg: Config) -> Arbiter:
    """The GPU arbiter when the executor may use a GPU and CUDA works, else the CPU one."""
    why = "executor cpu"
    if cfg.executor in ("gpu", "auto") and not _nvidia_present():
        # checked first: importing torch costs seconds (minutes in the emulated VM)
        why = "no NVIDIA driver (/dev/nvidiactl)"
    elif cfg.executor in ("gpu", "auto"):
        try:
            from .sched.arbiter import GpuArbiter   # needs torch
            import torch
            if not torch.cuda.is_available():
                raise RuntimeError("torch sees no CUDA device")
            arbiter = GpuArbiter(cfg.scheduler)
            log.info("arbiter: gpu")
            return arbiter
        except ImportError as e:
            why = f"GPU arbiter not importable: {e}"
        except Exception as e:  # noqa: BLE001 - no usable GPU: say why, run on the CPU
            why = f"GPU arbiter unavailable: {e}"
    log.info("arbiter: cpu (%s)", why)
    return CpuArbiter()


def make_host(cfg: Config, arbiter: Arbiter) -> Any:
    """laked.hosting.Host over the configured repository; None without one."""
    if cfg.repo_path is None:
        log.info("no [repository] path configured: no hosted models or jobs")
        return None
    try:
        from .hosting import Host
    except ImportError as e:
        log.warning("hosting unavailable (%s): no hosted models or jobs", e)
        return None
    host = Host(cfg.repo_path, arbiter, admin_group=cfg.admin_group)
    host.start()        # loads the repository's models; failures are listed, not raised
    return host


@dataclass
class Daemon:
    cfg: Config
    control: Control | None = None
    util: GpuUtil = field(default_factory=GpuUtil)
    costs: CostTable = field(default_factory=CostTable)
    dataplane: DataPlane | None = None
    stop_event: threading.Event = field(default_factory=threading.Event)
    started: float = field(default_factory=time.time)
    # The GPU arbiter's queue delay for kernel work (µs); its owner sets this.
    sched_delay_source: Callable[[], int] | None = None
    sched_delay_pinned: int | None = None     # `laked sched delay set N`
    arbiter: Arbiter | None = None
    host: Any = None                          # laked.hosting.Host, or None
    ledger: MemoryLedger | None = None        # device memory per uid, all clients
    clients: ClientServer | None = None
    kernel_tenant: TenantState | None = None  # lake_infer GPU batches and kernel cu* sessions

    def __post_init__(self) -> None:
        self._sched_delay_error: str | None = None
        self.ctl_lock = threading.Lock()
        self.policy: PolicyManager | None = None
        if self.cfg.module:
            from .policy import PolicyManager
            self.policy = PolicyManager(self._attach, self._detach)

    # -- lake.ko ------------------------------------------------------------
    def _attach(self, fd: int, name: str) -> None:
        with self.ctl_lock:
            self._require_control().policy_attach(fd, name)

    def _detach(self) -> None:
        with self.ctl_lock:
            self._require_control().policy_detach()

    def _require_control(self) -> Control:
        from .genl import ModuleNotLoaded
        if self.control is None:
            raise ModuleNotLoaded("lake.ko is not loaded; laked is waiting for it")
        return self.control

    def connect(self) -> None:
        from .genl import Control, ControlError
        control = Control()
        try:
            control.hello()
        except ControlError:
            control.close()
            raise
        self.control = control
        log.info("registered with lake.ko (pid %d)", os.getpid())

    def _disconnect(self, why: str) -> None:
        log.warning("%s", why)
        if self.policy is not None:
            self.policy.forget()
        if self.control is not None:
            self.control.close()
            self.control = None

    def _registered(self) -> bool:
        try:
            return sysfs.read("daemon") == f"connected pid={os.getpid()}"
        except OSError:
            return False

    def tick(self) -> None:
        if self.cfg.module:         # --no-module: no lake.ko to reconnect, no policy maps
            self._tick_module()
        self._write_sched_delay()

    def _tick_module(self) -> None:
        from .genl import ControlError, ModuleNotLoaded
        assert self.policy is not None
        with self.ctl_lock:
            if self.control is not None and not self._registered():
                self._disconnect("lake.ko was unloaded or dropped us; waiting for it")
            if self.control is None and sysfs.loaded():
                try:
                    self.connect()
                except (ModuleNotLoaded, ControlError, OSError) as e:
                    log.debug("reconnect failed: %s", e)
        self.policy.update_maps({"gpu_util": self.util.read()})
        self.costs.observe()
        self.policy.update_costs(self.costs.table())

    # -- the arbiter's queue delay, for policies (region header) -------------
    def _auto_sched_delay(self) -> int:
        src = self.sched_delay_source
        if src is None:
            return 0
        try:
            value = int(src())
        except Exception as e:  # the arbiter's hook must never stop the tick
            if str(e) != self._sched_delay_error:
                log.warning("arbiter queue delay unavailable (0 used): %s", e)
            self._sched_delay_error = str(e)
            return 0
        self._sched_delay_error = None
        return min(max(value, 0), _U32)

    def sched_delay(self) -> tuple[int, str]:
        """(value in µs, source): pinned, arbiter or none."""
        if self.sched_delay_pinned is not None:
            return self.sched_delay_pinned, "pinned"
        if self.sched_delay_source is not None:
            return self._auto_sched_delay(), "arbiter"
        return 0, "none"

    def _write_sched_delay(self) -> tuple[int, str]:
        """Put the current delay where lake_infer() reads it; returns what sched_delay() said."""
        value, source = self.sched_delay()
        dp = self.dataplane
        if dp is not None:
            dp.region.sched_delay_us = value
        return value, source

    # -- lifecycle -----------------------------------------------------------
    def run(self, ready: Callable[[str | None], None] | None = None) -> int:
        # Before CUDA starts: every stream its own hardware queue where the
        # driver allows, so a BE stream held at a gate shares none with LC
        # streams (laked/sched/gate.py); an operator's setting wins.
        os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "32")
        try:
            self.arbiter = make_arbiter(self.cfg)
            if self.sched_delay_source is None and hasattr(self.arbiter, "queue_delay_us"):
                self.sched_delay_source = self.arbiter.queue_delay_us
            if self.cfg.module:
                self.connect()
                self._open_dataplane()
            self._start_clients()
            server = ctl.Server(self.cfg.sock_path, self.handle)
        except Exception as e:  # noqa: BLE001 - whatever failed, undo and say why
            self.shutdown()
            if ready:
                ready(str(e))
            raise
        server.start()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop_event.set())
        log.info("laked ready: control socket %s, client socket %s%s", self.cfg.sock_path,
                 self.cfg.client_sock_path, "" if self.cfg.module else " (no lake.ko)")
        if ready:
            ready(None)
        try:
            while not self.stop_event.wait(self.cfg.interval):
                self.tick()
        finally:
            server.close()
            self.shutdown()
        return 0

    def _open_dataplane(self) -> None:
        if not os.path.exists(DEV):
            # A module without the data plane: serve the control plane only.
            log.warning("%s does not exist: no data plane (cu* calls and INFER unavailable)",
                        DEV)
            return
        try:
            self.dataplane = DataPlane.open(self.cfg.executor)
        except OSError as e:
            raise OSError(e.errno, f"cannot serve /dev/lake: {e.strerror}") from None
        self._bind_kernel_tenant()

    def _bind_kernel_tenant(self) -> None:
        """The kernel's GPU work runs as one tenant of the arbiter ([kernel] in laked.toml)."""
        assert self.arbiter is not None and self.dataplane is not None
        spec = self.cfg.kernel_tenant()
        self.kernel_tenant = self.arbiter.add_tenant(spec)
        self.dataplane.executor.tenancy = self.arbiter.tenancy(self.kernel_tenant)
        log.info("kernel work is tenant %r: %s, %s SMs, priority %d", spec.name, spec.cls,
                 spec.quota_sms or "all", spec.priority)

    def _start_clients(self) -> None:
        """Hosted work and the client socket, after the data plane."""
        assert self.arbiter is not None
        self.host = make_host(self.cfg, self.arbiter)
        self.ledger = MemoryLedger(self.cfg.quotas)
        self.clients = ClientServer(
            self.cfg.client_sock_path, arbiter=self.arbiter, quotas=self.cfg.quotas,
            ledger=self.ledger, make_executor=executor_factory(self.cfg.executor, self.ledger),
            host=self.host, max_region_mb=self.cfg.max_region_mb)
        self.clients.start()

    def shutdown(self) -> None:
        # mirror of run(): clients and hosted work stop before the data plane
        if self.clients is not None:
            self.clients.close()
            self.clients = None
        if self.host is not None:
            self.host.close()
            self.host = None
        if self.dataplane is not None:
            self.dataplane.close()
            self.dataplane = None
        if self.kernel_tenant is not None and self.arbiter is not None:
            self.arbiter.remove_tenant(self.kernel_tenant)
            self.kernel_tenant = None
        with self.ctl_lock:
            if self.control is not None:
                from .genl import ControlError
                try:
                    self.control.bye()  # the module detaches our policy
                except ControlError as e:
                    log.warning("goodbye to lake.ko failed: %s", e)
                self.control.close()
                self.control = None
        if self.policy is not None:
            self.policy.forget()
        if self.arbiter is not None:
            self.arbiter.close()
            self.arbiter = None
        log.info("laked stopped")

    # -- CLI requests ----------------------------------------------------------
    def status(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started, 1),
            "module_connected": self.control is not None,
            "executor": self.dataplane.executor.name if self.dataplane else None,
            "region": self.dataplane.info()["region_copies"] if self.dataplane else None,
            "dataplane": self.dataplane.info() if self.dataplane else None,
            "mode": "module" if self.cfg.module else "no-module",   # laked start --no-module
            "policy": self.policy.info() if self.policy is not None else None,
            "gpu_util": {"value": self.util.read(), "source": self.util.source},
            "costs": {str(k): vars(v) for k, v in self.costs.table().items()},
            "sched_delay_us": dict(zip(("value", "source"), self.sched_delay())),
            "clients": self.clients.clients() if self.clients is not None else [],
            "arbiter": self.arbiter.status() if self.arbiter is not None else None,
        }

    def handle(self, req: dict[str, Any], peer: ctl.Peer) -> dict[str, Any]:
        op = req.get("op")
        if op == "status":
            return {"ok": True, "status": self.status()}
        if op not in ("policy_load", "policy_unload", "util", "stop", "cost", "sched_delay"):
            return {"ok": False, "error": f"unknown request {op!r}"}
        if peer.uid != 0:
            return {"ok": False, "error": f"{op} needs root (you are uid {peer.uid})"}
        if not self.cfg.module and op in ("policy_load", "policy_unload", "util", "cost"):
            return {"ok": False, "error": f"{op}: laked runs without lake.ko (--no-module)"}
        try:
            return self._handle_admin(op, req)
        except self._refusals() as e:
            log.warning("%s refused: %s", op, e)
            return {"ok": False, "error": str(e)}

    def _refusals(self) -> tuple[type[Exception], ...]:
        """What a refused admin request raises (netlink and BCC ones only with lake.ko)."""
        if not self.cfg.module:
            return (ValueError,)
        from .genl import ControlError, ModuleNotLoaded
        from .policy import PolicyError
        return (PolicyError, ControlError, ModuleNotLoaded, ValueError)

    def _handle_admin(self, op: str, req: dict[str, Any]) -> dict[str, Any]:
        if op in ("policy_load", "policy_unload", "util", "cost"):
            assert self.policy is not None      # handle() refused these without lake.ko
        if op == "policy_load":
            defines = {str(k): str(v) for k, v in dict(req.get("defines") or {}).items()}
            loaded = self.policy.load(Path(str(req["path"])), defines)
            self.policy.update_maps({"gpu_util": self.util.read()})
            return {"ok": True, "policy": self.policy.info() | {"prog_id": loaded.prog_id}}
        if op == "policy_unload":
            self.policy.unload()
            log.info("policy detached; lake.ko uses its built-in rule")
            return {"ok": True}
        if op == "cost":
            mid = int(req["model"])
            c = req.get("cost")
            self.costs.pin(mid, None if c is None else Cost(*(int(v) for v in c)))
            self.policy.update_costs(self.costs.table())
            log.info("model %d costs %s", mid, "measured" if c is None else f"pinned at {c}")
            return {"ok": True}
        if op == "util":
            value = req.get("value")
            self.util.set_override(None if value is None else int(value))
            self.policy.update_maps({"gpu_util": self.util.read()})
            log.info("GPU utilisation %s", "auto" if value is None else f"pinned at {value}%")
            return {"ok": True, "gpu_util": self.util.read(), "source": self.util.source}
        if op == "sched_delay":
            self.sched_delay_pinned = check_sched_delay(req.get("value"))
            value, source = self._write_sched_delay()   # now, not at the next tick
            log.info("sched delay %s", f"pinned at {value} us" if source == "pinned"
                     else f"auto ({source}: {value} us)")
            return {"ok": True, "sched_delay_us": value, "source": source}
        self.stop_event.set()
        return {"ok": True}


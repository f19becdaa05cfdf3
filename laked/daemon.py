"""The laked main loop: register with lake.ko, serve the CLI, keep maps fresh."""
from __future__ import annotations

import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import ctl, sysfs
from .config import DEFAULT_RUN_DIR, Config
from .genl import Control, ControlError, ModuleNotLoaded
from .costs import Cost, CostTable
from .dataplane import DEV, DataPlane
from .executor import ExecutorUnavailable
from .gpustat import GpuUtil
from .policy import PolicyError, PolicyManager

log = logging.getLogger("laked")

@dataclass
class Daemon:
    cfg: Config
    control: Control | None = None
    util: GpuUtil = field(default_factory=GpuUtil)
    costs: CostTable = field(default_factory=CostTable)
    dataplane: DataPlane | None = None
    stop_event: threading.Event = field(default_factory=threading.Event)
    started: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        self.ctl_lock = threading.Lock()
        self.policy = PolicyManager(self._attach, self._detach)

    # -- lake.ko ------------------------------------------------------------
    def _attach(self, fd: int, name: str) -> None:
        with self.ctl_lock:
            self._require_control().policy_attach(fd, name)

    def _detach(self) -> None:
        with self.ctl_lock:
            self._require_control().policy_detach()

    def _require_control(self) -> Control:
        if self.control is None:
            raise ModuleNotLoaded("lake.ko is not loaded; laked is waiting for it")
        return self.control

    def connect(self) -> None:
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

    # -- lifecycle -----------------------------------------------------------
    def run(self, ready: Callable[[str | None], None] | None = None) -> int:
        try:
            self.connect()
            self._open_dataplane()
            server = ctl.Server(self.cfg.sock_path, self.handle)
        except (ModuleNotLoaded, ControlError, OSError, ExecutorUnavailable) as e:
            self.shutdown()
            if ready:
                ready(str(e))
            raise
        server.start()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop_event.set())
        log.info("laked ready: control socket %s", self.cfg.sock_path)
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

    def shutdown(self) -> None:
        if self.dataplane is not None:
            self.dataplane.close()
            self.dataplane = None
        with self.ctl_lock:
            if self.control is not None:
                try:
                    self.control.bye()  # the module detaches our policy
                except ControlError as e:
                    log.warning("goodbye to lake.ko failed: %s", e)
                self.control.close()
                self.control = None
        self.policy.forget()
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
            "policy": self.policy.info(),
            "gpu_util": {"value": self.util.read(), "source": self.util.source},
            "costs": {str(k): vars(v) for k, v in self.costs.table().items()},
        }

    def handle(self, req: dict[str, Any], peer: ctl.Peer) -> dict[str, Any]:
        op = req.get("op")
        if op == "status":
            return {"ok": True, "status": self.status()}
        if op not in ("policy_load", "policy_unload", "util", "stop", "cost"):
            return {"ok": False, "error": f"unknown request {op!r}"}
        if peer.uid != 0:
            return {"ok": False, "error": f"{op} needs root (you are uid {peer.uid})"}
        try:
            return self._handle_admin(op, req)
        except (PolicyError, ControlError, ModuleNotLoaded, ValueError) as e:
            log.warning("%s refused: %s", op, e)
            return {"ok": False, "error": str(e)}

    def _handle_admin(self, op: str, req: dict[str, Any]) -> dict[str, Any]:
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
        self.stop_event.set()
        return {"ok": True}


"""laked's configuration: where it keeps its sockets, and /etc/lake/laked.toml.

Light on purpose: the CLI imports it (the standard library's tomllib and
laked.tenants, nothing else).  Every key of the file is optional:

    [kernel]            # the kernel's tenant: lake_infer GPU batches and kernel cu* sessions
    class = "LC"        # LC (default) or BE
    quota_sms = 0       # 0: the whole GPU
    priority = 10
    [clients]
    max_region_mb = 256 # largest shared region a user client may hand laked
    [repository]
    path = "/var/lib/lake/repo"   # hosted models and jobs; absent: no hosting
    admin_group = "lake"          # besides root, members may add to the repository
    [quota.default]               # every uid but root (never limited) and those below
    classes = ["BE"]
    max_sms = 64                  # largest SM quota one tenant may ask for (0: any)
    max_device_mb = 8192          # device memory of all the uid's clients (0: no limit)
    max_clients = 4               # clients connected at once (0: no limit)
    [quota.uid.1000]              # keys left out are taken from [quota.default]
    classes = ["LC", "BE"]
    max_sms = 132
    [scheduler]                   # handed to the GPU arbiter as a dict (its knobs)

Unknown sections or keys, wrong types and values out of range are errors
that name the file and the key (``ConfigError``).
"""
from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .tenants import CLASSES, LC, Quotas, TenantSpec, UidQuota

DEFAULT_RUN_DIR = Path(os.environ.get("LAKED_RUN_DIR", "/run/lake"))
DEFAULT_CONFIG = Path("/etc/lake/laked.toml")

MAX_SMS = 4096              # far above any GPU's count; catches typos like 13200
MAX_UID = 2**32 - 2         # (uid_t)-1 is "no uid"


class ConfigError(ValueError):
    """The configuration file is missing, malformed or has a bad key; says which."""


@dataclass
class Config:
    run_dir: Path = DEFAULT_RUN_DIR
    interval: float = 0.5        # seconds between map refreshes
    executor: str = "auto"       # auto, gpu or cpu
    module: bool = True          # False: serve user clients only (laked start --no-module)
    kernel_class: str = LC
    kernel_quota_sms: int = 0
    kernel_priority: int = 10
    max_region_mb: int = 256
    repo_path: Path | None = None
    admin_group: str = "lake"
    quotas: Quotas = field(default_factory=Quotas)
    scheduler: dict[str, Any] = field(default_factory=dict)
    source: Path | None = None   # the file these came from (None: built-in defaults)

    @property
    def sock_path(self) -> Path:
        return self.run_dir / "laked.sock"

    @property
    def client_sock_path(self) -> Path:
        """Where user clients (the lake library) connect."""
        return self.run_dir / "lake.sock"

    @property
    def pid_path(self) -> Path:
        return self.run_dir / "laked.pid"

    @property
    def log_path(self) -> Path:
        return self.run_dir / "laked.log"

    def kernel_tenant(self) -> TenantSpec:
        """The kernel's tenant: lake_infer GPU batches and kernel cu* sessions."""
        return TenantSpec(name="kernel", cls=self.kernel_class,
                          quota_sms=self.kernel_quota_sms, priority=self.kernel_priority,
                          uid=0, kind="kernel")

    @classmethod
    def load(cls, path: Path | None = None, **overrides: Any) -> "Config":
        """Defaults, then ``path`` (or /etc/lake/laked.toml if it exists), then ``overrides``.

        A file named explicitly must exist; the default one may be absent.
        """
        explicit = path is not None
        path = Path(path) if path is not None else DEFAULT_CONFIG
        cfg = cls(**overrides)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            if explicit:
                raise ConfigError(f"{path}: no such configuration file") from None
            return cfg
        except OSError as e:
            raise ConfigError(f"{path}: cannot read it: {e.strerror}") from None
        try:
            doc = tomllib.loads(raw.decode())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid TOML: {e}") from None
        _apply(cfg, doc, _Where(path))
        cfg.source = path
        return cfg


# -- validation ----------------------------------------------------------------------------
@dataclass(frozen=True)
class _Where:
    path: Path

    def error(self, key: str, why: str) -> ConfigError:
        return ConfigError(f"{self.path}: {key}: {why}")


def _table(w: _Where, doc: dict[str, Any], key: str, allowed: set[str] | None,
           prefix: str = "") -> dict[str, Any]:
    name = f"{prefix}{key}"
    t = doc.get(key, {})
    if not isinstance(t, dict):
        raise w.error(f"[{name}]", "must be a table (a [section])")
    if allowed is not None:
        unknown = sorted(set(t) - allowed)
        if unknown:
            raise w.error(f"[{name}]", f"unknown key(s) {', '.join(unknown)} "
                                       f"(known: {', '.join(sorted(allowed))})")
    return t


def _int(w: _Where, t: dict[str, Any], section: str, key: str, lo: int, hi: int,
         default: int) -> int:
    v = t.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int):   # TOML true is not a number
        raise w.error(f"[{section}] {key}", f"must be an integer, not {v!r}")
    if not lo <= v <= hi:
        raise w.error(f"[{section}] {key}", f"{v} is out of range {lo}..{hi}")
    return v


def _str(w: _Where, t: dict[str, Any], section: str, key: str, default: str) -> str:
    v = t.get(key, default)
    if not isinstance(v, str) or not v:
        raise w.error(f"[{section}] {key}", f"must be a non-empty string, not {v!r}")
    return v


def _cls(w: _Where, v: Any, where: str) -> str:
    if v not in CLASSES:
        raise w.error(where, f"class must be LC or BE, not {v!r}")
    return str(v)


def _quota(w: _Where, t: dict[str, Any], section: str, base: UidQuota) -> UidQuota:
    classes = t.get("classes", list(base.classes))
    if not isinstance(classes, list):
        raise w.error(f"[{section}] classes", f"must be a list like [\"BE\"], not {classes!r}")
    return UidQuota(
        classes=tuple(_cls(w, c, f"[{section}] classes") for c in classes),
        max_sms=_int(w, t, section, "max_sms", 0, MAX_SMS, base.max_sms),
        max_device_mb=_int(w, t, section, "max_device_mb", 0, 1 << 30, base.max_device_mb),
        max_clients=_int(w, t, section, "max_clients", 0, 65536, base.max_clients))


def _apply(cfg: Config, doc: dict[str, Any], w: _Where) -> None:
    sections = {"kernel", "clients", "repository", "quota", "scheduler"}
    unknown = sorted(set(doc) - sections)
    if unknown:
        raise w.error(f"[{unknown[0]}]", f"unknown section (known: {', '.join(sorted(sections))})")

    k = _table(w, doc, "kernel", {"class", "quota_sms", "priority"})
    cfg.kernel_class = _cls(w, k.get("class", cfg.kernel_class), "[kernel] class")
    cfg.kernel_quota_sms = _int(w, k, "kernel", "quota_sms", 0, MAX_SMS, cfg.kernel_quota_sms)
    cfg.kernel_priority = _int(w, k, "kernel", "priority", -1000, 1000, cfg.kernel_priority)

    c = _table(w, doc, "clients", {"max_region_mb"})
    cfg.max_region_mb = _int(w, c, "clients", "max_region_mb", 1, 4096, cfg.max_region_mb)

    r = _table(w, doc, "repository", {"path", "admin_group"})
    if "path" in r:
        p = _str(w, r, "repository", "path", "")
        if not os.path.isabs(p):
            raise w.error("[repository] path", f"must be an absolute path, not {p!r}")
        cfg.repo_path = Path(p)
    cfg.admin_group = _str(w, r, "repository", "admin_group", cfg.admin_group)

    q = _table(w, doc, "quota", {"default", "uid"})
    default = _quota(w, _table(w, q, "default", {"classes", "max_sms", "max_device_mb",
                                                "max_clients"}, "quota."),
                     "quota.default", cfg.quotas.default)
    by_uid: dict[int, UidQuota] = {}
    for key, t in _table(w, q, "uid", None, "quota.").items():
        if not key.isdigit() or int(key) > MAX_UID:
            raise w.error(f"[quota.uid.{key}]", "the key must be a numeric uid")
        section = f"quota.uid.{key}"
        if not isinstance(t, dict):
            raise w.error(f"[{section}]", "must be a table (a [section])")
        t = _table(w, {key: t}, key, {"classes", "max_sms", "max_device_mb", "max_clients"},
                   "quota.uid.")
        by_uid[int(key)] = _quota(w, t, section, default)
    cfg.quotas = replace(cfg.quotas, default=default, by_uid=by_uid)

    cfg.scheduler = dict(_table(w, doc, "scheduler", None))

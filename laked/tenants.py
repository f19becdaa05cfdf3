"""Tenants: who shares the GPU through laked, and what each uid may take.

Every client of the arbiter is a tenant: the kernel (lake_infer GPU batches
and kernel cu* sessions), each user client connected to laked's client
socket, each hosted model and each hosted job.  A tenant has a class (LC:
latency-critical, BE: best-effort), an SM quota (what it is guaranteed;
0 means the whole GPU) and a priority among tenants of its class.

What a user may ask for is bounded per uid (``Quotas``): the classes it may
use, the largest SM quota, its device memory across all of its clients
(``MemoryLedger``) and how many clients it may connect at once.  Root is
never limited.  Pure logic: no GPU, no torch.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

LC = "LC"
BE = "BE"
CLASSES = (LC, BE)
KINDS = ("kernel", "client", "model", "job")


class QuotaError(PermissionError):
    """A request beyond what the caller's uid may take; the message says which limit."""


@dataclass(frozen=True)
class TenantSpec:
    name: str
    cls: str                 # LC or BE
    quota_sms: int = 0       # guaranteed SMs; 0: the whole GPU
    priority: int = 0        # within the class: higher is served first
    uid: int = 0
    kind: str = "client"     # kernel, client, model or job

    def __post_init__(self) -> None:
        if self.cls not in CLASSES:
            raise ValueError(f"tenant {self.name!r}: class must be LC or BE, not {self.cls!r}")
        if self.quota_sms < 0:
            raise ValueError(f"tenant {self.name!r}: SM quota {self.quota_sms} < 0")
        if self.kind not in KINDS:
            raise ValueError(f"tenant {self.name!r}: kind must be one of {', '.join(KINDS)}")
        if not self.name or len(self.name) > 64 or not self.name.isprintable():
            raise ValueError(f"tenant name {self.name!r}: 1-64 printable characters")


@dataclass(frozen=True)
class UidQuota:
    classes: tuple[str, ...] = (BE,)
    max_sms: int = 0         # largest SM quota one tenant may ask for (0: any)
    max_device_mb: int = 0   # device memory of all the uid's clients together (0: no limit)
    max_clients: int = 4     # client connections at once (0: no limit)

    def __post_init__(self) -> None:
        bad = [c for c in self.classes if c not in CLASSES]
        if bad:
            raise ValueError(f"quota classes {bad}: each must be LC or BE")
        for name in ("max_sms", "max_device_mb", "max_clients"):
            if getattr(self, name) < 0:
                raise ValueError(f"quota {name} must be >= 0")


UNLIMITED = UidQuota(classes=CLASSES, max_sms=0, max_device_mb=0, max_clients=0)


@dataclass
class Quotas:
    default: UidQuota = field(default_factory=UidQuota)
    by_uid: dict[int, UidQuota] = field(default_factory=dict)

    def for_uid(self, uid: int) -> UidQuota:
        if uid == 0:
            return UNLIMITED
        return self.by_uid.get(uid, self.default)

    def check_tenant(self, uid: int, cls: str, quota_sms: int, clients_now: int) -> None:
        """Raise QuotaError unless ``uid`` may open one more tenant like this."""
        q = self.for_uid(uid)
        if cls not in q.classes:
            raise QuotaError(f"uid {uid} may not run {cls} work (allowed: "
                             f"{', '.join(q.classes) or 'none'})")
        if q.max_sms and (quota_sms == 0 or quota_sms > q.max_sms):
            asked = "the whole GPU" if quota_sms == 0 else f"{quota_sms} SMs"
            raise QuotaError(f"uid {uid} may ask for at most {q.max_sms} SMs, not {asked}")
        if q.max_clients and clients_now >= q.max_clients:
            raise QuotaError(f"uid {uid} already has {clients_now} clients "
                             f"(at most {q.max_clients})")


class MemoryLedger:
    """Device memory per uid across all of its clients (thread-safe)."""

    def __init__(self, quotas: Quotas) -> None:
        self.quotas = quotas
        self._used: dict[int, int] = {}
        self._lock = threading.Lock()

    def charge(self, uid: int, nbytes: int) -> bool:
        """Take ``nbytes`` for ``uid``; False (and nothing taken) past its limit."""
        limit = self.quotas.for_uid(uid).max_device_mb << 20
        with self._lock:
            used = self._used.get(uid, 0)
            if limit and used + nbytes > limit:
                return False
            self._used[uid] = used + nbytes
        return True

    def release(self, uid: int, nbytes: int) -> None:
        with self._lock:
            left = self._used.get(uid, 0) - nbytes
            if left > 0:
                self._used[uid] = left
            else:
                self._used.pop(uid, None)

    def used(self, uid: int) -> int:
        with self._lock:
            return self._used.get(uid, 0)

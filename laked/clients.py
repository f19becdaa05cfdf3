"""laked's client socket: user-space programs (the ``lake`` library) as tenants.

``RUN_DIR/lake.sock`` is a Unix stream socket anyone may connect to (mode
0666); what a connection may do is bounded by its uid's quotas
(laked.tenants.Quotas), and the uid, gid and pid come from SO_PEERCRED,
never from what the client says.  A connection is one persistent client:
one thread here, one tenant of the arbiter, one shared region with its own
laked Server, until it says bye, closes the socket or dies.

Framing is laked/ctl.py's: a 4-byte little-endian length, then a msgpack
map; file descriptors travel with a frame as SCM_RIGHTS.  Every request
has ``op`` and gets exactly one reply ``{ok: true, ...}`` or ``{ok: false,
error: "why"}`` (the connection stays usable after an error reply).  A
frame that is cut short or longer than 1 MiB ends the connection.

``hello {name, class: "LC"|"BE", quota_sms, priority}`` + fds [region
memfd, sq eventfd, cq eventfd]
    Must come first.  The memfd holds a region laid out by
    laked.region.init_region, sealed against shrinking (F_SEAL_SHRINK: a
    shrunk mapping would fault laked), at most ``[clients] max_region_mb``.
    laked maps it, adds the tenant ``NAME.PID`` to the arbiter and serves
    the region's rings with the same Server the kernel's region has, so
    the client's cu* sessions (lake.ring.Session) work as the kernel's do.
    -> ``{tenant, sms, executor, region_registered}``
``infer {model, inputs: [[off, dtype, shape], ...], out: [off, cap]}``
    Runs a hosted model on arrays in the client's heap (numeric dtypes,
    each array inside the heap and aligned to its item size); outputs are
    written back packed, each 64-byte aligned, into [off, off + cap).
    -> ``{outputs: [[off, dtype, shape], ...]}``, or, when they do not fit,
    ``{ok: false, error, need: BYTES}`` with nothing written.
``models`` -> ``{models}``; ``jobs`` -> ``{jobs}`` (this client's);
``job_start {name, args}`` / ``job_stop {name}`` -> ``{job}``
    Hosted BE jobs, owned by this client: they stop when it goes.
``repo_add {kind: "model"|"job", name, config}`` + one fd
    The client opens the file itself (laked never opens a user-given path
    as root); laked hands the fd to the repository, which checks that the
    uid is root or in the admin group.  -> ``{entry}``
``repo_remove {kind, name}`` -> ``{entry}``
``status`` -> ``{tenant, quota, device_bytes, uid_device_bytes, requests}``
``bye`` -> ``{}``, then laked closes the connection.

Teardown, whatever ended the connection: the client's Server stops, its
executor closes (freeing every session's device memory, streams and
modules), its device memory leaves the uid's ledger, its hosted jobs stop,
its tenant leaves the arbiter, and the region and fds are released.
"""
from __future__ import annotations

import fcntl
import functools
import itertools
import logging
import mmap
import os
import re
import socket
import stat
import struct
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import msgpack
import numpy as np

from .ctl import MAX_MSG, Peer, close_listener, send_msg
from .doorbell import EventfdDoorbell
from .executor import Executor, choose_executor
from .region import HDR_SIZE, Region, RegionError, layout_for
from .sched.base import Arbiter, TenantState
from .server import Server
from .tenants import CLASSES, MemoryLedger, Quotas, TenantSpec

log = logging.getLogger("laked.clients")

MAX_FDS = 4                 # the most any request carries is 3 (hello)
MAX_CONNECTIONS = 256       # all uids together, including those not past hello
HELLO_TIMEOUT = 10.0        # a connection that does not say hello is dropped
OUT_ALIGN = 64
MAX_INPUTS = 64
MAX_DIMS = 16
NUMERIC_KINDS = "biufc"     # bool, int, uint, float, complex
_NAME = re.compile(r"[A-Za-z0-9_.+-]{1,32}")

ExecutorFactory = Callable[[Region, TenantState, int], Executor]


class Host(Protocol):
    """What laked.hosting.Host offers the client socket (see that module)."""

    def list(self) -> dict[str, Any]: ...
    def infer(self, name: str, inputs: list[np.ndarray]) -> list[np.ndarray]: ...
    def job_start(self, name: str, owner: str, uid: int, args: Any) -> dict[str, Any]: ...
    def job_stop(self, name: str, owner: str) -> dict[str, Any]: ...
    def jobs(self, owner: str) -> list[dict[str, Any]]: ...
    def stop_owner(self, owner: str) -> None: ...
    def repo_add(self, kind: str, name: str, fd: int, config: dict[str, Any], uid: int,
                 gid: int) -> dict[str, Any]: ...
    def repo_remove(self, kind: str, name: str, uid: int, gid: int) -> dict[str, Any]: ...


class FramingError(Exception):
    """The byte stream is broken (cut short, oversized): the connection ends."""


class _Malformed(ValueError):
    """A whole frame arrived but is not a request (bad msgpack, not a map)."""


class _Eof(Exception):
    """The peer closed the connection between frames."""


# -- framing ---------------------------------------------------------------------------------
def _close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def recv_frame(conn: socket.socket) -> tuple[Any, list[int]]:
    """One decoded frame and the fds that came with it (the caller owns them).

    _Eof between frames, FramingError for a broken stream (fds closed),
    _Malformed for a frame that is not msgpack (fds returned for closing:
    the stream itself is fine).
    """
    head, fds, flags, _ = socket.recv_fds(conn, 4, MAX_FDS)
    try:
        if not head:
            raise _Eof()
        while len(head) < 4:
            more = conn.recv(4 - len(head))
            if not more:
                raise FramingError("connection closed inside a frame header")
            head += more
        (n,) = struct.unpack("<I", head)
        if n > MAX_MSG:
            raise FramingError(f"frame of {n} bytes is larger than {MAX_MSG}")
        body = bytearray()
        while len(body) < n:
            chunk = conn.recv(min(n - len(body), 1 << 16))
            if not chunk:
                raise FramingError("connection closed inside a frame")
            body += chunk
    except BaseException:
        _close_all(fds)
        raise
    if flags & socket.MSG_CTRUNC:       # the kernel already dropped the ones past MAX_FDS
        _close_all(fds)
        raise _Malformed(f"a request carries at most {MAX_FDS} file descriptors")
    try:
        return msgpack.unpackb(bytes(body), raw=False), fds
    except (ValueError, TypeError, msgpack.UnpackException) as e:
        _close_all(fds)
        raise _Malformed(f"frame is not msgpack: {e}") from None


# -- request fields ------------------------------------------------------------------------
_MISSING = object()


def _field(msg: dict[str, Any], key: str, typ: type | tuple[type, ...],
           default: Any = _MISSING) -> Any:
    v = msg.get(key, default)
    if v is _MISSING:
        raise ValueError(f"{msg.get('op')}: missing field {key!r}")
    if not isinstance(v, typ) or (isinstance(v, bool) and typ is int):
        want = typ.__name__ if isinstance(typ, type) else " or ".join(t.__name__ for t in typ)
        raise ValueError(f"{msg.get('op')}: field {key!r} must be {want}, "
                         f"not {type(v).__name__}")
    return v


def _int_in(msg: dict[str, Any], key: str, lo: int, hi: int, default: int) -> int:
    v = _field(msg, key, int, default)
    if not lo <= v <= hi:
        raise ValueError(f"{msg.get('op')}: {key} {v} is out of range {lo}..{hi}")
    return v


def _dtype(s: Any) -> np.dtype:
    if not isinstance(s, str) or len(s) > 16:
        raise ValueError(f"dtype must be a short string like '<f4', not {s!r}")
    try:
        dt = np.dtype(s)
    except TypeError:
        raise ValueError(f"dtype {s!r} is not a numpy dtype") from None
    if dt.kind not in NUMERIC_KINDS or dt.byteorder == ">" or dt.fields is not None:
        raise ValueError(f"dtype {s!r}: only little-endian numeric dtypes "
                         "(bool, int, uint, float, complex)")
    return dt


def _align(x: int, a: int) -> int:
    return (x + a - 1) & ~(a - 1)


def _retry(fn: Callable[[], Any]) -> Any:
    """Read counters another thread is changing (dict/deque mutated under us)."""
    for _ in range(4):
        try:
            return fn()
        except RuntimeError:
            time.sleep(0)
    return fn()


def _device_bytes(ex: Executor, info: dict[str, Any]) -> int:
    """What a client holds on the device: the executor's sessions' allocations,
    or what its uid was charged for them (the CPU executor allocates nothing)."""
    return max(int(info.get("device_bytes", 0)), _retry(ex.charged_bytes))


def meter(executor: Executor, ledger: MemoryLedger, uid: int) -> Executor:
    """Charge ``executor``'s device allocations to ``uid`` in ``ledger``."""
    executor.mem_charge = functools.partial(ledger.charge, uid)
    executor.mem_release = functools.partial(ledger.release, uid)
    return executor


def executor_factory(kind: str, ledger: MemoryLedger | None) -> ExecutorFactory:
    """The default: ``choose_executor(kind, region)``, metered per uid by ``ledger``."""
    def make(region: Region, tenant: TenantState, uid: int) -> Executor:
        ex = choose_executor(kind, region)
        return meter(ex, ledger, uid) if ledger is not None else ex
    return make


# -- one connection ----------------------------------------------------------------------------
@dataclass
class _Conn:
    id: int
    sock: socket.socket
    peer: Peer
    thread: threading.Thread | None = None
    counted: bool = False            # holds one of its uid's client slots
    tenant: TenantState | None = None
    region_fd: int = -1
    sq_efd: int = -1
    cq_efd: int = -1
    mm: mmap.mmap | None = None
    region: Region | None = None
    executor: Executor | None = None
    doorbell: EventfdDoorbell | None = None
    server: Server | None = None
    requests: int = 0
    errors: int = 0
    done: bool = False
    connected: float = field(default_factory=time.time)

    @property
    def label(self) -> str:
        who = self.tenant.name if self.tenant else "(no hello yet)"
        return f"client {who} (pid {self.peer.pid}, uid {self.peer.uid})"


class ClientServer:
    """Accepts clients on ``path``; one thread per connection."""

    def __init__(self, path: Path, *, arbiter: Arbiter, quotas: Quotas,
                 ledger: MemoryLedger, make_executor: ExecutorFactory,
                 host: Host | None = None, max_region_mb: int = 256,
                 max_connections: int = MAX_CONNECTIONS,
                 hello_timeout: float = HELLO_TIMEOUT) -> None:
        self.path = Path(path)
        self.arbiter = arbiter
        self.quotas = quotas
        self.ledger = ledger
        self.make_executor = make_executor
        self.host = host
        self.max_region_mb = max_region_mb
        self.max_connections = max_connections
        self.hello_timeout = hello_timeout
        self._conns: dict[int, _Conn] = {}
        self._lock = threading.Lock()        # _conns, uid slots, tenant names
        self._ids = itertools.count(1)
        self._stopping = False
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if self.path.exists() or self.path.is_symlink():
            self.path.unlink()
        self.sock.bind(str(self.path))
        os.chmod(self.path, 0o666)   # anyone may connect: quotas bound what they get
        self.sock.listen(64)
        self._thread = threading.Thread(target=self._accept, name="laked-clients",
                                        daemon=True)

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()
        log.info("client socket %s (regions up to %d MiB)", self.path, self.max_region_mb)

    def close(self, timeout: float = 10.0) -> None:
        """Stop accepting, end every connection (each tears itself down) and wait."""
        if self._stopping:
            return
        self._stopping = True
        close_listener(self.sock)
        self._thread.join(timeout)
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        with self._lock:
            conns = list(self._conns.values())
        for c in conns:
            try:
                c.sock.shutdown(socket.SHUT_RDWR)   # its thread sees EOF and tears down
            except OSError:
                pass
        deadline = time.monotonic() + timeout
        for c in conns:
            if c.thread is not None:
                c.thread.join(max(0.0, deadline - time.monotonic()))
                if c.thread.is_alive():
                    log.warning("%s did not finish within %.0fs", c.label, timeout)

    def clients(self) -> list[dict[str, Any]]:
        """One entry per client past hello (for laked status)."""
        with self._lock:
            conns = [c for c in self._conns.values() if c.tenant is not None and not c.done]
        out = []
        for c in conns:
            ex, srv, t = c.executor, c.server, c.tenant
            if ex is None or srv is None or t is None:
                continue
            info = _retry(ex.info)
            out.append({"tenant": t.name, "class": t.spec.cls, "pid": c.peer.pid,
                        "uid": c.peer.uid, "executor": ex.name,
                        "sessions": info.get("sessions", 0),
                        "device_bytes": _device_bytes(ex, info),
                        "requests": c.requests, "ring_requests": srv.stats.requests,
                        "region_mb": (c.region.size >> 20) if c.region else 0,
                        "connected_s": round(time.time() - c.connected, 1)})
        return out

    # -- accepting -----------------------------------------------------------------------------
    def _accept(self) -> None:
        while not self._stopping:
            try:
                sock, _ = self.sock.accept()
            except OSError:
                return              # closed: we are stopping
            try:
                creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
                peer = Peer(*struct.unpack("3i", creds))
            except OSError as e:
                log.warning("client connection without credentials: %s", e)
                sock.close()
                continue
            with self._lock:
                full = len(self._conns) >= self.max_connections
                if not full:
                    c = _Conn(next(self._ids), sock, peer)
                    self._conns[c.id] = c
            if full:
                log.warning("client pid %d uid %d refused: %d connections open", peer.pid,
                            peer.uid, self.max_connections)
                self._refuse(sock, f"laked has {self.max_connections} client connections open")
                continue
            c.thread = threading.Thread(target=self._serve, args=(c,),
                                        name=f"laked-client-{peer.pid}", daemon=True)
            c.thread.start()

    @staticmethod
    def _refuse(sock: socket.socket, why: str) -> None:
        try:
            sock.settimeout(1.0)
            send_msg(sock, {"ok": False, "error": why})
        except OSError:
            pass
        sock.close()

    # -- one connection's thread ------------------------------------------------------------------
    def _serve(self, c: _Conn) -> None:
        why = "closed the connection"
        try:
            c.sock.settimeout(self.hello_timeout)
            while not self._stopping and not c.done:
                try:
                    msg, fds = recv_frame(c.sock)
                except _Eof:
                    break
                except _Malformed as e:
                    c.errors += 1
                    self._reply(c, {"ok": False, "error": str(e)})
                    continue
                except FramingError as e:
                    why = f"broke the framing ({e})"
                    self._reply(c, {"ok": False, "error": f"{e}; closing the connection"})
                    break
                except TimeoutError:
                    why = f"said no hello within {self.hello_timeout:g}s"
                    break
                except OSError as e:
                    why = f"connection failed ({e})"
                    break
                try:
                    reply = self._handle(c, msg, fds)
                finally:
                    _close_all(fds)       # those a handler kept were taken out of the list
                if not reply.get("ok"):
                    c.errors += 1
                if not self._reply(c, reply):
                    why = "left before its reply"
                    break
        except Exception:  # noqa: BLE001 - never let a client's thread die silently
            log.exception("%s: connection thread failed", c.label)
            why = "hit an internal error"
        finally:
            self._teardown(c, why)

    def _reply(self, c: _Conn, reply: dict[str, Any]) -> bool:
        try:
            send_msg(c.sock, reply)
        except (TypeError, ValueError) as e:   # a host result msgpack cannot carry
            log.error("%s: reply not serialisable: %s", c.label, e)
            try:
                send_msg(c.sock, {"ok": False, "error": f"internal error: reply not "
                                                          f"serialisable ({e})"})
            except OSError:
                return False
        except OSError as e:
            log.info("%s: cannot reply: %s", c.label, e)
            return False
        return True

    def _handle(self, c: _Conn, msg: Any, fds: list[int]) -> dict[str, Any]:
        if not isinstance(msg, dict):
            return {"ok": False, "error": f"a request must be a map, not {type(msg).__name__}"}
        op = msg.get("op")
        handler = self._OPS.get(op) if isinstance(op, str) else None
        if handler is None:
            return {"ok": False, "error": f"unknown op {op!r} (known: {', '.join(self._OPS)})"}
        if c.tenant is None and op not in ("hello", "bye"):
            return {"ok": False, "error": f"{op}: say hello first"}
        c.requests += 1
        try:
            return handler(self, c, msg, fds)
        except (ValueError, RuntimeError, OSError, RegionError, LookupError) as e:
            # QuotaError is an OSError, laked.hosting.HostError a RuntimeError.
            # Per-request refusals stay at debug: a looping client must not flood the log.
            log.log(logging.INFO if op in ("hello", "repo_add", "repo_remove")
                    else logging.DEBUG, "%s: %s refused: %s", c.label, op, e)
            return {"ok": False, "error": str(e) or type(e).__name__}
        except Exception as e:  # noqa: BLE001 - a bug must not end the connection
            log.exception("%s: %s failed", c.label, op)
            return {"ok": False, "error": f"internal error: {e}"}

    # -- hello ----------------------------------------------------------------------------------
    def _hello(self, c: _Conn, msg: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        if c.tenant is not None:
            raise ValueError(f"hello: already registered as {c.tenant.name}")
        name = _field(msg, "name", str)
        if not _NAME.fullmatch(name):
            raise ValueError(f"hello: name {name!r}: 1-32 of A-Z a-z 0-9 _ . + -")
        cls = _field(msg, "class", str)
        if cls not in CLASSES:
            raise ValueError(f"hello: class must be LC or BE, not {cls!r}")
        quota_sms = _int_in(msg, "quota_sms", 0, 4096, 0)
        priority = _int_in(msg, "priority", -1000, 1000, 0)
        if len(fds) != 3:
            raise ValueError(f"hello: needs 3 file descriptors (region memfd, sq eventfd, "
                             f"cq eventfd), got {len(fds)}")
        uid = c.peer.uid
        with self._lock:
            mine = sum(1 for o in self._conns.values() if o.counted and o.peer.uid == uid)
            self.quotas.check_tenant(uid, cls, quota_sms, mine)
            c.counted = True          # hold the slot while we set up
        try:
            return self._register(c, name, cls, quota_sms, priority, fds)
        except BaseException:
            self._release(c)
            with self._lock:
                c.counted = False
            raise

    def _register(self, c: _Conn, name: str, cls: str, quota_sms: int, priority: int,
                  fds: list[int]) -> dict[str, Any]:
        region_fd, sq_efd, cq_efd = fds
        size = self._check_region_fd(region_fd)
        for fd, what in ((sq_efd, "sq"), (cq_efd, "cq")):
            if _fd_kind(fd) != "anon_inode:[eventfd]":
                raise ValueError(f"hello: the {what} doorbell is not an eventfd")
        # From here on the fds are ours to close (teardown or _release).
        c.region_fd, c.sq_efd, c.cq_efd = region_fd, sq_efd, cq_efd
        del fds[:3]
        try:
            c.mm = mmap.mmap(region_fd, size, mmap.MAP_SHARED,
                             mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as e:
            raise ValueError(f"hello: cannot map the region read-write: {e.strerror}") from None
        try:
            c.region = Region(c.mm)
            bad = ""
        except RegionError as e:
            bad = str(e)
        if bad:     # raised out here: the RegionError's frames hold views of the mapping
            raise ValueError(f"hello: region refused: {bad}")
        c.tenant = self._add_tenant(c, name, cls, quota_sms, priority)
        c.executor = self.make_executor(c.region, c.tenant, c.peer.uid)
        c.executor.tenancy = self.arbiter.tenancy(c.tenant)    # its cu* launches are gated
        c.doorbell = EventfdDoorbell(sq_efd, cq_efd)
        c.server = Server(c.region, c.doorbell, c.executor)
        c.server.start()
        c.sock.settimeout(None)      # a persistent client from now on
        log.info("%s connected: %s, %s SMs, priority %d, %d MiB region, %s executor",
                 c.label, cls, quota_sms or "all", priority, size >> 20, c.executor.name)
        return {"ok": True, "tenant": c.tenant.name, "sms": c.tenant.sms,
                "executor": c.executor.name, "region_registered": bool(c.executor.registered)}

    def _check_region_fd(self, fd: int) -> int:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError("hello: the region fd is not a memfd")
        try:
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        except OSError:
            raise ValueError("hello: the region fd is not a memfd "
                             "(memfd_create with MFD_ALLOW_SEALING)") from None
        if not seals & fcntl.F_SEAL_SHRINK:
            raise ValueError("hello: the region memfd must be sealed against shrinking "
                             "(fcntl F_ADD_SEALS F_SEAL_SHRINK)")
        limit = self.max_region_mb << 20
        if st.st_size > limit:
            raise ValueError(f"hello: region of {st.st_size >> 20} MiB is larger than laked "
                             f"allows ({self.max_region_mb} MiB, [clients] max_region_mb)")
        if st.st_size < HDR_SIZE:
            raise ValueError(f"hello: region of {st.st_size} bytes is smaller than its header")
        try:
            layout_for(st.st_size)
        except RegionError as e:
            raise ValueError(f"hello: region too small: {e}") from None
        return st.st_size

    def _add_tenant(self, c: _Conn, name: str, cls: str, quota_sms: int,
                    priority: int) -> TenantState:
        base = f"{name}.{c.peer.pid}"
        for n in itertools.count(1):
            tname = base if n == 1 else f"{base}.{n}"
            spec = TenantSpec(name=tname, cls=cls, quota_sms=quota_sms, priority=priority,
                              uid=c.peer.uid, kind="client")
            try:
                return self.arbiter.add_tenant(spec)
            except ValueError:
                if n > 64:
                    raise
        raise AssertionError("unreachable")

    # -- inference ------------------------------------------------------------------------------
    def _need_host(self) -> Host:
        if self.host is None:
            raise RuntimeError("laked hosts no models or jobs here: no repository is "
                               "configured ([repository] path in laked.toml)")
        return self.host

    def _array(self, c: _Conn, spec: Any, i: int) -> np.ndarray:
        assert c.mm is not None and c.region is not None
        if not isinstance(spec, (list, tuple)) or len(spec) != 3:
            raise ValueError(f"infer: input {i} must be [off, dtype, shape]")
        off, dts, shape = spec
        if isinstance(off, bool) or not isinstance(off, int):
            raise ValueError(f"infer: input {i}: offset must be an integer")
        dt = _dtype(dts)
        if (not isinstance(shape, (list, tuple)) or len(shape) > MAX_DIMS
                or any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in shape)):
            raise ValueError(f"infer: input {i}: shape must be a list of at most {MAX_DIMS} "
                             "non-negative integers")
        count = 1
        for d in shape:
            count *= d
        nbytes = count * dt.itemsize
        if not c.region.in_heap(off, nbytes):
            raise ValueError(f"infer: input {i}: [{off}, +{nbytes}) is outside the heap "
                             f"[{c.region.heap_off}, {c.region.heap_end})")
        if off % dt.itemsize:
            raise ValueError(f"infer: input {i}: offset {off} is not aligned to {dt.itemsize}")
        # A view over the client's memory: the inputs are not copied.
        return np.frombuffer(c.mm, dtype=dt, count=count, offset=off).reshape(shape)

    def _infer(self, c: _Conn, msg: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        assert c.region is not None
        host = self._need_host()
        model = _field(msg, "model", str)
        inputs = _field(msg, "inputs", (list, tuple))
        if len(inputs) > MAX_INPUTS:
            raise ValueError(f"infer: at most {MAX_INPUTS} inputs")
        out = _field(msg, "out", (list, tuple))
        if (len(out) != 2 or any(isinstance(v, bool) or not isinstance(v, int) for v in out)):
            raise ValueError("infer: out must be [offset, capacity]")
        out_off, cap = out
        if not c.region.in_heap(out_off, cap):
            raise ValueError(f"infer: output buffer [{out_off}, +{cap}) is outside the heap "
                             f"[{c.region.heap_off}, {c.region.heap_end})")
        arrays = [self._array(c, spec, i) for i, spec in enumerate(inputs)]
        try:
            results = host.infer(model, arrays)
        finally:
            del arrays               # views of the mapping: do not keep them past the call
        outs: list[np.ndarray] = []
        for i, r in enumerate(results):
            a = np.asarray(r, order="C")     # not ascontiguousarray: 0-d stays 0-d
            if a.dtype.kind not in NUMERIC_KINDS:
                raise RuntimeError(f"model {model!r}: output {i} has dtype {a.dtype}, "
                                   "not a numeric one")
            outs.append(a.astype(a.dtype.newbyteorder("<")) if a.dtype.byteorder == ">" else a)
        places, pos = [], out_off
        for a in outs:
            pos = _align(pos, OUT_ALIGN)
            places.append(pos)
            pos += a.nbytes
        need = pos - out_off
        if need > cap:
            return {"ok": False, "need": need,
                    "error": f"infer: outputs take {need} bytes; the output buffer has {cap}"}
        for at, a in zip(places, outs):
            if a.nbytes:
                c.region.write(at, memoryview(a.reshape(-1)).cast("B"))
        return {"ok": True, "outputs": [[at, a.dtype.str, list(a.shape)]
                                        for at, a in zip(places, outs)]}

    # -- hosted models, jobs, repository ---------------------------------------------------------
    def _models(self, c: _Conn, msg: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        return {"ok": True, "models": self._need_host().list()}

    def _job_start(self, c: _Conn, msg: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        assert c.tenant is not None
        name = _field(msg, "name", str)
        args = _field(msg, "args", (dict, list), {})
        job = self._need_host().job_start(name, c.tenant.name, c.peer.uid, args)
        return {"ok": True, "job": job}

    def _job_stop(self, c: _Conn, msg: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        assert c.tenant is not None
        job = self._need_host().job_stop(_field(msg, "name", str), c.tenant.name)
        return {"ok": True, "job": job}

    def _jobs(self, c: _Conn, msg: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        assert c.tenant is not None
        return {"ok": True, "jobs": self._need_host().jobs(c.tenant.name)}

    def _repo_add(self, c: _Conn, msg: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        kind = _field(msg, "kind", str)
        if kind not in ("model", "job"):
            raise ValueError(f"repo_add: kind must be model or job, not {kind!r}")
        name = _field(msg, "name", str)
        config = _field(msg, "config", dict, {})
        if len(fds) != 1:
            raise ValueError(f"repo_add: needs the file as 1 file descriptor, got {len(fds)}")
        if not stat.S_ISREG(os.fstat(fds[0]).st_mode):
            raise ValueError("repo_add: the file descriptor is not a regular file")
        # The fd is closed after the call (by _serve): the repository copies what it needs.
        entry = self._need_host().repo_add(kind, name, fds[0], config, c.peer.uid, c.peer.gid)
        log.info("%s added %s %s to the repository", c.label, kind, name)
        if isinstance(entry, dict) and entry.get("ok") is False:
            # added, but e.g. the model does not load: the entry says why
            return {"ok": False, "error": str(entry.get("error") or "repo_add failed"),
                    "entry": entry}
        return {"ok": True, "entry": entry}

    def _repo_remove(self, c: _Conn, msg: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        kind = _field(msg, "kind", str)
        name = _field(msg, "name", str)
        entry = self._need_host().repo_remove(kind, name, c.peer.uid, c.peer.gid)
        log.info("%s removed %s %s from the repository", c.label, kind, name)
        return {"ok": True, "entry": entry}

    def _status(self, c: _Conn, msg: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        assert c.tenant is not None and c.executor is not None and c.server is not None
        quota = asdict(self.quotas.for_uid(c.peer.uid))
        quota["classes"] = list(quota["classes"])
        info = _retry(c.executor.info)
        return {"ok": True, "tenant": _retry(c.tenant.summary), "quota": quota,
                "executor": c.executor.name, "sessions": info.get("sessions", 0),
                "device_bytes": _device_bytes(c.executor, info),
                "uid_device_bytes": self.ledger.used(c.peer.uid),
                "requests": c.requests, "ring": _retry(c.server.info)}

    def _bye(self, c: _Conn, msg: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        self._finish(c, "said bye")      # before the reply: freed when bye returns
        return {"ok": True}

    _OPS: dict[str, Callable[["ClientServer", _Conn, dict[str, Any], list[int]],
                             dict[str, Any]]] = {
        "hello": _hello, "infer": _infer, "models": _models, "job_start": _job_start,
        "job_stop": _job_stop, "jobs": _jobs, "repo_add": _repo_add,
        "repo_remove": _repo_remove, "status": _status, "bye": _bye}

    # -- teardown -------------------------------------------------------------------------------
    def _finish(self, c: _Conn, why: str) -> None:
        """Free what the client held and log it; idempotent.  bye runs this before
        its reply, so a client that said bye may reconnect into its freed slot."""
        c.done = True
        registered = c.tenant is not None
        freed, sessions = 0, 0
        if c.executor is not None:
            info = _retry(c.executor.info)
            freed = _device_bytes(c.executor, info)
            sessions = int(info.get("sessions", 0))
        label = c.label
        try:
            self._release(c)
        finally:
            with self._lock:
                c.counted = False
        if registered:
            log.info("%s gone (%s): freed %d bytes, %d sessions", label, why, freed, sessions)

    def _teardown(self, c: _Conn, why: str) -> None:
        try:
            self._finish(c, why)
        finally:
            with self._lock:
                self._conns.pop(c.id, None)
            try:
                c.sock.close()
            except OSError:
                pass

    def _release(self, c: _Conn) -> None:
        """Undo whatever of a registration exists; each step on its own."""
        if c.server is not None:
            c.server.stop()
            if c.server._thread is not None:  # noqa: SLF001 - it did not stop: keep its fds
                log.error("%s: server thread still running; leaving its region mapped",
                          c.label)
                return
            c.server = None
        if c.doorbell is not None:
            c.doorbell.close()
            c.doorbell = None
        if c.executor is not None:
            try:
                c.executor.close()      # frees device memory, streams, modules
            except Exception:  # noqa: BLE001 - go on releasing the rest
                log.exception("%s: closing its executor failed", c.label)
            c.executor.release_charges()    # the ledger gets it back even if close failed
            c.executor = None
        if c.tenant is not None:
            if self.host is not None:
                try:
                    self.host.stop_owner(c.tenant.name)
                except Exception:  # noqa: BLE001 - go on releasing the rest
                    log.exception("%s: stopping its jobs failed", c.label)
            self.arbiter.remove_tenant(c.tenant)
            c.tenant = None
        if c.region is not None:
            c.region.close()
            c.region = None
        if c.mm is not None:
            try:
                c.mm.close()
            except BufferError:     # a view still held somewhere: the GC unmaps it later
                log.warning("%s: region still referenced; unmapped later", c.label)
            c.mm = None
        _close_all([fd for fd in (c.region_fd, c.sq_efd, c.cq_efd) if fd >= 0])
        c.region_fd = c.sq_efd = c.cq_efd = -1


def _fd_kind(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""

"""A user-space client of laked: GPU work, hosted models and jobs, as a tenant.

``Client`` connects to laked's client socket (``$LAKED_RUN_DIR/lake.sock``,
default /run/lake/lake.sock) and hands it a shared region of its own (a
sealed memfd) with two eventfd doorbells.  laked serves that region's
rings exactly as it serves lake.ko's, so ``session()`` gives the same
cu*-like API kernel code has; ``infer`` runs a model from laked's
repository on arrays passed through the same shared memory.  What the
client may ask for (class, SMs, device memory, number of clients) is
bounded by its uid's quotas in laked's configuration.

    import numpy as np
    import lake

    with lake.Client(name="ranker", cls="LC", quota_sms=16) as c:
        print(c.models())
        (scores,) = c.infer("ranker", [np.zeros((8, 64), np.float32)])
        s = c.session()          # the cu* API over the ring
        s.null()

Protocol: laked/clients.py.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
from pathlib import Path
from types import TracebackType
from typing import Any, Sequence

import msgpack
import numpy as np

from laked.ctl import recv_msg, send_msg

from .ring import HeapExhausted, PeerGone, Ring, Session

log = logging.getLogger("lake.client")

OUT_MIN = 64 << 10          # first output buffer; it grows when laked says ``need``


class NotRunning(ConnectionError):
    """No laked answers on the client socket."""


class ClientError(RuntimeError):
    """laked refused a request; the message is laked's."""

    def __init__(self, message: str, reply: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.reply = reply or {}


def default_path() -> Path:
    return Path(os.environ.get("LAKED_RUN_DIR", "/run/lake")) / "lake.sock"


class Client:
    """One connection to laked: a tenant with its own shared region.

    Thread-safe: requests on the socket are serialised; cu* sessions from
    ``session()`` may be used from any number of threads.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None, name: str = "client",
                 cls: str = "BE", quota_sms: int = 0, priority: int = 0,
                 region_mb: int = 64, timeout: float = 30.0) -> None:
        self.path = Path(path) if path is not None else default_path()
        self.timeout = timeout
        self._lock = threading.Lock()        # one request on the socket at a time
        self._out_lock = threading.Lock()    # the output buffer, shared by infer callers
        self._out_off: int | None = None     # reusable output buffer for infer
        self._out_cap = 0
        self._closed = False
        self._lost = ""                      # why the connection is unusable, if it is
        self.ring = Ring(region_mb << 20, name=f"lake-client-{name[:64]}")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.settimeout(timeout)
            try:
                self.sock.connect(str(self.path))
            except (FileNotFoundError, ConnectionRefusedError):
                raise NotRunning(f"laked is not running (no answer on {self.path}); "
                                 "start it with: laked start") from None
            except PermissionError:
                raise NotRunning(f"no permission to connect to {self.path}") from None
            reply = self._call({"op": "hello", "name": name, "class": cls,
                                "quota_sms": quota_sms, "priority": priority},
                               [self.ring.fd, self.ring.sq_efd, self.ring.cq_efd])
        except BaseException:
            self.sock.close()
            self.ring.close()
            raise
        self.tenant: str = reply["tenant"]
        self.sms: int = reply.get("sms", 0)
        self.executor: str = reply.get("executor", "")
        self.region_registered: bool = bool(reply.get("region_registered"))
        self.ring.watch_hangup(self.sock.fileno())   # laked gone: waits fail at once

    # -- plumbing ----------------------------------------------------------------------------
    def _exchange(self, request: dict[str, Any], fds: Sequence[int] = ()) -> dict[str, Any]:
        with self._lock:
            if self._closed:
                raise ClientError("the client is closed")
            if self._lost:
                raise PeerGone(f"the connection to laked is lost ({self._lost})")
            try:
                send_msg(self.sock, request, fds)
                try:
                    reply = recv_msg(self.sock)
                except (ValueError, msgpack.UnpackException) as e:
                    raise ClientError(f"laked sent a bad reply: {e}") from None
            except (OSError, ClientError) as e:
                # Out of step with laked (a timeout, a cut reply): a later reply could
                # answer the wrong request, so this connection is done; laked then
                # frees what it held for us.
                self._lost = str(e) or type(e).__name__
                try:
                    self.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass                # not connected any more anyway
                if isinstance(e, ConnectionError) and not isinstance(e, PeerGone):
                    raise PeerGone("laked closed the connection") from None
                raise
        return reply

    def _call(self, request: dict[str, Any], fds: Sequence[int] = ()) -> dict[str, Any]:
        reply = self._exchange(request, fds)
        if not reply.get("ok"):
            raise ClientError(str(reply.get("error", "request refused")), reply)
        return reply

    # -- cu* over the ring -------------------------------------------------------------------
    def session(self) -> Session:
        """A new cu* session (lake_session_open); ``close()`` frees its objects in laked.

        A BE client's streams are non-blocking (laked gates them against LC
        work) and its launches on stream 0 are not gated: order its work
        with stream syncs, not with the legacy stream's implicit ordering."""
        return self.ring.session()

    # -- hosted models -------------------------------------------------------------------------
    def models(self) -> dict[str, Any]:
        """The repository's models (and jobs) as laked lists them."""
        return self._call({"op": "models"})["models"]

    def infer(self, model: str, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Run hosted ``model`` on ``arrays``; returns its outputs (copies).

        Inputs go through the shared region (copied once into heap buffers);
        outputs come back in a buffer kept between calls.
        """
        ins = [np.asarray(a, order="C") for a in arrays]    # 0-d stays 0-d
        # laked takes little-endian numbers only
        ins = [a.astype(a.dtype.newbyteorder("<")) if a.dtype.byteorder == ">" else a
               for a in ins]
        offs: list[int] = []
        try:
            specs = []
            for a in ins:
                off = self.ring.alloc(max(a.nbytes, 1))
                offs.append(off)
                if a.nbytes:
                    self.ring.view(off, a.nbytes)[:] = memoryview(a.reshape(-1)).cast("B")
                specs.append([off, a.dtype.str, list(a.shape)])
            return self._infer(model, specs)
        finally:
            for off in offs:
                self.ring.free(off)

    def _infer(self, model: str, specs: list[list[Any]]) -> list[np.ndarray]:
        with self._out_lock:    # held until the outputs are copied out of the buffer
            for _ in range(3):
                if self._out_off is None:
                    self._grow_out(OUT_MIN)
                assert self._out_off is not None
                reply = self._exchange({"op": "infer", "model": model, "inputs": specs,
                                        "out": [self._out_off, self._out_cap]})
                if reply.get("ok"):
                    return [np.frombuffer(self.ring.view(off, _nbytes(dt, shape)),
                                          dtype=np.dtype(dt)).reshape(shape).copy()
                            for off, dt, shape in reply["outputs"]]
                need = reply.get("need")
                if not isinstance(need, int) or need <= self._out_cap:
                    raise ClientError(str(reply.get("error", "infer refused")), reply)
                self._grow_out(need)
        raise ClientError(f"infer {model}: outputs kept growing")

    def _grow_out(self, need: int) -> None:
        cap = max(OUT_MIN, 1 << (need - 1).bit_length())
        if self._out_off is not None:
            self.ring.free(self._out_off)
            self._out_off, self._out_cap = None, 0
        try:
            self._out_off = self.ring.alloc(cap)
        except HeapExhausted:
            self._out_off = self.ring.alloc(need)   # the exact size may still fit
            cap = need
        self._out_cap = cap

    # -- hosted jobs ---------------------------------------------------------------------------
    def job_start(self, name: str, args: dict[str, Any] | list[Any] | None = None
                  ) -> dict[str, Any]:
        """Start hosted job ``name`` from the repository; it stops when this client goes."""
        return self._call({"op": "job_start", "name": name, "args": args or {}})["job"]

    def job_stop(self, name: str) -> dict[str, Any]:
        return self._call({"op": "job_stop", "name": name})["job"]

    def jobs(self) -> list[dict[str, Any]]:
        """This client's jobs."""
        return self._call({"op": "jobs"})["jobs"]

    # -- the repository (root or the admin group) ----------------------------------------------
    def repo_add(self, kind: str, name: str, path: str | os.PathLike[str],
                 config: dict[str, Any] | None = None) -> dict[str, Any]:
        """Add a model or job file to laked's repository (opened here, with our rights)."""
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return self._call({"op": "repo_add", "kind": kind, "name": name,
                               "config": config or {}}, [fd])["entry"]
        finally:
            os.close(fd)

    def repo_remove(self, kind: str, name: str) -> dict[str, Any]:
        return self._call({"op": "repo_remove", "kind": kind, "name": name})["entry"]

    # -- status and teardown -------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """This tenant's counters, the uid's quota and device memory in use."""
        reply = self._call({"op": "status"})
        reply.pop("ok", None)
        return reply

    def close(self) -> None:
        """Say bye; laked frees everything this client held.  Idempotent."""
        if self._closed:
            return
        with self._out_lock:        # not while an infer still reads its outputs
            try:
                self._exchange({"op": "bye"})
            except (OSError, ClientError, ValueError, msgpack.UnpackException) as e:
                log.debug("bye: %s", e)   # laked may be gone already: nothing to free then
            with self._lock:
                if self._closed:
                    return
                self._closed = True
                self.sock.close()
                self.ring.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _nbytes(dtype: str, shape: Sequence[int]) -> int:
    n = np.dtype(dtype).itemsize
    for d in shape:
        n *= d
    return n

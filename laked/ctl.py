"""laked's own control socket: the CLI talks to the running daemon here.

Unix stream socket, one msgpack request and one reply per connection,
each prefixed by a 4-byte little-endian length.  SO_PEERCRED tells who is
asking; requests that change state need uid 0.
"""
from __future__ import annotations

import logging
import os
import socket
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import msgpack

log = logging.getLogger("laked.ctl")

MAX_MSG = 1 << 20
Handler = Callable[[dict[str, Any], "Peer"], dict[str, Any]]


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int


class NotRunning(RuntimeError):
    """No laked answers on the control socket."""


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("peer closed the control socket")
        buf += chunk
    return buf


def send_msg(conn: socket.socket, obj: dict[str, Any], fds: Sequence[int] = ()) -> None:
    """One frame; ``fds`` travel with it as SCM_RIGHTS (the client socket's hello)."""
    data = msgpack.packb(obj, use_bin_type=True)
    frame = struct.pack("<I", len(data)) + data
    if fds:
        sent = socket.send_fds(conn, [frame], list(fds))
        if sent < len(frame):
            conn.sendall(frame[sent:])
    else:
        conn.sendall(frame)


def recv_msg(conn: socket.socket) -> dict[str, Any]:
    (n,) = struct.unpack("<I", _recv_exact(conn, 4))
    if n > MAX_MSG:
        raise ValueError(f"control message of {n} bytes is too large")
    obj = msgpack.unpackb(_recv_exact(conn, n), raw=False)
    if not isinstance(obj, dict):
        raise ValueError("control message is not a map")
    return obj


def call(path: Path, request: dict[str, Any], timeout: float = 120.0) -> dict[str, Any]:
    """Send one request to the daemon and return its reply."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(timeout)
    try:
        conn.connect(str(path))
    except (FileNotFoundError, ConnectionRefusedError):
        conn.close()
        raise NotRunning(f"laked is not running (no answer on {path})") from None
    with conn:
        send_msg(conn, request)
        return recv_msg(conn)


def close_listener(sock: socket.socket) -> None:
    """Wake the thread blocked in accept() on ``sock`` and close it."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


class Server:
    """Accepts control connections on a thread; one handler call each."""

    def __init__(self, path: Path, handler: Handler) -> None:
        self.path = path
        self.handler = handler
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if path.exists():
            path.unlink()
        self.sock.bind(str(path))
        os.chmod(path, 0o666)  # anyone may ask for status; writes check uid
        self.sock.listen(16)
        self.thread = threading.Thread(target=self._serve, name="laked-ctl", daemon=True)
        self._stopping = False

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        self._stopping = True
        close_listener(self.sock)
        if self.path.exists():
            self.path.unlink()

    def _serve(self) -> None:
        while not self._stopping:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                self._one(conn)

    def _one(self, conn: socket.socket) -> None:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        peer = Peer(*struct.unpack("3i", creds))
        conn.settimeout(10)
        try:
            request = recv_msg(conn)
        except (ValueError, ConnectionError, OSError, msgpack.UnpackException) as e:
            log.warning("bad control request from pid %d: %s", peer.pid, e)
            return
        try:
            reply = self.handler(request, peer)
        except Exception as e:  # one bad request must not kill the server
            log.exception("control request %r failed", request.get("op"))
            reply = {"ok": False, "error": f"internal error: {e}"}
        try:
            send_msg(conn, reply)
        except OSError as e:
            log.info("control peer pid %d left before the reply: %s", peer.pid, e)

"""User-space clients of laked: lake.Client <-> laked's client socket.

CPU executor only (no GPU, no lake.ko): real sockets, real processes, the
real ClientServer in-process or the real `laked start --no-module`.  Hosted
models and jobs go through the real laked.hosting.Host over a temporary
repository of TorchScript models and job.py files (as root lays one out).
Real device allocations (and their release when a client dies) are covered
by the GPU tests; here the memory quota is checked where it acts, in
laked/executor/base.py, before any executor's handler runs.
"""
from __future__ import annotations

import contextlib
import json
import logging
import mmap
import os
import pwd
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import msgpack
import numpy as np
import pytest

import lake
from lake.client import OUT_MIN
from lake.ring import Launch, Ring, u64
from laked import abi, ctl
from laked.clients import ClientServer, executor_factory, meter
from laked.config import Config, ConfigError
from laked.executor import CpuExecutor
from laked.executor.base import OK
from laked.hosting import Host
from laked.region import Region, Sqe, init_region
from laked.sched.base import Arbiter, CpuArbiter
from laked.tenants import BE, MemoryLedger, Quotas, UidQuota

try:
    import torch
except ImportError:             # only hosted models and jobs need it
    torch = None

ROOT = Path(__file__).resolve().parents[2]
NOBODY = 65534
NO_DEVICE = abi.LAKE_CUDA_ERROR_NO_DEVICE
OOM = abi.LAKE_CUDA_ERROR_OUT_OF_MEMORY
ENV = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
       "PYTHONPATH": f"{ROOT}:{ROOT / 'python'}"}

needs_root = pytest.mark.skipif(os.geteuid() != 0,
                                reason="needs root to run a client as a second uid "
                                       f"({NOBODY}) and to start laked")
needs_torch = pytest.mark.skipif(torch is None, reason="hosted models and jobs need torch "
                                                       "(scripts/setup installs the CPU build)")
# TorchScript is deprecated in torch 2.13 but still what many deployments ship
no_jit_warning = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")


def wait_for(pred: Callable[[], Any], timeout: float = 5.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


class FakeAllocExecutor(CpuExecutor):
    """Stands in for the GPU executor, which cannot run here: it "allocates" device
    memory as bookkeeping only (addresses, sizes, sessions), so the quota metering
    around it can be checked.  Real allocations are covered by the GPU tests
    (tests/gpu/test_clients_gpu.py)."""

    def __init__(self, region: Region) -> None:
        super().__init__(region)
        self.next = 0x10000
        self.handler_calls = 0
        for op, fn in ((abi.LAKE_OP_MEM_ALLOC, self.op_mem_alloc),
                       (abi.LAKE_OP_MEM_FREE, self.op_mem_free),
                       (abi.LAKE_OP_SESSION_CLOSE, self.op_session_close)):
            self._handlers[op] = fn

    def op_mem_alloc(self, sqe: Sqe):  # type: ignore[no-untyped-def]
        self.handler_calls += 1
        n = sqe.args[0]
        if n == 0 or n > 1 << 40:
            return (abi.LAKE_CUDA_ERROR_INVALID_VALUE, 0, 0)
        dptr, self.next = self.next, self.next + n
        self.session(sqe.session).add_alloc(dptr, n)
        return (0, dptr, 0)

    def op_mem_free(self, sqe: Sqe):  # type: ignore[no-untyped-def]
        s = self.session(sqe.session)
        if not s.remove_alloc(sqe.args[0]):
            return (abi.LAKE_CUDA_ERROR_INVALID_VALUE, 0, 0)
        return OK


@contextlib.contextmanager
def client_server(quotas: Quotas | None = None, host: Host | None = None,
                  max_region_mb: int = 64, executor: Callable[..., Any] | None = None,
                  **kw: Any) -> Iterator[ClientServer]:
    """The real ClientServer in this process, on a socket any uid can reach; with a
    ``host``, on the host's arbiter (as laked shares one between them)."""
    d = Path(tempfile.mkdtemp(prefix="lake-clients-"))
    d.chmod(0o755)
    quotas = quotas or Quotas()
    ledger = MemoryLedger(quotas)
    make = executor or executor_factory("cpu", ledger)
    arbiter: Arbiter = host.arbiter if host is not None else CpuArbiter()
    srv = ClientServer(d / "lake.sock", arbiter=arbiter, quotas=quotas, ledger=ledger,
                       make_executor=make, host=host, max_region_mb=max_region_mb, **kw)
    srv.start()
    try:
        yield srv
    finally:
        srv.close()
        shutil.rmtree(d, ignore_errors=True)


def tenants(srv: ClientServer) -> list[str]:
    return sorted(srv.arbiter.tenants)


def run_as_nobody(script: str, *args: str, timeout: float = 30) -> dict[str, Any]:
    """Run ``script`` in a fresh interpreter as uid/gid 65534; its last line is JSON."""
    p = subprocess.run([sys.executable, "-c", textwrap.dedent(script), *args],
                       user=NOBODY, group=NOBODY, extra_groups=[], env=ENV, cwd="/",
                       capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.strip().splitlines()[-1])


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return "an unknown user"           # as laked/repo.py names a uid without a name


# -- a real repository behind the real Host ---------------------------------------------------
def put(repo: Path, kind: str, name: str, data: bytes, config: dict[str, Any] | None = None
        ) -> Path:
    """What root does by hand: REPO/{models,jobs}/NAME/ with the file and its config,
    owned by us (root in CI; laked trusts its own uid) and writable by no one else."""
    d = repo / f"{kind}s" / name
    d.mkdir(parents=True, exist_ok=True)
    for p in (d.parent, d):
        p.chmod(0o755)
    f = d / ("model.pt" if kind == "model" else "job.py")
    f.write_bytes(data)
    f.chmod(0o644)
    if config:
        c = d / "config.toml"
        c.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in config.items()))
        c.chmod(0o644)
    return f


@contextlib.contextmanager
def real_host(models: dict[str, tuple[Path, dict[str, Any]]] | None = None,
              jobs: dict[str, str] | None = None) -> Iterator[Host]:
    """laked.hosting.Host (no admin group: only root may change the repository) on a
    CPU arbiter, over a fresh repository holding ``models`` (name -> (TorchScript
    file, config)) and ``jobs`` (name -> job.py source)."""
    repo = Path(tempfile.mkdtemp(prefix="lake-repo-"))
    repo.chmod(0o755)
    for name, (path, config) in (models or {}).items():
        put(repo, "model", name, path.read_bytes(), config)
    for name, source in (jobs or {}).items():
        put(repo, "job", name, textwrap.dedent(source).encode())
    host = Host(repo, CpuArbiter(), admin_group=None, stop_timeout=5.0)
    host.start()
    try:
        yield host
    finally:
        host.close()
        shutil.rmtree(repo, ignore_errors=True)


@pytest.fixture(scope="module")
def model_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Small TorchScript models, scripted once for the module (name -> model.pt)."""
    if torch is None:
        pytest.skip("hosted models need torch")

    class Double(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 2.0

    class Mixed(torch.nn.Module):
        """Two inputs; outputs of four dtypes and several shapes, one empty, one 0-d."""

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[
                torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                torch.Tensor, torch.Tensor]:
            return (x * 2.0, (y * 2.0).to(torch.int64), x > 5.0, x.sum(dim=1),
                    (y * 2.0).to(torch.uint8), x[:0], x.sum())

    class Big(torch.nn.Module):
        """More output than the client's first output buffer (OUT_MIN bytes)."""

        def __init__(self, n: int) -> None:
            super().__init__()
            self.n = n

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return (torch.arange(self.n, dtype=torch.float32) + x.sum() * 0.0,
                    torch.ones(3, dtype=torch.int8))

    class DictOut(torch.nn.Module):
        """Returns what hosted models may not: a dict."""

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"y": x}

    d = tmp_path_factory.mktemp("models")
    out = {}
    for name, m in (("double", Double()), ("mixed", Mixed()), ("big", Big(OUT_MIN)),
                    ("dict", DictOut())):
        out[name] = d / f"{name}.pt"
        torch.jit.save(torch.jit.script(m.eval()), str(out[name]))
        out[name].chmod(0o644)
    return out


# -- the cu* API through a client's own ring -------------------------------------------------
def test_null_round_trips_through_the_clients_own_ring() -> None:
    with client_server() as srv, lake.Client(srv.path, name="rt") as c:
        assert c.executor == "cpu" and c.tenant == f"rt.{os.getpid()}"
        s = c.session()
        for _ in range(300):
            s.null()
        with pytest.raises(lake.CallError) as e:
            s.mem_alloc(4096)
        assert e.value.code == NO_DEVICE
        s.launch(Launch(1, (1, 1, 1), (1, 1, 1), [u64(0)]))    # async: latched
        with pytest.raises(lake.CallError):
            s.stream_sync()
        s.close()
        st = c.status()
        assert st["ring"]["by_op"]["null"] == 300 and st["executor"] == "cpu"
        assert st["tenant"]["name"] == c.tenant and st["tenant"]["class"] == BE
        assert st["quota"]["classes"] == ["LC", "BE"]           # root is never limited
        assert tenants(srv) == [c.tenant]
        assert [x["tenant"] for x in srv.clients()] == [c.tenant]
    wait_for(lambda: not tenants(srv) and not srv.clients(), what="the tenant to go")


def test_threads_share_one_client() -> None:
    errors: list[BaseException] = []
    with client_server() as srv, lake.Client(srv.path) as c:
        def work() -> None:
            try:
                s = c.session()
                for _ in range(100):
                    s.null()
                c.status()
                s.close()
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)
        ts = [threading.Thread(target=work) for _ in range(8)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(20)
        assert not errors
        assert c.status()["ring"]["by_op"]["null"] == 800


def test_default_socket_comes_from_laked_run_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    with client_server() as srv:
        monkeypatch.setenv("LAKED_RUN_DIR", str(srv.path.parent))
        with lake.Client() as c:
            c.session().null()
        monkeypatch.setenv("LAKED_RUN_DIR", str(srv.path.parent / "nowhere"))
        with pytest.raises(lake.NotRunning, match="laked is not running"):
            lake.Client()


def test_waits_fail_at_once_when_laked_goes_away() -> None:
    with client_server() as srv:
        c = lake.Client(srv.path)
        s = c.session()
        s.null()
        srv.close()                            # laked stops: every client torn down
        t = time.monotonic()
        with pytest.raises(lake.PeerGone):
            s.null()
        assert time.monotonic() - t < 5        # not the 30 s request timeout
        c.close()                              # bye to nobody: quiet


# -- hello refusals -------------------------------------------------------------------------
QUOTA_CHILD = """
import json, sys
import lake
path, out = sys.argv[1], {}
def hello(**kw):
    try:
        return lake.Client(path, **kw)
    except lake.ClientError as e:
        return str(e)
out["lc"] = hello(cls="LC")
out["sms"] = hello(cls="BE", quota_sms=100)
out["whole"] = hello(cls="BE")                       # 0: the whole GPU
first = hello(cls="BE", quota_sms=8, name="one")
second = hello(cls="BE", quota_sms=64, name="two")
out["third"] = hello(cls="BE", quota_sms=8, name="three")
out["tenants"] = [first.tenant, second.tenant]
s = first.session()
s.null()
for n in (2 << 20, 4096):                            # over the 1 MiB quota, then under
    try:
        s.mem_alloc(n)
    except lake.CallError as e:
        out[f"alloc_{n}"] = e.code
out["status"] = first.status()
first.close()
out["again"] = hello(cls="BE", quota_sms=8, name="again").tenant    # a slot is free again
print(json.dumps(out))
"""


@needs_root
def test_hello_is_refused_beyond_the_uids_quota() -> None:
    quotas = Quotas(default=UidQuota(classes=(BE,), max_sms=64, max_device_mb=1,
                                     max_clients=2))
    with client_server(quotas) as srv:
        out = run_as_nobody(QUOTA_CHILD, str(srv.path))
        assert out["lc"] == f"uid {NOBODY} may not run LC work (allowed: BE)"
        assert out["sms"] == f"uid {NOBODY} may ask for at most 64 SMs, not 100 SMs"
        assert out["whole"] == f"uid {NOBODY} may ask for at most 64 SMs, not the whole GPU"
        assert out["third"] == f"uid {NOBODY} already has 2 clients (at most 2)"
        # the device-memory quota refuses before the executor's handler (which says
        # NO_DEVICE on the CPU): OUT_OF_MEMORY over it, NO_DEVICE under it
        assert out["alloc_2097152"] == OOM and out["alloc_4096"] == NO_DEVICE
        st = out["status"]
        assert st["tenant"]["uid"] == NOBODY and st["uid_device_bytes"] == 0
        assert st["quota"] == {"classes": ["BE"], "max_sms": 64, "max_device_mb": 1,
                               "max_clients": 2}
        assert out["again"].startswith("again.")
        wait_for(lambda: not tenants(srv), what="the child's tenants to go")


def raw_hello(path: Path, fds: list[int], **fields: Any) -> dict[str, Any]:
    msg = {"op": "hello", "name": "raw", "class": "BE", "quota_sms": 0, "priority": 0}
    msg.update(fields)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(str(path))
        data = msgpack.packb(msg)
        socket.send_fds(s, [struct.pack("<I", len(data)) + data], fds)
        return ctl.recv_msg(s)


def memfd(size: int, data: bytes | None = None, seal: bool = True) -> int:
    fd = os.memfd_create("test-region", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    if data is not None:
        os.pwrite(fd, data, 0)
    else:
        with mmap.mmap(fd, size) as mm:
            init_region(mm)
    if seal:
        import fcntl
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    return fd


def open_fds() -> dict[str, str]:
    out = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            out[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            pass            # the listing's own fd
    return out


def test_hello_refuses_bad_regions_and_doorbells_without_leaking_fds() -> None:
    with client_server(max_region_mb=8) as srv:
        with pytest.raises(lake.ClientError,
                           match=r"region of 16 MiB is larger than laked allows \(8 MiB"):
            lake.Client(srv.path, region_mb=16)
        before = open_fds()
        sq, cq = os.eventfd(0), os.eventfd(0)
        r, w = os.pipe()
        cases = [
            (memfd(1 << 20, os.urandom(1 << 20)), sq, cq, "bad region magic"),
            (memfd(1 << 20, seal=False), sq, cq, "sealed against shrinking"),
            (memfd(8192, bytes(8192)), sq, cq, "region too small"),
            (memfd(1 << 20), r, cq, "the sq doorbell is not an eventfd"),
            (memfd(1 << 20), sq, w, "the cq doorbell is not an eventfd"),
            (r, sq, cq, "the region fd is not a memfd"),
        ]
        for region, a, b, why in cases:
            reply = raw_hello(srv.path, [region, a, b])
            assert not reply["ok"] and why in reply["error"], (why, reply)
            if region not in (r, w):
                os.close(region)
        fd = memfd(1 << 20)
        reply = raw_hello(srv.path, [fd])
        assert "needs 3 file descriptors" in reply["error"]
        assert "class must be LC or BE" in raw_hello(srv.path, [fd, sq, cq],
                                                     **{"class": "XX"})["error"]
        assert "name 'a b'" in raw_hello(srv.path, [fd, sq, cq], name="a b")["error"]
        assert "'quota_sms' must be int" in raw_hello(srv.path, [fd, sq, cq],
                                                      quota_sms="8")["error"]
        reply = raw_hello(srv.path, [fd, sq, cq])          # a good one still works
        assert reply["ok"] and reply["tenant"].startswith("raw.")
        for x in (fd, sq, cq, r, w):
            os.close(x)
        # every fd laked received was closed (same process: none is left beyond ours)
        def kept() -> set[tuple[str, str]]:
            return set(open_fds().items()) - set(before.items())
        try:
            wait_for(lambda: not kept() and not tenants(srv), what="fds")
        except AssertionError:
            raise AssertionError(f"laked kept fds {kept()}, tenants {tenants(srv)}") from None


# -- malformed frames -------------------------------------------------------------------------
def frame(obj: Any) -> bytes:
    data = msgpack.packb(obj)
    return struct.pack("<I", len(data)) + data


def test_malformed_frames_get_clear_errors_and_the_server_lives() -> None:
    with real_host() as host, client_server(host=host) as srv:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(str(srv.path))
            s.sendall(frame([1, 2, 3]))
            assert ctl.recv_msg(s)["error"] == "a request must be a map, not list"
            s.sendall(struct.pack("<I", 3) + b"\xc1\xc1\xc1")
            assert "frame is not msgpack" in ctl.recv_msg(s)["error"]
            s.sendall(frame({"op": "frobnicate"}))
            assert "unknown op 'frobnicate'" in ctl.recv_msg(s)["error"]
            s.sendall(frame({"op": 7}))
            assert "unknown op 7" in ctl.recv_msg(s)["error"]
            s.sendall(frame({"op": "status"}))
            assert ctl.recv_msg(s)["error"] == "status: say hello first"
            # broken framing: garbage read as a 1.8 GB length -> error, then closed
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
            assert "larger than" in ctl.recv_msg(s)["error"]
            try:                        # closed (a reset: laked left our bytes unread)
                assert s.recv(1) == b""
            except ConnectionResetError:
                pass
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(srv.path))
            s.sendall(struct.pack("<I", 100) + b"cut short")       # then EOF
            s.shutdown(socket.SHUT_WR)
            assert "inside a frame" in ctl.recv_msg(s)["error"]
        with lake.Client(srv.path) as c:                  # a hello'd client's mistakes
            heap_end = c.ring.region.heap_end
            bad = [
                ({"op": "infer", "model": "double", "inputs": [[0, "<f4", [4]]],
                  "out": [c.ring.region.heap_off, 4096]}, "outside the heap"),
                ({"op": "infer", "model": "double", "inputs": [[heap_end - 8, "<f4", [4]]],
                  "out": [c.ring.region.heap_off, 4096]}, "outside the heap"),
                ({"op": "infer", "model": "double", "inputs": [],
                  "out": [heap_end - 8, 4096]}, "output buffer"),
                ({"op": "infer", "model": "double",
                  "inputs": [[c.ring.region.heap_off, "O", [1]]],
                  "out": [c.ring.region.heap_off, 64]}, "only little-endian numeric"),
                ({"op": "infer", "model": "double",
                  "inputs": [[c.ring.region.heap_off, "<f4", [-1]]],
                  "out": [c.ring.region.heap_off, 64]}, "non-negative"),
                ({"op": "infer", "model": 3, "inputs": [], "out": [0, 0]},
                 "'model' must be str"),
                ({"op": "infer", "model": "double"}, "missing field 'inputs'"),
                ({"op": "hello"}, "already registered"),
                ({"op": "repo_add", "kind": "model", "name": "m"}, "needs the file"),
                ({"op": "job_start", "name": "train", "args": 5}, "'args' must be"),
            ]
            for req, why in bad:
                reply = c._exchange(req)  # noqa: SLF001 - raw requests on a live client
                assert not reply["ok"] and why in reply["error"], (req, reply)
            c.session().null()                             # still usable
        with lake.Client(srv.path) as c:                   # and the server lives
            c.session().null()


def test_silent_and_surplus_connections_are_dropped() -> None:
    with client_server(max_connections=2, hello_timeout=0.2) as srv:
        socks = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(3)]
        try:
            for s in socks:
                s.settimeout(5)
                s.connect(str(srv.path))
            # the third is over the limit: told so, then closed
            assert ctl.recv_msg(socks[2])["error"] == "laked has 2 client connections open"
            # the first two never say hello: dropped after hello_timeout
            for s in socks[:2]:
                assert s.recv(1) == b""
        finally:
            for s in socks:
                s.close()
        wait_for(lambda: not srv._conns, what="the connections to go")  # noqa: SLF001
        with lake.Client(srv.path) as c:           # room again
            c.session().null()


# -- hosted models, jobs and the repository through the real Host -----------------------------
@needs_torch
@no_jit_warning
def test_infer_through_shared_memory(model_files: dict[str, Path]) -> None:
    models = {"double": (model_files["double"], {"class": "LC", "dtype": "float64"}),
              "mixed": (model_files["mixed"], {}),                      # BE, float32
              "big": (model_files["big"], {}), "dict": (model_files["dict"], {})}
    with real_host(models) as host, client_server(host=host) as srv, \
            lake.Client(srv.path) as c:
        listed = c.models()
        assert listed == host.list()
        assert {m["name"]: m["state"] for m in listed["models"]} == dict.fromkeys(models,
                                                                                 "ready")
        x = np.arange(12, dtype=np.float32).reshape(3, 4)
        y = np.arange(5, dtype=np.int64)
        a, b, gt, total, small, empty, scalar = c.infer("mixed", [x, y])
        assert scalar.shape == () and scalar == x.sum()        # 0-d stays 0-d
        assert a.dtype == np.float32 and np.array_equal(a, x * 2)
        assert b.dtype == np.int64 and np.array_equal(b, y * 2)
        assert gt.dtype == np.bool_ and np.array_equal(gt, x > 5)
        assert total.dtype == np.float32 and np.array_equal(total, x.sum(axis=1))
        assert small.dtype == np.uint8 and small.tolist() == [0, 2, 4, 6, 8]
        assert empty.dtype == np.float32 and empty.shape == (0, 4)
        # inputs of any numeric dtype, shape and layout are read as the client sent
        # them (the model casts them to its float64): the doubled values prove it
        inputs = [np.arange(6, dtype=np.int16).reshape(2, 3) - 3,
                  np.linspace(-1, 1, 10),
                  np.array([[True, False, True]]),
                  np.arange(24, dtype=np.uint8).reshape(2, 3, 4),
                  np.arange(8, dtype=">i4").reshape(2, 4),             # big-endian
                  np.arange(20, dtype=np.float32).reshape(4, 5)[:, ::2]]  # strided
        for v in inputs:
            (out,) = c.infer("double", [v])
            assert out.dtype == np.float64 and out.shape == v.shape, v
            assert np.array_equal(out, v.astype(np.float64) * 2), v
        # outputs larger than the first output buffer: laked says `need`, the client
        # grows its buffer and asks again
        assert c._out_cap == OUT_MIN                    # the client's first output buffer
        big, ones = c.infer("big", [x])
        assert big.dtype == np.float32 and np.array_equal(big, np.arange(OUT_MIN,
                                                                         dtype=np.float32))
        assert ones.dtype == np.int8 and ones.tolist() == [1, 1, 1]
        assert c._out_cap > OUT_MIN                     # grown
        with pytest.raises(lake.ClientError) as e:
            c.infer("nope", [x])
        assert str(e.value) == "no model 'nope' is hosted (laked repo list shows them)"
        with pytest.raises(lake.ClientError) as e:
            c.infer("dict", [x])
        assert str(e.value) == ("model dict returned dict: hosted models must return a "
                                "tensor or a tuple of tensors")
        assert c.ring.heap.used == c._out_cap  # noqa: SLF001 - only the output buffer left
        errors: list[BaseException] = []

        def work(seed: int) -> None:
            try:
                for i in range(30):
                    v = np.full((seed + 1, 7), seed * 100 + i, dtype=np.float64)
                    (out,) = c.infer("double", [v])
                    assert np.array_equal(out, v * 2)
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)
        ts = [threading.Thread(target=work, args=(i,)) for i in range(6)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(30)
        assert not errors
        rows = {m["name"]: m for m in host.list()["models"]}
        assert rows["double"]["requests"] == len(inputs) + 6 * 30
        assert rows["mixed"]["requests"] == 1 and rows["dict"]["errors"] == 1


def test_infer_without_a_repository_says_so() -> None:
    with client_server() as srv, lake.Client(srv.path) as c:
        with pytest.raises(lake.ClientError, match="no repository is configured"):
            c.infer("m", [np.zeros(1)])
        with pytest.raises(lake.ClientError, match="no repository is configured"):
            c.jobs()


TRAIN_JOB = """
from pathlib import Path

def run(ctx):
    while not ctx.stop.is_set():
        ctx.report(ctx.args["step"])
        ctx.stop.wait(0.005)
    Path(ctx.args["done"]).write_text("stopped")
"""


@needs_torch
def test_jobs_belong_to_the_client_and_stop_with_it(tmp_path: Path) -> None:
    def job_tenants(host: Host) -> list[str]:
        return sorted(t["name"] for t in host.arbiter.status()["tenants"]
                      if t["kind"] == "job")

    with real_host(jobs={"train": TRAIN_JOB}) as host, client_server(host=host) as srv:
        c1 = lake.Client(srv.path, name="trainer")
        c2 = lake.Client(srv.path, name="other")
        try:
            one, two = c1.tenant, c2.tenant
            done = tmp_path / "done"
            job = c1.job_start("train", {"step": 3, "done": str(done)})
            assert (job["name"], job["owner"], job["uid"], job["state"]) == \
                ("train", one, 0, "running")
            wait_for(lambda: c1.jobs()[0]["items"] >= 9, what="the job to report")
            (mine,) = c1.jobs()
            assert (mine["name"], mine["owner"]) == ("train", one)
            assert mine["items"] % 3 == 0                  # its args came through
            assert c2.jobs() == []                         # not the other client's
            assert job_tenants(host) == [f"job:train:{one}"]
            with pytest.raises(lake.ClientError) as e:
                c1.job_start("train", {"step": 1, "done": str(done)})
            assert str(e.value) == f"job train is already running for {one}"
            with pytest.raises(lake.ClientError) as e:
                c2.job_stop("train")                       # not c2's to stop
            assert str(e.value) == f"no job train runs for {two}"
            stopped = c1.job_stop("train")
            assert stopped["state"] == "stopped" and stopped["items"] >= 9
            assert done.read_text() == "stopped"           # the job saw ctx.stop
            assert c1.jobs() == [] and host.jobs(one) == [] and job_tenants(host) == []

            # one each; a client's jobs stop when it goes, with a bye or without
            done1, done2 = tmp_path / "done1", tmp_path / "done2"
            c1.job_start("train", {"step": 1, "done": str(done1)})
            c2.job_start("train", {"step": 1, "done": str(done2)})
            wait_for(lambda: len(host.jobs()) == 2 and
                     all(j["items"] > 0 for j in host.jobs()), what="both jobs to run")
            assert [j["owner"] for j in c2.jobs()] == [two]
            c1.close()                       # bye: its jobs stop before laked replies
            assert host.jobs(one) == [] and done1.read_text() == "stopped"
            assert [(j["owner"], j["state"]) for j in host.jobs()] == [(two, "running")]
            assert job_tenants(host) == [f"job:train:{two}"]
            c2.sock.shutdown(socket.SHUT_RDWR)              # gone without a bye
            wait_for(lambda: not host.jobs(), what="the dropped client's job to stop")
            assert done2.read_text() == "stopped" and job_tenants(host) == []
        finally:
            c1.close()
            c2.close()


REPO_CHILD = """
import json, sys
import lake
c = lake.Client(sys.argv[1])
out = {}
for what, call in (("add", lambda: c.repo_add("model", "evil", sys.argv[2])),
                   ("remove", lambda: c.repo_remove("model", "m"))):
    try:
        out[what] = call()
    except lake.ClientError as e:
        out[what] = str(e)
print(json.dumps(out))
"""


@needs_root
@needs_torch
@no_jit_warning
def test_repository_changes_carry_the_peers_uid(model_files: dict[str, Path]) -> None:
    files = Path(tempfile.mkdtemp(prefix="lake-files-"))     # the non-admin child opens one
    files.chmod(0o755)
    model = files / "model.pt"
    shutil.copy(model_files["double"], model)
    model.chmod(0o644)
    x = np.arange(6, dtype=np.float64).reshape(2, 3)
    try:
        with real_host() as host, client_server(host=host) as srv, \
                lake.Client(srv.path) as c:
            entry = c.repo_add("model", "m", model, {"class": "LC", "dtype": "float64"})
            assert (entry["state"], entry["format"]) == ("ready", "torchscript"), entry
            (y,) = c.infer("m", [x])                       # usable right after the add
            assert np.array_equal(y, x * 2)
            out = run_as_nobody(REPO_CHILD, str(srv.path), str(model))
            who = f"{user_name(NOBODY)} (uid {NOBODY}) may not"
            only_root = ("only root (laked has no admin group configured) may change the "
                         "repository")
            assert out["add"] == f"repo add model evil: {only_root}; {who}"
            assert out["remove"] == f"repo remove model m: {only_root}; {who}"
            assert not (host.repo.path / "models" / "evil").exists()
            (y2,) = c.infer("m", [x])                      # root's model is still served
            assert np.array_equal(y2, x * 2)
            assert c.repo_remove("model", "m")["state"] == "removed"
            assert not (host.repo.path / "models" / "m").exists()
            with pytest.raises(lake.ClientError, match="no model 'm' is hosted"):
                c.infer("m", [x])
    finally:
        shutil.rmtree(files, ignore_errors=True)


@needs_torch
@no_jit_warning
def test_a_real_hosted_model_through_the_client(tmp_path: Path) -> None:
    """Add a TorchScript model through the socket, infer, and keep serving after a
    model that does not load."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU()).eval()
    model = tmp_path / "model.pt"
    torch.jit.save(torch.jit.script(net), str(model))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"PK\x03\x04 not a model")
    with real_host() as host, client_server(host=host) as srv, lake.Client(srv.path) as c:
        entry = c.repo_add("model", "mlp", model, {"class": "LC"})
        assert entry["state"] == "ready", entry
        x = np.random.default_rng(0).standard_normal((5, 16), dtype=np.float32)
        (y,) = c.infer("mlp", [x])
        with torch.no_grad():
            assert np.allclose(y, net(torch.from_numpy(x)).numpy(), atol=1e-6)
        assert [m["name"] for m in c.models()["models"]] == ["mlp"]
        with pytest.raises(lake.ClientError, match="not a TorchScript or torch.export file"):
            c.repo_add("model", "junk", junk)
        (y2,) = c.infer("mlp", [x])             # the others keep being served
        assert np.array_equal(y, y2)
        assert c.repo_remove("model", "mlp")["state"] == "removed"
        with pytest.raises(lake.ClientError, match="no model 'mlp' is hosted"):
            c.infer("mlp", [x])


# -- device-memory quota in laked/executor/base.py -----------------------------------------
def region(size: int = 1 << 20) -> Region:
    buf = bytearray(size)
    init_region(buf)
    return Region(buf)


def sqe(op: int, *args: int, session: int = 1) -> Sqe:
    return Sqe(1, op, session, 0, tuple(args) + (0,) * (abi.LAKE_SQE_ARGS - len(args)))


def test_memory_quota_refuses_before_the_cpu_executors_handler() -> None:
    # GPU tests cover real allocations; the CPU executor cannot allocate, so the
    # refusal is seen as OUT_OF_MEMORY instead of its NO_DEVICE.
    ledger = MemoryLedger(Quotas(by_uid={1000: UidQuota(max_device_mb=1)}))
    ex = meter(CpuExecutor(region()), ledger, 1000)
    assert ex.execute(sqe(abi.LAKE_OP_MEM_ALLOC, 2 << 20))[0] == OOM
    assert ex.execute(sqe(abi.LAKE_OP_MEM_ALLOC, 4096))[0] == NO_DEVICE
    assert ledger.used(1000) == 0                  # the failed allocation was not kept
    unmetered = CpuExecutor(region())
    assert unmetered.execute(sqe(abi.LAKE_OP_MEM_ALLOC, 2 << 20))[0] == NO_DEVICE


def test_memory_quota_charges_on_success_and_releases_on_free_close_and_teardown() -> None:
    ledger = MemoryLedger(Quotas(by_uid={1000: UidQuota(max_device_mb=1)}))
    ex = meter(FakeAllocExecutor(region()), ledger, 1000)
    a = ex.execute(sqe(abi.LAKE_OP_MEM_ALLOC, 600 << 10))
    assert a[0] == 0 and ledger.used(1000) == 600 << 10
    calls = ex.handler_calls
    assert ex.execute(sqe(abi.LAKE_OP_MEM_ALLOC, 600 << 10))[0] == OOM
    assert ex.handler_calls == calls               # refused before the handler
    assert ex.execute(sqe(abi.LAKE_OP_MEM_ALLOC, 0))[0] == abi.LAKE_CUDA_ERROR_INVALID_VALUE
    assert ex.execute(sqe(abi.LAKE_OP_MEM_FREE, 12345))[0] == abi.LAKE_CUDA_ERROR_INVALID_VALUE
    assert ledger.used(1000) == 600 << 10          # a failed free releases nothing
    assert ex.execute(sqe(abi.LAKE_OP_MEM_FREE, a[1]))[0] == 0
    assert ledger.used(1000) == 0
    ex.execute(sqe(abi.LAKE_OP_MEM_ALLOC, 100, session=1))
    ex.execute(sqe(abi.LAKE_OP_MEM_ALLOC, 200, session=2))
    assert ledger.used(1000) == 300 and ex.charged_bytes() == 300
    ex.execute(sqe(abi.LAKE_OP_SESSION_CLOSE, session=1))
    assert ledger.used(1000) == 200
    ex.close()
    assert ledger.used(1000) == 0 and ex.charged_bytes() == 0

    class OwnClose(FakeAllocExecutor):
        def close(self) -> None:       # like the GPU executor: its own, then the base's
            try:
                self.sessions.clear()
            finally:
                super().close()
    ex2 = meter(OwnClose(region()), ledger, 1000)
    ex2.execute(sqe(abi.LAKE_OP_MEM_ALLOC, 4096))
    assert ledger.used(1000) == 4096
    ex2.close()
    assert ledger.used(1000) == 0


def test_a_dropped_client_gives_its_device_memory_back(caplog: pytest.LogCaptureFixture
                                                        ) -> None:
    caplog.set_level(logging.INFO, logger="laked.clients")
    ledger_box: list[MemoryLedger] = []

    def make(region: Region, tenant: Any, uid: int) -> Any:
        return meter(FakeAllocExecutor(region), ledger_box[0], uid)
    with client_server(executor=make) as srv:
        ledger_box.append(srv.ledger)
        c = lake.Client(srv.path, name="leaky")
        s1, s2 = c.session(), c.session()
        s1.mem_alloc(1000)
        s2.mem_alloc(3000)
        assert srv.ledger.used(0) == 4000
        assert c.status()["device_bytes"] == 4000
        c.sock.shutdown(socket.SHUT_RDWR)          # gone without a bye
        wait_for(lambda: srv.ledger.used(0) == 0 and not tenants(srv), what="teardown")
        c.close()
    assert any(f"client leaky.{os.getpid()} (pid {os.getpid()}, uid 0) gone" in r.message
               and "freed 4000 bytes, 2 sessions" in r.message for r in caplog.records)


# -- the real daemon ---------------------------------------------------------------------------
@contextlib.contextmanager
def real_laked(config: str = "") -> Iterator[tuple[Path, Path]]:
    d = Path(tempfile.mkdtemp(prefix="laked-test-"))
    d.chmod(0o755)
    (d / "laked.toml").write_text(config)
    log_path = d / "out.log"
    with open(log_path, "w") as log_file:
        p = subprocess.Popen([sys.executable, "-m", "laked.cli", "--run-dir", str(d), "start",
                              "--no-module", "--executor", "cpu", "--config",
                              str(d / "laked.toml")], stdout=log_file,
                             stderr=subprocess.STDOUT, env=ENV, cwd=ROOT)
    try:
        def up() -> bool:
            if p.poll() is not None:
                raise AssertionError(f"laked exited {p.returncode}: {log_path.read_text()}")
            try:
                return bool(ctl.call(d / "laked.sock", {"op": "status"}, 2).get("ok"))
            except (ctl.NotRunning, OSError):
                return False
        wait_for(up, 15, "laked to start")
        yield d, log_path
    finally:
        try:
            ctl.call(d / "laked.sock", {"op": "stop"}, 5)
            p.wait(10)
        except (ctl.NotRunning, OSError, subprocess.TimeoutExpired):
            p.kill()
            p.wait(5)
        shutil.rmtree(d, ignore_errors=True)


KILLED_CHILD = """
import sys, time
import lake
c = lake.Client(sys.argv[1], name="victim", region_mb=16)
s = c.session()
for _ in range(50):
    s.null()
print(c.tenant, flush=True)
time.sleep(60)
"""


def daemon_status(d: Path) -> dict[str, Any]:
    return ctl.call(d / "laked.sock", {"op": "status"}, 5)["status"]


@needs_root
def test_real_daemon_survives_a_client_killed_mid_connection() -> None:
    with real_laked("[clients]\nmax_region_mb = 32\n") as (d, log_path):
        victim = subprocess.Popen([sys.executable, "-c", KILLED_CHILD, str(d / "lake.sock")],
                                  stdout=subprocess.PIPE, text=True, env=ENV)
        try:
            assert victim.stdout is not None
            tenant = victim.stdout.readline().strip()
            assert tenant.startswith("victim.")
            st = daemon_status(d)
            assert [x["tenant"] for x in st["clients"]] == [tenant]
            assert [t["name"] for t in st["arbiter"]["tenants"]] == [tenant]
            assert st["mode"] == "no-module" and st["policy"] is None
            victim.send_signal(signal.SIGKILL)
        finally:
            victim.kill()
            victim.wait(5)
        def gone() -> bool:
            st = daemon_status(d)
            return not st["clients"] and not st["arbiter"]["tenants"]
        wait_for(gone, what="the victim's client and tenant to go")
        wait_for(lambda: f"client {tenant} (pid {victim.pid}, uid 0) gone" in
                 log_path.read_text(), what="the log line")
        with lake.Client(d / "lake.sock", name="next", region_mb=16) as c:   # laked goes on
            s = c.session()
            for _ in range(100):
                s.null()
            with pytest.raises(lake.ClientError, match=r"larger than laked allows \(32 MiB"):
                lake.Client(d / "lake.sock", region_mb=64)
        # --no-module: no lake.ko needed, and the client socket takes anyone
        assert (d / "lake.sock").stat().st_mode & 0o777 == 0o666


@needs_root
def test_laked_start_refuses_non_root_and_bad_config(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "laked.cli", "--run-dir", str(tmp_path), "start",
           "--no-module", "--executor", "cpu"]
    p = subprocess.run(cmd, user=NOBODY, group=NOBODY, extra_groups=[], env=ENV, cwd=ROOT,
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 1 and "laked start needs root" in p.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text("[quota.uid.1000]\nmax_sms = -1\n")
    p = subprocess.run(cmd + ["--config", str(bad)], env=ENV, cwd=ROOT, capture_output=True,
                       text=True, timeout=30)
    assert p.returncode == 1
    assert f"{bad}: [quota.uid.1000] max_sms: -1 is out of range" in p.stderr
    p = subprocess.run(cmd + ["--config", str(tmp_path / "missing.toml")], env=ENV, cwd=ROOT,
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 1 and "missing.toml: no such configuration file" in p.stderr


def test_no_module_daemon_imports_neither_netlink_nor_bcc() -> None:
    code = ("import sys; from laked.config import Config; from laked.daemon import Daemon; "
            "d = Daemon(Config(module=False, executor='cpu')); "
            "print(sorted(m for m in ('laked.genl', 'laked.policy', 'bcc', 'pyroute2') "
            "if m in sys.modules))")
    p = subprocess.run([sys.executable, "-c", code], env=ENV, cwd=ROOT, capture_output=True,
                       text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]"


# -- the configuration file -----------------------------------------------------------------
EXAMPLE = """
[kernel]
class = "BE"
quota_sms = 24
priority = 5
[clients]
max_region_mb = 128
[repository]
path = "/var/lib/lake/repo"
admin_group = "lakeadm"
[quota.default]
classes = ["BE"]
max_sms = 64
max_device_mb = 8192
max_clients = 4
[quota.uid.1000]
classes = ["LC", "BE"]
max_sms = 132
[scheduler]
atom_us = 300
"""


def test_config_file(tmp_path: Path) -> None:
    f = tmp_path / "laked.toml"
    f.write_text(EXAMPLE)
    cfg = Config.load(f, run_dir=tmp_path)
    k = cfg.kernel_tenant()
    assert (k.name, k.cls, k.quota_sms, k.priority, k.kind) == ("kernel", "BE", 24, 5,
                                                                "kernel")
    assert cfg.max_region_mb == 128 and cfg.scheduler == {"atom_us": 300}
    assert cfg.repo_path == Path("/var/lib/lake/repo") and cfg.admin_group == "lakeadm"
    assert cfg.client_sock_path == tmp_path / "lake.sock"
    assert cfg.quotas.for_uid(1000) == UidQuota(("LC", "BE"), 132, 8192, 4)  # rest inherited
    assert cfg.quotas.for_uid(1001) == UidQuota(("BE",), 64, 8192, 4)
    assert cfg.quotas.for_uid(0).max_sms == 0                                 # root: no limit
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    assert Config.load(empty).repo_path is None and Config.load(empty).kernel_class == "LC"
    for text, why in [
        ("[kernel]\nclass = 'XX'", "[kernel] class: class must be LC or BE, not 'XX'"),
        ("[kernel]\nquota = 1", "[kernel]: unknown key(s) quota"),
        ("[clients]\nmax_region_mb = true", "[clients] max_region_mb: must be an integer"),
        ("[clients]\nmax_region_mb = 0", "[clients] max_region_mb: 0 is out of range"),
        ("[quota.uid.bob]\nmax_sms = 1", "[quota.uid.bob]: the key must be a numeric uid"),
        ("[quota.default]\nclasses = 'BE'", "[quota.default] classes: must be a list"),
        ("[repository]\npath = 'repo'", "[repository] path: must be an absolute path"),
        ("[gpu]\nx = 1", "[gpu]: unknown section"),
        ("[kernel\n", "not valid TOML"),
    ]:
        f.write_text(text)
        with pytest.raises(ConfigError) as e:
            Config.load(f)
        assert str(e.value).startswith(f"{f}: ") and why in str(e.value), str(e.value)
    with pytest.raises(ConfigError, match="no such configuration file"):
        Config.load(tmp_path / "missing.toml")


def test_ring_refuses_nothing_the_standin_relied_on() -> None:
    """The producer side on its own: a sealed memfd laked can map, fds that close."""
    import fcntl
    with Ring(4 << 20) as r:
        assert fcntl.fcntl(r.fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK
        with pytest.raises(PermissionError):
            os.ftruncate(r.fd, 1 << 20)
        fds = (r.fd, r.sq_efd, r.cq_efd)
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)

"""laked as a process, serving user clients on a real GPU (device machine only).

One `laked start --no-module --executor gpu` for the module, with a
repository holding a working TorchScript model and a broken one, and a
config that limits every uid but root.  Clients are real processes: the
test's own, a child killed mid-request, and children running as uid 65534.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

try:
    import torch
    HAVE = torch.cuda.is_available()
    WHY = "" if HAVE else "torch sees no CUDA device"
except ImportError as e:
    HAVE, WHY = False, f"no torch: {e}"

pytestmark = pytest.mark.skipif(not HAVE or os.geteuid() != 0,
                                reason=f"needs an NVIDIA GPU and root: {WHY or 'not root'}")

ROOT = Path(__file__).resolve().parents[2]
NOBODY = 65534


def _model() -> "torch.nn.Module":
    torch.manual_seed(7)
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(),
                               torch.nn.Linear(128, 16)).eval()


@pytest.fixture(scope="module")
def laked() -> Iterator[dict[str, Any]]:
    base = Path(tempfile.mkdtemp(prefix="lake-gpu-"))
    os.chmod(base, 0o755)
    run, repo, code = base / "run", base / "repo", base / "code"
    run.mkdir(mode=0o755)
    for sub in ("models/good", "models/broken"):
        (repo / sub).mkdir(parents=True)
    os.chmod(repo, 0o755)
    torch.jit.trace(_model(), torch.randn(2, 64)).save(str(repo / "models/good/model.pt"))
    (repo / "models/good/config.toml").write_text('class = "LC"\nmax_batch = 64\n')
    (repo / "models/broken/model.pt").write_bytes(b"PK\x03\x04 this is not a model")
    (repo / "models/broken/config.toml").write_text('class = "LC"\n')
    cfg = base / "laked.toml"
    cfg.write_text(textwrap.dedent(f"""\
        [repository]
        path = "{repo}"
        admin_group = "root"
        [quota.default]
        classes = ["BE"]
        max_sms = 64
        max_device_mb = 64
        max_clients = 4
        [scheduler]
        reserve_mb = 256
        """))
    # a copy of the code uid 65534 can read, whatever the checkout's modes
    for d in ("laked", "lakelib", "python"):
        shutil.copytree(ROOT / d, code / d, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(["chmod", "-R", "a+rX", str(base)], check=True)
    env = dict(os.environ, PYTHONPATH=f"{ROOT}:{ROOT / 'python'}",
               CUDA_DEVICE_MAX_CONNECTIONS="32", PYTHONUNBUFFERED="1")
    log = open(base / "laked.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "laked.cli", "--run-dir", str(run), "start",
                             "--no-module", "--executor", "gpu", "--config", str(cfg)],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    sock = run / "laked.sock"
    deadline = time.monotonic() + 180
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail("laked did not start:\n" + (base / "laked.log").read_text()[-4000:])
        time.sleep(0.2)
    try:
        yield {"run": run, "proc": proc, "log": base / "laked.log", "code": code}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        print((base / "laked.log").read_text()[-3000:])
        shutil.rmtree(base, ignore_errors=True)


def _status(run: Path) -> dict[str, Any]:
    from laked import ctl
    reply = ctl.call(run / "laked.sock", {"op": "status"}, 30)
    assert reply.get("ok"), reply
    return reply["status"]


def _client(laked: dict[str, Any], **kw: Any) -> Any:
    import lake
    return lake.Client(path=laked["run"] / "lake.sock", **kw)


def _gpu_used_mib() -> float:
    import pynvml
    pynvml.nvmlInit()
    h = pynvml.nvmlDeviceGetHandleByIndex(0)
    return pynvml.nvmlDeviceGetMemoryInfo(h).used / 2**20


def test_hosted_model_serves_and_a_broken_one_says_why(laked: dict[str, Any]) -> None:
    import lake
    x = np.random.default_rng(1).standard_normal((8, 64)).astype(np.float32)
    want = _model()(torch.from_numpy(x)).detach().numpy()
    with _client(laked, name="t1", cls="LC") as c:
        models = {m["name"]: m for m in c.models()["models"]}
        assert models["good"]["state"] == "ready"
        assert models["broken"]["state"] == "failed" and models["broken"]["error"]
        (y,) = c.infer("good", [x])
        np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)
        with pytest.raises(lake.ClientError, match="broken"):
            c.infer("broken", [x])
        (y2,) = c.infer("good", [x])             # laked keeps serving the others
        np.testing.assert_allclose(y2, want, rtol=1e-4, atol=1e-4)
    st = _status(laked["run"])
    tenants = {t["name"]: t for t in st["arbiter"]["tenants"]}
    assert st["arbiter"]["device"] == "cuda"
    assert tenants["model:good"]["class"] == "LC" and tenants["model:good"]["requests"] >= 2


VICTIM = """
import sys, numpy as np, lake
c = lake.Client(path=sys.argv[1], name="victim", cls="BE")
s = c.session(); s.init()
d = s.mem_alloc(512 << 20)
print("ready", flush=True)
x = np.ones((64, 64), np.float32)
while True:
    c.infer("good", [x])
"""


def test_client_killed_mid_request_frees_memory_and_tenant(laked: dict[str, Any]) -> None:
    used0 = _gpu_used_mib()
    env = dict(os.environ, PYTHONPATH=f"{ROOT}:{ROOT / 'python'}")
    child = subprocess.Popen([sys.executable, "-c", VICTIM, str(laked["run"] / "lake.sock")],
                             stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        time.sleep(0.5)                                  # in the middle of its requests
        names = [c["tenant"] for c in _status(laked["run"])["clients"]]
        assert any(n.startswith("victim") for n in names), names
        used1 = _gpu_used_mib()
        assert used1 >= used0 + 400, (used0, used1)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    deadline = time.monotonic() + 20
    while True:
        st = _status(laked["run"])
        left = [c["tenant"] for c in st["clients"] if c["tenant"].startswith("victim")]
        ten = [t["name"] for t in st["arbiter"]["tenants"] if t["name"].startswith("victim")]
        if not left and not ten:
            break
        assert time.monotonic() < deadline, (left, ten)
        time.sleep(0.2)
    assert _gpu_used_mib() <= used1 - 400
    with _client(laked, name="after", cls="BE") as c:        # still serving
        c.session().null()
        assert "Traceback" not in laked["log"].read_text()


QUOTA = """
import json, sys, lake
from lake.ring import CallError
path, out = sys.argv[1], {}
try:
    lake.Client(path=path, name="q-lc", cls="LC").close()
    out["lc"] = "admitted"
except lake.ClientError as e:
    out["lc"] = str(e)
try:
    lake.Client(path=path, name="q-big", cls="BE", quota_sms=100).close()
    out["big"] = "admitted"
except lake.ClientError as e:
    out["big"] = str(e)
with lake.Client(path=path, name="q-be", cls="BE", quota_sms=32) as c:
    s = c.session(); s.init()
    a = s.mem_alloc(40 << 20)
    try:
        s.mem_alloc(40 << 20)
        out["second"] = "allocated"
    except CallError as e:
        out["second"] = e.code
    s.mem_free(a)
    b = s.mem_alloc(60 << 20)
    out["after_free"] = "allocated"
    s.mem_free(b)
print(json.dumps(out))
"""


def test_quotas_are_enforced_per_uid(laked: dict[str, Any]) -> None:
    code = laked["code"]
    env = {"PATH": os.environ.get("PATH", ""), "HOME": "/",
           "PYTHONPATH": f"{code}:{code / 'python'}"}

    def as_nobody() -> None:
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
    r = subprocess.run([sys.executable, "-c", QUOTA, str(laked["run"] / "lake.sock")],
                       capture_output=True, text=True, env=env, preexec_fn=as_nobody,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert "may not run LC" in out["lc"], out
    assert "at most 64 SMs" in out["big"], out
    assert out["second"] == 2, out                # CUDA_ERROR_OUT_OF_MEMORY: 80 MiB > 64
    assert out["after_free"] == "allocated", out


def test_be_client_launches_wait_for_an_lc_clients(laked: dict[str, Any]) -> None:
    """Each client's cu* launches are its tenant's work in the arbiter: a BE
    client's kernel queued while an LC client's kernel runs starts after it."""
    sys.path.insert(0, str(ROOT / "tests" / "gpu"))
    from kernels import SPIN_PTX
    from lake.ring import Launch, u64
    spin_80ms = u64(160_000_000)            # cycles: >= 80 ms at <= 2 GHz

    def ready(c: Any) -> tuple[Any, int, int]:
        s = c.session()
        s.init()
        return s, s.get_function(s.module_load(SPIN_PTX), "spin"), s.stream_create()

    with _client(laked, name="k-lc", cls="LC") as lc, _client(laked, name="k-be", cls="BE") as be:
        ls, lfn, lst = ready(lc)
        bs, bfn, bst = ready(be)
        t0 = time.perf_counter()
        bs.launch(Launch(bfn, (1, 1, 1), (32, 1, 1), [u64(1000)], stream=bst))
        bs.stream_sync(bst)
        alone = time.perf_counter() - t0
        ls.launch(Launch(lfn, (1, 1, 1), (32, 1, 1), [spin_80ms], stream=lst))
        ls.null()                           # the LC launch has reached laked
        t0 = time.perf_counter()
        bs.launch(Launch(bfn, (1, 1, 1), (32, 1, 1), [u64(1000)], stream=bst))
        bs.stream_sync(bst)
        held = time.perf_counter() - t0
        ls.stream_sync(lst)
        assert alone < 0.04 and held >= 0.05, (alone, held)
        ten = {t["name"]: t for t in _status(laked["run"])["arbiter"]["tenants"]}
        lc_t = next(v for k, v in ten.items() if k.startswith("k-lc"))
        be_t = next(v for k, v in ten.items() if k.startswith("k-be"))
        assert lc_t["launches"] == 1 and be_t["launches"] == be_t["atoms"] == 2

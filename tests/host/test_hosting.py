"""Hosted models and jobs (laked/hosting.py, laked/repo.py) on the CPU.

Real files in a temporary repository, real TorchScript and torch.export
models, and the real CPU arbiter.  Tests that chown files to other users
need root (CI runs as root) and are skipped with the reason otherwise.
"""
import io
import os
import pwd
import shutil
import stat
import threading
import time
import zipfile
from pathlib import Path
from typing import Tuple

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="hosted-model tests need torch (scripts/setup "
                                            "installs the CPU build)")

from laked.hosting import Host, HostError  # noqa: E402
from laked.repo import (QuotaError, RepoError, Repository, UntrustedError,  # noqa: E402
                        detect_format, parse_config)
from laked.sched.base import CpuArbiter  # noqa: E402

ROOT = os.geteuid() == 0
need_root = pytest.mark.skipif(not ROOT, reason="chown to another user needs root")
NOBODY = 65534   # a uid in no admin group
# TorchScript is deprecated in torch 2.13 but still what many deployments ship
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")


# ---------------------------------------------------------------- models

class TwoInTwoOut(torch.nn.Module):
    """Two inputs, a tuple of two outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(8, 4)
        self.b = torch.nn.Linear(3, 4)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        h = self.a(x) + self.b(y)
        return torch.relu(h), h.sum(dim=1)


class Picky(torch.nn.Module):
    """Raises at run time on large inputs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool(x.abs().max() > 1000.0):
            raise ValueError("input too large for picky")
        return x * 2.0


class DictOut(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"y": x}


def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(),
                               torch.nn.Linear(32, 5)).eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    """A torch.export file with a dynamic batch (exporting takes seconds: once)."""
    torch.manual_seed(1)
    m = TwoInTwoOut().eval()
    batch = torch.export.Dim("batch", min=1, max=4096)
    ep = torch.export.export(m, (torch.randn(4, 8), torch.randn(4, 3)),
                             dynamic_shapes={"x": {0: batch}, "y": {0: batch}})
    path = tmp_path_factory.mktemp("export") / "model.pt2"
    torch.export.save(ep, str(path))
    return path, m


def toml(cfg: dict) -> str:
    out = []
    for k, v in cfg.items():
        out.append(f"{k} = " + ("true" if v is True else "false" if v is False
                                else f'"{v}"' if isinstance(v, str) else str(v)))
    return "\n".join(out) + "\n"


def put_model(repo: Path, name: str, model: torch.nn.Module | Path | bytes,
              cfg: dict | None = None) -> Path:
    """What an admin does by hand: a directory, the file and its config."""
    d = repo / "models" / name
    d.mkdir(parents=True, exist_ok=True)
    if isinstance(model, Path):
        path = d / model.name
        shutil.copy(model, path)
    elif isinstance(model, bytes):
        path = d / "model.pt"
        path.write_bytes(model)
    else:
        path = d / "model.pt"
        torch.jit.save(torch.jit.script(model), str(path))
    if cfg is not None:
        (d / "config.toml").write_text(toml(cfg))
    return path


def put_job(repo: Path, name: str, source: str, cfg: dict | None = None) -> Path:
    d = repo / "jobs" / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "job.py").write_text(source)
    if cfg is not None:
        (d / "config.toml").write_text(toml(cfg))
    return d / "job.py"


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    r = tmp_path / "repo"
    r.mkdir(mode=0o755)
    os.chmod(r, 0o755)
    return r


@pytest.fixture
def arbiter() -> CpuArbiter:
    return CpuArbiter()


@pytest.fixture
def make_host(repo: Path, arbiter: CpuArbiter):
    hosts: list[Host] = []

    def make(admin_group: str | None = None, stop_timeout: float = 10.0) -> Host:
        h = Host(repo, arbiter, admin_group, stop_timeout=stop_timeout)
        h.start()
        hosts.append(h)
        return h
    yield make
    for h in hosts:
        h.close()


def model_row(host: Host, name: str) -> dict:
    return next(m for m in host.list()["models"] if m["name"] == name)


def wait_for(cond, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


# ---------------------------------------------------------------- inference

def test_torchscript_and_export_give_the_models_numbers(repo, make_host, arbiter, exported):
    m = mlp()
    put_model(repo, "mlp", m, {"class": "LC", "max_batch": 32})
    two = TwoInTwoOut().eval()
    put_model(repo, "two_ts", two)
    put_model(repo, "two_export", exported[0], {"class": "BE", "dtype": "float32"})
    host = make_host()

    rows = {r["name"]: r for r in host.list()["models"]}
    assert {n: (r["state"], r["format"]) for n, r in rows.items()} == {
        "mlp": ("ready", "torchscript"), "two_ts": ("ready", "torchscript"),
        "two_export": ("ready", "export")}
    assert rows["mlp"]["class"] == "LC" and rows["two_export"]["class"] == "BE"

    x = np.random.default_rng(0).standard_normal((7, 16))       # float64: cast to float32
    (y,) = host.infer("mlp", [x])
    with torch.no_grad():
        want = m(torch.from_numpy(x).float())
    assert y.dtype == np.float32 and y.shape == (7, 5) and y.flags.c_contiguous
    assert torch.allclose(torch.from_numpy(y), want, rtol=1e-6, atol=1e-7)

    rng = np.random.default_rng(1)
    for name, ref in (("two_ts", two), ("two_export", exported[1])):
        for b in (1, 5):
            a = rng.standard_normal((b, 8)).astype(np.float32)
            c = rng.standard_normal((b, 3)).astype(np.float32)
            out = host.infer(name, [a, c])
            with torch.no_grad():
                want2 = ref(torch.from_numpy(a), torch.from_numpy(c))
            assert len(out) == 2
            for got, w in zip(out, want2):
                assert torch.allclose(torch.from_numpy(got), w, rtol=1e-6, atol=1e-7), name

    st = {t["name"]: t for t in arbiter.status()["tenants"]}
    assert st["model:mlp"]["class"] == "LC" and st["model:mlp"]["requests"] == 1
    assert st["model:mlp"]["items"] == 7
    assert st["model:two_export"]["kind"] == "model" and st["model:two_export"]["items"] == 6
    row = model_row(host, "two_ts")
    assert row["requests"] == 2 and row["p50_ms"] is not None and row["p99_ms"] is not None


def test_broken_models_fail_alone(repo, make_host):
    put_model(repo, "good", mlp())
    put_model(repo, "garbage", b"\x00this is not a model\xff" * 10)
    good = (repo / "models" / "good" / "model.pt").read_bytes()
    put_model(repo, "truncated", good[: len(good) // 2])
    # a zip that looks like TorchScript but is not: torch itself must fail
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("m/constants.pkl", b"junk")
        z.writestr("m/code/__torch__.py", b"junk")
        z.writestr("m/data.pkl", b"junk")
    put_model(repo, "fakezip", buf.getvalue())
    weights = repo / "sd.pt"
    torch.save(mlp().state_dict(), str(weights))
    put_model(repo, "weights", weights.read_bytes())
    put_model(repo, "badcfg", mlp(), {"max_batch": 0})
    host = make_host()

    rows = {r["name"]: r for r in host.list()["models"]}
    assert rows["good"]["state"] == "ready"
    for name in ("garbage", "truncated", "fakezip", "weights", "badcfg"):
        assert rows[name]["state"] == "failed" and rows[name]["error"], name
    assert "not a valid zip archive" in rows["garbage"]["error"]
    assert "models/garbage/model.pt" in rows["garbage"]["error"]
    assert "not a valid zip archive" in rows["truncated"]["error"]
    assert rows["fakezip"]["error"].startswith("RuntimeError")
    assert "torch.save pickle" in rows["weights"]["error"]
    assert "max_batch = 0 is out of range" in rows["badcfg"]["error"]
    assert "config.toml" in rows["badcfg"]["error"]

    with pytest.raises(HostError, match=r"model garbage failed to load: .*not a valid zip"):
        host.infer("garbage", [np.zeros((1, 16), np.float32)])
    with pytest.raises(HostError, match="no model 'nope' is hosted"):
        host.infer("nope", [np.zeros((1, 16), np.float32)])
    (y,) = host.infer("good", [np.ones((2, 16), np.float32)])
    assert y.shape == (2, 5)


def test_max_batch_and_runtime_errors(repo, make_host, arbiter):
    put_model(repo, "picky", Picky(), {"class": "LC", "max_batch": 4})
    put_model(repo, "dict", DictOut())
    host = make_host()
    ok = np.ones((4, 3), np.float32)
    (y,) = host.infer("picky", [ok])
    assert np.array_equal(y, ok * 2)

    with pytest.raises(HostError, match="batch 5 is larger than its max_batch 4"):
        host.infer("picky", [np.ones((5, 3), np.float32)])
    with pytest.raises(HostError) as e:
        host.infer("picky", [np.full((2, 3), 5000, np.float32)])
    assert str(e.value) == "model picky failed: ValueError: input too large for picky"
    (y,) = host.infer("picky", [ok])            # the next request is fine
    assert np.array_equal(y, ok * 2)
    with pytest.raises(HostError, match="must return a tensor or a tuple of tensors"):
        host.infer("dict", [ok])
    with pytest.raises(HostError, match="input 0 is a list"):
        host.infer("picky", [[1.0, 2.0]])
    with pytest.raises(HostError, match="no batch dimension"):
        host.infer("picky", [np.array(1.0, np.float32)])
    with pytest.raises(HostError, match="wrong number|expected|argument"):
        host.infer("picky", [ok, ok])

    row = model_row(host, "picky")
    assert row["requests"] == 2 and row["errors"] == 2
    st = {t["name"]: t for t in arbiter.status()["tenants"]}
    assert st["model:picky"]["errors"] == 2


@pytest.mark.parametrize("cls", ["LC", "BE"])
def test_concurrent_requests(repo, make_host, cls):
    m = mlp()
    put_model(repo, "mlp", m, {"class": cls})
    host = make_host()
    errors: list[BaseException] = []

    def client(seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            for _ in range(20):
                x = rng.standard_normal((3, 16)).astype(np.float32)
                (y,) = host.infer("mlp", [x])
                with torch.no_grad():
                    assert torch.allclose(torch.from_numpy(y), m(torch.from_numpy(x)),
                                          rtol=1e-6, atol=1e-7)
        except BaseException as e:  # reported by the main thread
            errors.append(e)
    threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert model_row(host, "mlp")["requests"] == 120


# ---------------------------------------------------------------- trust

MARKER_JOB = """
from pathlib import Path
Path({marker!r}).write_text("imported")
def run(ctx):
    pass
"""


def test_world_writable_job_is_never_imported(repo, make_host, tmp_path):
    marker = tmp_path / "imported"
    path = put_job(repo, "evil", MARKER_JOB.format(marker=str(marker)))
    os.chmod(path, 0o666)
    host = make_host()
    with pytest.raises(HostError) as e:
        host.job_start("evil", "alice", 1000)
    assert f"{path} is writable by others (mode 0666): refusing to load it" in str(e.value)
    assert not marker.exists()

    os.chmod(path, 0o644)
    os.chmod(path.parent, 0o777)                     # its directory instead
    with pytest.raises(HostError, match=f"{path.parent} is writable by others"):
        host.job_start("evil", "alice", 1000)
    os.chmod(path.parent, 0o755)
    os.chmod(repo, 0o757)                            # REPO itself is checked too
    with pytest.raises(HostError, match=f"{repo} is writable by others"):
        host.job_start("evil", "alice", 1000)
    assert not marker.exists()
    row = next(j for j in host.list()["jobs"] if j["name"] == "evil")
    assert row["state"] == "invalid" and "writable by others" in row["error"]

    os.chmod(repo, 0o755)                            # all fixed: now it runs
    if os.stat(repo / "jobs").st_gid == 0:
        os.chmod(repo / "jobs", 0o775)               # group-writable by root's group: fine
    host.job_start("evil", "alice", 1000)
    assert marker.read_text() == "imported"


def test_world_writable_model_dir_and_config(repo, make_host):
    put_model(repo, "open", mlp())
    os.chmod(repo / "models" / "open", 0o777)
    put_model(repo, "opencfg", mlp(), {"max_batch": 8})
    os.chmod(repo / "models" / "opencfg" / "config.toml", 0o646)
    put_model(repo, "fine", mlp())
    host = make_host()
    rows = {r["name"]: r for r in host.list()["models"]}
    assert f"{repo}/models/open is writable by others (mode 0777)" in rows["open"]["error"]
    assert "opencfg/config.toml is writable by others (mode 0646)" in rows["opencfg"]["error"]
    assert rows["fine"]["state"] == "ready"
    with pytest.raises(HostError, match="model open failed to load: .*writable by others"):
        host.infer("open", [np.zeros((1, 16), np.float32)])


@need_root
def test_files_of_other_users_are_refused(repo, make_host, tmp_path):
    marker = tmp_path / "imported"
    path = put_job(repo, "theirs", MARKER_JOB.format(marker=str(marker)))
    os.chown(path, NOBODY, 0)
    mpath = put_model(repo, "theirs", mlp())
    os.chown(mpath.parent, NOBODY, NOBODY)
    put_model(repo, "grpw", mlp())
    gw = repo / "models" / "grpw" / "model.pt"
    os.chown(gw, 0, NOBODY)
    os.chmod(gw, 0o664)                              # writable by a group that is not admin
    host = make_host()
    with pytest.raises(HostError) as e:
        host.job_start("theirs", "alice", 1000)
    assert f"{path} is owned by nobody (uid {NOBODY}" in str(e.value)
    assert "neither root nor an admin" in str(e.value)
    assert not marker.exists()
    rows = {r["name"]: r for r in host.list()["models"]}
    assert f"{mpath.parent} is owned by nobody" in rows["theirs"]["error"]
    assert f"{gw} is writable by group {NOBODY}" in rows["grpw"]["error"]


def test_symlinks_are_refused(repo, make_host, tmp_path):
    outside = tmp_path / "outside.pt"
    torch.jit.save(torch.jit.script(mlp()), str(outside))
    d = repo / "models" / "linked"
    d.mkdir(parents=True)
    (d / "model.pt").symlink_to(outside)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (repo / "models" / "redirected").symlink_to(elsewhere)
    host = make_host()
    assert "is a symbolic link" in model_row(host, "linked")["error"]
    with pytest.raises(HostError, match="redirected is a symbolic link"):
        _add(host, "model", "redirected", outside)
    assert list(elsewhere.iterdir()) == []            # nothing written through the link


@need_root
def test_admin_group_members_are_trusted(repo):
    try:
        daemon = pwd.getpwnam("daemon")
    except KeyError:
        pytest.skip("no user 'daemon' on this machine")
    r = Repository(repo, admin_group="daemon")
    assert r.may_admin(0, 0)
    assert r.may_admin(daemon.pw_uid, 12345)          # primary group daemon
    assert not r.may_admin(NOBODY, daemon.pw_gid)     # a gid is not a membership
    assert not Repository(repo, admin_group=None).may_admin(daemon.pw_uid, daemon.pw_gid)
    f = repo / "f"
    f.write_text("x")
    os.chown(f, daemon.pw_uid, daemon.pw_gid)
    os.chmod(f, 0o664)                                # group-writable by the admin group
    r.check_trusted(f)
    with pytest.raises(UntrustedError, match="neither root nor an admin"):
        Repository(repo, admin_group=None).check_trusted(f)
    os.chown(f, daemon.pw_uid, 0)                     # an admin's file in root's group? no:
    with pytest.raises(UntrustedError):               # it must carry the admin group
        r.check_trusted(f)


# ---------------------------------------------------------------- jobs

LOOP_JOB = """
import torch

def run(ctx):
    x = torch.randn(32, 32, device=ctx.device)
    ctx.log.info("looping with %s", ctx.args)
    while not ctx.stop.is_set():
        x = torch.tanh(x @ x)
        ctx.report(ctx.args.get("step", 1))
        ctx.stop.wait(0.002)
"""

FAIL_JOB = """
def run(ctx):
    raise ValueError("bad input " + str(ctx.args["n"]))
"""

STUBBORN_JOB = """
import time

def run(ctx):
    time.sleep(ctx.args["seconds"])     # does not look at ctx.stop
"""


def test_job_runs_reports_and_stops(repo, make_host, arbiter):
    put_job(repo, "loop", LOOP_JOB, {"quota_sms": 16, "priority": 2})
    host = make_host()
    assert host.list()["jobs"] == [{"name": "loop", "class": "BE", "state": "idle",
                                    "owner": None, "error": None, "items": 0}]
    info = host.job_start("loop", "alice", 1000, {"step": 3})
    assert info["state"] == "running" and info["owner"] == "alice"
    wait_for(lambda: host.jobs("alice")[0]["items"] >= 9)
    assert host.jobs("alice")[0]["items"] % 3 == 0
    t = {t["name"]: t for t in arbiter.status()["tenants"]}["job:loop:alice"]
    assert (t["class"], t["kind"], t["uid"], t["quota_sms"], t["priority"]) == \
        ("BE", "job", 1000, 16, 2)
    with pytest.raises(HostError, match="job loop is already running for alice"):
        host.job_start("loop", "alice", 1000)

    t0 = time.monotonic()
    out = host.job_stop("loop", "alice")
    assert time.monotonic() - t0 < 5
    assert out["state"] == "stopped" and out["items"] >= 9
    assert "job:loop:alice" not in {t["name"] for t in arbiter.status()["tenants"]}
    assert host.jobs() == []
    with pytest.raises(HostError, match="no job loop runs for alice"):
        host.job_stop("loop", "alice")
    host.job_start("loop", "alice", 1000)             # and again, a fresh module
    host.job_stop("loop", "alice")


def test_job_args_and_finish(repo, make_host):
    put_job(repo, "sum", "def run(ctx):\n    ctx.report(sum(ctx.args))\n")
    host = make_host()
    host.job_start("sum", "erin", 1003, [1, 2, 3])
    wait_for(lambda: host.jobs("erin")[0]["state"] != "running")
    (j,) = host.jobs("erin")
    assert (j["state"], j["items"], j["error"]) == ("finished", 6, None)
    with pytest.raises(HostError, match="args must be a map or a list"):
        host.job_start("sum", "erin", 1003, "1 2 3")  # type: ignore[arg-type]


def test_failing_job(repo, make_host, caplog):
    put_job(repo, "fails", FAIL_JOB)
    put_job(repo, "broken", "def run(ctx):\n    pass\nraise ImportError('no such thing')\n")
    put_job(repo, "norun", "x = 1\n")
    host = make_host()
    host.job_start("fails", "bob", 1001, {"n": 42})
    wait_for(lambda: host.jobs("bob")[0]["state"] != "running")
    (j,) = host.jobs("bob")
    assert j["state"] == "failed: ValueError: bad input 42"
    assert j["error"] == "ValueError: bad input 42"
    assert any("Traceback" in (r.exc_text or "") or r.exc_info for r in caplog.records
               if r.name == "laked.job.fails")
    host.job_start("fails", "bob", 1001, {"n": 1})   # an ended instance may start again
    with pytest.raises(HostError, match="importing .*job.py failed: ImportError: no such"):
        host.job_start("broken", "bob", 1001)
    with pytest.raises(HostError, match="defines no run"):
        host.job_start("norun", "bob", 1001)
    assert {j["name"] for j in host.jobs("bob")} == {"fails"}


def test_stop_owner_and_stubborn_jobs(repo, make_host, arbiter):
    put_job(repo, "loop", LOOP_JOB)
    put_job(repo, "stubborn", STUBBORN_JOB)
    host = make_host(stop_timeout=0.3)
    host.job_start("loop", "alice", 1000)
    host.job_start("loop", "bob", 1001)
    host.job_start("stubborn", "alice", 1000, {"seconds": 1.0})
    wait_for(lambda: all(j["items"] > 0 for j in host.jobs() if j["name"] == "loop"))

    out = {j["name"]: j for j in host.stop_owner("alice")}
    assert out["loop"]["state"] == "stopped"
    assert out["stubborn"]["state"] == "stopping"     # did not stop within 0.3 s
    (bob,) = [j for j in host.jobs() if j["owner"] == "bob"]
    assert bob["state"] == "running"
    wait_for(lambda: host.jobs("alice")[0]["state"] != "stopping", 5)
    assert host.jobs("alice")[0]["state"] == "stopped"
    host.close()
    assert host.jobs("bob")[0]["state"] == "stopped"
    assert arbiter.status()["tenants"] == []


# ---------------------------------------------------------------- repo add / remove

def _add(host: Host, kind: str, name: str, path: Path, config: dict | None = None,
         uid: int = 0, gid: int = 0) -> dict:
    fd = os.open(path, os.O_RDONLY)                   # the client's descriptor
    try:
        return host.repo_add(kind, name, fd, config, uid, gid)
    finally:
        os.close(fd)


def test_repo_add_model_usable_at_once(repo, make_host, tmp_path, exported):
    host = make_host()
    src = tmp_path / "upload.pt"
    m = mlp()
    torch.jit.save(torch.jit.script(m), str(src))
    reply = _add(host, "model", "fresh", src, {"class": "LC", "max_batch": 8})
    assert reply["ok"] and reply["state"] == "ready" and reply["format"] == "torchscript"
    x = np.ones((8, 16), np.float32)
    (y,) = host.infer("fresh", [x])
    with torch.no_grad():
        assert torch.allclose(torch.from_numpy(y), m(torch.from_numpy(x)))
    f = repo / "models" / "fresh" / "model.pt"
    st = f.stat()
    assert stat.S_IMODE(st.st_mode) == 0o644
    if ROOT:
        assert (st.st_uid, st.st_gid) == (0, 0)
    cfg = (repo / "models" / "fresh" / "config.toml").read_text()
    assert 'class = "LC"' in cfg and "max_batch = 8" in cfg and "warmup = true" in cfg
    assert not [p for p in (repo / "models" / "fresh").iterdir() if p.name.startswith(".")]

    # the same name with a torch.export file: replaced, reloaded, old file gone
    reply = _add(host, "model", "fresh", exported[0], {"class": "BE"})
    assert reply["ok"] and reply["format"] == "export"
    assert sorted(p.name for p in (repo / "models" / "fresh").iterdir()) == \
        ["config.toml", "model.pt2"]
    out = host.infer("fresh", [np.ones((2, 8), np.float32), np.ones((2, 3), np.float32)])
    assert [o.shape for o in out] == [(2, 4), (2,)]
    assert model_row(host, "fresh")["class"] == "BE"

    # content that is no model is refused before anything is written
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"no zip here")
    with pytest.raises(HostError, match="not a TorchScript or torch.export file"):
        _add(host, "model", "junk", junk)
    assert not (repo / "models" / "junk").exists()

    reply = host.repo_remove("model", "fresh", 0, 0)
    assert reply["ok"]
    assert not (repo / "models" / "fresh").exists()
    with pytest.raises(HostError, match="no model 'fresh' is hosted"):
        host.infer("fresh", [x])
    with pytest.raises(HostError, match="no model 'fresh' in the repository"):
        host.repo_remove("model", "fresh", 0, 0)


def test_repo_add_model_that_fails_to_load_stays(repo, make_host, tmp_path):
    host = make_host()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("m/constants.pkl", b"junk")
        z.writestr("m/code/__torch__.py", b"junk")
    src = tmp_path / "bad.pt"
    src.write_bytes(buf.getvalue())
    reply = _add(host, "model", "bad", src)
    assert not reply["ok"] and reply["state"] == "failed"
    assert reply["error"].startswith("model bad failed to load: RuntimeError")
    assert (repo / "models" / "bad" / "model.pt").exists()
    assert model_row(host, "bad")["state"] == "failed"


def test_repo_add_job_and_remove_running(repo, make_host, tmp_path, arbiter):
    host = make_host()
    src = tmp_path / "loop.py"
    src.write_text(LOOP_JOB)
    reply = _add(host, "job", "loop", src, {"quota_sms": 8})
    assert reply["ok"] and reply["state"] == "idle"
    assert 'class = "BE"' in (repo / "jobs" / "loop" / "config.toml").read_text()
    host.job_start("loop", "carol", 1002)
    wait_for(lambda: host.jobs()[0]["items"] > 0)
    host.repo_remove("job", "loop", 0, 0)             # its instance stops first
    assert host.jobs() == [] and arbiter.status()["tenants"] == []
    assert not (repo / "jobs" / "loop").exists()

    bad = tmp_path / "bad.py"
    bad.write_text("def run(ctx)\n    pass\n")
    with pytest.raises(HostError, match="job.py line 1"):
        _add(host, "job", "bad", bad)
    bad.write_text("def other(ctx):\n    pass\n")
    with pytest.raises(HostError, match="defines no top-level run"):
        _add(host, "job", "bad", bad)
    big = tmp_path / "big.py"
    big.write_bytes(b"#" * ((1 << 20) + 1))
    with pytest.raises(HostError, match="more than the 1 MiB a job may have"):
        _add(host, "job", "big", big)


def test_repo_add_by_non_admin_is_refused(repo, make_host, tmp_path):
    host = make_host(admin_group="daemon" if _has_group("daemon") else None)
    src = tmp_path / "m.pt"
    torch.jit.save(torch.jit.script(mlp()), str(src))
    assert not host.repo.may_admin(NOBODY, NOBODY)
    with pytest.raises(QuotaError, match="may not") as e:
        _add(host, "model", "m", src, uid=NOBODY, gid=NOBODY)
    assert isinstance(e.value, PermissionError)
    assert "nobody (uid 65534)" in str(e.value)
    assert not (repo / "models" / "m").exists()
    _add(host, "model", "m", src)
    with pytest.raises(PermissionError, match="may not"):
        host.repo_remove("model", "m", NOBODY, NOBODY)
    assert model_row(host, "m")["state"] == "ready"


def _has_group(name: str) -> bool:
    import grp
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


@pytest.mark.parametrize("name", ["", ".hidden", "a/b", "..", "x" * 65, "sp ace", "ü"])
def test_names_are_checked(repo, make_host, tmp_path, name):
    host = make_host()
    src = tmp_path / "j.py"
    src.write_text("def run(ctx):\n    pass\n")
    with pytest.raises(HostError, match="without a leading dot"):
        _add(host, "job", name, src)
    with pytest.raises(HostError, match="without a leading dot"):
        host.job_start(name, "alice", 1000)
    assert sorted(os.listdir(repo)) == []


@pytest.mark.parametrize("kind,config,message", [
    ("model", {"clas": "LC"}, "unknown key"),
    ("model", {"class": "XX"}, 'class must be "LC" or "BE"'),
    ("model", {"quota_sms": "8"}, "quota_sms must be an integer, not str"),
    ("model", {"quota_sms": True}, "quota_sms must be an integer, not bool"),
    ("model", {"max_batch": 0}, r"max_batch = 0 is out of range \[1, "),
    ("model", {"priority": 10**6}, "priority = 1000000 is out of range"),
    ("model", {"dtype": "float8"}, "dtype 'float8' is not one of"),
    ("model", {"warmup": 1}, "warmup must be true or false"),
    ("job", {"max_batch": 4}, "unknown key.*max_batch"),
    ("job", {"class": "LC"}, "hosted jobs are best-effort"),
])
def test_configs_are_checked(repo, make_host, tmp_path, kind, config, message):
    host = make_host()
    src = tmp_path / "f"
    if kind == "model":
        torch.jit.save(torch.jit.script(mlp()), str(src))
    else:
        src.write_text("def run(ctx):\n    pass\n")
    with pytest.raises(HostError, match=message):
        _add(host, kind, "thing", src, config)
    assert not (repo / f"{kind}s" / "thing").exists()


def test_config_defaults_and_file_errors(repo, make_host):
    c = parse_config("model", {}, "x")
    assert (c.cls, c.quota_sms, c.priority, c.max_batch, c.dtype, c.warmup) == \
        ("BE", 0, 0, 64, "float32", True)
    put_model(repo, "nocfg", mlp())
    d = repo / "models" / "badtoml"
    put_model(repo, "badtoml", mlp())
    (d / "config.toml").write_text("class = LC\n")
    host = make_host()
    assert model_row(host, "nocfg")["max_batch"] == 64
    assert "config.toml: not valid TOML" in model_row(host, "badtoml")["error"]


def test_detect_format(tmp_path, exported):
    ts = tmp_path / "m.pt"
    torch.jit.save(torch.jit.script(mlp()), str(ts))
    assert detect_format(ts) == "torchscript"
    assert detect_format(exported[0]) == "export"
    with pytest.raises(RepoError):
        detect_format(tmp_path)

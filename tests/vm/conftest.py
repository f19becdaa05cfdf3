"""VM tests: run as root inside the VM with the freshly built lake.ko."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest

from laked import ctl
from laked.genl import Control

ROOT = Path(__file__).resolve().parents[2]
KO = ROOT / "kmod" / "lake.ko"
SYSFS = Path("/sys/kernel/lake")
BAD = re.compile(r"BUG:|WARNING:|Oops|general protection|Call Trace|refcount_t")

if os.geteuid() != 0 or not KO.exists():
    pytest.skip("VM tests run as root inside scripts/vm with kmod/lake.ko built",
                allow_module_level=True)


def sh(*cmd: str, check: bool = True, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=check, capture_output=True, text=True, **kw)


def dmesg() -> str:
    return sh("dmesg").stdout


def module_loaded() -> bool:
    return SYSFS.is_dir()


def insmod() -> None:
    if not module_loaded():
        sh("insmod", str(KO))


def rmmod() -> subprocess.CompletedProcess[str]:
    return sh("rmmod", "lake", check=False)


@pytest.fixture(autouse=True)
def no_oops() -> Iterator[None]:
    """Fail any test after which the kernel log shows a BUG, WARNING or Oops."""
    before = len(dmesg())
    yield
    new = dmesg()[before:]
    bad = [line for line in new.splitlines() if BAD.search(line)]
    assert not bad, "kernel log:\n" + new[-4000:]


KNOB_DEFAULTS = {"enabled": "1", "gpu_batch_threshold": "32", "timeout_ms": "2000"}


@pytest.fixture
def module() -> Iterator[None]:
    """lake.ko loaded; it stays loaded for the next test (boots are slow)."""
    insmod()
    yield
    if module_loaded():
        for knob, value in KNOB_DEFAULTS.items():
            (SYSFS / knob).write_text(value)


@pytest.fixture
def no_module() -> Iterator[None]:
    """lake.ko unloaded (the shared laked stopped first)."""
    _shared.stop()
    assert rmmod().returncode == 0 or not module_loaded()
    yield


class Laked:
    """A laked started for one test, in its own run directory."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.env = dict(os.environ, LAKED_RUN_DIR=str(run_dir))

    def cli(self, *args: str, check: bool = True, timeout: float = 120,
            user: str | None = None) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "laked.cli", *args]
        if user:
            cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *cmd]
        res = subprocess.run(cmd, capture_output=True, text=True, env=self.env,
                             timeout=timeout, cwd=ROOT)
        if check and res.returncode != 0:
            raise AssertionError(f"laked {' '.join(args)} failed ({res.returncode}):\n"
                                 f"{res.stdout}{res.stderr}")
        return res

    def start(self) -> None:
        self.cli("start", "--daemon")

    def stop(self) -> None:
        if self.running():
            self.cli("stop", check=False)

    def running(self) -> bool:
        try:
            pid = self.pid
        except (OSError, ValueError):
            return False
        return Path(f"/proc/{pid}").exists()

    def request(self, req: dict[str, object]) -> dict[str, object]:
        """Talk to laked in-process, as the CLI does, without its start-up."""
        return ctl.call(self.run_dir / "laked.sock", req, 60)

    @property
    def pid(self) -> int:
        return int((self.run_dir / "laked.pid").read_text())

    def freeze(self) -> None:
        """SIGSTOP laked and wait until every thread has stopped: kill() only
        queues the signal, and a thread busy on another (emulated) CPU can
        still serve a request until it next enters the kernel."""
        os.kill(self.pid, signal.SIGSTOP)
        assert wait_for(lambda: _all_stopped(self.pid), timeout=30, interval=0.01), \
            "laked did not stop on SIGSTOP"

    def thaw(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def log(self) -> str:
        p = self.run_dir / "laked.log"
        return p.read_text() if p.exists() else ""

    def decide(self, batch: int, **kw: int) -> tuple[str, str]:
        """One decision straight from lake.ko (the CLI's path is tested once)."""
        with Control() as c:
            d = c.decide(batch, **kw)
        return d.target, d.by


_shared = Laked(Path("/tmp/laked-shared"))


@pytest.fixture
def laked_cli(module: None) -> Iterator[Laked]:
    """No laked running; a fresh run directory for the test's own."""
    _shared.stop()
    # world-traversable, so tests can talk to laked as an unprivileged user
    run = Path(tempfile.mkdtemp(prefix="laked-test-", dir="/tmp"))
    run.chmod(0o755)
    d = Laked(run)
    yield d
    d.stop()


@pytest.fixture
def no_laked(module: None) -> None:
    """lake.ko loaded and no laked connected."""
    _shared.stop()


@pytest.fixture
def laked(module: None) -> Iterator[Laked]:
    """A running laked, shared by tests: starting one costs ~15 s here.
    Each test gets it back with no policy and measured utilisation."""
    if not _shared.running():
        _shared.run_dir.mkdir(mode=0o755, exist_ok=True)
        _shared.start()
    yield _shared
    if _shared.running():
        _shared.request({"op": "policy_unload"})
        _shared.request({"op": "util", "value": None})


def _all_stopped(pid: int) -> bool:
    """True when every thread of pid is in state T (stopped)."""
    states = []
    for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
        try:
            # the state follows the command name's closing parenthesis
            states.append(stat.read_text().rsplit(")", 1)[1].split()[0])
        except (OSError, IndexError):
            continue
    return bool(states) and all(s in ("T", "t") for s in states)


def wait_for(pred, timeout: float = 10.0, interval: float = 0.05) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return bool(pred())

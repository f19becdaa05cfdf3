"""VM tests: run as root inside the VM with the freshly built lake.ko."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest

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


@pytest.fixture
def module() -> Iterator[None]:
    insmod()
    yield
    rmmod()


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
        self.cli("stop", check=False)

    @property
    def pid(self) -> int:
        return int((self.run_dir / "laked.pid").read_text())

    def log(self) -> str:
        p = self.run_dir / "laked.log"
        return p.read_text() if p.exists() else ""

    def decide(self, batch: int, **kw: int) -> tuple[str, str]:
        args = ["decide", "--batch", str(batch), "--json"]
        for k, v in kw.items():
            args += [f"--{k.replace('_', '-')}", str(v)]
        import json
        out = json.loads(self.cli(*args).stdout)
        return out["target"], out["by"]


@pytest.fixture
def laked_cli() -> Iterator[Laked]:
    # world-traversable, so tests can talk to laked as an unprivileged user
    run = Path(tempfile.mkdtemp(prefix="laked-test-", dir="/tmp"))
    run.chmod(0o755)
    d = Laked(run)
    yield d
    d.stop()


@pytest.fixture
def laked(module: None, laked_cli: Laked) -> Iterator[Laked]:
    laked_cli.start()
    yield laked_cli
    laked_cli.stop()


def wait_for(pred, timeout: float = 10.0, interval: float = 0.05) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return bool(pred())

"""laked status / top / status --json show the arbiter's tenants (real daemon, CPU).

A real `laked start --no-module --executor cpu` with a repository holding a
TorchScript model; a real client drives it; the CLI reads the daemon.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="hosted models need torch")

ROOT = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, PYTHONPATH=f"{ROOT}:{ROOT / 'python'}")


class Double(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


def laked_cli(run: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "laked.cli", "--run-dir", str(run), *args],
                          capture_output=True, text=True, env=ENV, timeout=60)


@pytest.fixture
def daemon() -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="lake-cli-"))
    run, repo = base / "run", base / "repo"
    (repo / "models" / "dbl").mkdir(parents=True)
    run.mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(Double()).save(str(repo / "models" / "dbl" / "model.pt"))
    (repo / "models" / "dbl" / "config.toml").write_text('class = "LC"\n')
    owner = "root" if os.geteuid() == 0 else None
    cfg = base / "laked.toml"
    cfg.write_text(f'[repository]\npath = "{repo}"\n' +
                   (f'admin_group = "{owner}"\n' if owner else ""))
    proc = subprocess.Popen([sys.executable, "-m", "laked.cli", "--run-dir", str(run), "start",
                             "--no-module", "--executor", "cpu", "--config", str(cfg)],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 60
    while not (run / "laked.sock").exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail("laked did not start: " + (proc.stderr.read() if proc.stderr else ""))
        time.sleep(0.05)
    try:
        yield run
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="laked start needs root")
def test_status_and_top_show_each_tenant(daemon: Path) -> None:
    import lake
    with lake.Client(daemon / "lake.sock", name="viewer", cls="LC") as c:
        for _ in range(25):
            (y,) = c.infer("dbl", [np.ones((4, 3), np.float32)])
        assert y.tolist() == [[2.0] * 3] * 4
        st = json.loads(laked_cli(daemon, "status", "--json").stdout)
        tenants = {t["name"]: t for t in st["daemon"]["arbiter"]["tenants"]}
        assert tenants["model:dbl"]["requests"] == 25 and tenants["model:dbl"]["items"] == 100
        assert tenants["model:dbl"]["class"] == "LC" and tenants["model:dbl"]["p99_ms"] > 0
        assert [cl["tenant"] for cl in st["daemon"]["clients"]] == [c.tenant]
        assert st["daemon"]["mode"] == "no-module"
        text = laked_cli(daemon, "status").stdout
        assert "tenant model:dbl [LC model uid 0]" in text and "requests 25" in text
        assert f"client {c.tenant}" in text and "module not used (--no-module)" in text

        # top's rates come from two snapshots: requests made between them count
        top = subprocess.Popen([sys.executable, "-m", "laked.cli", "--run-dir", str(daemon),
                                "top", "--count", "1", "--interval", "1.5", "--json"],
                               stdout=subprocess.PIPE, text=True, env=ENV)
        time.sleep(0.5)                  # its first snapshot is taken
        for _ in range(30):
            c.infer("dbl", [np.ones((2, 3), np.float32)])
        out, _ = top.communicate(timeout=60)
    screen = json.loads(out.strip().splitlines()[-1])
    row = {r["name"]: r for r in screen["tenants"]}["model:dbl"]
    assert row["requests_per_s"] * screen["interval_s"] == pytest.approx(30, abs=0.5)
    assert row["items_per_s"] * screen["interval_s"] == pytest.approx(60, abs=1)
    assert row["class"] == "LC" and row["p50_ms"] is not None
    human = laked_cli(daemon, "top", "--count", "1", "--interval", "0.2").stdout
    assert "TENANT" in human and "model:dbl" in human


def test_status_shows_the_governors_be_duty(capsys: pytest.CaptureFixture[str]) -> None:
    from laked.cli import _print_arbiter
    arb = {"device": "NVIDIA H200", "total_sms": 132, "tenants": [],
           "be_duty": {"now": 0.85, "sm_mhz": 1710.0, "target_mhz": 1722}}
    _print_arbiter(arb, [])
    out = capsys.readouterr().out
    assert "BE duty beside LC: 0.85 (SM clock 1710 MHz, the governor's target 1722 MHz)" in out
    _print_arbiter(dict(arb, be_duty={"now": 1.0, "sm_mhz": 0.0, "target_mhz": 0}), [])
    assert "BE duty" not in capsys.readouterr().out      # no NVML clocks: no governor

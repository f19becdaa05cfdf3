"""laked start/status/stop, and the module noticing laked's death."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, SYSFS, Laked, rmmod, wait_for

THRESHOLD = str(ROOT / "ebpf" / "threshold.bpf.c")


def test_start_without_module_is_a_clear_error(laked_cli: Laked) -> None:
    rmmod()
    res = laked_cli.cli("start", "--daemon", check=False)
    assert res.returncode == 1
    assert "lake.ko is not loaded" in res.stderr
    assert not (laked_cli.run_dir / "laked.pid").exists()


def test_start_status_stop(laked: Laked) -> None:
    assert (SYSFS / "daemon").read_text().strip() == f"connected pid={laked.pid}"
    out = json.loads(laked.cli("status", "--json").stdout)
    assert out["daemon"]["pid"] == laked.pid
    assert out["daemon"]["module_connected"] is True
    assert out["module"]["daemon_connected"] == 1
    assert out["module"]["daemon_pid"] == laked.pid
    assert out["sysfs"]["policy"] == "builtin"
    text = laked.cli("status").stdout
    assert "laked:     pid" in text and "policy:  builtin" in text
    pid = laked.pid
    laked.cli("stop")
    assert (SYSFS / "daemon").read_text().strip() == "disconnected"
    assert wait_for(lambda: not Path(f"/proc/{pid}").exists())
    assert "laked stopped" in laked.log()


def test_second_start_is_refused(laked: Laked) -> None:
    res = laked.cli("start", "--daemon", check=False)
    assert res.returncode == 1 and "already running" in res.stderr


def test_second_daemon_elsewhere_gets_ebusy(laked: Laked) -> None:
    other = Laked(laked.run_dir / "other")
    res = other.cli("start", "--daemon", check=False)
    assert res.returncode == 1
    assert "another laked is connected" in res.stderr


def test_status_without_daemon(module: None, laked_cli: Laked) -> None:
    text = laked_cli.cli("status").stdout
    assert "laked:     not running" in text and "daemon:  disconnected" in text
    assert laked_cli.cli("stop").returncode == 0


def test_sigkill_is_noticed_and_policy_dropped(laked: Laked) -> None:
    laked.cli("policy", "load", THRESHOLD)
    assert (SYSFS / "policy").read_text().startswith("threshold id=")
    os.kill(laked.pid, signal.SIGKILL)
    assert wait_for(lambda: (SYSFS / "daemon").read_text().strip() == "disconnected")
    assert (SYSFS / "policy").read_text().strip() == "builtin"
    # a new laked can take over at once
    (laked.run_dir / "laked.pid").unlink()
    laked.start()
    assert (SYSFS / "daemon").read_text().strip() == f"connected pid={laked.pid}"


def test_state_changes_need_root(laked: Laked) -> None:
    res = laked.cli("policy", "load", THRESHOLD, check=False, user="65534")
    assert res.returncode == 1 and "needs root" in res.stderr
    res = laked.cli("util", "set", "50", check=False, user="65534")
    assert res.returncode == 1 and "needs root" in res.stderr
    assert laked.cli("status", user="65534").returncode == 0
    res = laked.cli("decide", "--batch", "1", check=False, user="65534")
    assert res.returncode == 1 and "needs root" in res.stderr


def test_daemon_checks_peer_uid(laked: Laked) -> None:
    """The socket is world-writable: the daemon itself must refuse non-root."""
    code = ("from laked import ctl; from pathlib import Path; "
            f"print(ctl.call(Path('{laked.run_dir}/laked.sock'), {{'op': 'stop'}}))")
    res = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                          sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, timeout=60)
    assert "needs root" in res.stdout, res.stdout + res.stderr
    assert Path(f"/proc/{laked.pid}").exists()


def test_help_has_examples() -> None:
    laked_cli = Laked(Path("/tmp/laked-help"))
    for cmd in (["--help"], ["start", "--help"], ["policy", "load", "--help"],
                ["status", "--help"], ["decide", "--help"], ["util", "set", "--help"]):
        out = laked_cli.cli(*cmd).stdout
        assert "Example" in out, cmd

"""Policy manager: compile ebpf/*.bpf.c with BCC, attach through lake.ko.

A policy is a socket filter whose entry point is ``int decide(struct
__sk_buff *skb)``; it reads the decision context from skb->cb[] (see
ebpf/lake_policy.h) and returns 0 (CPU) or 1 (GPU).  The BPF object stays
alive here so laked can keep the policy's maps fresh; lake.ko holds its own
reference to the program.
"""
from __future__ import annotations

import logging
import os
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger("laked.policy")

ENTRY = "decide"
EBPF_DIR = Path(__file__).resolve().parent.parent / "ebpf"
LAKELIB_DIR = Path(__file__).resolve().parent.parent / "lakelib"

# Maps laked keeps up to date when a policy declares them (BPF_ARRAY, u32).
LIVE_MAPS = ("gpu_util",)


class PolicyError(RuntimeError):
    """The policy did not compile, did not verify, or was refused."""


@dataclass
class LoadedPolicy:
    name: str
    path: str
    prog_id: int
    defines: dict[str, str]
    bpf: Any = field(repr=False)

    def close(self) -> None:
        self.bpf.cleanup()


def policy_name(path: Path) -> str:
    name = path.name
    for suffix in (".bpf.c", ".c"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


class _StderrCapture:
    """libbcc prints compiler and verifier logs on fd 2; keep them."""

    def __enter__(self) -> "_StderrCapture":
        self.tmp = tempfile.TemporaryFile()
        self.saved = os.dup(2)
        os.dup2(self.tmp.fileno(), 2)
        self.text = ""
        return self

    def __exit__(self, *exc: object) -> None:
        os.dup2(self.saved, 2)
        os.close(self.saved)
        self.tmp.seek(0)
        self.text = self.tmp.read().decode(errors="replace")
        self.tmp.close()


def compile_policy(path: Path, defines: dict[str, str]) -> tuple[Any, int]:
    """Compile and verify; return (BPF object, program fd)."""
    from bcc import BPF  # Debian's python3-bpfcc; imported only here

    if not path.is_file():
        raise PolicyError(f"{path}: no such policy file")
    cflags = [f"-I{EBPF_DIR}", f"-I{LAKELIB_DIR}"]
    cflags += [f"-D{k}={v}" for k, v in defines.items()]
    bpf = None
    with _StderrCapture() as cap:
        try:
            bpf = BPF(src_file=str(path).encode(), cflags=cflags)
            fn = bpf.load_func(ENTRY.encode(), BPF.SOCKET_FILTER)
        except Exception as e:  # BCC raises bare Exception for both stages
            err: Exception | None = e
        else:
            err = None
    if err is not None:
        if bpf is not None:
            bpf.cleanup()
        detail = cap.text.strip()
        tail = "\n".join(detail.splitlines()[-25:])
        raise PolicyError(f"{path.name}: {err}" + (f"\n{tail}" if tail else ""))
    return bpf, fn.fd


def prog_id_of(fd: int) -> int:
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("prog_id:"):
                return int(line.split()[1])
    return 0


class PolicyManager:
    """Owns the attached policy's BPF object and its live maps."""

    def __init__(self, attach: Callable[[int, str], None],
                 detach: Callable[[], None]) -> None:
        self._attach = attach
        self._detach = detach
        self.current: LoadedPolicy | None = None
        self.lock = threading.Lock()

    def load(self, path: Path, defines: dict[str, str] | None = None) -> LoadedPolicy:
        defines = dict(defines or {})
        name = policy_name(path)
        bpf, fd = compile_policy(path, defines)
        try:
            self._attach(fd, name)
        except Exception:
            bpf.cleanup()
            raise
        new = LoadedPolicy(name, str(path), prog_id_of(fd), defines, bpf)
        with self.lock:
            old, self.current = self.current, new
        if old is not None:
            old.close()
        log.info("policy %s attached (prog id %d) from %s", name, new.prog_id, path)
        return new

    def unload(self) -> None:
        self._detach()
        self.forget()

    def forget(self) -> None:
        """The module dropped the policy (unload, daemon reconnect)."""
        with self.lock:
            old, self.current = self.current, None
        if old is not None:
            old.close()
            log.info("policy %s released", old.name)

    def update_maps(self, values: dict[str, int]) -> None:
        with self.lock:
            if self.current is None:
                return
            tables = self.current.bpf
            for name, value in values.items():
                try:
                    table = tables[name.encode()]
                except KeyError:
                    continue
                table[table.Key(0)] = table.Leaf(int(value))

    def update_costs(self, costs: dict[int, Any]) -> None:
        """Fill a cost policy's "costs" map (struct lake_model_cost by id)."""
        with self.lock:
            if self.current is None:
                return
            try:
                table = self.current.bpf[b"costs"]
            except KeyError:
                return
            for mid, cost in costs.items():
                table[table.Key(mid)] = table.Leaf(*cost.leaf())

    def info(self) -> dict[str, Any] | None:
        cur = self.current
        if cur is None:
            return None
        return {"name": cur.name, "path": cur.path, "prog_id": cur.prog_id,
                "defines": cur.defines}

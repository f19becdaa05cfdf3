"""/sys/kernel/lake: read status and knobs, write knobs."""
from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(os.environ.get("LAKE_SYSFS", "/sys/kernel/lake"))


def loaded() -> bool:
    return ROOT.is_dir()


def read(name: str) -> str:
    return (ROOT / name).read_text().strip()


def write(name: str, value: str | int) -> None:
    with open(ROOT / name, "w") as f:
        f.write(f"{value}\n")


def read_all() -> dict[str, str]:
    if not loaded():
        return {}
    return {p.name: p.read_text().strip() for p in sorted(ROOT.iterdir())
            if p.is_file() and os.access(p, os.R_OK)}


def stats() -> dict[str, int]:
    out: dict[str, int] = {}
    for line in read("stats").splitlines():
        key, _, value = line.partition(" ")
        out[key] = int(value)
    return out

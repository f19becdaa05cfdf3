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


def models() -> list[dict[str, object]]:
    """Each model's id, weights line and counters (models/NAME/)."""
    root = ROOT / "models"
    if not root.is_dir():
        return []
    out: list[dict[str, object]] = []
    for d in sorted(root.iterdir()):
        try:
            stats = {k: int(v) for k, v in (line.split() for line in
                                            (d / "stats").read_text().splitlines())}
            out.append({"name": d.name, "id": int((d / "id").read_text()),
                        "weights": (d / "weights").read_text().strip(), "stats": stats})
        except (OSError, ValueError):
            continue  # deleted while we looked
    return out

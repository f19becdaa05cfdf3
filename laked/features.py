"""Feature sets lake.ko's callers registered: list them, drain their records.

Records come from /sys/kernel/lake/features/NAME/records (reading drains
them, per CPU in order); struct lake_feature_rec in lakelib/uapi/lake.h is
their layout.  Recording merges the CPUs by timestamp, which keeps each
CPU's own order since a CPU's timestamps never go back.
"""
from __future__ import annotations

import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import msgpack

from . import abi

ROOT = Path("/sys/kernel/lake/features")
REC_HDR = struct.Struct("<QII")


@dataclass
class Feature:
    name: str
    fields: list[tuple[str, str]]
    capacity: int
    captured: int
    dropped: int

    @property
    def record_size(self) -> int:
        return REC_HDR.size + 8 * len(self.fields)


@dataclass
class Record:
    ts_ns: int
    cpu: int
    values: list[int] = field(default_factory=list)


def load(name: str, root: Path = ROOT) -> Feature:
    d = root / name
    if not d.is_dir():
        raise FileNotFoundError(f"no feature {name!r} (is its kernel module loaded?)")
    fields = [line.split() for line in (d / "fields").read_text().splitlines() if line]
    stats = dict(line.split() for line in (d / "stats").read_text().splitlines())
    return Feature(name, [(f[0], f[1]) for f in fields], int((d / "capacity").read_text()),
                   int(stats["captured"]), int(stats["dropped"]))


def list_all(root: Path = ROOT) -> list[Feature]:
    if not root.is_dir():
        return []
    out = []
    for p in sorted(root.iterdir()):
        try:
            out.append(load(p.name, root))
        except (OSError, ValueError, KeyError):
            continue    # unregistered while we looked
    return out


def _signed(v: int, bits: int) -> int:
    v &= (1 << bits) - 1
    return v - (1 << bits) if v >> (bits - 1) else v


def decode(feat: Feature, data: bytes) -> list[Record]:
    """Whole records from one read; values typed as the fields say."""
    out = []
    size = feat.record_size
    for off in range(0, len(data) - size + 1, size):
        ts, cpu, n = REC_HDR.unpack_from(data, off)
        if n != len(feat.fields):
            raise ValueError(f"record with {n} fields, feature has {len(feat.fields)}")
        raw = struct.unpack_from(f"<{n}Q", data, off + REC_HDR.size)
        vals = []
        for v, (_, kind) in zip(raw, feat.fields):
            if kind == "s64":
                v = _signed(v, 64)
            elif kind == "s32":
                v = _signed(v, 32)
            elif kind == "u32":
                v &= 0xFFFFFFFF
            vals.append(v)
        out.append(Record(ts, cpu, vals))
    return out


def drain(feat: Feature, root: Path = ROOT) -> list[Record]:
    """Everything queued now, in capture order across CPUs."""
    recs: list[Record] = []
    chunk = max(feat.record_size, 4096 // feat.record_size * feat.record_size)
    with open(root / feat.name / "records", "rb", buffering=0) as f:
        while True:
            data = f.read(chunk)
            if not data:
                break
            recs += decode(feat, data)
    recs.sort(key=lambda r: r.ts_ns)
    return recs


def record(name: str, out: BinaryIO, seconds: float, interval: float = 0.1,
           root: Path = ROOT) -> int:
    """Drain @name for @seconds into @out (msgpack); returns records written."""
    feat = load(name, root)
    deadline = time.monotonic() + seconds
    recs: list[Record] = []
    while True:
        recs += drain(feat, root)
        if time.monotonic() >= deadline:
            break
        time.sleep(interval)
    recs.sort(key=lambda r: r.ts_ns)
    doc: dict[str, Any] = {
        "feature": name, "abi": abi.LAKE_ABI_VERSION,
        "fields": [list(f) for f in feat.fields],
        "records": [[r.ts_ns, r.cpu, r.values] for r in recs],
    }
    out.write(msgpack.packb(doc))
    return len(recs)

"""The user/kernel ABI, read from lakelib/uapi/lake.h at import.

The header is the one source of truth: every enum and #define in it is an
attribute of this module (e.g. ``abi.LAKE_CMD_HELLO``).  Struct layouts are
spelled here as ``struct`` formats; tests/host/test_abi.py compiles the
header with gcc and checks sizes and offsets against them.
"""
from __future__ import annotations

import os
import re
import struct
from pathlib import Path

_HERE = Path(__file__).resolve().parent
HEADER_CANDIDATES = (
    os.environ.get("LAKE_UAPI_HEADER", ""),
    str(_HERE.parent / "lakelib" / "uapi" / "lake.h"),
    str(_HERE / "lake.h"),
)

# Little-endian, no implicit padding: every pad is explicit in the header.
STRUCTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "lake_decide_ctx": ("<5I", ("model", "batch", "flags", "queue_depth",
                                "queue_delay_us")),
    "lake_ring": ("<I60xI60x", ("head", "tail")),
    "lake_region_hdr": ("<IIQQQIIQQIIQQII", (
        "magic", "version", "size", "sq_ring_off", "sq_off", "sq_entries",
        "sqe_size", "cq_ring_off", "cq_off", "cq_entries", "cqe_size",
        "heap_off", "heap_size", "daemon_flags", "sched_delay_us")),
    "lake_sqe": ("<QIII4x10QQQ", ()),
    "lake_cqe": ("<Qi4x2Q", ()),
    "lake_region_info": ("<QI4x", ("size", "version")),
}


def sizeof(name: str) -> int:
    return struct.calcsize(STRUCTS[name][0])


def header_path() -> Path:
    for cand in HEADER_CANDIDATES:
        if cand and Path(cand).is_file():
            return Path(cand)
    raise FileNotFoundError(
        "lake UAPI header not found; set LAKE_UAPI_HEADER to lakelib/uapi/lake.h")


def _ioc(direction: int, typ: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (typ << 8) | nr


def _eval(expr: str, names: dict[str, object]) -> object:
    expr = expr.strip()
    if expr.startswith('"'):
        return expr.strip('"')
    m = re.fullmatch(r"_IO(R|W|WR)?\((\w+),\s*(\w+)(?:,\s*struct\s+(\w+))?\)", expr)
    if m:
        direction = {None: 0, "W": 1, "R": 2, "WR": 3}[m.group(1)]
        size = sizeof(m.group(4)) if m.group(4) else 0
        return _ioc(direction, int(_eval(m.group(2), names)),
                    int(_eval(m.group(3), names)), size)
    py = re.sub(r"\b(0x[0-9a-fA-F]+|\d+)[uUlL]+\b", r"\1", expr)
    if not re.fullmatch(r"[\w\s()<>|+\-*&~]+", py):
        raise ValueError(f"cannot evaluate {expr!r}")
    return eval(py, {"__builtins__": {}}, dict(names))  # noqa: S307 - header only


def parse(text: str) -> dict[str, object]:
    """Return every enum constant and simple #define of a C header."""
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    text = re.sub(r"//[^\n]*", "", text)
    names: dict[str, object] = {}
    for m in re.finditer(r"#define\s+(\w+)[ \t]+([^\n]+)|enum\s+\w+\s*\{(.*?)\};",
                         text, flags=re.S):
        if m.group(1):
            try:
                names[m.group(1)] = _eval(m.group(2), names)
            except (ValueError, SyntaxError, NameError, KeyError):
                continue
            continue
        value = -1
        for item in m.group(3).split(","):
            item = item.strip()
            if not item:
                continue
            name, _, expr = item.partition("=")
            value = int(_eval(expr, names)) if expr else value + 1
            names[name.strip()] = value
    return names


_NAMES = parse(header_path().read_text())
globals().update(_NAMES)


def names_with_prefix(prefix: str) -> dict[str, int]:
    """{'HELLO': 1, ...} for prefix 'LAKE_CMD_' (private names skipped)."""
    return {k[len(prefix):]: v for k, v in _NAMES.items()
            if k.startswith(prefix) and isinstance(v, int)}

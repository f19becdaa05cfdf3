"""The Python ABI mirror must match lakelib/uapi/lake.h as gcc sees it."""
from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from laked import abi

ROOT = Path(__file__).resolve().parents[2]

# Fields whose offsets we check, per struct (names as in the header).
OFFSETS = {
    "lake_decide_ctx": abi.STRUCTS["lake_decide_ctx"][1],
    "lake_ring": ("head", "tail"),
    "lake_region_hdr": tuple(n for n in abi.STRUCTS["lake_region_hdr"][1] if n != "_pad"),
    "lake_sqe": ("id", "op", "session", "flags", "args", "data_off", "data_len"),
    "lake_cqe": ("id", "result", "ret"),
    "lake_region_info": ("size", "version"),
}


def _python_offsets(name: str) -> dict[str, int]:
    """Offsets implied by the struct format, for fields in order."""
    fmt = abi.STRUCTS[name][0]
    fields = OFFSETS[name]
    offs: dict[str, int] = {}
    pos = 0
    i = 0
    for count, code in _tokens(fmt[1:]):
        if code == "x":
            pos += count
            continue
        size = struct.calcsize("<" + code)
        if i < len(fields):
            offs[fields[i]] = pos
        # an array (args[10], ret[2]) is one named field
        array = name in ("lake_sqe", "lake_cqe") and count > 1
        i += 1 if array else count
        if not array and count > 1:
            for k in range(1, count):
                if i - count + k < len(fields):
                    offs[fields[i - count + k]] = pos + k * size
        pos += count * size
    return offs


def _tokens(fmt: str) -> list[tuple[int, str]]:
    out, num = [], ""
    for ch in fmt:
        if ch.isdigit():
            num += ch
        else:
            out.append((int(num or 1), ch))
            num = ""
    return out


@pytest.fixture(scope="module")
def c_view(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    ints = [k for k, v in abi._NAMES.items() if isinstance(v, int) and not k.startswith("__")]
    lines = ['#include <stdio.h>', '#include <stddef.h>', '#include "uapi/lake.h"',
             "int main(void) {"]
    for k in ints:
        lines.append(f'  printf("%s %lld\\n", "{k}", (long long)({k}));')
    for s, fields in OFFSETS.items():
        lines.append(f'  printf("sizeof.{s} %zu\\n", sizeof(struct {s}));')
        for f in fields:
            lines.append(f'  printf("offsetof.{s}.{f} %zu\\n", offsetof(struct {s}, {f}));')
    lines += ["  return 0;", "}"]
    d = tmp_path_factory.mktemp("abi")
    (d / "abi.c").write_text("\n".join(lines))
    subprocess.run(["gcc", "-Wall", "-Werror", f"-I{ROOT / 'lakelib'}", "-o", str(d / "abi"),
                    str(d / "abi.c")], check=True)
    out = subprocess.run([str(d / "abi")], check=True, capture_output=True, text=True).stdout
    return {k: int(v) for k, v in (line.split() for line in out.splitlines())}


def test_every_constant_matches(c_view: dict[str, int]) -> None:
    ints = {k: v for k, v in abi._NAMES.items() if isinstance(v, int) and not k.startswith("__")}
    assert len(ints) > 60
    mismatched = {k: (v, c_view[k]) for k, v in ints.items() if c_view[k] & 0xFFFFFFFF != v & 0xFFFFFFFF}
    assert mismatched == {}


def test_struct_sizes_match(c_view: dict[str, int]) -> None:
    for name in abi.STRUCTS:
        assert abi.sizeof(name) == c_view[f"sizeof.{name}"], name


def test_struct_offsets_match(c_view: dict[str, int]) -> None:
    for name in OFFSETS:
        for field, off in _python_offsets(name).items():
            assert off == c_view[f"offsetof.{name}.{field}"], f"{name}.{field}"


def test_decide_ctx_fits_skb_cb() -> None:
    # __sk_buff->cb[] gives a socket filter five u32 words
    assert abi.sizeof("lake_decide_ctx") == 20


def test_parser_handles_expressions() -> None:
    names = abi.parse("#define A (1U << 3)\nenum e { X, Y = A + 1, Z, };\n#define S \"s\"\n")
    assert names == {"A": 8, "X": 0, "Y": 9, "Z": 10, "S": "s"}

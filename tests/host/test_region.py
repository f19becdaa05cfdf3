"""The shared region as laked sees it: layout, rings, bounds (no GPU, no module).

The layout and the launch-parameter packing are checked against the
kernel's own C (kmod/region.c, kmod/cuapi.c) compiled with gcc in user
space, so the stand-in writes exactly what lake.ko writes.
"""
from __future__ import annotations

import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from laked import abi
from laked.region import (CQE_SIZE, HDR_SIZE, RING_SIZE, SQE_SIZE, Cqe, Region, RegionError,
                          Sqe, init_region, layout_for, pack_launch_params,
                          parse_launch_params, read_layout)

ROOT = Path(__file__).resolve().parents[2]
HDR = struct.Struct(abi.STRUCTS["lake_region_hdr"][0])
SQ_N, CQ_N = abi.LAKE_SQ_ENTRIES, abi.LAKE_CQ_ENTRIES


def kernel_function(path: Path, signature: str) -> str:
    """The text of one C function of the module, from its signature to its closing brace."""
    text = path.read_text()
    m = re.search(re.escape(signature) + r"\n\{.*?\n\}\n", text, flags=re.S)
    assert m, f"{signature} not found in {path}: update this test with the kernel"
    return m.group(0)


SHIM = """
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
typedef uint64_t u64; typedef uint32_t u32; typedef uint8_t u8;
#define ALIGN(x, a) (((x) + (a) - 1) & ~((u64)(a) - 1))
#define PAGE_ALIGN(x) ALIGN(x, 4096)
#include "uapi/lake.h"
"""


def build(tmp: Path, name: str, source: str) -> Path:
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    (tmp / f"{name}.c").write_text(source)
    exe = tmp / name
    subprocess.run(["gcc", "-Wall", "-Werror", "-Wno-unused-function", f"-I{ROOT / 'lakelib'}",
                    "-o", str(exe), str(tmp / f"{name}.c")], check=True)
    return exe


# -- layout -------------------------------------------------------------------------------
@pytest.mark.parametrize("mb", [2, 16, 64])
def test_layout_is_the_kernels(tmp_path: Path, mb: int) -> None:
    fn = kernel_function(ROOT / "kmod" / "region.c",
                         "static void lake_region_layout(struct lake_region *r)")
    src = SHIM + """
struct lake_region {
    void *base; size_t size; struct lake_region_hdr *hdr; struct lake_ring *sq_ring;
    struct lake_sqe *sqes; struct lake_ring *cq_ring; struct lake_cqe *cqes; u64 heap_off;
};
""" + fn + """
int main(int argc, char **argv) {
    struct lake_region r = { .size = strtoull(argv[1], 0, 0) };
    r.base = calloc(1, r.size);
    lake_region_layout(&r);
    fwrite(r.base, 1, sizeof(struct lake_region_hdr), stdout);
    return 0;
}
"""
    exe = build(tmp_path, "layout", src)
    size = mb << 20
    kernel = subprocess.run([str(exe), str(size)], check=True, capture_output=True).stdout
    buf = bytearray(size)
    init_region(buf)
    assert bytes(buf[:HDR_SIZE]) == kernel
    lay = read_layout(buf)
    assert lay == layout_for(size)
    assert lay.heap_off % 4096 == 0 and lay.heap_off + lay.heap_size == size
    assert lay.sq_ring_off % 64 == 0 and lay.cq_ring_off % 64 == 0


@pytest.mark.parametrize("sizes", [[8, 8, 8, 4], [1], [4, 2, 1, 8, 16, 3], [], [2000, 1000]])
def test_launch_params_are_packed_like_the_kernel(tmp_path: Path, sizes: list[int]) -> None:
    fn = kernel_function(ROOT / "kmod" / "cuapi.c",
                         "static void *lake_pack_params(void **params, const u32 *sizes, u32 n,\n"
                         "\t\t\t      size_t *len)")
    src = SHIM + """
#define LAKE_MAX_PARAM_BYTES 4096
static void *lake_payload(const void *src, size_t len) { return calloc(1, len); }
""" + fn + """
int main(int argc, char **argv) {
    u32 n = argc - 1, sizes[64]; void *params[64]; size_t len = 0;
    for (u32 i = 0; i < n; i++) {
        sizes[i] = atoi(argv[i + 1]);
        params[i] = malloc(sizes[i]);
        for (u32 b = 0; b < sizes[i]; b++) ((u8 *)params[i])[b] = (u8)(i * 31 + b);
    }
    void *p = lake_pack_params(params, sizes, n, &len);
    if (!p) return 1;
    fwrite(p, 1, len, stdout);
    return 0;
}
"""
    exe = build(tmp_path, "params", src)
    kernel = subprocess.run([str(exe), *map(str, sizes)], check=True,
                            capture_output=True).stdout
    values = [bytes((i * 31 + b) & 0xFF for b in range(s)) for i, s in enumerate(sizes)]
    ours = pack_launch_params(values)
    assert ours == kernel
    spans = parse_launch_params(ours, base=1000)
    assert [ours[o - 1000:o - 1000 + n] for o, n in spans] == values


def test_bad_launch_params_are_refused() -> None:
    good = pack_launch_params([b"12345678", b"1234"])
    for bad in (b"", b"\x02\x00", struct.pack("<II", 1, 64) + bytes(8),   # value past the end
                struct.pack("<II", 1, 0) + bytes(8),                      # size 0
                struct.pack("<I", 10_000) + bytes(64)):                   # count too big
        with pytest.raises(ValueError):
            parse_launch_params(bad)
    parse_launch_params(good[:-4])          # the last value's padding may be cut
    with pytest.raises(ValueError):
        parse_launch_params(good[:-5])          # but not the value
    with pytest.raises(ValueError):
        pack_launch_params([b"x"] * 65)


# -- the header is checked, never trusted ----------------------------------------------
def corrupt(field: str, value: int, size: int = 4 << 20) -> bytearray:
    buf = bytearray(size)
    init_region(buf)
    vals = dict(zip(abi.STRUCTS["lake_region_hdr"][1], HDR.unpack_from(buf, 0)))
    vals[field] = value
    HDR.pack_into(buf, 0, *vals.values())
    return buf


@pytest.mark.parametrize("field,value,why", [
    ("magic", 0x12345678, "magic"),
    ("version", 99, "version"),
    ("sqe_size", SQE_SIZE + 8, "entry sizes"),
    ("cq_entries", 100, "power of two"),
    ("size", 8 << 20, "mapped"),
    ("cq_off", 4096 + 64, "overlaps"),
    ("heap_size", 4 << 20, "past the region"),
    ("sq_ring_off", 4096 + 8, "overlaps|aligned"),
])
def test_bad_headers_are_refused(field: str, value: int, why: str) -> None:
    with pytest.raises(RegionError, match=why):
        Region(corrupt(field, value))


def test_read_only_and_tiny_buffers_are_refused() -> None:
    buf = bytearray(4 << 20)
    init_region(buf)
    with pytest.raises(RegionError, match="read-only"):
        Region(bytes(buf))
    with pytest.raises(RegionError):
        Region(bytearray(16))
    with pytest.raises(RegionError, match="no heap"):
        init_region(bytearray(16384))


def test_heap_bounds() -> None:
    buf = bytearray(4 << 20)
    init_region(buf)
    r = Region(buf)
    assert r.in_heap(r.heap_off, 1) and r.in_heap(r.heap_end - 1, 1)
    assert r.in_heap(r.heap_off, r.heap_end - r.heap_off)
    for off, n in ((0, 8), (r.heap_off - 1, 2), (r.heap_end, 1), (r.heap_end - 1, 2),
                   (r.heap_off, -1), (2**64 - 1, 2), (r.heap_off, 2**64)):
        assert not r.in_heap(off, n), (off, n)
        with pytest.raises(RegionError):
            r.view(off, n)
    r.write(r.heap_off + 5, b"abc")
    assert r.read(r.heap_off + 5, 3) == b"abc"


# -- rings ----------------------------------------------------------------------------------
def ring_at(start: int) -> tuple[bytearray, Region]:
    """A region whose four indices all start at ``start`` (as after long uptime)."""
    buf = bytearray(4 << 20)
    lay = init_region(buf)
    for ring in (lay.sq_ring_off, lay.cq_ring_off):
        struct.pack_into("<I", buf, ring, start)
        struct.pack_into("<I", buf, ring + 64, start)
    return buf, Region(buf)


@pytest.mark.parametrize("start", [0, 0xFFFFFFFF - 100, 0xFFFFFFFF])
def test_submissions_wrap_around(start: int) -> None:
    _buf, r = ring_at(start)
    sent = got = 0
    for burst in (1, 7, SQ_N, 3, SQ_N - 1, 50, 200, SQ_N):
        for _ in range(burst):
            assert r.submit(Sqe(sent, abi.LAKE_OP_NULL, session=sent % 7, args=(sent,) * 10,
                                data_off=sent * 3, data_len=sent))
            sent += 1
        while got < sent:
            for s in r.take_submissions(limit=37):
                assert (s.id, s.session, s.args, s.data_off, s.data_len) == \
                    (got, got % 7, (got,) * 10, got * 3, got)
                got += 1
    assert r.sq_pending() == 0
    assert r._load(r._sq_head_at) == (start + sent) & 0xFFFFFFFF  # noqa: SLF001


@pytest.mark.parametrize("start", [0, 0xFFFFFFFF - 3])
def test_completions_wrap_around(start: int) -> None:
    _buf, r = ring_at(start)
    posted = got = 0
    for burst in (CQ_N, 5, CQ_N - 2, 300):
        cqes = [Cqe(posted + i, -(posted + i) % 1000, posted + i, 2**64 - 1)
                for i in range(burst)]
        while cqes:
            n = r.post_completions(cqes)
            posted += n
            del cqes[:n]
            for c in r.take_completions():
                assert (c.id, c.result, c.ret0, c.ret1) == \
                    (got, -got % 1000, got, 2**64 - 1)
                got += 1
    assert got == posted


def test_full_rings_push_back() -> None:
    _buf, r = ring_at(0xFFFFFFF0)
    for i in range(SQ_N):
        assert r.submit(Sqe(i, 0))
    assert r.sq_space() == 0 and not r.submit(Sqe(999, 0))
    assert [s.id for s in r.take_submissions(10)] == list(range(10))
    assert r.sq_space() == 10
    assert r.post_completions([Cqe(i, 0) for i in range(CQ_N + 10)]) == CQ_N
    assert r.cq_space() == 0 and r.post_completions([Cqe(1, 0)]) == 0


@pytest.mark.parametrize("head_delta", [SQ_N + 1, 10_000, 2**31, 2**32 - 1])
def test_garbage_submission_head_is_rejected(head_delta: int) -> None:
    buf, r = ring_at(500)
    struct.pack_into("<I", buf, r.layout.sq_ring_off, (500 + head_delta) & 0xFFFFFFFF)
    assert r.sq_pending() <= SQ_N
    with pytest.raises(RegionError, match="ahead of tail"):
        r.take_submissions()
    # laked skipped to the head: a sane producer from there on works again
    producer = Region(buf)
    assert producer.submit(Sqe(77, abi.LAKE_OP_NULL))
    assert [s.id for s in r.take_submissions()] == [77]


def test_garbage_completion_indices_stay_in_bounds() -> None:
    buf, r = ring_at(0)
    lay = r.layout
    # a consumer tail far beyond our head: no space, nothing written
    struct.pack_into("<I", buf, lay.cq_ring_off + 64, 12345)
    before = bytes(buf)
    assert r.cq_space() == 0 and r.post_completions([Cqe(1, 0)]) == 0
    assert bytes(buf) == before
    # a producer reading a wild head takes at most one ring's worth, from inside the ring
    struct.pack_into("<I", buf, lay.cq_ring_off + 64, 0)
    struct.pack_into("<I", buf, lay.cq_ring_off, 0x7FFFFFFF)
    assert len(r.take_completions()) == CQ_N


def test_rings_do_not_touch_the_heap() -> None:
    buf, r = ring_at(0xFFFFFFF0)
    heap_before = bytes(buf[r.heap_off:])
    for round_ in range(5):
        for i in range(SQ_N):
            assert r.submit(Sqe(i, 0, args=(2**64 - 1,) * 10, data_off=2**64 - 1,
                                data_len=2**64 - 1))
        assert len(r.take_submissions()) == SQ_N
        assert r.post_completions([Cqe(2**64 - 1, -1, 2**64 - 1, 2**64 - 1)] * CQ_N) == CQ_N
        assert len(r.take_completions()) == CQ_N
    assert bytes(buf[r.heap_off:]) == heap_before
    assert SQE_SIZE * SQ_N + RING_SIZE + CQE_SIZE * CQ_N + RING_SIZE < r.heap_off


def test_out_of_range_fields_wrap_like_c() -> None:
    _buf, r = ring_at(0)
    assert r.submit(Sqe(-1, -1, -1, 2**33, (-1,) * 10, -1, 2**64 + 5))
    [s] = r.take_submissions()
    assert (s.id, s.op, s.session, s.flags, s.args[0], s.data_len) == \
        (2**64 - 1, 2**32 - 1, 2**32 - 1, 0, 2**64 - 1, 5)
    assert r.post_completions([Cqe(1, 2**40)]) == 1          # not a CUresult: UNKNOWN
    assert r.take_completions()[0].result == abi.LAKE_CUDA_ERROR_UNKNOWN

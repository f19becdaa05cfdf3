"""The shared region: header, submission and completion rings, heap.

A ``Region`` sits over any writable buffer laid out as lakelib/uapi/lake.h
says (the /dev/lake mapping in laked, a memfd mapping in the user-space
stand-in and in tests).  Every offset comes from the header, never from
this file; ``init_region`` writes a fresh header with the layout the kernel
uses (kmod/region.c: lake_region_layout), for the stand-in.

Each side of a ring keeps a private copy of the index it owns (laked: the
SQ tail and the CQ head; the producer side: the SQ head and the CQ tail)
and only reads the other side's index from memory, as the kernel does, so
nothing the peer scribbles into the mapping can make us walk out of the
ring.  One Region object may play both roles (the tests do); two Region
objects over one buffer must not share a role.

Memory ordering: x86-64 is TSO, so plain stores through a memoryview are
seen in program order.  Producers write the entry, then publish the index;
consumers read the index, then the entries.  That is all the kernel's
smp_store_release/smp_load_acquire pair needs on this architecture.
"""
from __future__ import annotations

import ctypes
import logging
import struct
from dataclasses import dataclass
from typing import Iterable, Sequence

from . import abi

log = logging.getLogger("laked.region")

U32 = 0xFFFFFFFF
U64 = 0xFFFFFFFFFFFFFFFF
PAGE = 4096

_HDR = struct.Struct(abi.STRUCTS["lake_region_hdr"][0])
_SQE = struct.Struct(abi.STRUCTS["lake_sqe"][0])
_CQE = struct.Struct(abi.STRUCTS["lake_cqe"][0])
_RING = struct.Struct(abi.STRUCTS["lake_ring"][0])
_U32 = struct.Struct("<I")
_RING_TAIL_OFF = 64          # struct lake_ring: head at 0, tail on the next cache line
_DAEMON_FLAGS_OFF = _HDR.size - 8   # the header's last two u32s
_SCHED_DELAY_US_OFF = _HDR.size - 4

SQE_SIZE = _SQE.size
CQE_SIZE = _CQE.size
RING_SIZE = _RING.size
HDR_SIZE = _HDR.size

# The kernel caps launch parameters (kmod/cuapi.c); lake.h does not say.
MAX_LAUNCH_PARAMS = 64
MAX_LAUNCH_PARAM_BYTES = 4096


class RegionError(Exception):
    """The buffer is not a usable lake region, or a ring is corrupt."""


@dataclass(frozen=True)
class Layout:
    """Where everything is, as struct lake_region_hdr states it."""

    size: int
    sq_ring_off: int
    sq_off: int
    sq_entries: int
    sqe_size: int
    cq_ring_off: int
    cq_off: int
    cq_entries: int
    cqe_size: int
    heap_off: int
    heap_size: int


@dataclass(slots=True)
class Sqe:
    """One struct lake_sqe."""

    id: int
    op: int
    session: int = 0
    flags: int = 0
    args: tuple[int, ...] = (0,) * abi.LAKE_SQE_ARGS
    data_off: int = 0
    data_len: int = 0

    @classmethod
    def unpack(cls, t: tuple[int, ...]) -> "Sqe":
        return cls(t[0], t[1], t[2], t[3], t[4:14], t[14], t[15])

    def pack_into(self, buf: memoryview, off: int) -> None:
        args = self.args
        if len(args) != abi.LAKE_SQE_ARGS:
            if len(args) > abi.LAKE_SQE_ARGS:
                raise ValueError(f"an sqe has {abi.LAKE_SQE_ARGS} args, got {len(args)}")
            args = tuple(args) + (0,) * (abi.LAKE_SQE_ARGS - len(args))
        try:    # the common case: every field already in range (no masking: hot path)
            _SQE.pack_into(buf, off, self.id, self.op, self.session, self.flags, *args,
                           self.data_off, self.data_len)
        except struct.error:    # negative or oversized values wrap, as in C
            _SQE.pack_into(buf, off, self.id & U64, self.op & U32, self.session & U32,
                           self.flags & U32, *(a & U64 for a in args),
                           self.data_off & U64, self.data_len & U64)


@dataclass(slots=True)
class Cqe:
    """One struct lake_cqe."""

    id: int
    result: int
    ret0: int = 0
    ret1: int = 0


def _align(x: int, a: int) -> int:
    return (x + a - 1) & ~(a - 1)


def layout_for(size: int) -> Layout:
    """The layout kmod/region.c gives a region of ``size`` bytes."""
    off = abi.LAKE_SQ_RING_OFF
    sq_ring_off = off
    off += RING_SIZE
    sq_off = off
    off = _align(off + abi.LAKE_SQ_ENTRIES * SQE_SIZE, 64)
    cq_ring_off = off
    off += RING_SIZE
    cq_off = off
    heap_off = _align(off + abi.LAKE_CQ_ENTRIES * CQE_SIZE, PAGE)
    if size < heap_off + PAGE:
        raise RegionError(f"a region of {size} bytes leaves no heap "
                          f"(rings end at {heap_off}; need at least {heap_off + PAGE})")
    return Layout(size, sq_ring_off, sq_off, abi.LAKE_SQ_ENTRIES, SQE_SIZE,
                  cq_ring_off, cq_off, abi.LAKE_CQ_ENTRIES, CQE_SIZE,
                  heap_off, size - heap_off)


def init_region(buf: object, size: int | None = None) -> Layout:
    """Write a fresh header and empty rings into ``buf`` (the stand-in's job).

    The heap is left as it is (a new memfd is zero already).
    """
    mv = memoryview(buf).cast("B") if not isinstance(buf, memoryview) else buf.cast("B")
    size = len(mv) if size is None else size
    if size > len(mv):
        raise RegionError(f"region size {size} exceeds the {len(mv)}-byte buffer")
    lay = layout_for(size)
    mv[:lay.heap_off] = bytes(lay.heap_off)
    _HDR.pack_into(mv, 0, abi.LAKE_REGION_MAGIC, abi.LAKE_REGION_VERSION, lay.size,
                   lay.sq_ring_off, lay.sq_off, lay.sq_entries, lay.sqe_size,
                   lay.cq_ring_off, lay.cq_off, lay.cq_entries, lay.cqe_size,
                   lay.heap_off, lay.heap_size, 0, 0)
    return lay


def read_layout(buf: object) -> Layout:
    """Parse and check the header; RegionError says what is wrong."""
    mv = memoryview(buf).cast("B") if not isinstance(buf, memoryview) else buf.cast("B")
    if len(mv) < HDR_SIZE:
        raise RegionError(f"buffer of {len(mv)} bytes is smaller than the region header")
    (magic, version, size, sq_ring_off, sq_off, sq_entries, sqe_size, cq_ring_off,
     cq_off, cq_entries, cqe_size, heap_off, heap_size, _flags, _delay) = _HDR.unpack_from(mv, 0)
    if magic != abi.LAKE_REGION_MAGIC:
        raise RegionError(f"bad region magic {magic:#010x} (want {abi.LAKE_REGION_MAGIC:#010x}):"
                          " not a lake region, or the mapping is at the wrong offset")
    if version != abi.LAKE_REGION_VERSION:
        raise RegionError(f"region version {version}, laked speaks {abi.LAKE_REGION_VERSION}:"
                          " lake.ko and laked come from different builds")
    if sqe_size != SQE_SIZE or cqe_size != CQE_SIZE:
        raise RegionError(f"entry sizes sqe={sqe_size} cqe={cqe_size}, laked expects "
                          f"sqe={SQE_SIZE} cqe={CQE_SIZE}: lake.h changed on one side only")
    if size > len(mv):
        raise RegionError(f"region is {size} bytes but only {len(mv)} are mapped")
    for name, n in (("sq_entries", sq_entries), ("cq_entries", cq_entries)):
        if n == 0 or n & (n - 1):
            raise RegionError(f"{name}={n} is not a power of two")
    spans = sorted([(0, HDR_SIZE, "header"),
                    (sq_ring_off, RING_SIZE, "sq ring"),
                    (sq_off, sq_entries * sqe_size, "sq entries"),
                    (cq_ring_off, RING_SIZE, "cq ring"),
                    (cq_off, cq_entries * cqe_size, "cq entries"),
                    (heap_off, heap_size, "heap")])
    end = 0
    prev = "start"
    for off, length, name in spans:
        if off < end:
            raise RegionError(f"region header: {name} at {off} overlaps {prev}")
        end = off + length
        prev = name
    if end > size:
        raise RegionError(f"region header: {prev} ends at {end}, past the region's {size} bytes")
    if sq_ring_off % 64 or cq_ring_off % 64:
        raise RegionError("region header: rings are not cache-line aligned")
    return Layout(size, sq_ring_off, sq_off, sq_entries, sqe_size, cq_ring_off, cq_off,
                  cq_entries, cqe_size, heap_off, heap_size)


def buffer_address(buf: object) -> tuple[int, object]:
    """(address, keeper) of a writable buffer; keep ``keeper`` alive while using it."""
    keeper = ctypes.c_char.from_buffer(buf)  # type: ignore[arg-type]
    return ctypes.addressof(keeper), keeper


class Region:
    """A lake region over ``buf`` (mmap, bytearray, writable memoryview).

    Construct it after the kernel has reset the rings (LAKE_IOC_SERVE): the
    private indices start from what memory says at that moment.
    """

    def __init__(self, buf: object) -> None:
        self._buf = buf
        mv = memoryview(buf)
        if mv.readonly:
            raise RegionError("the region buffer is read-only; map it PROT_READ|PROT_WRITE")
        self.layout = read_layout(mv)
        self.mv = mv.cast("B")[: self.layout.size]
        lay = self.layout
        self.size = lay.size
        self.heap_off = lay.heap_off
        self.heap_end = lay.heap_off + lay.heap_size
        # 32-bit words of the header and rings: index loads and stores are
        # the hot path, and a word view is cheaper than struct (aligned: checked)
        self._w = self.mv[: lay.size & ~3].cast("I")
        self._sq_head_at = lay.sq_ring_off
        self._sq_tail_at = lay.sq_ring_off + _RING_TAIL_OFF
        self._cq_head_at = lay.cq_ring_off
        self._cq_tail_at = lay.cq_ring_off + _RING_TAIL_OFF
        self._sq_mask = lay.sq_entries - 1
        self._cq_mask = lay.cq_entries - 1
        # consumer-side (laked) indices
        self._sq_tail = self._load(self._sq_tail_at)
        self._cq_head = self._load(self._cq_head_at)
        # producer-side (kernel stand-in) indices
        self._sq_head = self._load(self._sq_head_at)
        self._cq_tail = self._load(self._cq_tail_at)
        self._addr: int | None = None
        self._keeper: object | None = None

    # -- plumbing -------------------------------------------------------------
    def _load(self, off: int) -> int:
        return self._w[off >> 2]

    def _store(self, off: int, value: int) -> None:
        self._w[off >> 2] = value & U32

    @property
    def address(self) -> int:
        """Base address of the mapping in this process (for cuMemHostRegister)."""
        if self._addr is None:
            self._addr, self._keeper = buffer_address(self._buf)
        return self._addr

    def close(self) -> None:
        """Drop our exports of the buffer so the caller can close the mmap."""
        self._keeper = None
        self._addr = None
        self._w.release()
        self.mv.release()

    @property
    def daemon_flags(self) -> int:
        return self._load(_DAEMON_FLAGS_OFF)

    @daemon_flags.setter
    def daemon_flags(self, flags: int) -> None:
        self._store(_DAEMON_FLAGS_OFF, flags)

    @property
    def sched_delay_us(self) -> int:
        """The arbiter's queue delay for kernel work (µs), as policies see it."""
        return self._load(_SCHED_DELAY_US_OFF)

    @sched_delay_us.setter
    def sched_delay_us(self, us: int) -> None:
        if not 0 <= us <= U32:
            raise ValueError(f"sched_delay_us {us} does not fit a u32")
        self._store(_SCHED_DELAY_US_OFF, us)

    # -- heap -------------------------------------------------------------------
    def in_heap(self, off: int, length: int) -> bool:
        """Whether [off, off + length) lies inside the heap."""
        return self.heap_off <= off and length >= 0 and off + length <= self.heap_end

    def check_heap(self, off: int, length: int) -> None:
        if not self.in_heap(off, length):
            raise RegionError(f"[{off}, +{length}) is outside the heap "
                              f"[{self.heap_off}, {self.heap_end})")

    def view(self, off: int, length: int) -> memoryview:
        """A zero-copy view of heap bytes; RegionError outside the heap."""
        self.check_heap(off, length)
        return self.mv[off:off + length]

    def read(self, off: int, length: int) -> bytes:
        return bytes(self.view(off, length))

    def write(self, off: int, data: bytes | bytearray | memoryview) -> None:
        n = len(memoryview(data).cast("B"))
        self.view(off, n)[:] = memoryview(data).cast("B")

    def ptr(self, off: int) -> int:
        """Address of region offset ``off`` in this process."""
        return self.address + off

    # -- consumer side (laked) ----------------------------------------------
    def sq_pending(self) -> int:
        """Submissions published and not yet taken (clamped to the ring size)."""
        return min((self._load(self._sq_head_at) - self._sq_tail) & U32, self._sq_mask + 1)

    def take_submissions(self, limit: int | None = None) -> list[Sqe]:
        """Copy out up to ``limit`` pending submissions and free their slots.

        A head that claims more than a ring's worth is a corrupt producer:
        RegionError, after skipping to that head so the ring is usable again.
        """
        head = self._load(self._sq_head_at)
        n = (head - self._sq_tail) & U32
        if n > self._sq_mask + 1:
            bad = self._sq_tail
            self._sq_tail = head
            self._store(self._sq_tail_at, head)
            raise RegionError(f"sq head {head} is {n} ahead of tail {bad}; skipped to head")
        if limit is not None:
            n = min(n, limit)
        if n == 0:
            return []
        base = self.layout.sq_off
        tail = self._sq_tail
        out = [Sqe.unpack(_SQE.unpack_from(self.mv, base + ((tail + i) & self._sq_mask) * SQE_SIZE))
               for i in range(n)]
        self._sq_tail = (tail + n) & U32
        self._store(self._sq_tail_at, self._sq_tail)  # entries are copied: slots are free
        return out

    def cq_space(self) -> int:
        used = (self._cq_head - self._load(self._cq_tail_at)) & U32
        return max(0, self._cq_mask + 1 - used)

    def post_completions(self, cqes: Sequence[Cqe]) -> int:
        """Write as many completions as fit, then publish the head once.

        Returns how many were posted; the caller keeps the rest.
        """
        n = min(len(cqes), self.cq_space())
        base = self.layout.cq_off
        head = self._cq_head
        for i in range(n):
            c = cqes[i]
            res = c.result if -2**31 <= c.result < 2**31 else abi.LAKE_CUDA_ERROR_UNKNOWN
            _CQE.pack_into(self.mv, base + ((head + i) & self._cq_mask) * CQE_SIZE,
                           c.id & U64, res, c.ret0 & U64, c.ret1 & U64)
        if n:
            self._cq_head = (head + n) & U32
            self._store(self._cq_head_at, self._cq_head)
        return n

    # -- producer side (the kernel, or its user-space stand-in) ---------------
    def sq_space(self) -> int:
        used = (self._sq_head - self._load(self._sq_tail_at)) & U32
        return max(0, self._sq_mask + 1 - used)

    def submit(self, sqe: Sqe) -> bool:
        """Publish one submission; False when the ring is full."""
        if self.sq_space() == 0:
            return False
        sqe.pack_into(self.mv, self.layout.sq_off + (self._sq_head & self._sq_mask) * SQE_SIZE)
        self._sq_head = (self._sq_head + 1) & U32
        self._store(self._sq_head_at, self._sq_head)
        return True

    def take_completions(self) -> list[Cqe]:
        head = self._load(self._cq_head_at)
        n = min((head - self._cq_tail) & U32, self._cq_mask + 1)
        if n == 0:
            return []
        base = self.layout.cq_off
        tail = self._cq_tail
        out = [Cqe(*_CQE.unpack_from(self.mv, base + ((tail + i) & self._cq_mask) * CQE_SIZE))
               for i in range(n)]
        self._cq_tail = (tail + n) & U32
        self._store(self._cq_tail_at, self._cq_tail)
        return out

    def reset_rings(self) -> None:
        """Empty both rings (what LAKE_IOC_SERVE does in the kernel)."""
        for off in (self._sq_head_at, self._sq_tail_at, self._cq_head_at, self._cq_tail_at):
            self._store(off, 0)
        self._sq_tail = self._cq_head = self._sq_head = self._cq_tail = 0


# -- struct lake_launch_params -------------------------------------------------
def pack_launch_params(values: Iterable[bytes]) -> bytes:
    """count, sizes[count], then each value at the next 8-byte boundary."""
    vals = [bytes(v) for v in values]
    if len(vals) > MAX_LAUNCH_PARAMS:
        raise ValueError(f"{len(vals)} launch parameters; at most {MAX_LAUNCH_PARAMS}")
    if any(not v for v in vals):
        raise ValueError("a launch parameter has size 0")
    head = struct.pack(f"<I{len(vals)}I", len(vals), *(len(v) for v in vals))
    out = bytearray(head + bytes(_align(len(head), 8) - len(head)))
    for v in vals:
        out += v + bytes(_align(len(v), 8) - len(v))
    if len(out) > MAX_LAUNCH_PARAM_BYTES:
        raise ValueError(f"launch parameters take {len(out)} bytes; at most {MAX_LAUNCH_PARAM_BYTES}")
    return bytes(out)


def parse_launch_params(buf: memoryview | bytes, base: int = 0) -> list[tuple[int, int]]:
    """(offset, size) of each value of a lake_launch_params in ``buf``.

    Offsets are ``base`` + position in ``buf`` (pass the payload's region
    offset to get region offsets).  ValueError if anything points outside.
    """
    n_bytes = len(buf)
    if n_bytes < 4:
        raise ValueError("launch parameters: payload shorter than the count")
    (count,) = _U32.unpack_from(buf, 0)
    if count > MAX_LAUNCH_PARAMS:
        raise ValueError(f"launch parameters: count {count} > {MAX_LAUNCH_PARAMS}")
    hdr = 4 * (count + 1)
    if hdr > n_bytes:
        raise ValueError(f"launch parameters: {count} sizes do not fit in {n_bytes} bytes")
    sizes = struct.unpack_from(f"<{count}I", buf, 4)
    pos = _align(hdr, 8)
    out = []
    for i, s in enumerate(sizes):
        if s == 0 or pos + s > n_bytes:
            raise ValueError(f"launch parameter {i} (size {s}) does not fit in {n_bytes} bytes")
        out.append((base + pos, s))
        pos = _align(pos + s, 8)
    return out

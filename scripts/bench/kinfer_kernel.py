#!/usr/bin/env python3
"""lake.ko's side of the kinfer workload, in a process of its own.

Started by workloads.KernelInfer with one end of a socketpair (argv[1]).  It
makes the ring (a memfd and two eventfds, as lake.ko's region and doorbells),
hands their fds to the benchmark, which serves them with laked's Server and
GPU executor, and then answers one byte at a time:

  r  run one INFER batch; reply with its round trip in seconds (float64)
  t  the same; reply with its start and end on CLOCK_MONOTONIC (two float64,
     time.perf_counter's clock: comparable with the benchmark process's)
  c  check the last batch's output against the CPU reference; reply 1 or 0

It exits when the socket closes.  The kernel is not a thread of laked: this
caller waits for its completion on an eventfd, never for laked's GIL.
"""
from __future__ import annotations

import socket
import struct
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "python")]

import numpy as np  # noqa: E402

from lake.ring import Ring  # noqa: E402
from laked import mlp  # noqa: E402

N_IN, N_OUT = 31, 2


def serve(sock: socket.socket, k: Ring, batch: int) -> None:
    s = k.session()
    s.init()
    model = mlp.quantize(*mlp.linnos_like(5))
    blob = model.blob()
    blob_off = s.host_copy(blob)
    x = mlp.to_fixed(np.random.default_rng(1).normal(size=(batch, N_IN)), model.frac)
    off = s.mem_alloc_host(batch * (N_IN + N_OUT) * 4)
    k.write(off, x.astype("<i4").tobytes())
    want = model.run(x).astype("<i4").tobytes()
    sock.sendall(b"k")
    while cmd := sock.recv(1):
        if cmd in (b"r", b"t"):
            t0 = time.perf_counter()
            s.infer(1, 1, blob_off, len(blob), batch, N_IN, N_OUT, off)
            t1 = time.perf_counter()
            sock.sendall(struct.pack("d", t1 - t0) if cmd == b"r" else struct.pack("dd", t0, t1))
        elif cmd == b"c":
            got = k.read(off + batch * N_IN * 4, batch * N_OUT * 4)
            sock.sendall(b"1" if got == want else b"0")
        else:
            raise SystemExit(f"kinfer_kernel: unknown command {cmd!r}")


def main() -> int:
    sock = socket.socket(fileno=int(sys.argv[1]))
    batch = int(sys.argv[2])
    with Ring(64 << 20, name="lake-kinfer") as k:
        socket.send_fds(sock, [b"f"], [k.fd, k.sq_efd, k.cq_efd])
        if sock.recv(1) != b"g":            # the benchmark's server is running
            return 1
        serve(sock, k, batch)
    return 0


if __name__ == "__main__":
    sys.exit(main())

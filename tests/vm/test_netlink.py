"""Malformed generic netlink messages are refused; nothing breaks."""
from __future__ import annotations

import errno
import random
import socket
import struct

import pytest
from conftest import SYSFS, Laked

from laked import abi
from laked.genl import Control

NLM_F_REQUEST, NLM_F_ACK = 1, 4
NLMSG_ERROR = 2


def family_id() -> int:
    with Control() as c:
        return c.family


def nla(kind: int, payload: bytes, length: int | None = None) -> bytes:
    n = 4 + len(payload) if length is None else length
    pad = b"\0" * (-(4 + len(payload)) % 4)
    return struct.pack("<HH", n, kind) + payload + pad


def send_raw(fam: int, cmd: int, attrs: bytes = b"", nlmsg_len: int | None = None,
             sock: socket.socket | None = None) -> int:
    """Send one message; return the errno of the kernel's ack (0 = accepted)."""
    own = sock is None
    s = sock or socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 16)  # NETLINK_GENERIC
    try:
        if own:
            s.bind((0, 0))
        s.settimeout(5)
        body = struct.pack("<BBH", cmd, 1, 0) + attrs
        n = 16 + len(body) if nlmsg_len is None else nlmsg_len
        s.send(struct.pack("<IHHII", n, fam, NLM_F_REQUEST | NLM_F_ACK, 1, 0) + body)
        while True:
            try:
                data = s.recv(65536)
            except TimeoutError:
                return -1  # the kernel dropped it without an ack
            off = 0
            while off + 16 <= len(data):
                length, typ = struct.unpack_from("<IH", data, off)
                if typ == NLMSG_ERROR:
                    return -struct.unpack_from("<i", data, off + 16)[0]
                off += max((length + 3) & ~3, 16)
    finally:
        if own:
            s.close()


def u32(v: int) -> bytes:
    return struct.pack("<I", v)


A = abi


def test_well_formed_status_is_accepted(module: None) -> None:
    assert send_raw(family_id(), A.LAKE_CMD_STATUS) == 0


@pytest.mark.parametrize("attrs", [
    nla(A.LAKE_ATTR_CTX_BATCH, b"\x01"),                  # u32 given 1 byte
    nla(A.LAKE_ATTR_CTX_BATCH, struct.pack("<Q", 5)),     # u32 given 8 bytes
    nla(A.LAKE_ATTR_CTX_BATCH, u32(5)) + nla(200, u32(1)),  # unknown attribute
    nla(A.LAKE_ATTR_CTX_BATCH, u32(5), length=4000),      # length past the message
    nla(A.LAKE_ATTR_CTX_BATCH, u32(5), length=2),         # length under the header
])
def test_malformed_attributes_are_refused(module: None, attrs: bytes) -> None:
    assert send_raw(family_id(), A.LAKE_CMD_DECIDE, attrs) == errno.EINVAL


def test_missing_attributes_are_refused(module: None) -> None:
    fam = family_id()
    assert send_raw(fam, A.LAKE_CMD_DECIDE) == errno.EINVAL
    assert send_raw(fam, A.LAKE_CMD_HELLO) == errno.EINVAL


def test_bad_version_is_refused(no_laked: None) -> None:
    assert send_raw(family_id(), A.LAKE_CMD_HELLO, nla(A.LAKE_ATTR_VERSION, u32(99))) \
        == errno.EPROTO
    assert (SYSFS / "daemon").read_text().strip() == "disconnected"


def test_policy_name_without_nul_or_too_long(laked: Laked) -> None:
    fam = family_id()
    long_name = b"x" * 200 + b"\0"
    assert send_raw(fam, A.LAKE_CMD_POLICY_SET, nla(A.LAKE_ATTR_POLICY_FD, u32(0))
                    + nla(A.LAKE_ATTR_POLICY_NAME, long_name)) == errno.EINVAL
    assert send_raw(fam, A.LAKE_CMD_POLICY_SET,
                    nla(A.LAKE_ATTR_POLICY_NAME, b"abc")) == errno.EINVAL


def test_policy_set_only_from_the_daemon(laked: Laked) -> None:
    fam = family_id()
    assert send_raw(fam, A.LAKE_CMD_POLICY_SET) == errno.EPERM
    assert send_raw(fam, A.LAKE_CMD_BYE) == errno.ENOTCONN
    assert (SYSFS / "daemon").read_text().strip() == f"connected pid={laked.pid}"


def test_bad_fd_from_the_daemon_socket(no_laked: None) -> None:
    """A fd that is no BPF program: refused with a message, nothing attached."""
    fam = family_id()
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 16)
    s.bind((0, 0))
    try:
        assert send_raw(fam, A.LAKE_CMD_HELLO, nla(A.LAKE_ATTR_VERSION, u32(1)), sock=s) == 0
        attrs = nla(A.LAKE_ATTR_POLICY_FD, u32(s.fileno())) + \
            nla(A.LAKE_ATTR_POLICY_NAME, b"sock\0")
        assert send_raw(fam, A.LAKE_CMD_POLICY_SET, attrs, sock=s) == errno.EINVAL
        attrs = nla(A.LAKE_ATTR_POLICY_FD, u32(9999)) + nla(A.LAKE_ATTR_POLICY_NAME, b"x\0")
        assert send_raw(fam, A.LAKE_CMD_POLICY_SET, attrs, sock=s) == errno.EBADF
        assert (SYSFS / "policy").read_text().strip() == "builtin"
    finally:
        s.close()
    assert (SYSFS / "daemon").read_text().strip() == "disconnected"


def test_unknown_command_and_short_message(module: None) -> None:
    fam = family_id()
    assert send_raw(fam, 99) == errno.EOPNOTSUPP
    # nlmsg_len smaller than the headers: dropped or refused, never parsed
    assert send_raw(fam, A.LAKE_CMD_STATUS, nlmsg_len=17) in (-1, errno.EINVAL)


def test_random_messages_do_not_hurt(laked: Laked) -> None:
    rng = random.Random(1234)
    fam = family_id()
    for _ in range(1500):
        attrs = b"".join(
            nla(rng.randrange(0, A.LAKE_ATTR_MAX + 3), rng.randbytes(rng.randrange(0, 24)),
                length=rng.choice([None, None, None, rng.randrange(0, 64)]))
            for _ in range(rng.randrange(0, 5)))
        cmd = rng.choice([A.LAKE_CMD_DECIDE, A.LAKE_CMD_STATUS, A.LAKE_CMD_POLICY_SET,
                          A.LAKE_CMD_HELLO, A.LAKE_CMD_BYE, A.LAKE_CMD_MODEL_PUSH,
                          A.LAKE_CMD_MODEL_DEL, A.LAKE_CMD_INFER, rng.randrange(0, 256)])
        send_raw(fam, cmd, attrs)
    # the module and the daemon still work
    assert (SYSFS / "daemon").read_text().strip() == f"connected pid={laked.pid}"
    assert laked.decide(64) == ("gpu", "builtin")

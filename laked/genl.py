"""Control-plane transport: the generic netlink family "lake" via pyroute2.

pyroute2 is imported here only, so the executor and scheduler modules run on
machines without it (the GPU device machine).
"""
from __future__ import annotations

import errno
import logging
from dataclasses import dataclass
from typing import Any

from pyroute2.netlink import NLM_F_ACK, NLM_F_REQUEST, genlmsg
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.generic import GenericNetlinkSocket

from . import abi

log = logging.getLogger("laked.genl")

_ATTR_TYPES = {
    "VERSION": "uint32", "DAEMON_PID": "uint32", "DAEMON_CONNECTED": "uint8",
    "ENABLED": "uint8", "POLICY_FD": "uint32", "POLICY_NAME": "asciiz",
    "POLICY_ID": "uint32", "CTX_MODEL": "uint32", "CTX_BATCH": "uint32",
    "CTX_QUEUE_DEPTH": "uint32", "CTX_QUEUE_DELAY_US": "uint32",
    "DECISION": "uint32", "DECIDED_BY": "uint32",
}


def _nla_map() -> tuple[tuple[str, str], ...]:
    attrs = sorted(((v, k) for k, v in abi.names_with_prefix("LAKE_ATTR_").items()
                    if k != "MAX"))
    out = []
    for value, name in attrs:
        assert value == len(out), "attribute ids must be dense"
        kind = "uint64" if name.startswith("STAT_") else _ATTR_TYPES.get(name, "none")
        out.append((f"LAKE_ATTR_{name}", kind))
    return tuple(out)


class LakeMsg(genlmsg):
    prefix = "LAKE_ATTR_"
    nla_map = _nla_map()


class ModuleNotLoaded(RuntimeError):
    """lake.ko is not loaded (no generic netlink family "lake")."""


def _daemon_sysfs() -> str:
    try:
        with open("/sys/kernel/lake/daemon") as f:
            return f.read().strip()
    except OSError as e:
        return f"cannot read /sys/kernel/lake/daemon: {e.strerror}"


class ControlError(RuntimeError):
    """The module refused a control request; errno and message say why."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Decision:
    verdict: int
    decided_by: int

    @property
    def target(self) -> str:
        return "gpu" if self.verdict == abi.LAKE_DECIDE_GPU else "cpu"

    @property
    def by(self) -> str:
        names = {v: k.lower() for k, v in abi.names_with_prefix("LAKE_BY_").items()}
        return names.get(self.decided_by, str(self.decided_by))


class Control:
    """One generic netlink socket to lake.ko.  Not thread-safe."""

    def __init__(self) -> None:
        self.sock = GenericNetlinkSocket()
        try:
            self.sock.bind(abi.LAKE_GENL_NAME, LakeMsg)
        except NetlinkError as e:
            self.sock.close()
            if e.code == errno.ENOENT:
                raise ModuleNotLoaded(
                    "lake.ko is not loaded (no generic netlink family 'lake'); "
                    "run: insmod kmod/lake.ko") from None
            raise

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "Control":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, cmd: int, attrs: list[tuple[str, Any]]) -> list[genlmsg]:
        msg = LakeMsg()
        msg["cmd"] = cmd
        msg["version"] = abi.LAKE_GENL_VERSION
        msg["attrs"] = attrs
        try:
            return list(self.sock.nlm_request(
                msg, msg_type=self.sock.prid, msg_flags=NLM_F_REQUEST | NLM_F_ACK))
        except NetlinkError as e:
            text = e.args[1] if len(e.args) > 1 and e.args[1] else errno.errorcode.get(
                e.code, str(e.code))
            raise ControlError(e.code, f"{text} (errno {e.code})") from None

    def hello(self) -> None:
        try:
            self.request(abi.LAKE_CMD_HELLO, [("LAKE_ATTR_VERSION", abi.LAKE_ABI_VERSION)])
        except ControlError as e:
            if e.code != errno.EBUSY:
                raise
            raise ControlError(e.code, f"another laked is connected ({_daemon_sysfs()})") from None

    def bye(self) -> None:
        self.request(abi.LAKE_CMD_BYE, [])

    def policy_attach(self, fd: int, name: str) -> None:
        self.request(abi.LAKE_CMD_POLICY_SET,
                     [("LAKE_ATTR_POLICY_FD", fd), ("LAKE_ATTR_POLICY_NAME", name)])

    def policy_detach(self) -> None:
        self.request(abi.LAKE_CMD_POLICY_SET, [])

    def status(self) -> dict[str, Any]:
        replies = [m for m in self.request(abi.LAKE_CMD_STATUS, [])
                   if m.get_attr("LAKE_ATTR_VERSION") is not None]
        if not replies:
            raise ControlError(errno.EPROTO, "lake.ko sent no status")
        out: dict[str, Any] = {}
        for name, _ in replies[0]["attrs"]:
            key = name[len("LAKE_ATTR_"):].lower()
            out[key] = replies[0].get_attr(name)
        return out

    def decide(self, batch: int, model: int = 0, queue_depth: int = 0,
               queue_delay_us: int = 0) -> Decision:
        replies = self.request(abi.LAKE_CMD_DECIDE, [
            ("LAKE_ATTR_CTX_BATCH", batch), ("LAKE_ATTR_CTX_MODEL", model),
            ("LAKE_ATTR_CTX_QUEUE_DEPTH", queue_depth),
            ("LAKE_ATTR_CTX_QUEUE_DELAY_US", queue_delay_us)])
        for m in replies:
            verdict = m.get_attr("LAKE_ATTR_DECISION")
            if verdict is not None:
                return Decision(verdict, m.get_attr("LAKE_ATTR_DECIDED_BY"))
        raise ControlError(errno.EPROTO, "lake.ko sent no decision")

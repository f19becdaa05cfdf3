"""Doorbells: how laked learns of submissions and tells of completions.

Two kinds, one interface (``Doorbell``):

- ``DevLakeDoorbell``: /dev/lake.  poll() is readable while submissions are
  pending (level-triggered, so a wake-up is never lost); LAKE_IOC_CQ_KICK
  makes the kernel drain the completion ring right away, in our context.
- ``EventfdDoorbell``: the user-space stand-in's pair of eventfds (a memfd
  region instead of /dev/lake).  The SQ eventfd is read (reset) before the
  ring is scanned, so a submission published after the scan rings again.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import select
from typing import Protocol

from . import abi

log = logging.getLogger("laked.doorbell")


class Doorbell(Protocol):
    def wait_for_submissions(self, timeout: float | None) -> bool:
        """Sleep until submissions may be pending or ``timeout`` seconds pass.

        True when woken by the producer.  Callers still check the ring: a
        wake-up may be stale and a False may race with a new submission.
        """

    def completions_posted(self) -> None:
        """Tell the consumer of the completion ring that it has work."""

    def watch(self, fd: int) -> None:
        """Also wake up when eventfd ``fd`` is readable (the executor's
        completions, a stop request); the doorbell resets it when it fires,
        so whoever rings it must publish its news before ringing.
        """

    def unwatch(self, fd: int) -> None:
        """Stop watching ``fd`` (before its owner closes it)."""

    def close(self) -> None:
        """Release what the doorbell owns (never fds it was given)."""


def _reset(efd: int) -> None:
    try:
        os.eventfd_read(efd)
    except BlockingIOError:
        pass


def _poll_ms(timeout: float | None) -> int | None:
    if timeout is None:
        return None
    return max(0, int(timeout * 1000 + 0.999))


class DevLakeDoorbell:
    """poll(POLLIN) on /dev/lake + ioctl(LAKE_IOC_CQ_KICK), on an fd that said SERVE."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._poll = select.poll()
        self._poll.register(fd, select.POLLIN)
        self._watched: list[int] = []
        self.kicks = 0

    def wait_for_submissions(self, timeout: float | None) -> bool:
        try:
            events = self._poll.poll(_poll_ms(timeout))
        except InterruptedError:
            return False
        for fd, ev in events:
            if fd == self.fd:
                if ev & (select.POLLERR | select.POLLNVAL):
                    raise OSError(errno.EBADF, "/dev/lake reported an error while polling")
            else:
                _reset(fd)
        return bool(events)

    def watch(self, fd: int) -> None:
        self._poll.register(fd, select.POLLIN)
        self._watched.append(fd)

    def unwatch(self, fd: int) -> None:
        if fd in self._watched:
            self._poll.unregister(fd)
            self._watched.remove(fd)

    def completions_posted(self) -> None:
        # The kernel drains the whole CQ inside this ioctl.
        fcntl.ioctl(self.fd, abi.LAKE_IOC_CQ_KICK)
        self.kicks += 1

    def close(self) -> None:
        self._poll.unregister(self.fd)
        for fd in self._watched:
            self._poll.unregister(fd)
        self._watched.clear()


class EventfdDoorbell:
    """laked's side of the stand-in: wait on ``sq_efd``, ring ``cq_efd``."""

    def __init__(self, sq_efd: int, cq_efd: int) -> None:
        self.sq_efd = sq_efd
        self.cq_efd = cq_efd
        self._poll = select.poll()
        self._poll.register(sq_efd, select.POLLIN)
        # Non-blocking reads: a ring seen by poll() must not block on read.
        os.set_blocking(sq_efd, False)
        self._watched: list[int] = []
        self.kicks = 0

    def wait_for_submissions(self, timeout: float | None) -> bool:
        try:
            events = self._poll.poll(_poll_ms(timeout))
        except InterruptedError:
            return False
        woke = False
        for fd, _ev in events:
            if fd != self.sq_efd:
                _reset(fd)          # a watched eventfd
                woke = True
                continue
            try:
                os.eventfd_read(self.sq_efd)
                woke = True
            except BlockingIOError:
                pass
        return woke

    def completions_posted(self) -> None:
        os.eventfd_write(self.cq_efd, 1)
        self.kicks += 1

    def watch(self, fd: int) -> None:
        self._poll.register(fd, select.POLLIN)
        self._watched.append(fd)

    def unwatch(self, fd: int) -> None:
        if fd in self._watched:
            self._poll.unregister(fd)
            self._watched.remove(fd)

    def close(self) -> None:
        self._poll.unregister(self.sq_efd)
        for fd in self._watched:
            self._poll.unregister(fd)
        self._watched.clear()

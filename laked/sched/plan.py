"""The BE atom decision: how long the next atom may be, where it runs, or hold.

Pure (no GPU, no clock) so it can be tested on its own; ``GpuArbiter.be_plan``
feeds it a snapshot of the LC tenants and the pacer's queue and sleeps
while it says hold.

A hold is judged against the predicted LC arrival, not against how long
BE has been holding: BE stops issuing once its queued atoms fill the time
left before the arrival (often a millisecond or more ahead of it), and a
hold timer started then would run out just before LC arrives and let a
full atom in front of it.  The prediction is only called wrong once the
arrival is ``hold_us`` overdue.

With ``park`` on, a hold becomes a park: the atom is queued now behind a
GPU-side wait for the LC request (park.py), so the issuer keeps working.
"""
from __future__ import annotations

from dataclasses import dataclass

from .knobs import Knobs

INF = float("inf")
PHASE_GAIN = 0.25    # share of an arrival's lateness that moves the next prediction
UNSTICK_X = 8.0      # an LC request this many times its tenant's usual GPU wait is stuck


@dataclass(slots=True)
class Plan:
    budget_s: float              # inf: no limit
    kind: str                    # "full" or "comp" (the complement of right-sized LC)
    slots: list[int]             # gates to wait on before the atom
    park: tuple[int, int, float] | None = None  # (counter, request, deadline) to wait for
    recent: bool = False         # an LC tenant is active (be_duty applies)
    room_s: float = INF          # to the predicted LC arrival, less BE's queue


@dataclass(slots=True)
class LcView:
    """What the LC tenants are doing, as BE's next atom sees it."""
    recent: bool = False         # any LC tenant active within quiet_s
    run_full: bool = False       # an LC request on the whole GPU is running
    run_part: bool = False       # ... on a right-sized partition
    until_s: float = INF         # to the next predicted arrival (< 0: overdue)
    until_part: bool = False     # that arrival is right-sized
    until_i: int = -1            # which tenant it is (index in the snapshot)


@dataclass(slots=True)
class Ask:
    """The pacer's side of the decision."""
    queued_s: float              # estimated GPU time of its atoms not yet finished
    inflight: bool               # some atom of it is queued or running
    need_s: float = 0.0          # the smallest useful atom (an unsplittable op's size)
    lc_passed: bool = False      # an LC request started since this decision began
    parked: bool = False         # an atom of it waits on the GPU for the next LC request
    issue_x: float = 1.0         # issuer's host seconds per GPU second of its atoms


def light(k: Knobs, issue_x: float) -> bool:
    """An issuer this light refills the GPU in a small share of its GPU time."""
    return issue_x <= k.park_one


def atom_s(k: Knobs, issue_x: float) -> float:
    """The atom budget beside active LC for an issuer of this weight.

    A light issuer gets ``light_atom_us`` (at most ``atom_us``): the atom
    LC's request finds in flight is shorter, and the issuer pays for the
    extra boundaries in little host time.  A heavy one (training) keeps
    ``atom_us``: its ops past 1.5 shorter budgets would be cut into rows
    (opmode.WHOLE_X), and its rate fell to 0.36-0.46 of solo with 300 us
    atoms for every issuer; 500 us against 400 raised it beside LC in 8 of
    10 interleaved pairs, LC's p99 lower in 7 (stop 33)."""
    if k.light_atom_us and light(k, issue_x):
        return min(k.light_atom_us, k.atom_us) / 1e6
    return k.atom_us / 1e6


def decide(v: LcView, a: Ask, k: Knobs) -> tuple[str, float] | None:
    """(partition kind, atom budget in seconds) for the next atom, or None to
    hold; kind "park": queue it behind the next LC request (``k.park``)."""
    atom = atom_s(k, a.issue_x)
    if not v.recent:
        return "full", k.idle_atom_us / 1e6
    if v.run_full:
        # an atom already waiting behind the gate is all BE can use now
        return None if a.inflight else ("full", atom)
    if v.run_part:
        return "comp", atom
    if a.parked:
        if not a.lc_passed and light(k, a.issue_x):
            # a light issuer sleeps until LC's request came: the parked atom
            # keeps the GPU busy after it while the issuer wakes, and BE's
            # Python stays off the request's path as it arrives.  A heavy
            # one (training) would leave the GPU idle after LC: it queues on
            return None
        return "full", atom              # queued behind the parked one: after LC
    room = v.until_s - a.queued_s
    if room >= max(a.need_s, k.min_atom_us / 1e6):
        return "full", min(atom, room)
    if v.until_part:
        return "comp", atom
    if a.lc_passed:
        # an op too big for the room went past an LC request: right after
        # one is the longest room it will get
        return "full", atom
    if v.until_s < -k.hold_us / 1e6:
        return "full", atom              # LC is that late: the prediction was wrong
    return ("park", atom) if k.park else None


def next_due(due: float, now: float, gap: float) -> float:
    """The next arrival of an LC tenant that arrived at ``now`` (mean gap ``gap``).

    Phase-locked rather than ``now + gap``: a request whose start the host
    delayed (a late wake-up, the GIL) would otherwise push the prediction
    back by as much, and the request after it, on time, would then find a
    BE atom planned into its slot.  So a late start moves the phase by
    ``PHASE_GAIN`` of its lateness, while an early one, which no host delay
    can cause, sets it.  An arrival off by more than half a gap is a new
    rhythm and resets the phase."""
    off = now - due
    if due and 0 <= off < gap / 2:
        return due + PHASE_GAIN * off + gap
    return now + gap


def stuck(running_s: float, gpu_wait_s: float, k: Knobs) -> bool:
    """An LC request that has run ``running_s`` is stuck behind a BE gate wait
    (gate.py): past ``unstick_ms`` and UNSTICK_X times its tenant's usual wait
    for the GPU (a kernel tenant's: its INFER batches' time).  Never for a
    tenant with no measured wait yet (its first requests, a kernel tenant
    that only launched) nor with the knob at 0."""
    if not k.unstick_ms or gpu_wait_s <= 0:
        return False
    return running_s > max(k.unstick_ms / 1e3, UNSTICK_X * gpu_wait_s)

"""The vocabulary of a shared node's life, in one place: its roles, the phases of a switch, and
the table that drives a switch: (phase, event, direction) -> target phase. The phase handlers
(provisioner/switch/handlers.py) only observe and act, and name an event; the machine
(provisioner/switch/machine.py) looks the target up here and makes the one write. A change
that is not in this table cannot happen (the model: Ironic's common/states.py).

A switch goes one of two ways; `direction` is its target role:

                     ┌─ drain ──> draining ─ drained ─┐            ┌─ retry ─┐
    steady ─ start ─>│ requested                      ├─> rebooting ─ power ─> booting ─ booted ─> joining ─ joined ─> steady
    failed ─ start ─>│  (to k8s: drain; to slurm:     │      │  ^   └───── serving ─────────────────^  │
                     └─ cordon ─> cordoning ─ emptied ┘      │  └── retry ─────────┴── retry ────────┘
                                                             └─ refused: back to draining / cordoning

Every phase but steady and failed has a way out (TIMEOUTS says which event its timeout takes):
    requested, draining, cordoning ─ rollback ─> steady   (a balancer's move: its holds lifted)
    requested, cordoning, rebooting, booting, joining ─ fail ─> failed   (with the reason)
    requested, draining, cordoning, rebooting ─ cancel ─> steady   (an admin; rebooting only before power)
    requested ... joining, and steady ─ given-up ─> failed   (to slurm: slurmctld's ResumeFailProgram)

- draining (to k8s only): SLURM drains the node, jobs finish; then `down k8s_connect`.
- cordoning (to slurm only): Kubernetes cordons it; pods leave (evicted when an admin forced it).
- rebooting: the power action (re-checking both clusters right before it); refused when work
  appeared, which sends the switch back one step. power-intent: written before the action, so a
  pass killed after it never powers twice; power-failed: the action failed, tried again.
- serving: the node already serves the target (its daemon registered since the power action,
  the boot callback lost): on to joining rather than round the loop again.
- booting: waiting for the boot callback of the target image (or its daemon); joining: for its
  daemon (kubelet Ready with a new bootID, or a slurmd started since the reboot) to serve.
- retry: the node did not come back in time and is rebooted again (policy.max_retries);
  fail: given up, with the reason, until an admin starts it again.

`python -m provisioner.states` prints the table (docs/switching.md holds the same text).
"""

from __future__ import annotations

from typing import NamedTuple

SLURM, K8S = "slurm", "k8s"
ROLES = (SLURM, K8S)
POOLS = (SLURM, K8S, "shared")

STEADY = "steady"
REQUESTED = "requested"
DRAINING = "draining"
CORDONING = "cordoning"
REBOOTING = "rebooting"
BOOTING = "booting"
JOINING = "joining"
FAILED = "failed"
SWITCHING = (REQUESTED, DRAINING, CORDONING, REBOOTING, BOOTING, JOINING)
PHASES = (STEADY, *SWITCHING, FAILED)
FINAL = (STEADY, FAILED)


class Transition(NamedTuple):
    event: str
    source: str
    target: str
    directions: tuple[str, ...]  # the target roles of the switches that may take it
    kind: str  # the kind of the event written to the log (what `history` and /metrics read)


_T = Transition
_SWITCHES_TO_SLURM = (REQUESTED, CORDONING, REBOOTING, BOOTING, JOINING)

TRANSITIONS: tuple[Transition, ...] = (
    _T("start", STEADY, REQUESTED, ROLES, "switch"),
    _T("start", FAILED, REQUESTED, ROLES, "switch"),
    # requested: set the hold (the drain or the cordon)
    _T("drain", REQUESTED, DRAINING, (K8S,), "phase"),
    _T("cordon", REQUESTED, CORDONING, (SLURM,), "phase"),
    _T("rollback", REQUESTED, STEADY, ROLES, "rollback"),
    _T("fail", REQUESTED, FAILED, ROLES, "failed"),
    _T("cancel", REQUESTED, STEADY, ROLES, "rollback"),
    # draining, cordoning: the node empties
    _T("drained", DRAINING, REBOOTING, (K8S,), "phase"),
    _T("emptied", CORDONING, REBOOTING, (SLURM,), "phase"),
    _T("rollback", DRAINING, STEADY, (K8S,), "rollback"),
    _T("rollback", CORDONING, STEADY, (SLURM,), "rollback"),
    _T("fail", CORDONING, FAILED, (SLURM,), "failed"),
    _T("cancel", DRAINING, STEADY, (K8S,), "rollback"),
    _T("cancel", CORDONING, STEADY, (SLURM,), "rollback"),
    # rebooting: the power action
    _T("power-intent", REBOOTING, REBOOTING, ROLES, "power-intent"),
    _T("power-failed", REBOOTING, REBOOTING, ROLES, "retry"),
    _T("power", REBOOTING, BOOTING, ROLES, "phase"),
    _T("refused", REBOOTING, DRAINING, (K8S,), "reboot-refused"),
    _T("refused", REBOOTING, CORDONING, (SLURM,), "reboot-refused"),
    _T("serving", REBOOTING, JOINING, ROLES, "phase"),
    _T("fail", REBOOTING, FAILED, ROLES, "failed"),
    _T("cancel", REBOOTING, STEADY, ROLES, "rollback"),
    # booting, joining: the node comes back in the target role
    _T("booted", BOOTING, JOINING, ROLES, "phase"),
    _T("retry", BOOTING, REBOOTING, ROLES, "retry"),
    _T("fail", BOOTING, FAILED, ROLES, "failed"),
    _T("joined", JOINING, STEADY, ROLES, "switched"),
    _T("retry", JOINING, REBOOTING, ROLES, "retry"),
    _T("fail", JOINING, FAILED, ROLES, "failed"),
    # slurmctld's ResumeFailProgram: a node it expected did not register within ResumeTimeout
    *(_T("given-up", p, FAILED, (SLURM,), "failed") for p in (STEADY, *_SWITCHES_TO_SLURM)),
)

# What a phase's timeout (policy.phase_timeout_s in the phase) does, by who started the switch:
# (a balancer's move, an admin's). "retry" is taken while attempts remain (policy.max_retries),
# then "fail". None: the phase waits (a note every pass); `provisioner role --cancel` ends it.
TIMEOUTS: dict[str, tuple[str | None, str | None]] = {
    REQUESTED: ("rollback", "fail"),  # the drain or cordon keeps failing
    DRAINING: ("rollback", None),  # an admin's drain waits for running jobs however long they take
    CORDONING: ("rollback", "fail"),  # pods that cannot be evicted (a PodDisruptionBudget)
    REBOOTING: ("fail", "fail"),  # the power action keeps failing or cannot even be tried
    BOOTING: ("retry", "retry"),
    JOINING: ("retry", "retry"),
}

# A reclaim (a busy node going home, policy.Move.reclaim) waits in draining or cordoning for its
# grace, then moves the work: EVICT its pods (the Eviction API) or REQUEUE its jobs; or WAIT:
# its jobs run to their end (their requeue would lose more work than the wait it saves), the
# deadline being their time limit. Its phase timeout counts from the deadline, and takes these
# ways out: jobs that are waited for or cannot be requeued run to their end (wait); pods a
# PodDisruptionBudget keeps from leaving roll it back.
EVICT, REQUEUE, WAIT = "evict", "requeue", "wait"
RECLAIM_TIMEOUTS: dict[str, str | None] = {
    DRAINING: None,
    CORDONING: "rollback",
}

# Phases whose switch has not powered the node yet: an admin may cancel it (rebooting only
# until the power intent is written).
CANCELLABLE = (REQUESTED, DRAINING, CORDONING, REBOOTING)

_TABLE = {(t.source, t.event, d): t for t in TRANSITIONS for d in t.directions}
_BY_EDGE = {(t.source, t.target, d): t for t in TRANSITIONS for d in t.directions}


class IllegalTransition(Exception):
    """A phase change the state machine does not allow: a bug, never a runtime condition."""


def lookup(source: str, event: str, direction: str | None) -> Transition:
    """The declared transition taken by `event` in phase `source` of a switch to `direction`."""
    t = _TABLE.get((source, event, direction))
    if t is None:
        raise IllegalTransition(f"no event {event!r} in phase {source} for a switch to {direction} "
                                f"(the table is provisioner/states.py)")
    return t


def transition(source: str, target: str, direction: str | None) -> Transition:
    """The declared transition source -> target for a switch to `direction`, or IllegalTransition."""
    t = _BY_EDGE.get((source, target, direction))
    if t is None:
        raise IllegalTransition(f"no transition {source} -> {target} for a switch to {direction} "
                                f"(declared in provisioner/states.py)")
    return t


def other(role: str) -> str:
    return K8S if role == SLURM else SLURM


def table_text() -> str:
    """The table as Markdown: one row per transition, then the timeouts (docs/switching.md)."""
    rows = ["| phase | event | to k8s | to slurm | logged as |", "|---|---|---|---|---|"]
    for t in TRANSITIONS:
        rows.append(f"| {t.source} | {t.event} | {t.target if K8S in t.directions else '-'} | "
                    f"{t.target if SLURM in t.directions else '-'} | {t.kind} |")
    rows += ["", "| phase | timeout: a balancer's move | timeout: an admin's switch | timeout: a reclaim "
             "(from its grace deadline) | cancel |", "|---|---|---|---|---|"]
    for phase, (balancer, admin) in TIMEOUTS.items():
        cancel = "before power" if phase == REBOOTING else "yes" if phase in CANCELLABLE else "no"
        reclaim = RECLAIM_TIMEOUTS.get(phase, balancer)
        rows.append(f"| {phase} | {balancer or 'wait'} | {admin or 'wait'} | {reclaim or 'wait'} | {cancel} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(table_text(), end="")

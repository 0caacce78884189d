"""The vocabulary of a shared node's life, in one place: its roles, the phases of a switch, and
the transitions the balancer may take between them, declared as data. The reconciler refuses
any phase change that is not in TRANSITIONS (the model: Ironic's common/states.py).

A switch goes one of two ways; `direction` is its target role:

                     ┌─ drain ──> draining ─ drained ─┐            ┌─ retry ─┐
    steady ─ start ─>│ requested                      ├─> rebooting ─ power ─> booting ─ booted ─> joining ─ joined ─> steady
    failed ─ start ─>│  (to k8s: drain; to slurm:     │      │  ^                  │                 │
                     └─ cordon ─> cordoning ─ emptied ┘      │  └── retry ─────────┴── retry ────────┘
                                                             └─ refused: back to draining / cordoning
    draining, cordoning ─ rollback ─> steady
    cordoning, rebooting, booting, joining ─ fail ─> failed
    steady ─ given-up ─> failed   (slurmctld's ResumeFailProgram: a node it powered up never came)

- draining (to k8s only): SLURM drains the node, jobs finish; then `down k8s_connect`.
- cordoning (to slurm only): Kubernetes cordons it; pods leave (evicted when an admin forced it).
- rebooting: the power action (re-checking both clusters right before it); refused when work
  appeared, which sends the switch back one step.
- booting: waiting for the boot callback of the target image; joining: for its daemon
  (kubelet Ready with a new bootID, or a slurmd started since the reboot) to serve.
- retry: the node did not come back in time and is rebooted again (policy.max_retries);
  fail: given up, with the reason, until an admin starts it again.
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


class Transition(NamedTuple):
    event: str
    source: str
    target: str
    directions: tuple[str, ...]  # the target roles of the switches that may take it


TRANSITIONS: tuple[Transition, ...] = (
    Transition("start", STEADY, REQUESTED, ROLES),
    Transition("start", FAILED, REQUESTED, ROLES),
    Transition("drain", REQUESTED, DRAINING, (K8S,)),
    Transition("cordon", REQUESTED, CORDONING, (SLURM,)),
    Transition("drained", DRAINING, REBOOTING, (K8S,)),
    Transition("emptied", CORDONING, REBOOTING, (SLURM,)),
    Transition("rollback", DRAINING, STEADY, (K8S,)),
    Transition("rollback", CORDONING, STEADY, (SLURM,)),
    Transition("fail", CORDONING, FAILED, (SLURM,)),
    Transition("refused", REBOOTING, DRAINING, (K8S,)),
    Transition("refused", REBOOTING, CORDONING, (SLURM,)),
    Transition("power", REBOOTING, BOOTING, ROLES),
    Transition("fail", REBOOTING, FAILED, ROLES),
    Transition("booted", BOOTING, JOINING, ROLES),
    Transition("retry", BOOTING, REBOOTING, ROLES),
    Transition("fail", BOOTING, FAILED, ROLES),
    Transition("joined", JOINING, STEADY, ROLES),
    Transition("retry", JOINING, REBOOTING, ROLES),
    Transition("fail", JOINING, FAILED, ROLES),
    Transition("given-up", STEADY, FAILED, (SLURM,)),
)

_BY_EDGE = {(t.source, t.target): t for t in TRANSITIONS}


class IllegalTransition(Exception):
    """A phase change the state machine does not allow: a bug, never a runtime condition."""


def transition(source: str, target: str, direction: str | None) -> Transition:
    """The declared transition source -> target for a switch to `direction`, or IllegalTransition."""
    t = _BY_EDGE.get((source, target))
    if t is None or direction not in t.directions:
        raise IllegalTransition(f"no transition {source} -> {target} for a switch to {direction} "
                                f"(declared in provisioner/states.py)")
    return t


def other(role: str) -> str:
    return K8S if role == SLURM else SLURM

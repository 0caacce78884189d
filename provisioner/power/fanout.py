"""Power actions over many nodes at once: parallel up to power.fanout (like xCAT's ipmimaxp or
Warewulf's --fanout), one result per node in the order given, and one node's failure never stops
the others. Recording the actions is the caller's business (provisioner.reconcile.power_nodes
records them as events in the store)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import TypeVar

from provisioner.model import Node, Site
from provisioner.power.dispatch import ACTIONS, BootTarget, PowerResult, act

T = TypeVar("T")
R = TypeVar("R")


def fan_out(items: Sequence[T], fn: Callable[[T], R], limit: int) -> list[R]:
    """fn over items, at most `limit` at a time; results in input order. fn must not raise."""
    if not items:
        return []
    with ThreadPoolExecutor(max_workers=max(1, min(limit, len(items))), thread_name_prefix="power") as pool:
        return list(pool.map(fn, items))


def run_action(site: Site, nodes: Sequence[Node], action: str, netboot: bool = False,
               boot: Mapping[str, BootTarget] | None = None,
               done: Callable[[PowerResult], None] | None = None) -> list[PowerResult]:
    """Do `action` (status|on|off|soft|reset|cycle|boot) on every node, by its power method.

    netboot: set a one-time network boot first. boot: node name -> the image a kexec method boots
    into (a provisioner.boot.plan.BootPlan, or the NoBoot saying why there is none); a kexec node
    without one fails (kexec+ipmi: falls back to IPMI). done: called with each node's result as
    soon as it is known (in a worker thread), e.g. to record it; it must not raise.
    """
    if action not in ACTIONS:
        raise ValueError(f"unknown power action {action!r} (known: {', '.join(ACTIONS)})")
    boot = boot or {}

    def one(node: Node) -> PowerResult:
        res = _scrub(act(site, node, action, netboot=netboot, boot=boot.get(node.name)), node)
        if done is not None:
            done(res)
        return res

    return fan_out(list(nodes), one, site.power.fanout)


def _scrub(res: PowerResult, node: Node) -> PowerResult:
    """Belt and braces: whatever went wrong, the BMC password never leaves this package."""
    pw = node.bmc.password if node.bmc else ""
    if not pw:
        return res
    fields = {k: getattr(res, k).replace(pw, "***") for k in ("error", "note") if getattr(res, k)}
    return replace(res, **fields) if fields else res

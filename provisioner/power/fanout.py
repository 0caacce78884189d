"""Power actions over many nodes at once: parallel up to power.fanout (like xCAT's ipmimaxp or
Warewulf's --fanout), one result per node in the order given, and one node's failure never stops
the others. Every action that changes something is recorded as an event in the store."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import TypeVar

from provisioner.model import Node, Site
from provisioner.power.dispatch import ACTIONS, PowerResult, act
from provisioner.store import Store, default_actor

T = TypeVar("T")
R = TypeVar("R")


def fan_out(items: Sequence[T], fn: Callable[[T], R], limit: int) -> list[R]:
    """fn over items, at most `limit` at a time; results in input order. fn must not raise."""
    if not items:
        return []
    with ThreadPoolExecutor(max_workers=max(1, min(limit, len(items))), thread_name_prefix="power") as pool:
        return list(pool.map(fn, items))


def run_action(site: Site, nodes: Sequence[Node], action: str, netboot: bool = False, store: Store | None = None,
               actor: str | None = None, roles: dict[str, str] | None = None,
               secret: bytes | None = None) -> list[PowerResult]:
    """Do `action` (status|on|off|soft|reset|cycle|boot) on every node, by its power method.

    netboot: set a one-time network boot first. roles: node name -> the role a kexec boots into
    (default: the desired role in the store, else the node's default role). Events (kind "power")
    go to `store` for every action but status.
    """
    if action not in ACTIONS:
        raise ValueError(f"unknown power action {action!r} (known: {', '.join(ACTIONS)})")
    actor = actor or default_actor()
    if secret is None and any(n.power_method.startswith("kexec") for n in nodes) and action in ("reset", "cycle", "boot"):
        from provisioner.tokens import load_or_create_secret

        secret = load_or_create_secret(site.secret_file)

    def role_of(node: Node) -> str:
        if roles and node.name in roles:
            return roles[node.name]
        return (store.desired_role(node.name) if store else None) or node.default_role

    def one(node: Node) -> PowerResult:
        res = _scrub(act(site, node, action, netboot=netboot, role=role_of(node), secret=secret), node)
        if store is not None and action != "status":
            _record(store, actor, res)
        return res

    return fan_out(list(nodes), one, site.power.fanout)


def _record(store: Store, actor: str, res: PowerResult) -> None:
    how = f"power {res.action}" + (" --netboot" if res.netboot else "") + (f" via {res.method}" if res.method else "")
    outcome = (f"ok" + (f", now {res.state}" if res.state else "")) if res.ok else f"FAILED: {res.error}"
    data = {k: v for k, v in res.as_dict().items() if k != "node" and v is not None}
    try:
        store.add_event(res.node, actor, "power", f"{how}: {outcome}", data)
    except Exception:  # the action happened; a store hiccup must not turn it into a failure
        pass


def _scrub(res: PowerResult, node: Node) -> PowerResult:
    """Belt and braces: whatever went wrong, the BMC password never leaves this package."""
    pw = node.bmc.password if node.bmc else ""
    if not pw:
        return res
    fields = {k: getattr(res, k).replace(pw, "***") for k in ("error", "note") if getattr(res, k)}
    return replace(res, **fields) if fields else res

"""Power actions as provisioner takes them: provisioner.power.run_action plus what power control
leaves to its caller (the boot plan a kexec boots into, and an event per action in the store).
One copy for the switch's power action and for `provisioner power`, which therefore does not
load the balancer."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from provisioner.model import Node, Site
from provisioner.store import Store, default_actor

if TYPE_CHECKING:
    from provisioner.power.dispatch import PowerResult


def power_nodes(site: Site, nodes: Sequence[Node], action: str, *, netboot: bool = False, store: Store | None = None,
                actor: str | None = None, roles: dict[str, str] | None = None) -> list[PowerResult]:
    """provisioner.power.run_action plus what power control leaves to its caller: the boot plan
    a kexec boots into (roles: node name -> role; default the desired role in the store, else
    the default role; the node's image version pin applies, as when it network-boots), and an
    event (kind "power") in `store` for every action but status. The reconciler's power action
    and `provisioner power`."""
    from provisioner.power import REBOOTS, run_action

    boot = None
    kexec = [n for n in nodes if n.power_method.startswith("kexec")]
    if kexec and action in REBOOTS:
        from provisioner.boot.plan import BootPlanner
        from provisioner.tokens import load_or_create_secret

        planner = BootPlanner(site, load_or_create_secret(site.secret_file), store)
        # Files are not checked here (as before): the node fetches them from the boot endpoint,
        # and a missing one fails the kexec on the node with the fetch's error.
        boot = {n.name: planner.plan(n, (roles or {}).get(n.name), check_files=False) for n in kexec}
    actor = actor or default_actor()
    done = None if store is None or action == "status" else (lambda res: record_power(store, actor, res))
    return run_action(site, nodes, action, netboot=netboot, boot=boot, done=done)


def record_power(store: Store, actor: str, res: PowerResult) -> None:
    """One power action as an event. Best effort: the action happened; a store hiccup must not
    turn it into a failure."""
    how = f"power {res.action}" + (" --netboot" if res.netboot else "") + (f" via {res.method}" if res.method else "")
    outcome = ("ok" + (f", now {res.state}" if res.state else "")) if res.ok else f"FAILED: {res.error}"
    data = {k: v for k, v in res.as_dict().items() if k != "node" and v is not None}
    try:
        store.add_event(res.node, actor, "power", f"{how}: {outcome}", data)
    except Exception:  # noqa: BLE001
        pass

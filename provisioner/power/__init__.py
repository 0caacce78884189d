"""Power and boot control: the BMC by IPMI or Redfish (pyghmi), SSH reboot and kexec (paramiko),
fan-out over nodes.

The API the rest of the project calls:

    from provisioner.power import run_action
    results = run_action(site, nodes, "boot", netboot=True, boot={name: boot_plan})
    # -> [PowerResult(node, action, ok, state, method, netboot, error, error_kind, note, elapsed_s,
    #                 protocol)]

Actions: status, on, off, soft, reset, cycle, and boot (on when off, reset when on).
This package neither reads nor writes the store and does not work out boot plans: callers pass
what a kexec boots and record the results (provisioner.reconcile.power_nodes does both).
Names are imported on first use, so the BMC worker processes (`python -m
provisioner.power.ipmi`, `... .redfish`) do not pay for paramiko.
"""

from importlib import import_module

_EXPORTS = {
    "ACTIONS": "dispatch", "REBOOTS": "dispatch", "PowerResult": "dispatch", "act": "dispatch",
    "fan_out": "fanout", "run_action": "fanout",
    "BmcError": "bmc", "BmcAuthError": "bmc", "BmcBusy": "bmc", "BmcStateError": "bmc", "BmcTimeout": "bmc",
    "BmcServerError": "bmc", "BmcTlsError": "bmc",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f"provisioner.power.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'provisioner.power' has no attribute {name!r}")

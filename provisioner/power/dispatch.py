"""One power action on one node, by the node's power method; never raises, returns a PowerResult.

Methods (node.power_method, per node or per pool in the site config):
- ipmi: everything through the BMC, in the protocol it speaks (bmc.protocol: ipmi or redfish).
- ssh: reboot-type actions (reset, cycle, boot) run power.ssh.reboot_command on the node; with
  --netboot the BMC's one-time network boot is set first (when the node has a BMC).
- kexec: reboot-type actions kexec the node straight into an image (the caller's boot plan).
- kexec+ipmi: kexec, and when that fails, the BMC's one-time network boot + reset/on.
status, on, off and soft always go through the BMC: an SSH method cannot reach a node that is off.
The result says which BMC protocol was used (protocol), and method names it for BMC actions.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Protocol

from provisioner.errors import OperationError
from provisioner.model import Node, Site
from provisioner.power import bmc, ssh

ACTIONS = bmc.ACTIONS
REBOOTS = ("reset", "cycle", "boot")


class NoBmc(bmc.BmcError):
    kind = "config"


class NoImage(Protocol):
    """Why a node has no image to kexec into now: provisioner.boot.plan.NoBoot."""

    ok: bool  # False
    reason: str


BootTarget = ssh.KexecImage | NoImage


@dataclass(frozen=True)
class PowerResult:
    node: str
    action: str
    ok: bool
    state: str | None = None  # "on" / "off" read back from the BMC; None when not known (SSH)
    method: str | None = None  # what was used: ipmi, redfish, ssh, kexec, or "kexec->ipmi" (fallback)
    netboot: bool = False  # a one-time network boot override was set (and verified)
    error: str | None = None  # one line, never a password
    error_kind: str | None = None  # auth | timeout | busy | state | ssh | config | error
    note: str | None = None
    elapsed_s: float = 0.0
    protocol: str | None = None  # the BMC protocol used (ipmi, redfish); None when no BMC was

    def as_dict(self) -> dict:
        return asdict(self)


def act(site: Site, node: Node, action: str, *, netboot: bool = False, boot: BootTarget | None = None) -> PowerResult:
    """Do `action` on `node`. boot: for the kexec methods, the image to kexec into (the caller's
    boot plan, or its NoBoot saying why there is none)."""
    start = time.monotonic()
    method = node.power_method if action in REBOOTS else "ipmi"
    protocol = node.bmc.protocol if node.bmc else None

    def done(ok: bool, **fields) -> PowerResult:
        if fields.get("method") == "ipmi" and protocol:  # through the BMC: name its protocol
            fields["method"] = protocol
        return PowerResult(node=node.name, action=action, ok=ok, elapsed_s=round(time.monotonic() - start, 3),
                           **fields)

    try:
        if method == "ipmi":
            return _through_bmc(site, node, action, netboot, done)
        if method == "ssh":
            note = None
            if netboot:
                if node.bmc is not None:
                    _bmc_call(site, node, bmc.NETBOOT_ONLY)
                else:
                    netboot, note = False, "no BMC: the node boots by its own boot order"
            out = ssh.reboot(site, node)
            return done(True, method="ssh", netboot=netboot, note=_join(note, out.note),
                        protocol=protocol if netboot else None)
        # kexec / kexec+ipmi
        try:
            out = ssh.kexec(site, node, _kexec_image(node, boot))
            return done(True, method="kexec", note=out.note)
        except OperationError as exc:
            if method != "kexec+ipmi":
                raise
            fallback = f"kexec failed ({exc}); fell back to a {protocol or 'BMC'} network boot"
        res = _bmc_call(site, node, "boot", netboot=True)
        return done(True, method=f"kexec->{res.protocol}", state=res.power, netboot=True,
                    note=_join(fallback, res.note), protocol=res.protocol)
    except bmc.BmcError as exc:
        return done(False, method=method, error=str(exc), error_kind=exc.kind,
                    protocol=protocol if method != "kexec" else None)
    except OperationError as exc:
        return done(False, method=method, error=str(exc), error_kind="ssh" if method != "ipmi" else "error")
    except Exception as exc:  # one node's bug must not stop the others; say what it was
        return done(False, method=method, error=f"{type(exc).__name__}: {exc}"[:300], error_kind="error")


def _through_bmc(site: Site, node: Node, action: str, netboot: bool, done) -> PowerResult:
    res = _bmc_call(site, node, action, netboot=netboot)
    return done(True, method="ipmi", state=res.power, netboot=bool(netboot and action != "status"),
                note=_join(f"{res.attempts} attempts" if res.attempts > 1 else None, res.note),
                protocol=res.protocol)


def _bmc_call(site: Site, node: Node, action: str, netboot: bool = False) -> bmc.BmcResult:
    if node.bmc is None:
        raise NoBmc(f"node {node.name} has no BMC (bmc.address) in the site config; add one to {action} it")
    return bmc.power(node.bmc, action, netboot=netboot, timeout=site.power.timeout_s, retries=site.power.retries,
                     settle_s=site.power.settle_s, node=node.name)


def _kexec_image(node: Node, boot: BootTarget | None) -> ssh.KexecImage:
    """The image to kexec into; OperationError (so kexec+ipmi falls back to IPMI) when none."""
    if boot is None:
        raise OperationError(f"node {node.name}: no boot plan was given for its kexec; pass boot= to run_action "
                             "(provisioner.reconcile.power_nodes makes them)")
    if not boot.ok:
        raise OperationError(boot.reason)
    return boot


def _join(*notes: str | None) -> str | None:
    return "; ".join(n for n in notes if n) or None

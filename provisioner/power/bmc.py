"""Power and boot-device control of one node's BMC, by the protocol it speaks (bmc.protocol):
IPMI (provisioner/power/ipmi.py) or Redfish (provisioner/power/redfish.py), both through pyghmi.

    res = power(node.bmc, "boot", netboot=True, timeout=5, retries=2, settle_s=30, node="sn01")
    # -> BmcResult(power="on", bootdev="network", persistent=False, attempts=1, protocol="ipmi")

Each attempt runs in a short-lived worker process (provisioner/power/worker.py) that the
protocol's module serves; this module picks the worker, retries, and turns a failed attempt
into one error that says what to do next.

Retries: a BMC that did not answer (silent, refused, cut off), answered busy (IPMI 0xC0) or
failed on its side (Redfish 5xx) is tried again, up to `retries` more times. After a timeout we
cannot know whether a reset got through, so a retried reset may reset twice; every attempt sets
the one-time network boot again, so the boot that counts still network-boots. Wrong credentials,
a refused certificate and a bad power state are not retried: trying again cannot help.

The resulting power state is read back and must be what the action implies (soft-off excepted:
that is up to the OS). Errors are subclasses of OperationError, one per cause (error_kind), so
callers and the fan-out can tell them apart; the BMC password appears in none of them, nor in
logs: anything a worker says is redacted before it leaves the worker and again here.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from provisioner.errors import OperationError
from provisioner.power import worker

if TYPE_CHECKING:  # the worker processes stay light: no yaml, no config loader
    from provisioner.model import Bmc

log = logging.getLogger(__name__)

ACTIONS = ("status", "on", "off", "soft", "reset", "cycle", "boot")
NETBOOT_ONLY = "netboot"  # set the one-time network boot override, no power change
EXPECTED = {"on": "on", "off": "off", "reset": "on", "cycle": "on", "boot": "on"}  # power state after
_WORKERS = {"ipmi": "provisioner.power.ipmi", "redfish": "provisioner.power.redfish"}
_RETRIED = ("timeout", "busy", "server")
_BACKOFF_S = 0.5
# A Redfish attempt is a handful of HTTPS requests (service root, session, system, boot PATCH,
# reset POST), each given power.timeout_s, then up to power.settle_s for the power state.
_REDFISH_REQUESTS = 5


class BmcError(OperationError):
    kind = "error"


class BmcAuthError(BmcError):
    """The BMC refused the user name or password (IPMI: RAKP; Redfish: 401/403)."""
    kind = "auth"


class BmcTimeout(BmcError):
    """The BMC did not answer (wrong address, down, or network)."""
    kind = "timeout"


class BmcBusy(BmcError):
    """The BMC answered 0xC0 (node busy) on every attempt."""
    kind = "busy"


class BmcStateError(BmcError):
    """The BMC answered 0xD5: not possible in the present power state (e.g. reset while off)."""
    kind = "state"


class BmcServerError(BmcError):
    """The Redfish service failed on its side (HTTP 5xx) on every attempt."""
    kind = "server"


class BmcTlsError(BmcError):
    """The BMC's TLS certificate did not verify against bmc.ca_file (or the system's CAs)."""
    kind = "tls"


@dataclass(frozen=True)
class BmcResult:
    power: str  # "on" | "off", read back from the BMC after the action
    bootdev: str | None = None  # the boot override read back after setting it (netboot)
    persistent: bool | None = None
    attempts: int = 1
    protocol: str = "ipmi"
    note: str | None = None  # e.g. "UefiHttp not offered by the BMC; PXE instead"


def power(bmc: Bmc, action: str, *, netboot: bool = False, timeout: float = 5.0, retries: int = 2,
          settle_s: float = 30.0, node: str | None = None) -> BmcResult:
    """Do `action` (see ACTIONS) through the node's BMC and read the power state back.

    netboot: first set a ONE-TIME boot override to network (verified by reading it back), so a
    node that later reboots by itself goes back to its normal boot order. "boot" = on when off,
    reset when on; "netboot" only sets the override. Each IPMI attempt gets `timeout` seconds; a
    Redfish attempt `timeout` per request and `settle_s` for the power state to follow.
    """
    if action == NETBOOT_ONLY:
        netboot = True
    elif action not in ACTIONS:
        raise ValueError(f"unknown power action {action!r}")
    protocol = bmc.protocol
    who = f"BMC {bmc.address}:{bmc.port}" + (f" ({protocol}, node {node})" if node else f" ({protocol})")
    request = {"address": bmc.address, "port": bmc.port, "user": bmc.user, "password": bmc.password,
               "action": action, "netboot": bool(netboot), "timeout": timeout}
    budget = timeout
    if protocol == "redfish":
        request.update(ca_file=bmc.ca_file, insecure=bmc.insecure, system=bmc.system,
                       http_boot_uri=bmc.http_boot_uri, boot_mode=bmc.boot_mode, settle_s=settle_s)
        budget = _REDFISH_REQUESTS * timeout + settle_s
    attempts = retries + 1
    last: dict[str, Any] = {}
    for attempt in range(1, attempts + 1):
        last = worker.run(_WORKERS[protocol], request, budget)
        if last.get("ok"):
            return BmcResult(last["power"], last.get("bootdev"), last.get("persistent"), attempt, protocol,
                             last.get("note"))
        if last["kind"] not in _RETRIED:
            break
        if attempt < attempts:
            log.info("%s: %s (attempt %d of %d); retrying", who, last["kind"], attempt, attempts)
            if last["kind"] != "timeout":
                time.sleep(_BACKOFF_S * attempt)
    raise _error(last, who, bmc, action, budget, attempt)


def _error(res: dict, who: str, bmc: Bmc, action: str, budget: float, attempt: int) -> BmcError:
    kind, step = res["kind"], res.get("step") or action
    tries = f"{attempt} attempt{'s' if attempt > 1 else ''}"
    detail = worker.redact(res.get("detail") or "", bmc.password)
    if kind == "auth":
        return BmcAuthError(f"{who} refused the login of user {bmc.user!r} (wrong user name or password); "
                            f"fix bmc.user / bmc.password_file in the site config")
    if kind == "timeout":
        why = f" ({detail})" if detail else ""
        return BmcTimeout(f"{who} did not answer within {budget:g}s{why} ({tries}); check the BMC address, "
                          f"port and network, or raise power.timeout_s")
    if kind == "busy":
        return BmcBusy(f"{who} is busy (0xC0) ({tries}); retry later")
    if kind == "server":
        return BmcServerError(f"{who}: the Redfish service failed (HTTP {res.get('code')}: {detail or 'no detail'}) "
                              f"({tries}); check the BMC (a BMC reset often helps), then retry")
    if kind == "tls":
        return BmcTlsError(f"{who}: its TLS certificate was refused ({detail}); give the CA that signed it in "
                           f"bmc.ca_file")
    if kind == "state":
        hint = "power it on instead" if step in ("reset", "cycle") else "check the node's power state"
        return BmcStateError(f"{who}: {step} is not possible in the present power state (0xD5); {hint}")
    code = res.get("code")
    shown = f" (0x{code:02X})" if code and bmc.protocol == "ipmi" else (f" (HTTP {code})" if code else "")
    return BmcError(f"{who}: {step} failed{shown}: {detail or 'unknown error'}; check the BMC")

"""IPMI power and boot-device control of one node's BMC, through pyghmi (IPMI 2.0 / RMCP+ over UDP).

Each call runs pyghmi in a short-lived worker process (`python -m provisioner.power.ipmi`, the
request on stdin so the password never shows in a process list). Why not in this process: pyghmi
keeps every session in class-level state shared by all threads, and in 1.6.19 a session that
ended (logged out, or failed to log in) poisons the next one to the same BMC (a stale
`initting_sessions` entry: TypeError, or a hang); a silent BMC also holds pyghmi for its own
fixed ~5 s. A worker process starts clean, and killing it cuts each attempt's BMC conversation
at power.timeout_s (the clock starts once the worker has loaded pyghmi).

Retries: a BMC that answered 0xC0 did nothing, so retrying is safe. After a timeout we cannot
know whether a reset got through, so a retried reset may reset twice; every attempt sets the
one-time network boot again, so the boot that counts still network-boots. The resulting power
state is read back and must be what the action implies (soft-off excepted: that is up to the OS).

Errors are subclasses of OperationError, one per cause, so callers (and the fan-out) can tell
them apart. The BMC password appears in none of them, nor in logs: anything pyghmi says is
redacted before it leaves this module.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from provisioner.errors import OperationError
from provisioner.power import worker

if TYPE_CHECKING:  # the worker process stays light: no yaml, no config loader
    from provisioner.model import Bmc

log = logging.getLogger(__name__)

ACTIONS = ("status", "on", "off", "soft", "reset", "cycle", "boot")
NETBOOT_ONLY = "netboot"  # set the one-time network boot override, no power change
# IPMI Chassis Control (netfn 0, cmd 2) directives
_CONTROL = {"off": 0, "on": 1, "cycle": 2, "reset": 3, "soft": 5}
_NETWORK = 0x04  # boot flags data 2: "force PXE" device selector (1 << 2)
_BUSY, _BAD_STATE = 0xC0, 0xD5
_BUSY_BACKOFF_S = 0.5
_EXPECTED = {"on": "on", "off": "off", "reset": "on", "cycle": "on", "boot": "on"}  # power state after


class IpmiError(OperationError):
    kind = "error"


class BmcAuthError(IpmiError):
    """The BMC refused the user name or password."""
    kind = "auth"


class BmcTimeout(IpmiError):
    """The BMC did not answer (wrong address, down, or network)."""
    kind = "timeout"


class BmcBusy(IpmiError):
    """The BMC answered 0xC0 (node busy) on every attempt."""
    kind = "busy"


class BmcStateError(IpmiError):
    """The BMC answered 0xD5: not possible in the present power state (e.g. reset while off)."""
    kind = "state"


@dataclass(frozen=True)
class IpmiResult:
    power: str  # "on" | "off", read back from the BMC after the action
    bootdev: str | None = None  # the boot override read back after setting it (netboot)
    persistent: bool | None = None
    attempts: int = 1


def power(bmc: Bmc, action: str, *, netboot: bool = False, timeout: float = 5.0, retries: int = 2,
          node: str | None = None) -> IpmiResult:
    """Do `action` (see ACTIONS) and read the power state back.

    netboot: first set a ONE-TIME boot override to network (verified by reading it back), so a
    node that later reboots by itself goes back to its normal boot order. "boot" = on when off,
    reset when on; "netboot" only sets the override. Each attempt gets `timeout` seconds; not answering and busy are retried up to
    `retries` times (the whole sequence, boot override included), wrong credentials and 0xD5 not.
    """
    if action == NETBOOT_ONLY:
        netboot = True
    elif action not in ACTIONS:
        raise ValueError(f"unknown power action {action!r}")
    who = f"BMC {bmc.address}:{bmc.port}" + (f" (node {node})" if node else "")
    request = {"address": bmc.address, "port": bmc.port, "user": bmc.user, "password": bmc.password,
               "action": action, "netboot": bool(netboot), "timeout": timeout}
    attempts = retries + 1
    last: dict[str, Any] = {}
    for attempt in range(1, attempts + 1):
        last = worker.run("provisioner.power.ipmi", request, timeout)
        if last.get("ok"):
            return IpmiResult(last["power"], last.get("bootdev"), last.get("persistent"), attempt)
        if last["kind"] not in ("timeout", "busy"):
            break
        if attempt < attempts:
            log.info("%s: %s (attempt %d of %d); retrying", who, last["kind"], attempt, attempts)
            if last["kind"] == "busy":
                time.sleep(_BUSY_BACKOFF_S * attempt)
    raise _error(last, who, bmc, action, timeout, attempt, attempts)


def _error(res: dict, who: str, bmc: Bmc, action: str, timeout: float, attempt: int, attempts: int) -> IpmiError:
    kind, step = res["kind"], res.get("step", action)
    tries = f"{attempt} attempt{'s' if attempt > 1 else ''}"
    if kind == "auth":
        return BmcAuthError(f"{who} refused the login of user {bmc.user!r} (wrong user name or password); "
                            f"fix bmc.user / bmc.password_file in the site config")
    if kind == "timeout":
        return BmcTimeout(f"{who} did not answer within {timeout:g}s ({tries}); check the BMC address, "
                          f"port and network, or raise power.timeout_s")
    if kind == "busy":
        return BmcBusy(f"{who} is busy (0xC0) ({tries}); retry later")
    if kind == "state":
        hint = "power it on instead" if step in ("reset", "cycle") else "check the node's power state"
        return BmcStateError(f"{who}: {step} is not possible in the present power state (0xD5); {hint}")
    code = res.get("code")
    detail = worker.redact(res.get("detail") or "unknown error", bmc.password)
    return IpmiError(f"{who}: {step} failed{f' (0x{code:02X})' if code else ''}: {detail}; check the BMC")


# ---------------------------------------------------------------------- worker (own process)


class _Failed(Exception):
    def __init__(self, kind: str, step: str, code: int | None = None, detail: str | None = None):
        super().__init__(kind)
        self.kind, self.step, self.code, self.detail = kind, step, code, detail


def _raw(cmd, step: str, netfn: int, command: int, data=()) -> bytes:
    rsp = cmd.raw_command(netfn=netfn, command=command, data=data)
    code = rsp.get("code", 0)
    if code in (0xFFFF,) or rsp.get("error") == "timeout":
        raise _Failed("timeout", step)
    if code == _BUSY:
        raise _Failed("busy", step, code)
    if code == _BAD_STATE:
        raise _Failed("state", step, code)
    if code or "error" in rsp:
        raise _Failed("error", step, code, str(rsp.get("error")))
    return bytes(rsp.get("data", b""))


def _power_state(cmd) -> str:
    return "on" if _raw(cmd, "status", 0, 1)[0] & 1 else "off"


def _boot_override(cmd) -> tuple[str, bool]:
    data = _raw(cmd, "get boot device", 0, 9, (5, 0, 0))  # boot flags parameter
    if len(data) < 4 or not data[2] & 0x80:
        return "default", True
    selector = (data[3] >> 2) & 0x0F
    return ("network" if selector == 1 else f"selector-{selector}"), bool(data[2] & 0x40)


def _do(request: dict) -> dict:
    from pyghmi import exceptions as pyghmi_exc
    from pyghmi.ipmi import command as ipmi_command

    action = request["action"]
    started = time.monotonic()
    try:
        cmd = ipmi_command.Command(bmc=request["address"], port=int(request["port"]), userid=request["user"],
                                   password=request["password"], keepalive=False)
    except pyghmi_exc.IpmiException as exc:
        text = str(exc)
        if any(s in text for s in ("Incorrect password", "Unauthorized name", "privilege", "Unauthorized role")):
            return {"ok": False, "kind": "auth", "step": "login"}
        return {"ok": False, "kind": "timeout", "step": "login"}
    try:
        result: dict[str, Any] = {"ok": True}
        if request.get("netboot") and action != "status":
            _raw(cmd, "set boot device", 0, 8, (3, 8))  # boot info acknowledge, as pyghmi and ipmitool do
            _raw(cmd, "set boot device", 0, 8, (5, 0x80, _NETWORK, 0, 0, 0))  # valid, next boot only
            dev, persistent = _boot_override(cmd)
            if (dev, persistent) != ("network", False):
                raise _Failed("error", "set boot device", None,
                              f"the BMC kept boot device {dev} (persistent={persistent}) instead of one-time network")
            result.update(bootdev=dev, persistent=persistent)
        if action not in ("status", NETBOOT_ONLY):
            step = action
            if action == "boot":
                step = "on" if _power_state(cmd) == "off" else "reset"
            elif action == "on" and _power_state(cmd) == "on":
                step = None  # already on: nothing to do (a real BMC would ignore it too)
            if step:
                _raw(cmd, step, 0, 2, (_CONTROL[step],))
        result["power"] = _power_state(cmd)
        expected = _EXPECTED.get(action)
        # Verify: some BMCs take a moment to switch. Poll within this attempt's budget (the parent
        # kills the worker at its timeout anyway); soft-off is the OS's business and not waited for.
        deadline = started + 0.6 * float(request.get("timeout", 5.0))
        while expected and result["power"] != expected and time.monotonic() < deadline:
            time.sleep(0.2)
            result["power"] = _power_state(cmd)
        if expected and result["power"] != expected:
            raise _Failed("error", action, None, f"the BMC accepted {action} but the power is still {result['power']}")
        return result
    except _Failed as f:
        return {"ok": False, "kind": f.kind, "step": f.step, "code": f.code, "detail": f.detail}
    except pyghmi_exc.IpmiException as exc:
        text = str(exc)
        kind = "timeout" if ("timeout" in text.lower() or "no longer connected" in text) else "error"
        return {"ok": False, "kind": kind, "step": action, "detail": worker.redact(text, request["password"])}
    finally:
        try:
            cmd.ipmi_session.logout()
        except Exception:  # the session may already be gone; the worker exits anyway
            pass


def _preload() -> None:
    from pyghmi.ipmi import command  # noqa: F401  (loaded before the caller's clock starts)


if __name__ == "__main__":
    worker.serve(_do, _preload)

"""IPMI power and boot-device control of one BMC, through pyghmi (IPMI 2.0 / RMCP+ over UDP): the
worker side of provisioner.power.bmc (which retries and words the errors), served as
`python -m provisioner.power.ipmi` by provisioner/power/worker.py.

Why a worker process for IPMI in particular: pyghmi keeps every session in class-level state
shared by all threads, and in 1.6.19 a session that ended (logged out, or failed to log in)
poisons the next one to the same BMC (a stale `initting_sessions` entry: TypeError, or a hang); a
silent BMC also holds pyghmi for its own fixed ~5 s. A worker process starts clean, and killing
it cuts each attempt's BMC conversation at power.timeout_s.
"""

from __future__ import annotations

import time
from typing import Any

from provisioner.power import worker
from provisioner.power.bmc import EXPECTED, NETBOOT_ONLY

# IPMI Chassis Control (netfn 0, cmd 2) directives
_CONTROL = {"off": 0, "on": 1, "cycle": 2, "reset": 3, "soft": 5}
_NETWORK = 0x04  # boot flags data 2: "force PXE" device selector (1 << 2)
_BUSY, _BAD_STATE = 0xC0, 0xD5


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
        expected = EXPECTED.get(action)
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

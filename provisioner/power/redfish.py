"""Redfish power and boot-override control of one BMC, through pyghmi's Redfish client
(pyghmi.redfish.command.Command, HTTPS): the worker side of provisioner.power.bmc (which retries
and words the errors), served as `python -m provisioner.power.redfish` by
provisioner/power/worker.py, so that a BMC that holds a connection open is cut off at the
attempt's budget (pyghmi dials with its own 60 s).

What it sends: GET the system (PowerState, Boot), PATCH Boot {BootSourceOverrideTarget: Pxe,
BootSourceOverrideEnabled: Once, BootSourceOverrideMode} for a network boot, or UefiHttp with
HttpBootUri = bmc.http_boot_uri when the system lists UefiHttp among its allowed targets (else
Pxe, and the result's note says so), then POST ComputerSystem.Reset with ResetType On,
ForceOff, GracefulShutdown or ForceRestart (cycle: ForceOff, then On once it is off). The power
state is then read until it is what the action implies, for at most power.settle_s: a BMC that
runs the reset as a task that never ends fails here, with that reason.

pyghmi does the session, the system lookup, the power and the boot override. Two things go
through pyghmi's own web client (pyghmi.util.webclient) instead: the first request, so that a
401, a 5xx and a refused connection can be told apart (Command folds them into one exception
text), and the HttpBootUri PATCH, which Command.set_bootdev cannot send.

TLS: pyghmi's standard validation (OpenSSL: the chain and the BMC's address in the certificate)
against bmc.ca_file alone, else against the system's trust store, or none at all with
bmc.insecure.
"""

from __future__ import annotations

import http.client
import json
import os
import time
from typing import Any

from provisioner.power import worker
from provisioner.power.bmc import EXPECTED

_RESET = {"on": "on", "off": "off", "soft": "softoff", "reset": "reset", "boot": "boot"}  # pyghmi's names
_TARGETS = {"Pxe": "network", "UefiHttp": "http"}  # Redfish boot targets, as the result names them
_POLL_S = 0.25


class _Failed(Exception):
    def __init__(self, kind: str, step: str, detail: str | None = None, code: int | None = None):
        super().__init__(kind)
        self.kind, self.step, self.detail, self.code = kind, step, detail, code


def _verifier(request: dict):
    """pyghmi's verifycallback: None = its standard validation (OpenSSL: the chain, the BMC's
    address in the certificate), against bmc.ca_file alone when one is given. This worker process
    is the only user of its environment, so the CA file is named there, where OpenSSL looks."""
    if request.get("insecure"):
        return lambda _der: True
    if request.get("ca_file"):
        os.environ["SSL_CERT_FILE"] = request["ca_file"]
        os.environ["SSL_CERT_DIR"] = os.devnull  # not the system's CAs as well
    return None


def _first_request(request: dict, verify) -> dict:
    """GET the Systems collection with the credentials: the cause of a failure, by status."""
    from pyghmi.util import webclient

    wc = webclient.SecureHTTPConnection(request["address"], int(request["port"]), verifycallback=verify,
                                        timeout=float(request["timeout"]))
    wc.set_header("Accept", "application/json")
    wc.set_header("OData-Version", "4.0")
    wc.set_basic_credentials(request["user"], request["password"])
    body, status = _call(wc, "/redfish/v1/Systems", "login")
    if status in (401, 403):
        raise _Failed("auth", "login", code=status)
    if status >= 500:
        raise _Failed("server", "login", _text(body), status)
    if not 200 <= status < 300 or not isinstance(body, dict):
        raise _Failed("error", "login", f"GET /redfish/v1/Systems answered {status}: {_text(body)}", status)
    members = [m.get("@odata.id") for m in body.get("Members", [])]
    system = request.get("system")
    if system:
        url = system if system.startswith("/") else f"/redfish/v1/Systems/{system}"
        if url not in members:
            raise _Failed("error", "login", f"no system {system!r} here (the BMC lists "
                                            f"{', '.join(m.rsplit('/', 1)[-1] for m in members) or 'none'}); "
                                            f"fix bmc.system")
        return {"sysurl": url, "wc": wc}
    if len(members) != 1:
        raise _Failed("error", "login", f"the BMC lists {len(members)} systems; name the node's in bmc.system")
    return {"sysurl": members[0], "wc": wc}


def _call(wc, url: str, step: str, payload: Any = None, method: str | None = None) -> tuple[Any, int]:
    """One request through pyghmi's web client; a connection that fails is "timeout" (not answering)."""
    import ssl

    try:
        return wc.grab_json_response_with_status(url, payload, method=method)
    except ssl.SSLCertVerificationError as exc:
        raise _Failed("tls", step, exc.verify_message or "verification failed") from None
    except (OSError, http.client.HTTPException) as exc:
        raise _Failed("timeout", step, str(exc) or type(exc).__name__) from None


def _text(body: Any) -> str:
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    if isinstance(body, str):
        try:
            body = json.loads(body)
        except ValueError:
            return body[:200]
    if isinstance(body, dict):  # a Redfish error: its messages
        err = body.get("error", {})
        msgs = [m.get("Message", m.get("MessageId", "")) for m in err.get("@Message.ExtendedInfo", [])]
        return "; ".join(filter(None, msgs)) or str(err.get("message", "")) or json.dumps(body)[:200]
    return str(body)[:200]


def _set_netboot(cmd, wc, request: dict, sysurl: str) -> dict[str, Any]:
    """The one-time network boot override; read back. {bootdev, persistent, note}."""
    note = None
    uri = request.get("http_boot_uri")
    uefi = request.get("boot_mode", "uefi") == "uefi"
    if uri:
        allowed = cmd.sysinfo.get("Boot", {}).get("BootSourceOverrideTarget@Redfish.AllowableValues", [])
        if "UefiHttp" in allowed:
            boot = {"BootSourceOverrideEnabled": "Once", "BootSourceOverrideTarget": "UefiHttp", "HttpBootUri": uri}
            body, status = _call(wc, sysurl, "set boot device", {"Boot": boot}, "PATCH")
            if status >= 500:
                raise _Failed("server", "set boot device", _text(body), status)
            if not 200 <= status < 300:
                raise _Failed("error", "set boot device", f"UefiHttp to {uri} refused ({status}): {_text(body)}",
                              status)
            want = "http"
        else:
            note = "the BMC does not offer UefiHttp; set a one-time PXE boot instead"
            cmd.set_bootdev("network", persist=False, uefiboot=uefi)
            want = "network"
    else:
        cmd.set_bootdev("network", persist=False, uefiboot=uefi)
        want = "network"
    # Read back with our own GET: pyghmi's get_bootdev would answer from its 30 s cache.
    body, status = _call(wc, sysurl, "get boot device")
    boot = body.get("Boot", {}) if 200 <= status < 300 and isinstance(body, dict) else {}
    got = _TARGETS.get(boot.get("BootSourceOverrideTarget"), boot.get("BootSourceOverrideTarget"))
    if got != want:
        raise _Failed("error", "set boot device", f"the BMC kept boot device {got} instead of {want}")
    persistent = boot.get("BootSourceOverrideEnabled") == "Continuous"
    if persistent:  # e.g. sushy-tools' emulator: harmless for a diskless node, which always netboots
        note = "; ".join(filter(None, [note, "the BMC keeps the network boot for every boot (Continuous)"]))
    return {"bootdev": want, "persistent": persistent, "note": note}


def _power_state(cmd) -> str:
    return cmd.get_power()["powerstate"]


def _wait_power(cmd, want: str, deadline: float, action: str) -> str:
    state = _power_state(cmd)
    while state != want and time.monotonic() < deadline:
        time.sleep(_POLL_S)
        state = _power_state(cmd)
    if state != want:
        raise _Failed("error", action, f"the BMC accepted {action} but the power is still {state} after "
                                       f"power.settle_s; the BMC's task did not finish")
    return state


def _do(request: dict) -> dict:
    from pyghmi import exceptions as pyghmi_exc
    from pyghmi.redfish import command as redfish_command

    action = request["action"]
    settle = float(request.get("settle_s", 30.0))
    try:
        verify = _verifier(request)
        found = _first_request(request, verify)
        try:
            cmd = redfish_command.Command(request["address"], request["user"], request["password"], verify,
                                          sysurl=found["sysurl"], port=int(request["port"]))
        except (OSError, http.client.HTTPException) as exc:
            raise _Failed("timeout", "login", str(exc) or type(exc).__name__) from None
        result: dict[str, Any] = {"ok": True}
        if request.get("netboot") and action != "status":
            result.update(_set_netboot(cmd, found["wc"], request, found["sysurl"]))
        if action == "cycle":
            if _power_state(cmd) == "on":
                cmd.set_power("off")
                _wait_power(cmd, "off", time.monotonic() + settle, "cycle (off)")
            cmd.set_power("on")
        elif action in _RESET:
            cmd.set_power(_RESET[action])  # pyghmi: on/off are no-ops when already so; boot = on or reset
        want = EXPECTED.get(action)
        result["power"] = _wait_power(cmd, want, time.monotonic() + settle, action) if want else _power_state(cmd)
        return result
    except _Failed as f:
        return {"ok": False, "kind": f.kind, "step": f.step, "code": f.code,
                "detail": worker.redact(f.detail or "", request["password"])}
    except (OSError, http.client.HTTPException) as exc:  # the BMC went away in the middle
        return {"ok": False, "kind": "timeout", "step": action, "detail": worker.redact(str(exc), request["password"])}
    except pyghmi_exc.PyghmiException as exc:
        text = worker.redact(str(exc), request["password"])
        kind = "server" if "Target Unavailable" in text else "error"
        return {"ok": False, "kind": kind, "step": action, "detail": text[:300]}


def _preload() -> None:
    from pyghmi.redfish import command  # noqa: F401  (loaded before the caller's clock starts)


if __name__ == "__main__":
    worker.serve(_do, _preload)

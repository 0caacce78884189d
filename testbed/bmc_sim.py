"""A BMC simulator on pyghmi's own IPMI server class: one UDP port per node on loopback.

Each simulated BMC keeps a power state and a boot-device override (persistent or one-time),
speaks real IPMI 2.0 / RMCP+ (pyghmi's server), and behaves like a real BMC where pyghmi's server
does not:
- an open-session request for a cipher suite other than 3 (pyghmi's client first asks for 17)
  gets RMCP+ status 0x11 "no matching cipher suite", so the client falls back to suite 3;
- an unknown user name gets RAKP2 status 0x0D instead of silence;
- reset or cycle while powered off answers 0xD5 (not supported in present state);
- a boot (power on, reset, cycle) consumes a one-time boot device and records what it used;
- a retransmitted request (same command, data and rqSeq, a client that heard no answer in time)
  is answered again, not run again: one reset per power action however slow the answer.
Faults can be injected per BMC: "password" (the BMC's password changes, so logins are rejected),
"silent" (every packet dropped), "busy" (every command answers 0xC0), "stuck" (power commands are
accepted but the power state never changes, like a failed relay), "lag" (power commands are
answered only after LAG_S, so the client retransmits them).

The simulator always runs in its OWN process: pyghmi keeps client and server sessions in shared
class-level state, so a simulator inside the process under test would share it with the client
under test. Two ways to run it:

- from tests: `BmcSim.start([...])` spawns `python -m testbed.bmc_sim --control CONFIG`, which takes
  JSON-line commands on stdin and reports power events on stdout; `on_power` callables run in the
  test process, on a reader thread (so a slow callback never stalls a BMC). The child exits when
  its stdin closes, so it cannot outlive the test process.
- standalone (demo): `python -m testbed.bmc_sim --site site.yaml [--nodes 'sn[01-04]']
  [--on-power CMD]` starts one BMC per node whose bmc.address is a loopback address, with the
  node's port, user and password; events are printed as JSON lines, and CMD (if given) runs on
  every power event with BMC_NODE, BMC_ACTION, BMC_POWER, BMC_BOOTDEV, BMC_PERSISTENT set.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

# "lag": power commands are answered after LAG_S, past pyghmi's first retransmission (0.5-1 s).
LAG_S = 1.6
# A request repeated (same command, data and rqSeq) within this long is a retransmission.
DUPLICATE_WINDOW_S = 5.0
FAULTS = (None, "password", "silent", "busy", "stuck", "lag")

# ----------------------------------------------------------------------------------- the server
# (only imported in the simulator's own process; see the module docstring)


def _server_classes():
    import pyghmi.ipmi.bmc as bmc
    import pyghmi.ipmi.command as ipmicommand
    import pyghmi.ipmi.private.constants as constants
    import pyghmi.ipmi.private.serversession as serversession
    import pyghmi.ipmi.private.session as ipmisession

    SUITE3 = {12: 1, 20: 1, 28: 1}  # offsets of auth/integrity/confidentiality algorithm: suite 3

    class SimServerSession(serversession.ServerSession):
        def create_open_session_response(self, request):
            # A real BMC refuses algorithms it does not implement: 0x11, and the client retries
            # with suite 3. pyghmi's server would say "ok" and the client would crash in RAKP2.
            if len(request) < 32 or any(request[off] & 0x3F != algo for off, algo in SUITE3.items()):
                self.clientsessionid = request[4:8]
                return bytearray([request[0], 0x11, 0, 0]) + request[4:8]
            return super().create_open_session_response(request)

        def _got_rakp1(self, data):
            username = bytes(data[28:]).decode("utf-8", "replace")
            if data[27] and self.authdata.get(username) is None:
                reply = bytearray([data[0], 0x0D, 0, 0]) + self.clientsessionid  # unauthorized name
                self.send_payload(reply, constants.payload_types["rakp2"], retry=False)
                return
            super()._got_rakp1(data)

        def _got_rmcp_openrequest(self, data):
            # A new login from a client address that still has a session here (pyghmi's client
            # reuses one UDP socket per process, so a session it abandoned after a timeout keeps
            # its address): start afresh, as a real BMC does. pyghmi's server would reuse the old
            # session, whose sequence numbers make it drop every packet of the new one: the BMC
            # then looked dead to that client (seen in CI: bn01 silent for three tests).
            # A retransmitted request of a login in progress (same client session id, not yet
            # authenticated) is answered by this session, as before.
            established = getattr(self, "k1", None) is not None
            if not established and bytes(data[4:8]) == bytes(getattr(self, "clientsessionid", b"")):
                return super()._got_rmcp_openrequest(data)
            self.close_server_session()
            SimServerSession(self.bmc.authdata, self.bmc.kg, self.sockaddr, self.socket, data,
                             self.bmc.uuid, bmc=self.bmc)

        def handle_client_request(self, request):
            # A retransmitted request (the client heard no answer in time, and pyghmi's client sends
            # the same request, same rqSeq, again) gets the first answer again instead of being run
            # twice, as IPMI asks of a BMC (completion code 0xCF is for one that cannot do so).
            # pyghmi's server would run it again: a second reset for one power action.
            key = (self.clientnetfn, self.clientcommand, self.seqlun, bytes(request["data"]))
            last = getattr(self, "last_request", None)
            if last and last[0] == key and last[2] is not None and time.monotonic() - last[1] < DUPLICATE_WINDOW_S:
                self.bmc.duplicate(request)
                return serversession.ServerSession._send_ipmi_net_payload(self, data=last[2][0], code=last[2][1])
            self.last_request = [key, time.monotonic(), None]
            return super().handle_client_request(request)

        def _send_ipmi_net_payload(self, netfn=None, command=None, data=(), code=0, **kw):
            last = getattr(self, "last_request", None)
            if last is not None and netfn is None and command is None:
                last[2] = (bytes(data), code)  # the answer a retransmission of this request gets
            return super()._send_ipmi_net_payload(netfn, command, data, code, **kw)

        def sessionless_data(self, data, sockaddr):
            # pyghmi hands a closed session the packets still queued for it as "sessionless";
            # ServerSession has no such handler (the AttributeError killed the simulator's loop
            # in CI): they go to the BMC, as new packets would.
            self.bmc.sessionless_data(data, sockaddr)

        def close_server_session(self):
            # Forget the session, so the next login from the same client port starts afresh.
            handlers = ipmisession.Session.bmc_handlers.get(self.sockaddr)
            if handlers is not None:
                handlers.pop(self.bmc.port, None)
                if not handlers:
                    ipmisession.Session.bmc_handlers.pop(self.sockaddr, None)

    class SimBmc(bmc.Bmc):
        def __init__(self, name, port, user, password, address, notify):
            self.name = name
            self.user = user
            self.password = password
            self.notify = notify
            self.lock = threading.RLock()
            self.power = "off"
            self.bootdev = "default"
            self.persistent = False
            self.uefi = False
            self.fault = None
            self.boots: list[dict] = []
            self.actions: list[str] = []
            self.bootdev_sets: list[dict] = []
            self.refused = {"busy": 0, "silent": 0}  # requests answered 0xC0 / dropped by a fault
            self.duplicates: list[dict] = []  # retransmitted requests answered again, not run again
            super().__init__({user: password}, port=port, address=address)

        # -- state ------------------------------------------------------------------
        def snapshot(self) -> dict:
            with self.lock:
                return {"name": self.name, "port": self.port, "power": self.power, "bootdev": self.bootdev,
                        "persistent": self.persistent, "fault": self.fault, "boots": list(self.boots),
                        "actions": list(self.actions), "bootdev_sets": list(self.bootdev_sets),
                        "refused": dict(self.refused), "duplicates": list(self.duplicates)}

        def set(self, fault="keep", power=None, bootdev=None, persistent=False, reset=False) -> None:
            with self.lock:
                if reset:
                    self.power, self.bootdev, self.persistent, self.fault = "off", "default", False, None
                    self.boots, self.actions, self.bootdev_sets, self.duplicates = [], [], [], []
                    self.refused = {"busy": 0, "silent": 0}
                if fault != "keep":
                    if fault not in FAULTS:
                        raise ValueError(f"unknown fault {fault!r}")
                    self.fault = fault
                # A "password" fault changes the BMC's password: logins with the configured one fail.
                self.authdata = {self.user: self.password + "-changed" if self.fault == "password" else self.password}
                if power is not None:
                    self.power = power
                if bootdev is not None:
                    self.bootdev, self.persistent = bootdev, bool(persistent)

        def duplicate(self, request: dict) -> None:
            with self.lock:
                self.duplicates.append({"netfn": request["netfn"], "command": request["command"], "ts": time.time()})
            self.notify({"event": "duplicate", "bmc": self.name, "netfn": request["netfn"],
                         "command": request["command"]})

        def _event(self, action: str, boot: dict | None) -> None:
            self.actions.append(action)
            self.notify({"event": "power", "bmc": self.name, "action": action, "boot": boot,
                         "power": self.power})

        def _boot(self, how: str) -> dict:
            # What the firmware would boot from now; a one-time override is used up.
            boot = {"how": how, "bootdev": self.bootdev, "persistent": self.persistent, "ts": time.time()}
            self.boots.append(boot)
            if not self.persistent:
                self.bootdev = "default"
            self.power = "on"
            return boot

        # -- pyghmi hooks -----------------------------------------------------------
        def sessionless_data(self, data, sockaddr):
            if self.fault == "silent":
                self.refused["silent"] += 1
                return
            d = bytearray(data)
            if len(d) >= 22 and d[0] == 6 and d[2:4] == b"\xff\x07" and d[4] == 6 and d[5] == 16:
                SimServerSession(self.authdata, self.kg, sockaddr, self.serversocket, d[16:], self.uuid, bmc=self)
                return
            super().sessionless_data(data, sockaddr)

        def handle_raw_request(self, request, session):
            if self.fault == "silent":
                self.refused["silent"] += 1
                return
            if self.fault == "busy":
                self.refused["busy"] += 1
                return session.send_ipmi_response(code=0xC0)
            if self.fault == "stuck" and request["netfn"] == 0 and request["command"] == 2:
                return session.send_ipmi_response()  # "done", and nothing happens
            if self.fault == "lag" and request["netfn"] == 0 and request["command"] == 2:
                time.sleep(LAG_S)
            with self.lock:
                return super().handle_raw_request(request, session)

        def get_power_state(self):
            return self.power

        def power_on(self):
            boot = None if self.power == "on" else self._boot("on")
            self._event("on", boot)

        def power_off(self):
            self.power = "off"
            self._event("off", None)

        def power_shutdown(self):
            # ACPI soft-off: the simulated OS shuts down at once.
            self.power = "off"
            self._event("soft", None)

        def power_reset(self):
            if self.power == "off":
                return 0xD5
            self._event("reset", self._boot("reset"))

        def power_cycle(self):
            if self.power == "off":
                return 0xD5
            self._event("cycle", self._boot("cycle"))

        def get_system_boot_options(self, request, session):
            if request["data"][0] != 5:
                return session.send_ipmi_response(code=0x80)  # parameter not supported
            if self.bootdev == "default":
                flags, selector = 0, 0
            else:
                flags = 0x80 | (0x40 if self.persistent else 0) | (0x20 if self.uefi else 0)
                selector = ipmicommand.boot_devices[self.bootdev]
            session.send_ipmi_response(data=[1, 5, flags, selector, 0, 0, 0])

        def set_system_boot_options(self, request, session):
            data = request["data"]
            if data[0] in (0, 3, 4):  # set-in-progress, info acknowledge, boot info: accepted
                return session.send_ipmi_response()
            if data[0] != 5 or len(data) < 3:
                return session.send_ipmi_response(code=0x80)
            flags, selector = data[1], (data[2] >> 2) & 0x0F
            name = ipmicommand.boot_devices.get(selector) if selector else "default"
            if name is None:
                return session.send_ipmi_response(code=0xCC)
            if not flags & 0x80:
                name = "default"
            self.bootdev = name
            self.persistent = bool(flags & 0x40) and name != "default"
            self.uefi = bool(flags & 0x20)
            self.bootdev_sets.append({"bootdev": name, "persistent": self.persistent})
            session.send_ipmi_response()

    return SimBmc, ipmisession


def serve(specs: list[dict], address: str, notify: Callable[[dict], None]) -> dict:
    """Start one SimBmc per spec ({name, port, user, password}) in this process; returns name->bmc.
    The caller runs `run_forever()` (pyghmi's loop) in one thread."""
    SimBmc, _ = _server_classes()
    return {s["name"]: SimBmc(s["name"], int(s["port"]), s["user"], s["password"], address, notify) for s in specs}


def run_forever() -> None:
    import traceback

    _, ipmisession = _server_classes()
    while True:
        try:
            ipmisession.Session.wait_for_rsp(30)
        except Exception:  # noqa: BLE001 - one bad packet must not kill every BMC of the simulator
            traceback.print_exc()


# ----------------------------------------------------------------------------- child process


def _child_control(config_path: str) -> None:
    cfg = json.loads(Path(config_path).read_text())
    out_lock = threading.Lock()

    def emit(obj: dict) -> None:
        with out_lock:
            sys.stdout.write(json.dumps(obj) + "\n")
            sys.stdout.flush()

    on_power = cfg.get("on_power_command")
    bmcs = serve(cfg["bmcs"], cfg.get("address", "127.0.0.1"),
                 lambda ev: (emit(ev), _run_hook(on_power, ev) if on_power and ev["event"] == "power" else None))
    threading.Thread(target=run_forever, daemon=True, name="ipmi-loop").start()
    emit({"ready": True, "ports": {n: b.port for n, b in bmcs.items()}})
    for line in sys.stdin:  # EOF: the parent is gone, and so are we
        try:
            req = json.loads(line)
        except ValueError:
            continue
        rid, op = req.get("id"), req.get("op")
        try:
            if op == "stop":
                emit({"id": rid, "ok": True})
                break
            names = req.get("bmcs") or list(bmcs)
            if op == "state":
                result = {n: bmcs[n].snapshot() for n in names}
            elif op == "set":
                for n in names:
                    bmcs[n].set(**req.get("args", {}))
                result = None
            else:
                raise ValueError(f"unknown op {op!r}")
            emit({"id": rid, "ok": True, "result": result})
        except Exception as exc:  # a bad request must not kill the simulator
            emit({"id": rid, "ok": False, "error": f"{type(exc).__name__}: {exc}"})
    os._exit(0)  # pyghmi's IO thread is not a daemon thread


def _run_hook(command: str, ev: dict) -> None:
    boot = ev.get("boot") or {}
    env = {**os.environ, "BMC_NODE": ev["bmc"], "BMC_ACTION": ev["action"], "BMC_POWER": ev["power"],
           "BMC_BOOTDEV": str(boot.get("bootdev", "")), "BMC_PERSISTENT": "1" if boot.get("persistent") else "0"}
    # Detached: a real BMC answers at once while the machine boots.
    subprocess.Popen(command, shell=True, env=env, stdin=subprocess.DEVNULL, start_new_session=True)


def _standalone(args) -> None:
    import ipaddress

    from provisioner import config
    from provisioner.nodeset import expand

    site = config.load(args.site, check_files=False)
    wanted = set(expand(args.nodes)) if args.nodes else None
    specs = []
    for node in site.nodes.values():
        if node.bmc is None or (wanted is not None and node.name not in wanted):
            continue
        try:
            if not ipaddress.ip_address(node.bmc.address).is_loopback:
                continue
        except ValueError:
            continue
        password = node.bmc.password
        if node.bmc.password_file:  # not read by load(check_files=False)
            password = Path(node.bmc.password_file).read_text().strip()
        specs.append({"name": node.name, "port": node.bmc.port, "user": node.bmc.user, "password": password})
    if not specs:
        sys.exit("no node with a loopback bmc.address in that site config")

    def emit(ev: dict) -> None:
        print(json.dumps(ev), flush=True)
        if args.on_power and ev["event"] == "power":
            _run_hook(args.on_power, ev)

    bmcs = serve(specs, "127.0.0.1", emit)
    for name, b in bmcs.items():
        print(f"BMC {name} on 127.0.0.1:{b.port} (udp)", file=sys.stderr, flush=True)
    try:
        run_forever()
    except KeyboardInterrupt:
        os._exit(0)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m testbed.bmc_sim", description=__doc__.split("\n\n")[0])
    p.add_argument("--control", metavar="CONFIG_JSON", help="(used by BmcSim) JSON-line control on stdin")
    p.add_argument("--site", help="site.yaml: one BMC per node with a loopback bmc.address")
    p.add_argument("--nodes", help="only these nodes (hostlist expression)")
    p.add_argument("--on-power", help="shell command run on every power event (BMC_* variables set)")
    args = p.parse_args(argv)
    if args.control:
        _child_control(args.control)
    elif args.site:
        _standalone(args)
    else:
        p.error("give --site SITE_YAML (or --control, used by the test fixtures)")


# ------------------------------------------------------------------------- the parent's handle


@dataclass(frozen=True)
class BmcSpec:
    name: str
    port: int
    user: str = "admin"
    password: str = "s3cret-bmc-pw"


class BmcSim:
    """Handle on a simulator process. `on_power(event)` gets every power event:
    {"bmc", "action": on|off|soft|reset|cycle, "boot": {how, bootdev, persistent} or None, "power"}."""

    def __init__(self, proc: subprocess.Popen, specs: list[BmcSpec], on_power=None, workdir: Path | None = None):
        self.proc = proc
        self.pid = proc.pid
        self.specs = {s.name: s for s in specs}
        self.on_power = on_power
        self.events: list[dict] = []
        self._next = 0
        self._lock = threading.Lock()
        self._replies: dict[int, dict] = {}
        self._cv = threading.Condition()
        self._ready: dict | None = None
        self._reader = threading.Thread(target=self._read, daemon=True, name=f"bmc-sim-{proc.pid}")
        self._reader.start()

    @classmethod
    def start(cls, specs: list[BmcSpec], workdir: Path, on_power=None, on_power_command: str | None = None,
              timeout: float = 15.0) -> "BmcSim":
        workdir.mkdir(parents=True, exist_ok=True)
        cfg = workdir / "bmc-sim.json"
        fd = os.open(cfg, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"address": "127.0.0.1", "on_power_command": on_power_command,
                       "bmcs": [s.__dict__ for s in specs]}, f)
        root = Path(__file__).resolve().parent.parent
        proc = subprocess.Popen(
            [sys.executable, "-m", "testbed.bmc_sim", "--control", str(cfg)], cwd=root,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(workdir / "bmc-sim.log", "ab"),
            text=True, bufsize=1, start_new_session=True,
        )
        sim = cls(proc, specs, on_power, workdir)
        with sim._cv:
            if not sim._cv.wait_for(lambda: sim._ready is not None or proc.poll() is not None, timeout):
                sim.stop()
                raise RuntimeError(f"BMC simulator did not start within {timeout}s; see {workdir}/bmc-sim.log")
        if sim._ready is None:
            sim.stop()
            raise RuntimeError(f"BMC simulator exited: {(workdir / 'bmc-sim.log').read_text()[-2000:]}")
        return sim

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if "event" in msg:
                self.events.append(msg)
                if self.on_power is not None and msg["event"] == "power":
                    try:
                        self.on_power(msg)
                    except Exception as exc:  # a failing hook is reported, never kills the reader
                        self.events.append({"event": "hook-error", "bmc": msg.get("bmc"), "error": repr(exc)})
                continue
            with self._cv:
                if msg.get("ready"):
                    self._ready = msg
                elif "id" in msg:
                    self._replies[msg["id"]] = msg
                self._cv.notify_all()
        with self._cv:
            self._cv.notify_all()

    def _call(self, op: str, bmcs: list[str] | None = None, timeout: float = 10.0, **args) -> Any:
        with self._lock:
            self._next += 1
            rid = self._next
            self.proc.stdin.write(json.dumps({"id": rid, "op": op, "bmcs": bmcs, "args": args}) + "\n")
            self.proc.stdin.flush()
        with self._cv:
            if not self._cv.wait_for(lambda: rid in self._replies or self.proc.poll() is not None, timeout):
                raise RuntimeError(f"BMC simulator did not answer {op}")
        reply = self._replies.pop(rid, None)
        if reply is None or not reply["ok"]:
            raise RuntimeError(f"BMC simulator: {op} failed: {reply and reply.get('error')}")
        return reply.get("result")

    # -- public -------------------------------------------------------------------
    def port(self, name: str) -> int:
        return self.specs[name].port

    def state(self, name: str) -> dict:
        return self._call("state", [name])[name]

    def states(self) -> dict[str, dict]:
        return self._call("state")

    def set_fault(self, names: str | list[str], fault: str | None) -> None:
        self._call("set", [names] if isinstance(names, str) else list(names), fault=fault)

    def set_power(self, names: str | list[str], power: str) -> None:
        self._call("set", [names] if isinstance(names, str) else list(names), power=power)

    def set_bootdev(self, names: str | list[str], bootdev: str, persistent: bool = False) -> None:
        self._call("set", [names] if isinstance(names, str) else list(names), bootdev=bootdev, persistent=persistent)

    def reset(self) -> None:
        """Every BMC back to: off, no boot override, no fault, empty history."""
        self._call("set", reset=True)
        self.events.clear()

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()  # the child exits on EOF
            except OSError:
                pass
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self._reader.join(timeout=5)


if __name__ == "__main__":
    main()

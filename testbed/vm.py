"""A qemu VM that network-boots like a diskless compute node: firmware -> the iPXE ROM -> DHCP
from qemu's user network, whose boot file is the boot server's stage-1 script.

    vm = VM("sn01", mac="52:54:00:03:00:01", boot_url="http://10.0.2.2:8080/boot.ipxe", workdir=d)
    vm.start(netboot=True)                 # power on
    m = vm.wait_for_serial(r"PROVISIONER-BOOTED node=(\\S+) role=(\\S+)", timeout=120)
    mark = vm.serial_mark(); vm.reset()    # QMP system_reset; search the log after `mark`
    vm.power_off(); vm.cleanup()

The guest reaches the host's 127.0.0.1 as 10.0.2.2, so the boot server listens on loopback and
the site's boot_url says http://10.0.2.2:PORT. No qemu outlives its VM object's owner:
- every qemu is started with parent-death signal SIGKILL (util-linux `setpriv --pdeathsig`),
  from one long-lived launcher thread (the "parent" of that signal is the thread that forked,
  and a power event's short-lived worker thread would otherwise take its VM with it);
- cleanup() (also at interpreter exit, for every VM still running) quits it over QMP, then kills.

KVM is used only when it can work (/dev/kvm usable and the CPU advertises vmx/svm, and not the
PVM nested backend, where iPXE triple-faults); otherwise TCG. PROVISIONER_VM_ACCEL=tcg|kvm
overrides the detection.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

QEMU = "qemu-system-x86_64"
ACCEL_ENV = "PROVISIONER_VM_ACCEL"
# The marker in every test VM's command line: `pgrep -f` finds strays with it (tests assert none).
MARKER = "provisioner-test-vm"

_launcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vm-launcher")
_live: "weakref.WeakSet[VM]" = weakref.WeakSet()


class VMError(RuntimeError):
    pass


def qemu_binary() -> str | None:
    return shutil.which(QEMU)


def accelerator() -> str:
    """kvm or tcg, decided without starting a VM (see the module docstring)."""
    forced = os.environ.get(ACCEL_ENV)
    if forced in ("kvm", "tcg"):
        return forced
    if not os.access("/dev/kvm", os.R_OK | os.W_OK) or Path("/sys/module/kvm_pvm").exists():
        return "tcg"
    try:
        flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("flags")), [])
    except OSError:
        return "tcg"
    return "kvm" if ("vmx" in flags or "svm" in flags) else "tcg"


def stray_qemus() -> list[int]:
    """Pids of test VMs still running (any owner's): the tests' own cleanup check."""
    out = subprocess.run(["pgrep", "-f", MARKER], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


class VM:
    """One VM. Thread-safe: power actions are serialised per VM (a BMC may send on, then reset)."""

    def __init__(self, name: str, mac: str, boot_url: str, workdir: str | os.PathLike, memory_mb: int = 256,
                 accel: str | None = None, serial_log: str | os.PathLike | None = None,
                 forwards: dict[int, int] | None = None):
        """forwards: {host port on 127.0.0.1: guest port}, for what must reach into the node
        (its sshd, its slurmd); the guest reaches out to the host as 10.0.2.2 without them."""
        self.name, self.mac, self.boot_url = name, mac, boot_url
        self.forwards = dict(forwards or {})
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.serial_log = Path(serial_log) if serial_log else self.workdir / f"{name}.serial.log"
        self.qemu_log = self.workdir / f"{name}.qemu.log"
        # A unix socket path has a 108-byte limit; pytest's tmp paths can be longer.
        self._sockdir = tempfile.mkdtemp(prefix="vm-qmp-")
        self.qmp_path = Path(self._sockdir) / f"{name}.qmp"
        self.memory_mb = memory_mb
        self.accel = accel or accelerator()
        self.proc: subprocess.Popen | None = None
        self.lock = threading.RLock()
        self.started_at: float | None = None  # time.time() of the last power on or reset
        _live.add(self)

    # ------------------------------------------------------------------ power

    def command(self, netboot: bool = True) -> list[str]:
        qemu = qemu_binary()
        if qemu is None:
            raise VMError(f"{QEMU} not found; install Debian's qemu-system-x86 (scripts/install-system-deps.sh)")
        setpriv = shutil.which("setpriv")
        prefix = [setpriv, "--pdeathsig", "KILL"] if setpriv else []
        return [
            *prefix, qemu, "-name", f"{self.name},process={MARKER}-{self.name}",
            "-accel", self.accel, "-m", str(self.memory_mb), "-smp", "1",
            "-nographic", "-display", "none", "-monitor", "none",
            # append: a log spans every run of this VM (reset and power cycles alike)
            "-chardev", f"file,id=serial0,path={self.serial_log},append=on", "-serial", "chardev:serial0",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
            "-netdev", f"user,id=n0,bootfile={self.boot_url}"
            + "".join(f",hostfwd=tcp:127.0.0.1:{h}-:{g}" for h, g in sorted(self.forwards.items())),
            "-device", f"virtio-net-pci,netdev=n0,mac={self.mac}",
            # No disk: a diskless node. "n" stays in force across resets; without it the firmware
            # tries the (absent) disk and CD-ROM first and then still reaches the NIC's iPXE ROM.
            "-boot", "n" if netboot else "order=cn",
        ]

    def start(self, netboot: bool = True, timeout: float = 15.0) -> None:
        """Power on (a no-op when it runs). Returns once qemu's QMP answers."""
        with self.lock:
            if self.is_running():
                return
            self._close_proc()
            self.serial_log.touch()
            try:
                self.qmp_path.unlink()
            except FileNotFoundError:
                pass
            argv = self.command(netboot)
            log = open(self.qemu_log, "ab")
            try:
                self.proc = _launcher.submit(
                    subprocess.Popen, argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    start_new_session=True).result()
            finally:
                log.close()
            self.started_at = time.time()
            deadline = time.monotonic() + timeout
            while True:
                try:
                    self.qmp("query-status")
                    return
                except VMError:
                    if self.proc.poll() is not None:
                        raise VMError(f"qemu for {self.name} exited {self.proc.returncode}: "
                                      f"{self.qemu_log.read_text(errors='replace')[-1500:]}") from None
                    if time.monotonic() > deadline:
                        self.power_off()
                        raise VMError(f"qemu for {self.name}: QMP did not answer within {timeout} s") from None
                    time.sleep(0.05)

    def reset(self) -> None:
        """Hard reset (QMP system_reset): the firmware network-boots again. Starts it when off."""
        with self.lock:
            if not self.is_running():
                self.start()
                return
            self.qmp("system_reset")
            self.started_at = time.time()

    def power_off(self, timeout: float = 10.0) -> None:
        """Pull the plug: QMP quit, then SIGTERM, then SIGKILL. A no-op when off."""
        with self.lock:
            proc = self.proc
            if proc is None:
                return
            if proc.poll() is None:
                try:
                    self.qmp("quit", timeout=2)
                except VMError:
                    pass
                for sig, wait in ((None, timeout / 2), (signal.SIGTERM, timeout / 4), (signal.SIGKILL, timeout)):
                    if sig is not None and proc.poll() is None:
                        try:
                            os.killpg(proc.pid, sig)
                        except ProcessLookupError:
                            pass
                    try:
                        proc.wait(wait)
                        break
                    except subprocess.TimeoutExpired:
                        continue
            self._close_proc()

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def cleanup(self) -> None:
        """Power off and remove the QMP socket folder; safe to call twice."""
        self.power_off()
        shutil.rmtree(self._sockdir, ignore_errors=True)

    def _close_proc(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            self.proc = None

    # ------------------------------------------------------------------ QMP

    def qmp(self, command: str, arguments: dict | None = None, timeout: float = 5.0) -> object:
        """One QMP command on a fresh connection (qemu takes one client at a time)."""
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(timeout)
                s.connect(str(self.qmp_path))
                f = s.makefile("rw")
                json.loads(f.readline())  # greeting
                for cmd in ({"execute": "qmp_capabilities"},
                            {"execute": command, **({"arguments": arguments} if arguments else {})}):
                    f.write(json.dumps(cmd) + "\n")
                    f.flush()
                    while True:
                        line = f.readline()
                        if not line:
                            if command == "quit":
                                return None
                            raise VMError(f"qemu for {self.name} closed QMP during {command}")
                        reply = json.loads(line)
                        if "event" in reply:
                            continue
                        if "error" in reply:
                            raise VMError(f"QMP {command}: {reply['error'].get('desc')}")
                        break
                return reply.get("return")
        except (OSError, ValueError) as exc:
            raise VMError(f"QMP {command} to {self.name}: {exc}") from None

    # ------------------------------------------------------------------ the serial console

    def serial_mark(self) -> int:
        """The console log's current end: pass it as `since` to look only at what comes after."""
        try:
            return self.serial_log.stat().st_size
        except FileNotFoundError:
            return 0

    def serial_text(self, since: int = 0) -> str:
        try:
            with open(self.serial_log, "rb") as f:
                f.seek(since)
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for_serial(self, pattern: str, timeout: float, since: int = 0,
                        cancelled=lambda: False) -> re.Match:
        """The first match of `pattern` (a regex, per line) in the console output after byte
        `since`. Raises VMError after `timeout` s, when the VM stops, or when cancelled() says so,
        with the console's tail."""
        rx = re.compile(pattern, re.M)
        deadline = time.monotonic() + timeout
        while True:
            text = self.serial_text(since)
            m = rx.search(text)
            if m:
                return m
            why = None
            if cancelled():
                why = "cancelled"
            elif not self.is_running():
                why = "the VM is off"
            elif time.monotonic() > deadline:
                why = f"not seen within {timeout:.0f} s"
            if why:
                tail = "\n".join(text.replace("\r", "").splitlines()[-15:])
                raise VMError(f"{self.name}: /{pattern}/ {why}; console tail:\n{tail}")
            time.sleep(0.2)

    def __repr__(self) -> str:
        state = f"pid {self.proc.pid}" if self.is_running() else "off"
        return f"VM({self.name}, {self.mac}, {self.accel}, {state})"


@atexit.register
def _cleanup_all() -> None:
    for vm in list(_live):
        try:
            vm.cleanup()
        except Exception:  # noqa: BLE001 - best effort at exit; pdeathsig is the backstop
            pass

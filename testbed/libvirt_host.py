"""libvirtd (Debian's) for the Redfish tests: the VMs that sushy-emulator's libvirt driver powers
and boot-overrides are libvirt domains, defined here, that network-boot like testbed/vm.py's.

    host = LibvirtHost(workdir).start()   # our own libvirtd + virtlogd, or the one already running
    vm = host.vm("sn01", mac, "http://10.0.2.2:PORT/boot.ipxe", workdir)   # a VM, as a domain
    vm.start(); vm.reset(); vm.power_off(); vm.cleanup()                  # what VM offers
    host.stop()

No systemd here: libvirtd and virtlogd run in the foreground, each in its own session, stopped
by pid (only when this object started them). A domain is what qemu runs, so the usual checks
hold: its qemu's command line carries testbed/vm.py's MARKER (stray_qemus() finds it), its
console goes to a file that VM reads (serial_text, wait_for_serial).

The one trick: iPXE must be told its boot file, which qemu's user network hands out
(`-netdev user,bootfile=URL`) but libvirt's <interface type='user'> cannot set. So the domain
drops libvirt's JSON -netdev syntax (qemu:capabilities) and sets bootfile and the port forwards
on libvirt's own netdev with `-set` (qemu:commandline). The NIC stays libvirt's, so the boot order
the emulator writes (its Pxe override) is the one the firmware follows.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from xml.sax.saxutils import escape

from testbed.parts import PartMissing, require_binary
from testbed.process import Daemon
from testbed.vm import MARKER, QEMU, VM, VMError, accelerator, qemu_binary

URI = "qemu:///system"


def _libvirt():
    try:
        import libvirt
    except ImportError:
        raise PartMissing("the libvirt Python binding is missing; run `make venv` (libvirt-python, built "
                          "against Debian's libvirt-dev from `make system-deps`)") from None
    return libvirt


class LibvirtHost:
    def __init__(self, workdir: str | os.PathLike, uri: str = URI):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.uri = uri
        self.daemons: list[Daemon] = []
        self.domains: list[str] = []  # defined by us: undefined at stop()

    def answers(self) -> bool:
        libvirt = _libvirt()
        libvirt.registerErrorHandler(lambda *_: None, None)  # no "libvirt: error" lines on stderr
        try:
            libvirt.open(self.uri).close()
            return True
        except libvirt.libvirtError:
            return False

    def start(self, timeout: float = 60) -> "LibvirtHost":
        if os.geteuid() != 0:
            raise PartMissing("root (libvirtd's qemu:///system)")
        if self.answers():  # a libvirtd runs already (the host's own): use it, leave it running
            self._undefine_strays()
            return self
        for name in ("virtlogd", "libvirtd"):
            cmd = [require_binary(name)]
            if name == "libvirtd" and accelerator() == "tcg" and Path("/dev/kvm").exists():
                # The VMs run TCG. Where /dev/kvm exists but cannot run them (the PVM nested
                # backend), libvirtd finds its cached qemu capabilities stale on every call and
                # probes qemu again (~55 s per domain definition): it sees no /dev/kvm at all.
                cmd = [require_binary("unshare"), "--mount", "--", "sh", "-c",
                       'mount --bind /dev/null /dev/kvm && exec "$0"', cmd[0]]
            d = Daemon(cmd, 0, self.workdir / f"{name}.log", name=name)
            probe = (lambda: Path("/run/libvirt/virtlogd-sock").exists()) if name == "virtlogd" else self.answers
            self.daemons.append(d.start(probe, timeout))
        self._undefine_strays()
        return self

    def _undefine_strays(self) -> None:
        """Test domains whose test process is gone (killed before its clean-up)."""
        libvirt = _libvirt()
        with libvirt.open(self.uri) as conn:
            names = [d.name() for d in conn.listAllDomains()]
        for name in names:
            pid = name.rsplit("-", 1)[-1]
            if name.startswith(f"{MARKER}-") and pid.isdigit() and not Path(f"/proc/{pid}").exists():
                self._undefine(name)

    def stop(self) -> None:
        for name in self.domains:
            self._undefine(name)
        self.domains.clear()
        for d in reversed(self.daemons):
            d.stop()
        self.daemons.clear()

    def pids(self) -> dict[str, int]:
        return {d.name: d.pid for d in self.daemons if d.running()}

    def vm(self, name: str, mac: str, boot_url: str, workdir: str | os.PathLike, memory_mb: int = 256,
           forwards: dict[int, int] | None = None) -> "LibvirtVM":
        vm = LibvirtVM(self, name, mac, boot_url, workdir, memory_mb=memory_mb, forwards=forwards)
        self.domains.append(vm.domain_name)
        return vm

    def _undefine(self, name: str) -> None:
        libvirt = _libvirt()
        try:
            with libvirt.open(self.uri) as conn:
                dom = conn.lookupByName(name)
                if dom.isActive():
                    dom.destroy()
                dom.undefine()
        except libvirt.libvirtError:
            pass


class LibvirtVM(VM):
    """testbed/vm.py's VM, run by libvirtd as domain `domain_name` (the Redfish system's id)."""

    def __init__(self, host: LibvirtHost, name: str, mac: str, boot_url: str, workdir, **kwargs):
        super().__init__(name, mac, boot_url, workdir, **kwargs)
        self.host = host
        self.domain_name = f"{MARKER}-{name}-{os.getpid()}"
        self.harness_ids: set[int] = set()  # domain ids of the starts made here, not by a BMC
        self._define()

    def domain_xml(self) -> str:
        if qemu_binary() is None:
            raise VMError(f"{QEMU} not found; install Debian's qemu-system-x86 (scripts/install-system-deps.sh)")
        sets = [f"netdev.hostnet0.bootfile={self.boot_url}"] + [
            f"netdev.hostnet0.hostfwd=tcp:127.0.0.1:{h}-:{g}" for h, g in sorted(self.forwards.items())]
        args = "".join(f"<qemu:arg value='-set'/><qemu:arg value='{escape(s)}'/>" for s in sets)
        return f"""<domain type='{'kvm' if self.accel == 'kvm' else 'qemu'}'
        xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{self.domain_name}</name>
  <memory unit='MiB'>{self.memory_mb}</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><bios useserial='yes'/></os>
  <features><acpi/></features>
  <seclabel type='none' model='none'/>
  <devices>
    <emulator>{qemu_binary()}</emulator>
    <interface type='user'>
      <mac address='{self.mac}'/>
      <model type='virtio'/>
      <boot order='1'/>
    </interface>
    <serial type='file'><source path='{escape(str(self.serial_log))}' append='on'/></serial>
  </devices>
  <qemu:capabilities><qemu:del capability='netdev.json'/></qemu:capabilities>
  <qemu:commandline>{args}</qemu:commandline>
</domain>"""

    def _conn(self):
        return _libvirt().open(self.host.uri)

    def _define(self) -> None:
        self.host._undefine(self.domain_name)  # a left-over of an earlier run of this pid
        with self._conn() as conn:
            self.uuid = conn.defineXML(self.domain_xml()).UUIDString()  # its Redfish system id

    def _dom(self, conn):
        return conn.lookupByName(self.domain_name)

    # ------------------------------------------------------------------ power (as VM's)

    def start(self, netboot: bool = True, timeout: float = 15.0) -> None:
        with self.lock:
            self.serial_log.touch()
            with self._conn() as conn:
                dom = self._dom(conn)
                if not dom.isActive():
                    dom.create()
                    self.harness_ids.add(dom.ID())
            self.started_at = time.time()

    def reset(self) -> None:
        with self.lock:
            with self._conn() as conn:
                dom = self._dom(conn)
                if dom.isActive():
                    dom.reset()  # the same domain id: no power event for a watcher
                else:
                    dom.create()
                    self.harness_ids.add(dom.ID())
            self.started_at = time.time()

    def power_off(self, timeout: float = 10.0) -> None:
        libvirt = _libvirt()
        with self.lock:
            try:
                with self._conn() as conn:
                    dom = self._dom(conn)
                    if dom.isActive():
                        dom.destroy()
            except libvirt.libvirtError:
                pass  # no libvirtd, no domain: nothing runs

    def is_running(self) -> bool:
        libvirt = _libvirt()
        try:
            with self._conn() as conn:
                return bool(self._dom(conn).isActive())
        except libvirt.libvirtError:
            return False

    def domain_id(self) -> int:
        """libvirt's id of the running domain (a new one at every start; -1 when off)."""
        libvirt = _libvirt()
        try:
            with self._conn() as conn:
                return self._dom(conn).ID()
        except libvirt.libvirtError:
            return -1

    def qemu_pid(self) -> int | None:
        out = subprocess.run(["pgrep", "-f", f"guest={self.domain_name}"], capture_output=True, text=True).stdout
        return int(out.split()[0]) if out.split() else None

    def cleanup(self) -> None:
        self.power_off()
        super().cleanup()

    def qmp(self, command: str, arguments: dict | None = None, timeout: float = 5.0) -> object:
        raise VMError(f"{self.name} runs under libvirtd: no QMP socket of ours")

    def __repr__(self) -> str:
        return f"LibvirtVM({self.name}, {self.domain_name}, {'on' if self.is_running() else 'off'})"


"""End-to-end VMs: the balancer's test world (testbed/simnodes.py) with real qemu VMs as its shared
nodes, network-booting the tiny image (images/tiny) through iPXE from the real `provisioner serve`.

VmSite is a SimSite whose shared nodes are VMs (testbed/vm.py):
- site.yaml: `site.boot_url` is http://10.0.2.2:PORT (the guests' view of the host's loopback,
  where the boot server listens); both roles boot the built tiny image from `image_root`; the VM
  nodes have no `ip` (their callbacks reach the server from 127.0.0.1 through qemu's user
  network, so there is no source address to check).
- a power event from the node's BMC simulator drives its VM: on -> qemu starts (network boot
  when the one-time boot device is network), reset/cycle -> QMP system_reset, off/soft -> quit.
  A VM that dies by itself is reported to its BMC as off.
- a shared node named in `redfish=` is a libvirt domain instead (testbed/libvirt_host.py), its
  BMC sushy-tools' emulator (testbed/redfish_bmc.py, libvirt driver): provisioner powers it by
  Redfish, and a watcher turns what the domain does (started, restarted, stopped) into the same
  power events the BMC simulator sends for the others;
- the VM's own /init posts the boot callback; once the console says it was accepted
  (`PROVISIONER-CALLBACK-OK node=N role=R`), the harness starts the node's real slurmd (R=slurm)
  or starts its simulated kubelet (R=k8s), as the image's daemons would.

The pytest fixtures (vm_image_root, vm_site, e2e_site) are in tests/fixtures/vms.py.
Every qemu is stopped at the end of the session, also when a test fails (testbed/vm.py).
"""

from __future__ import annotations

import os
import secrets
import threading
import time
from pathlib import Path

import yaml

from testbed.simnodes import SimNode, SimSite
from testbed.vm import VM, VMError

GUEST_HOST = "10.0.2.2"  # qemu user networking: the host's 127.0.0.1 as seen from the guest
IPXE_ROM = "/usr/lib/ipxe/qemu/efi-virtio.rom"  # Debian's ipxe-qemu: the virtio-net boot ROM
BOOT_TIMEOUT_S = 150  # power action -> callback; about 12 s under TCG on an idle 2-core host

# A VM takes seconds, not the simulated 0.2 s, to come back: the balancer's phase timeout must
# cover a boot on a loaded host (a retry would reboot a VM that is about to call back).
VM_POLICY = {"phase_timeout_s": 120, "max_retries": 1}
# The real images: the squashfs root into RAM and systemd under TCG take a minute or more.
REAL_POLICY = {"phase_timeout_s": 600, "max_retries": 1}

BOOTED_RE = (r"^PROVISIONER-BOOTED node={node} role=(?P<role>\S+) version=(?P<version>\S+) "
             r"overlay=(?P<overlay>\S+) hostname=(?P<hostname>\S*)")
CALLBACK_RE = r"^PROVISIONER-CALLBACK-OK node={node} role=(?P<role>\S+) version=(?P<version>\S+)"


# Run by the tiny image's /init once the node is up: a user of the node (nobody) tries for its
# secrets with all it can read (the token on the kernel command line, a new script by its MAC).
USER_ATTACK = r"""#!/bin/sh
mkdir -p /tmp/user && chown 65534:65534 /tmp/user
su -s /bin/sh nobody -c '
cd /tmp/user
arg() { for w in $(cat /proc/cmdline); do case "$w" in "$1="*) echo "${w#*=}";; esac; done; }
code() { if wget -q -O out "$@" 2>err; then echo 200; else c=$(grep -o "HTTP/1.[01] [0-9]*" err | cut -d" " -f2); echo "${c:-none}"; fi; }
TOKEN=$(arg provisioner.token); SECRETS=$(arg provisioner.secrets); CB=$(arg provisioner.callback)
file=$(cat /etc/provisioner/node-secret >/dev/null 2>&1 && echo read || echo denied)
cmdline=$(code "$SECRETS?token=$TOKEN")
NIC=$(ls /sys/class/net | grep -v "^lo$" | head -n 1)
code "${CB%/api/*}/ipxe?mac=$(cat /sys/class/net/$NIC/address)" >/dev/null
FRESH=$(grep -o "provisioner.token=[0-9a-f]*" out | head -n 1 | cut -d= -f2)
fresh=$(code "$SECRETS?token=$FRESH")
spent=$(code --post-data "role=slurm&token=$TOKEN" "$CB")
echo "USER-ATTACK uid=$(id -u) file=$file cmdline-token=$cmdline fresh-token=${FRESH:+$fresh} spent-callback=$spent"
'
"""


class VmSite(SimSite):
    """SimSite with VMs as the shared nodes. `image_root` must hold a published tiny image."""

    booted_re = BOOTED_RE
    callback_re = CALLBACK_RE

    def __init__(self, workdir: str | os.PathLike, image_root: str | os.PathLike, *, fixed: str = "cn01",
                 shared: str = "sn01", fixed_k8s: str = "kn01", roles: dict[str, str] | None = None,
                 policy: dict | None = None, power: dict | None = None, memory_mb: int = 256,
                 boot_timeout: float = BOOT_TIMEOUT_S, kube=None, redfish: tuple[str, ...] = ()):
        super().__init__(workdir, fixed=fixed, shared=shared, fixed_k8s=fixed_k8s, roles=roles, boot_delay=0,
                         policy={**VM_POLICY, **(policy or {})}, power=power, kube=kube)
        self.image_root = Path(image_root).resolve()
        self.memory_mb = memory_mb
        self.boot_timeout = boot_timeout
        self.vms: dict[str, VM] = {}
        self.running_role: dict[str, str | None] = {}  # what each VM's console says it booted
        self.vm_boots: list[dict] = []  # one record per VM boot (also those of reset())
        self._stopping = threading.Event()
        self.redfish = tuple(redfish)
        self.libvirt = None  # testbed.libvirt_host.LibvirtHost, when there are Redfish nodes
        self.redfish_bmc = None  # testbed.redfish_bmc.RedfishBmc (libvirt driver)

    def start(self) -> "VmSite":
        if self.redfish:
            from testbed.libvirt_host import LibvirtHost
            from testbed.redfish_bmc import RedfishBmc

            try:
                self.libvirt = LibvirtHost(self.workdir / "libvirt").start()
                self.redfish_bmc = RedfishBmc(self.workdir / "redfish", libvirt_uri=self.libvirt.uri).start()
            except BaseException:
                self.stop()
                raise
        super().start()
        for name in self.redfish:
            t = threading.Thread(target=self._watch_domain, args=(name,), name=f"domain-{name}", daemon=True)
            t.start()
        return self

    # ----------------------------------------------------------------------- set-up

    @property
    def guest_boot_url(self) -> str:
        return f"http://{GUEST_HOST}:{self.port}"

    def write_config(self, policy: dict | None = None, power: dict | None = None,
                     kubernetes: dict | None = None) -> Path:
        """SimSite's site.yaml, changed where a VM differs from a simulated node."""
        path = super().write_config(policy, power, kubernetes)
        data = yaml.safe_load(path.read_text())
        data["site"]["boot_url"] = self.guest_boot_url
        data["site"]["image_root"] = str(self.image_root)
        # qemu's user-mode network connects to the boot server from its own (unprivileged) port:
        # the guest's privileged source port cannot be seen through it.
        data["site"]["secrets_privileged_port"] = False
        data["images"] = {"slurm": {"image": "tiny"}, "k8s": {"image": "tiny"}}
        secret = self.workdir / "node-secret"
        if not secret.exists():
            secret.write_text(secrets.token_hex(24) + "\n")
            secret.chmod(0o600)
        (self.workdir / "passwd").write_text("root:x:0:0:root:/:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/sh\n")
        (self.workdir / "group").write_text("root:x:0:\nnogroup:x:65534:\n")
        (self.workdir / "after-boot").write_text(USER_ATTACK)
        data["overlay"] = {"files": {"node_secret": str(secret),  # the tiny image's secret part
                                     "tiny_passwd": str(self.workdir / "passwd"), "tiny_group": str(self.workdir / "group"),
                                     "tiny_after_boot": str(self.workdir / "after-boot")}}
        for entry in data["nodes"]:
            if entry["name"] in self.nodes:
                entry.pop("ip", None)
            if entry["name"] in self.redfish:
                rf = self.redfish_bmc
                entry["bmc"] = {"protocol": "redfish", "address": "127.0.0.1", "port": rf.port, "user": rf.user,
                                "password_file": str(rf.password_file), "ca_file": str(rf.ca_file),
                                "system": self.vm(entry["name"]).uuid, "boot_mode": "legacy"}
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(yaml.safe_dump(data, sort_keys=False))
        tmp.replace(path)  # a `provisioner` run reading it meanwhile sees the old or the new file
        return path

    def vm(self, name: str) -> VM:
        vm = self.vms.get(name)
        if vm is None:
            node = self.nodes[name]
            make = self.libvirt.vm if name in self.redfish else VM
            vm = self.vms[name] = make(name, node.mac, f"{self.guest_boot_url}/boot.ipxe", self.workdir / "vms",
                                       memory_mb=self.memory_mb)
        return vm

    def _watch_domain(self, name: str) -> None:
        """A Redfish node's power, as its BMC simulator would report it: the domain started (on),
        started anew (reset: the emulator's ForceRestart is destroy + create) or stopped (off).
        The harness's own starts (reset(), boot_vms()) are not events: LibvirtVM records them."""
        vm, last = self.vm(name), None
        while not self._stopping.is_set():
            with vm.lock:
                now = vm.domain_id()
                own = now in vm.harness_ids
            if last is not None and now != last and not own:
                if now != -1:  # the emulator's power-on or reset: the boot counts from here (±0.2 s)
                    vm.started_at = time.time()
                if now == -1:
                    self._on_power({"bmc": name, "action": "off", "boot": {}, "powered": True})
                else:
                    self._on_power({"bmc": name, "action": "on" if last == -1 else "reset",
                                    "boot": {"bootdev": "network"}, "powered": True})
            last = now
            self._stopping.wait(0.2)

    def stop(self) -> None:
        """VMs first (a boot in progress then stops waiting), then everything SimSite started."""
        self._stopping.set()
        for vm in self.vms.values():
            vm.cleanup()
        super().stop()
        if self.redfish_bmc:
            self.redfish_bmc.stop()
        if self.libvirt:
            self.libvirt.stop()

    def reset(self, **kwargs) -> None:
        """SimSite's reset (same keywords: roles=, policy=, ...), then every VM running the image
        of its role: a VM that already does is left alone (a boot costs seconds), the others are
        rebooted, in parallel."""
        self.wait_idle(self.boot_timeout + 30)
        super().reset(**kwargs)
        self.boot_vms()
        last = self.store.events(limit=1)
        self.first_event = last[-1].id + 1 if last else 0
        self.vm_boots.clear()

    def boot_vms(self, names: list[str] | None = None) -> None:
        """Boot the VMs that do not run the image of their node's role (directly, not over IPMI:
        this is the test's set-up, not something the balancer did)."""
        todo = {}
        for name in names or self.shared:
            vm, want = self.vm(name), self.nodes[name].role
            if vm.is_running() and self.running_role.get(name) == want:
                continue
            # As an admin's `provisioner power` does: the boot may fetch the overlay's secrets.
            self.store.grant_boot([name], actor="testbed", reason="test set-up boot")
            with vm.lock:
                self.running_role[name] = None
                mark = vm.serial_mark()
                vm.reset() if vm.is_running() else vm.start()
            todo[name] = (mark, want)
        for name, (mark, want) in todo.items():
            try:
                booted = self.wait_booted(name, mark)
            except VMError:  # one more reset, as the balancer's retry would do
                vm = self.vm(name)
                with vm.lock:
                    mark = vm.serial_mark()
                    vm.reset()
                booted = self.wait_booted(name, mark)
            if booted["role"] != want:
                raise AssertionError(f"{name} booted the {booted['role']} image, its role is {want}")

    # ----------------------------------------------------------------------- the VMs' boots

    def wait_booted(self, name: str, since: int, cancelled=lambda: False) -> dict:
        """Wait for the VM's console (after byte `since`) to show the image's boot line and the
        accepted callback. Returns {role, version, overlay, hostname, line, booted_at, callback_at}."""
        vm = self.vm(name)
        stop = lambda: cancelled() or self._stopping.is_set()  # noqa: E731
        booted = vm.wait_for_serial(self.booted_re.format(node=name), self.boot_timeout, since, stop)
        booted_at = time.time()
        called = vm.wait_for_serial(self.callback_re.format(node=name), self.boot_timeout, since + booted.end(), stop)
        if called.group("role") != booted.group("role"):
            raise VMError(f"{name}: console says it booted {booted.group('role')} but called back as "
                          f"{called.group('role')}")
        self.running_role[name] = booted.group("role")
        result = {"node": name, **booted.groupdict(), "line": booted.group(0).strip(), "booted_at": booted_at,
                  "callback_at": time.time(), "powered_at": vm.started_at}
        self.vm_boots.append(result)
        return result

    def _boot(self, node: SimNode, gen: int, event: dict) -> None:
        """A power event that boots (on, reset, cycle): the VM boots, for real."""
        record = {"node": node.name, "how": event["action"], "bootdev": event["boot"].get("bootdev"),
                  "started": time.time(), "ok": False, "vm": True}
        self.boots.append(record)
        with node.lock:
            node.role = None
        # The old OS is gone at once: its daemons stop answering.
        self.slurm.stop_slurmd(node.name)
        self.kube.power_off(node.name)
        vm = self.vm(node.name)
        try:
            with vm.lock:
                if not self._current(node, gen):
                    record["superseded"] = True
                    return
                self.running_role[node.name] = None
                mark = vm.serial_mark()
                if event.get("powered"):
                    pass  # its BMC (Redfish) powered it already
                elif vm.is_running():
                    vm.reset()
                else:
                    vm.start(netboot=event["boot"].get("bootdev") == "network")
            booted = self.wait_booted(node.name, mark, cancelled=lambda: not self._current(node, gen))
            role = booted["role"]
            record.update(role=role, version=booted["version"], serial=booted["line"], callback=200, ok=True)
            time.sleep(self.join_delay)
            if not self._current(node, gen):
                return
            self._join(node, role)
            record["joined"] = time.time()
        except VMError as exc:
            record["error"] = str(exc)
            if not self._stopping.is_set() and self._current(node, gen):  # fails the test (check())
                self.error(f"{node.name}: VM boot ({event['action']}): {exc}")
            if not vm.is_running() and self._current(node, gen) and not self._stopping.is_set():
                self.bmc.set_power(node.name, "off")  # the BMC reports what the machine does

    def _power_off(self, node: SimNode, gen: int, event: dict) -> None:
        vm = self.vms.get(node.name)
        if vm is not None:
            with vm.lock:
                if self._current(node, gen):
                    if not event.get("powered"):
                        vm.power_off()
                    self.running_role[node.name] = None
        super()._power_off(node, gen, event)

    # ----------------------------------------------------------------------- looking

    def console(self, name: str, since: int = 0) -> str:
        return self.vm(name).serial_text(since)


# The Debian images' provisioner-callback prints these once the root's services are up; not
# anchored: getty's login prompt on the same console often comes first on the line.
IMAGE_BOOTED_RE = (r"PROVISIONER-BOOTED node={node} role=(?P<role>\S+) version=(?P<version>\S+) "
                   r"failed_units=(?P<failed>\S+)")
IMAGE_CALLBACK_RE = CALLBACK_RE.lstrip("^")


class ImageVmSite(VmSite):
    """VmSite whose shared VMs boot the real images (images/slurm and k8s), which
    run their own daemons: the slurm image's slurmd registers with the test slurmctld, the k8s
    image's kubelet joins the real API server with a bootstrap token (TLS bootstrap, as at a
    site). Nothing of a node's work is played by the harness.

    What crosses qemu's user network: the guest reaches the host as 10.0.2.2 (boot server,
    slurmctld, kube-apiserver); the host reaches into a guest only through forwarded ports on
    127.0.0.1: its sshd (how the tests read a job's or a pod's own output) and its slurmd (the
    node's Port in slurm.conf, the same number on both sides, so slurmctld's NodeAddr=127.0.0.1
    reaches the VM). `image_root` must hold the slurm and k8s images, published."""

    host_daemons = False
    booted_re = IMAGE_BOOTED_RE
    callback_re = IMAGE_CALLBACK_RE

    def __init__(self, workdir: str | os.PathLike, image_root: str | os.PathLike, *, kube, memory_mb: int = 2048,
                 boot_timeout: float = 600, **kwargs):
        super().__init__(workdir, image_root, kube=kube, memory_mb=memory_mb, boot_timeout=boot_timeout, **kwargs)
        from testbed.process import free_port

        self.ssh_ports = {n: free_port() for n in self.shared}
        self.ssh_key = self.workdir / "ssh" / "id_ed25519"
        # The VMs' own host keys (provisioner/hostkeys.py, in their overlays), as
        # `provisioner ssh known-hosts` prints them: what ssh() and power.ssh check.
        self.known_hosts = self.workdir / "ssh" / "known_hosts"
        # Extra site.yaml fields per VM node (e.g. {"sn01": {"power_method": "kexec+ipmi"}}),
        # applied by write_config (reset() rewrites the config).
        self.node_fields: dict[str, dict] = {}
        self.bootstrap_token: str | None = None

    def start(self) -> "ImageVmSite":
        import subprocess

        self.ssh_key.parent.mkdir(parents=True, exist_ok=True)
        if not self.ssh_key.exists():
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "provisioner-tests",
                            "-f", str(self.ssh_key)], check=True)
        super().start()
        return self

    def write_config(self, policy: dict | None = None, power: dict | None = None,
                     kubernetes: dict | None = None) -> Path:
        path = super().write_config(policy, power, kubernetes)
        files = self.workdir / "overlay-files"
        files.mkdir(exist_ok=True)
        (files / "slurm.conf").write_text(self.slurm.guest_conf(GUEST_HOST))
        if self.bootstrap_token is None:
            self.bootstrap_token = self.kube.plane.bootstrap_token()
        (files / "bootstrap-token").write_text(self.bootstrap_token + "\n")
        (files / "bootstrap-token").chmod(0o600)
        data = yaml.safe_load(path.read_text())
        data["images"] = {"slurm": {"image": "slurm"}, "k8s": {"image": "k8s"}}
        data["overlay"] = {
            "files": {"slurm_conf": str(files / "slurm.conf"),
                      "munge_key": str(self.slurm.workdir / "munge" / "munge.key"),
                      "kube_ca": str(self.kube.plane.ca.cert),
                      "kube_bootstrap_token": str(files / "bootstrap-token"),
                      "ssh_authorized_keys": str(self.ssh_key) + ".pub"},
            "values": {"kube_api_server": f"https://{GUEST_HOST}:{self.kube.plane.port}"},
        }
        for entry in data["nodes"]:
            if entry["name"] in self.nodes:  # SSH reaches a VM through its forwarded port
                entry.update(ssh_host="127.0.0.1", ssh_port=self.ssh_ports[entry["name"]],
                             **self.node_fields.get(entry["name"], {}))
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(yaml.safe_dump(data, sort_keys=False))
        tmp.replace(path)
        self.write_known_hosts(path)
        return path

    def write_known_hosts(self, config: Path) -> None:
        """known_hosts for the VMs, from `provisioner ssh known-hosts` (which makes a node's key
        when it has none yet; the boot server's overlay then gives the VM that same key)."""
        import subprocess

        from testbed.boot_server import PROVISIONER
        from testbed.process import ROOT

        r = subprocess.run([*PROVISIONER, "--config", str(config), "ssh", "known-hosts", ",".join(self.shared)],
                           capture_output=True, text=True, cwd=ROOT, timeout=60)
        if r.returncode:
            raise RuntimeError(f"provisioner ssh known-hosts failed ({r.returncode}): {r.stderr.strip()}")
        self.known_hosts.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.known_hosts.with_name(self.known_hosts.name + ".tmp")
        tmp.write_text(r.stdout)
        tmp.replace(self.known_hosts)

    def vm(self, name: str) -> VM:
        vm = self.vms.get(name)
        if vm is None:
            node, port = self.nodes[name], self.slurm.node_ports[name]
            make = self.libvirt.vm if name in self.redfish else VM  # a Redfish node is a libvirt domain
            vm = self.vms[name] = make(name, node.mac, f"{self.guest_boot_url}/boot.ipxe", self.workdir / "vms",
                                       memory_mb=self.memory_mb, forwards={self.ssh_ports[name]: 22, port: port})
        return vm

    def reset(self, **kwargs) -> None:
        """VmSite's reset, then each shared node whose role is slurm back in service: its VM's own
        slurmd registered, and a DOWN or DRAIN left by an earlier test (a switch cut short) is
        lifted, as SimSite does for the slurmds it starts itself."""
        super().reset(**kwargs)
        for name in self.shared:
            if self.nodes[name].role != "slurm":
                continue
            # Responding (no "*"): its slurmd registered, and slurmctld has judged the boot
            # (a reboot it did not order is a DOWN of its own).
            self.slurm.wait_node_state(name, lambda s: "*" not in s and not s.startswith("UNKNOWN"),
                                       timeout=self.boot_timeout)
            if self.slurm.node_state(name) != "IDLE":
                self.slurm.run("scontrol", "update", f"nodename={name}", "state=resume", check=False)
            self.slurm.wait_node_state(name, lambda s: s == "IDLE", timeout=self.boot_timeout)

    def ssh(self, name: str, command: str, timeout: float = 60) -> str:
        """Run a command on the node (root, the key its overlay authorised); its stdout. The host
        key is checked against known_hosts: the node's own key, the same in both images."""
        import subprocess

        proc = subprocess.run(
            ["ssh", "-i", str(self.ssh_key), "-p", str(self.ssh_ports[name]), "-o", "BatchMode=yes",
             "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={self.known_hosts}",
             "-o", "GlobalKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
             "-o", "ConnectTimeout=10", "root@127.0.0.1", command],
            capture_output=True, text=True, timeout=timeout)
        if proc.returncode:
            raise VMError(f"ssh {name} {command!r}: exit {proc.returncode}: {proc.stderr.strip()[-500:]}")
        return proc.stdout


def build_images(image_root: str | os.PathLike, names: tuple[str, ...] = ("slurm", "k8s")) -> Path:
    """Build and publish the real images into image_root through the CLI, as an admin does (from
    the build cache, ~/.cache/provisioner/image-builds, after the first build on this machine:
    seconds; the first takes a few minutes each and needs root and mmdebstrap)."""
    import json
    import subprocess

    from testbed.boot_server import PROVISIONER
    from testbed.process import ROOT
    from testbed.site import write_site

    root = Path(image_root)
    config = write_site(root.parent / f"{root.name}-site", site={"image_root": str(root)},
                        images={"slurm": {"image": "slurm"}, "k8s": {"image": "k8s"}})
    for name in names:
        r = subprocess.run([*PROVISIONER, "--config", str(config), "image", "build", name, "--json"],
                           capture_output=True, text=True, cwd=ROOT, timeout=2400)
        if r.returncode or not json.loads(r.stdout or "{}").get("published"):
            raise RuntimeError(f"image build {name} failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
    return root

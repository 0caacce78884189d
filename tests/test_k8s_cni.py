"""The k8s image's pod network (files/etc/cni/net.d/10-provisioner-bridge.conflist) with Debian's
real CNI plugins from the bin_dir the image's containerd config names, called the way
containerd's CRI calls them for a pod: loopback, then the list's plugins in order with each one's
result passed on (ADD), and in reverse order (DEL). The node's side and the pod's side are two
network namespaces the test makes and deletes, so the machine's own network is not touched."""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import tomllib
import uuid
from pathlib import Path

import pytest

from provisioner.model import DEFAULT_IMAGE_DEFINITIONS
from tests.support import missing, require_binary

pytestmark = pytest.mark.integration

K8S_FILES = DEFAULT_IMAGE_DEFINITIONS / "k8s" / "files"
CONFLIST = K8S_FILES / "etc/cni/net.d/10-provisioner-bridge.conflist"
HOST_PORT, POD_PORT = 18080, 80


def cri_cni() -> dict:
    return tomllib.loads((K8S_FILES / "etc/containerd/config.toml").read_text())["plugins"][
        "io.containerd.grpc.v1.cri"]["cni"]


def ip(*args: str, ns: str | None = None) -> str:
    argv = ["ip", *(["netns", "exec", ns, "ip"] if ns else []), *args]
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=30).stdout


class Cni:
    """A pod's network set up and torn down as containerd's CRI does it (libcni's order)."""

    def __init__(self, bin_dir: Path, host_ns: str, pod_ns: str, data_dir: Path):
        self.bin_dir, self.host_ns, self.pod_ns, self.data_dir = bin_dir, host_ns, pod_ns, data_dir
        self.id = uuid.uuid4().hex

    def call(self, command: str, conf: dict) -> dict:
        plugin = self.bin_dir / conf["type"]
        if not os.access(plugin, os.X_OK):
            missing(f"the CNI plugin {plugin} (Debian's containernetworking-plugins)")
        env = {"CNI_COMMAND": command, "CNI_CONTAINERID": self.id, "CNI_NETNS": f"/run/netns/{self.pod_ns}",
               "CNI_IFNAME": "lo" if conf["type"] == "loopback" else "eth0", "CNI_PATH": str(self.bin_dir),
               "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
        res = subprocess.run(["ip", "netns", "exec", self.host_ns, str(plugin)], input=json.dumps(conf), env=env,
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, f"CNI {conf['type']} {command} failed: {res.stdout}{res.stderr}"
        return json.loads(res.stdout) if res.stdout.strip() else {}

    def confs(self, netlist: dict, prev: dict | None) -> list[dict]:
        out = []
        for plugin in netlist["plugins"]:
            conf = {**plugin, "cniVersion": netlist["cniVersion"], "name": netlist["name"]}
            if conf.get("ipam", {}).get("type") == "host-local":
                # the node keeps leases under /var/lib/cni (RAM on a node); here in the test's folder
                conf["ipam"] = {**conf["ipam"], "dataDir": str(self.data_dir)}
            if plugin.get("capabilities", {}).get("portMappings"):
                conf["runtimeConfig"] = {"portMappings": [
                    {"hostPort": HOST_PORT, "containerPort": POD_PORT, "protocol": "tcp"}]}
            if prev is not None:
                conf["prevResult"] = prev
            out.append(conf)
        return out

    def add(self, netlist: dict) -> dict:
        self.call("ADD", {"cniVersion": netlist["cniVersion"], "name": "cni-loopback", "type": "loopback"})
        result = None
        for plugin in netlist["plugins"]:
            result = self.call("ADD", self.confs({**netlist, "plugins": [plugin]}, result)[0])
        return result

    def delete(self, netlist: dict, result: dict) -> None:
        for conf in reversed(self.confs(netlist, result)):
            self.call("DEL", conf)
        self.call("DEL", {"cniVersion": netlist["cniVersion"], "name": "cni-loopback", "type": "loopback"})


@pytest.fixture
def namespaces():
    if os.geteuid() != 0:
        missing("root (network namespaces)")
    require_binary("ip")
    require_binary("iptables")
    tag = uuid.uuid4().hex[:8]
    names = (f"prov-node-{tag}", f"prov-pod-{tag}")
    run_netns = Path("/run/netns")
    had_run_netns = run_netns.exists()  # else `ip netns add` makes it, a mount point on itself
    made = []
    try:
        for n in names:
            ip("netns", "add", n)
            made.append(n)
        ip("link", "set", "lo", "up", ns=names[0])
        yield names
    finally:
        for n in made:
            subprocess.run(["ip", "netns", "delete", n], capture_output=True)
        assert not any((run_netns / n).exists() for n in names)
        if not had_run_netns and run_netns.is_dir() and not any(run_netns.iterdir()):
            subprocess.run(["umount", str(run_netns)], capture_output=True)
            run_netns.rmdir()


def test_debians_plugins_take_the_conflist_and_give_a_pod_its_network(namespaces, tmp_path):
    host_ns, pod_ns = namespaces
    netlist = json.loads(CONFLIST.read_text())
    cni = Cni(Path(cri_cni()["bin_dir"]), host_ns, pod_ns, tmp_path / "ipam")
    result = cni.add(netlist)

    # the pod: eth0 with an address from 10.88.0.0/16, the bridge as its default route, lo up
    (addr,) = result["ips"]
    iface = ipaddress.ip_interface(addr["address"])
    assert iface.network == ipaddress.ip_network("10.88.0.0/16") and addr["gateway"] == "10.88.0.1"
    pod = json.loads(ip("-j", "addr", "show", "eth0", ns=pod_ns))[0]
    assert any(a["local"] == str(iface.ip) for a in pod["addr_info"])
    assert "default via 10.88.0.1" in ip("route", ns=pod_ns)
    assert "UP" in json.loads(ip("-j", "link", "show", "lo", ns=pod_ns))[0]["flags"]
    # the node: cni0 is the gateway, and reaches the pod
    bridge = json.loads(ip("-j", "addr", "show", "cni0", ns=host_ns))[0]
    assert any(a["local"] == "10.88.0.1" for a in bridge["addr_info"])
    busybox = require_binary("busybox")
    ping = subprocess.run(["ip", "netns", "exec", host_ns, busybox, "ping", "-c", "1", "-W", "3", str(iface.ip)],
                          capture_output=True, text=True, timeout=30)
    assert ping.returncode == 0, f"the node cannot reach its pod at {iface.ip}: {ping.stdout}{ping.stderr}"
    # masquerading for traffic leaving the node, and the hostPort mapping (portmap)
    nat = subprocess.run(["ip", "netns", "exec", host_ns, "iptables", "-t", "nat", "-S"], check=True,
                         capture_output=True, text=True, timeout=30).stdout
    assert "MASQUERADE" in nat and f"--dport {HOST_PORT}" in nat and f"{iface.ip}:{POD_PORT}" in nat, nat

    cni.delete(netlist, result)
    assert not list((tmp_path / "ipam").rglob(str(iface.ip))), "host-local kept the pod's address"
    nat = subprocess.run(["ip", "netns", "exec", host_ns, "iptables", "-t", "nat", "-S"], check=True,
                         capture_output=True, text=True, timeout=30).stdout
    assert f"--dport {HOST_PORT}" not in nat and str(iface.ip) not in nat, nat

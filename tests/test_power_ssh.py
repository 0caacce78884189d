"""SSH power methods against the real sshd: graceful reboot, kexec (through a recording shim,
never a real kexec), the kexec+ipmi fallback, and host-key checking."""

from __future__ import annotations

import socket
import stat
from pathlib import Path

import pytest

from provisioner import config
from provisioner.boot.plan import BootPlanner
from provisioner.model import Site
from provisioner.power.ssh import kexec_argv
from provisioner.reconcile import power_nodes
from provisioner.store import Store
from provisioner.tokens import load_or_create_secret
from testbed.boot_server import BootServer
from testbed.site import mac, write_site
from tests.support import free_port

pytestmark = pytest.mark.integration

SEP = "\x1f"

# Installed in the sshd's PATH for the test only. Records each call's argv; on `-l` keeps copies
# of the kernel and initrd it was given, so the test can check what the node fetched.
SHIM = """#!/bin/sh
out={out}
{{ for a in "$@"; do printf '%s\\037' "$a"; done; printf '\\n'; }} >> "$out/{name}.calls"
if [ -e "$out/{name}.fail" ]; then echo "{name}: simulated failure" >&2; exit 1; fi
if [ "{name}" = kexec ] && [ "$1" = -l ]; then
    cp "$2" "$out/loaded-kernel"
    for a in "$@"; do case "$a" in --initrd=*) cp "${{a#--initrd=}}" "$out/loaded-initrd";; esac; done
fi
exit 0
"""


@pytest.fixture
def shims(sshd, tmp_path):
    """kexec and systemctl shims first on the sshd sessions' PATH; removed afterwards."""
    out = tmp_path / "shim-out"
    out.mkdir()
    made = []
    for name in ("kexec", "systemctl"):
        path = sshd.bin_dir / name
        path.write_text(SHIM.format(out=out, name=name))
        path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        made.append(path)
    try:
        yield out
    finally:
        for path in made:
            path.unlink(missing_ok=True)


def calls(out: Path, name: str) -> list[list[str]]:
    f = out / f"{name}.calls"
    if not f.exists():
        return []
    return [line.split(SEP)[:-1] for line in f.read_text().splitlines()]


def ssh_site(tmp_path, sshd, method: str, reboot_command: str = "true", bmc_port: int | None = None,
             boot_url: str = "http://127.0.0.1:8080", known_hosts: str | None = None, no_bmc: bool = False,
             **sections) -> Site:
    """One node sn01 whose SSH is the test sshd. Its BMC: bmc_port, or a port where nobody listens."""
    node = {"name": "sn01", "pool": "shared", "default_role": "slurm", "macs": [mac(1, 7)],
            "ip": "10.0.7.1", "ssh_host": "127.0.0.1", "ssh_port": sshd.port, "power_method": method,
            "bmc": {"address": "127.0.0.1", "port": bmc_port or free_port(socket.SOCK_DGRAM)}}
    if no_bmc:  # only non-shared nodes may lack a BMC
        node.update(pool="slurm", bmc=None)
        sections["defaults"] = {"bmc": None}
    path = write_site(
        tmp_path / "site", nodes=[node],
        site={"boot_url": boot_url, "listen": boot_url.split("//")[1]},
        power={"timeout_s": 3.0, "retries": 1,
               "ssh": {"user": "root", "key_file": sshd.key_file, "known_hosts": known_hosts or sshd.known_hosts,
                       "reboot_command": reboot_command, "timeout_s": 10}},
        **sections,
    )
    return config.load(path)


def test_ssh_reboot_runs_the_configured_command(tmp_path, sshd):
    marker = tmp_path / "rebooted"
    site = ssh_site(tmp_path, sshd, "ssh", reboot_command=f"echo \"reboot by $(id -un)\" > {marker}")
    store = Store(site.store)
    store.seed([("sn01", "slurm")])
    [res] = power_nodes(site, [site.nodes["sn01"]], "reset", store=store, actor="test")
    assert res.ok and res.method == "ssh", res
    assert marker.read_text() == "reboot by root\n"
    [ev] = [e for e in store.events(["sn01"]) if e.kind == "power"]
    assert ev.message == "power reset via ssh: ok" and ev.actor == "test"


def test_ssh_reboot_with_netboot_sets_the_bmc_first(tmp_path, sshd, bmcs):
    marker = tmp_path / "rebooted"
    site = ssh_site(tmp_path, sshd, "ssh", reboot_command=f"touch {marker}", bmc_port=bmcs.port("bn01"))
    [res] = power_nodes(site, [site.nodes["sn01"]], "reset", netboot=True)
    assert res.ok and res.netboot and marker.exists()
    st = bmcs.state("bn01")
    assert (st["bootdev"], st["persistent"]) == ("network", False) and st["actions"] == []  # no IPMI reset


def test_ssh_reboot_failure_is_reported(tmp_path, sshd):
    site = ssh_site(tmp_path, sshd, "ssh", reboot_command="echo no permission >&2; exit 4")
    [res] = power_nodes(site, [site.nodes["sn01"]], "reset")
    assert not res.ok and res.error_kind == "ssh"
    assert "exited with 4: no permission" in res.error


def test_unknown_host_key_is_refused(tmp_path, sshd):
    marker = tmp_path / "rebooted"
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    site = ssh_site(tmp_path, sshd, "ssh", reboot_command=f"touch {marker}", known_hosts=str(empty))
    [res] = power_nodes(site, [site.nodes["sn01"]], "reset")
    assert not res.ok and "unknown host key" in res.error
    assert not marker.exists()
    site = ssh_site(tmp_path / "2", sshd, "ssh", reboot_command=f"touch {marker}", known_hosts=sshd.other_known_hosts)
    [res] = power_nodes(site, [site.nodes["sn01"]], "reset")
    assert not res.ok and "host key CHANGED" in res.error
    assert not marker.exists()


@pytest.fixture
def boot_endpoint(tmp_path):
    """The project's real boot endpoint serving /images/ for the kexec tests."""
    port = free_port()
    servers = []

    def start(site_path: Path) -> BootServer:
        srv = BootServer(site_path, port, tmp_path / "boot.log", workers=1).start()
        servers.append(srv)
        return srv

    start.port = port
    try:
        yield start
    finally:
        for srv in servers:
            srv.stop()


def two_initrd_images(folder: Path) -> dict:
    (folder / "images" / "k8s").mkdir(parents=True, exist_ok=True)
    (folder / "images" / "k8s" / "extra.img").write_bytes(b"second initrd\n")
    return {"k8s": {"version": "7", "kernel": "k8s/vmlinuz", "initrds": ["k8s/initrd.img", "k8s/extra.img"],
                    "cmdline": "console=ttyS0 quiet"}}


def test_kexec_fetches_the_role_image_and_runs_the_exact_command(tmp_path, sshd, shims, boot_endpoint):
    url = f"http://127.0.0.1:{boot_endpoint.port}"
    site = ssh_site(tmp_path, sshd, "kexec", boot_url=url, images=two_initrd_images(tmp_path / "site"))
    boot_endpoint(site.path)
    store = Store(site.store)
    store.seed([("sn01", "slurm")])
    store.set_role(["sn01"], "k8s", actor="test", reason="test", pin=True)
    [res] = power_nodes(site, [site.nodes["sn01"]], "boot", store=store, actor="test")
    assert res.ok and res.method == "kexec", res

    plan = BootPlanner(site, load_or_create_secret(site.secret_file), store).plan("sn01")
    assert plan.role == "k8s"
    load, execute = calls(shims, "kexec")
    assert load[0] == "-l" and load[1].endswith("/kernel")
    assert load[2].startswith("--initrd=") and load[2].endswith("/initrd")
    assert load[3] == f"--append={plan.args}"
    assert "provisioner.role=k8s" in load[3] and "provisioner.token=" in load[3]
    assert execute == ["-e"]  # no systemd here; the systemctl shim is a guard
    assert calls(shims, "systemctl") == []
    # The node got exactly the k8s image from the boot endpoint; the initrds concatenated.
    assert (shims / "loaded-kernel").read_text() == "k8s kernel\n"
    assert (shims / "loaded-initrd").read_bytes() == b"k8s initrd\nsecond initrd\n"
    [ev] = [e for e in store.events(["sn01"]) if e.kind == "power"]
    assert ev.message == "power boot via kexec: ok"


def test_kexec_argv_quotes_nothing_into_the_shell(tmp_path, sshd):
    site = ssh_site(tmp_path, sshd, "kexec")
    node = site.nodes["sn01"]
    argv = kexec_argv(BootPlanner(site, b"x" * 32).plan(node, "slurm"), node.macs[0])
    assert argv[:2] == ["sh", "-c"] and argv[3] == "provisioner-kexec"
    assert argv[4] == "http://127.0.0.1:8080/images/slurm/vmlinuz"
    assert argv[6:] == ["http://127.0.0.1:8080/images/slurm/initrd.img"]


def test_kexec_failure_falls_back_to_ipmi_netboot(tmp_path, sshd, shims, bmcs, boot_endpoint):
    url = f"http://127.0.0.1:{boot_endpoint.port}"
    site = ssh_site(tmp_path, sshd, "kexec+ipmi", boot_url=url, bmc_port=bmcs.port("bn02"))
    boot_endpoint(site.path)
    (shims / "kexec.fail").write_text("")
    bmcs.set_power("bn02", "on")
    [res] = power_nodes(site, [site.nodes["sn01"]], "reset")
    assert res.ok and res.method == "kexec->ipmi" and res.netboot and res.state == "on", res
    assert "kexec failed" in res.note and "simulated failure" in res.note
    boot = bmcs.state("bn02")["boots"][-1]
    assert (boot["how"], boot["bootdev"], boot["persistent"]) == ("reset", "network", False)


def test_kexec_without_fallback_fails(tmp_path, sshd, shims, boot_endpoint):
    url = f"http://127.0.0.1:{boot_endpoint.port}"
    site = ssh_site(tmp_path, sshd, "kexec", boot_url=url)
    boot_endpoint(site.path)
    (shims / "kexec.fail").write_text("")
    [res] = power_nodes(site, [site.nodes["sn01"]], "reset")
    assert not res.ok and res.error_kind == "ssh" and "simulated failure" in res.error


def test_kexec_when_the_image_is_missing_on_the_endpoint(tmp_path, sshd, shims, boot_endpoint):
    url = f"http://127.0.0.1:{boot_endpoint.port}"
    site = ssh_site(tmp_path, sshd, "kexec", boot_url=url)
    boot_endpoint(site.path)
    (site.image_root / "slurm" / "vmlinuz").unlink()
    [res] = power_nodes(site, [site.nodes["sn01"]], "reset")
    assert not res.ok and "exited with" in res.error
    assert calls(shims, "kexec") == []  # nothing was loaded, nothing executed


def test_status_and_on_use_the_bmc_even_for_ssh_methods(tmp_path, sshd, bmcs):
    site = ssh_site(tmp_path, sshd, "kexec+ipmi", bmc_port=bmcs.port("bn03"))
    [res] = power_nodes(site, [site.nodes["sn01"]], "on")
    assert res.ok and res.method == "ipmi" and res.state == "on"
    site = ssh_site(tmp_path / "nobmc", sshd, "ssh", no_bmc=True)
    [res] = power_nodes(site, [site.nodes["sn01"]], "status")
    assert not res.ok and res.error_kind == "config" and "has no BMC" in res.error


def test_kexec_into_a_built_image_brings_the_node_overlay(tmp_path, tiny_image):
    """iPXE loads the overlay with ${netX/mac}; over SSH the node's own MAC stands in."""
    from testbed.tinyimage import clone_root, tiny_site

    from provisioner import config

    site = config.load(tiny_site(tmp_path / "site", clone_root(tiny_image, tmp_path / "root")))
    node = site.nodes["sn01"]
    argv = kexec_argv(BootPlanner(site, b"x" * 32).plan(node, "k8s"), node.macs[0])
    overlay = [a for a in argv[6:] if "/overlay/" in a]
    assert len(overlay) == 1 and "${" not in overlay[0]
    assert overlay[0].startswith(f"{site.boot_url}/overlay/sn01.cpio.gz?") and f"mac={node.macs[0]}" in overlay[0]

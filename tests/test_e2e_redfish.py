"""End to end by Redfish: the balancer switches a VM between the slurm and the k8s image, powering
it through sushy-tools' emulator (libvirt driver), which drives the VM as a domain of our libvirtd
(qemu, TCG). The same world as tests/test_e2e_vm.py (testbed/vm_site.py VmSite, the tiny image,
the real SLURM cluster and Kubernetes control plane), with node names of its own: cn21 fixed
SLURM, sn21 the shared VM (Redfish), kn21 fixed Kubernetes."""

from __future__ import annotations

import json
import os
import re

import pytest

from provisioner import images
from testbed.redfish_bmc import PASSWORD
from testbed.vm_site import VmSite
from tests.fixtures.slurm_cluster import require_slurm
from tests.fixtures.vms import require_vm_parts, running, switch_back_to_slurm

pytestmark = [pytest.mark.slow, pytest.mark.integration]

SWITCH_TIMEOUT_S = 240  # one switch: drain or cordon, a Redfish reset, a TCG boot (~12 s idle), join


@pytest.fixture(scope="module")
def redfish_site(tmp_path_factory, vm_image_root, kube_cluster):
    require_vm_parts()
    site = VmSite(require_slurm(tmp_path_factory.mktemp("redfish-site")), vm_image_root, kube=kube_cluster,
                  fixed="cn21", shared="sn21", fixed_k8s="kn21", redfish=("sn21",))
    with running(site):
        yield site


def _alive(pid: int | None) -> bool:
    return bool(pid) and os.path.exists(f"/proc/{pid}")


def test_balancer_switches_a_vm_by_redfish_to_k8s_and_back(redfish_site):
    sim = redfish_site
    sim.reset()
    vm = sim.vm("sn21")
    current = images.current(sim.image_root, "tiny")
    first_qemu = vm.qemu_pid()

    # Kubernetes demand: kn21 is full, two pods are Unschedulable.
    sim.kube.add_pod("big-21", node="kn21", requests={"cpu": "1", "memory": "128Mi"})
    for i in range(2):
        sim.kube.add_pod(f"rf-web-{i}", namespace="rf")
        sim.kube.wait_unschedulable(f"rf-web-{i}", "rf")
    mark = vm.serial_mark()

    def pods_on_sn21():
        pods = [p for p in sim.kube.pods() if p["metadata"]["name"].startswith("rf-web")]
        return all(p["spec"].get("nodeName") == "sn21" and p["status"].get("phase") == "Running" for p in pods)

    reports = sim.passes_until(lambda: pods_on_sn21() and sim.state("sn21").phase == "steady",
                               timeout=SWITCH_TIMEOUT_S, what="the pods to run on sn21, and the switch to end")
    moves = [(m["node"], m["to"]) for r in reports for m in r["moves"]]
    assert moves == [("sn21", "k8s")], json.dumps(reports, indent=1)[-3000:]
    console = sim.console("sn21", mark)
    assert re.search(rf"^PROVISIONER-BOOTED node=sn21 role=k8s version={current} overlay=yes", console, re.M)
    assert sim.state("sn21").booted_role == "k8s"
    # The reboot went by Redfish: the power event says so, and the emulator shows the override.
    power = [e for e in sim.store.events(["sn21"]) if e.kind == "power" and e.id >= sim.first_event]
    assert power and all(e.data.get("protocol") == "redfish" and e.data.get("method") == "redfish" for e in power), \
        [(e.message, e.data) for e in power]
    assert sim.redfish_bmc.system(vm.uuid)["Boot"]["BootSourceOverrideTarget"] == "Pxe"
    # The real parts are alive: the emulator, libvirtd (ours, when we started it) and the
    # domain's qemu, a new one (the emulator's ForceRestart is destroy + create).
    parts = {"sushy-emulator": sim.redfish_bmc.pid, "qemu-system-x86_64": vm.qemu_pid(),
             **{k: v for k, v in sim.libvirt.pids().items() if k == "libvirtd"}}
    assert all(_alive(p) for p in parts.values()) and parts["qemu-system-x86_64"] != first_qemu, parts

    # And back: the pods finish; SLURM demand (cn21 busy, one job Pending).
    switch_back_to_slurm(sim, "sn21", [("rf", f"rf-web-{i}") for i in range(2)], current, SWITCH_TIMEOUT_S)
    assert sim.slurm.running("slurmd:sn21")
    assert not sim.violations, sim.violations

    # No BMC password anywhere: events, the passes' reports, the boot server's and emulator's logs.
    seen = "\n".join([json.dumps(reports), *(f"{e.message} {json.dumps(e.data)}" for e in sim.store.events()),
                      *(p.read_text(errors="replace") for p in sim.workdir.rglob("*.log"))])
    assert PASSWORD not in seen
    sim.slurm.scancel_all()


def test_a_pinned_version_boots_by_redfish_as_by_ipmi_and_kexec(redfish_site):
    """sn21 pinned to an older version of its image: booted by Redfish it runs exactly the boot
    plan that the IPMI path's iPXE script and the kexec path's command line are made from
    (tests/test_boot_plan.py checks those two against the same plan)."""
    from provisioner import config
    from provisioner.boot.plan import BootPlanner
    from provisioner.tokens import load_or_create_secret
    from testbed.tinyimage import CACHE, DEFINITIONS
    from testbed.wait import wait_for

    sim = redfish_site
    sim.reset()
    root = sim.image_root
    pinned = images.current(root, "tiny")
    newer = images.build(DEFINITIONS, root, "tiny", cache=CACHE, publish=True, actor="test").version
    assert newer != pinned
    try:
        sim.store.pin_image(["sn21"], "tiny", pinned, actor="test", reason="rollback")
        site = config.load(sim.config)
        plan = BootPlanner(site, load_or_create_secret(site.secret_file), sim.store).plan(site.nodes["sn21"])
        assert plan.version == pinned
        vm, n_boots, mark = sim.vm("sn21"), len(sim.boots), sim.vm("sn21").serial_mark()
        r = sim.cli("power", "sn21", "boot", "--netboot", "--json")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)[0]["protocol"] == "redfish"
        wait_for(lambda: len(sim.boots) > n_boots and (sim.boots[-1].get("ok") or sim.boots[-1].get("error")),
                 sim.boot_timeout + 10, "sn21 to boot")
        assert sim.boots[-1]["ok"] and sim.boots[-1]["version"] == pinned, sim.boots[-1]
        console = sim.console("sn21", mark)
        wanted = [u.replace(site.boot_url, sim.guest_boot_url) for u in (plan.kernel_url, *plan.initrd_urls)]
        assert all(u in console for u in wanted), (wanted, console[-2000:])
        assert {u for u in re.findall(r"(http://\S+/images/\S+?)\.\.\.", console)} <= set(wanted)
        line = re.search(r"Command line: (.*)", console).group(1)
        assert all(a in line.split() for a in plan.args.split() if not a.startswith("provisioner.token")), line
        assert sim.state("sn21").booted_version == pinned
    finally:
        sim.store.unpin_image(["sn21"], "tiny", actor="test", reason="done")
        images.publish(root, "tiny", pinned)

"""End to end, with real VMs: qemu (TCG) network-boots through Debian's iPXE ROM from the real
`provisioner serve`, powered through the BMC simulators over IPMI, and the balancer switches a VM
from the SLURM role to the Kubernetes role and back, driven only by pending work in the real SLURM
cluster and in a real Kubernetes control plane.

What runs, exactly: both roles boot the same TINY image (images/tiny: a kernel
and a busybox initramfs, no slurmd, no kubelet); what differs per role is the kernel command line,
the overlay and the callback, which the console and the boot server prove. Once the VM's callback
is accepted, the HARNESS plays the role's daemon: a real slurmd on the host (slurm) or a simulated
kubelet (k8s). The real Debian images, with their own slurmd and kubelet, are booted only by
tests/test_e2e_images.py.

The world is tests/fixtures/vms.py's VmSite (one session; VMs reused between tests): cn11 fixed
SLURM node, sn11 a shared node that is a VM, kn11 fixed Kubernetes node.
"""

from __future__ import annotations

import json
import re
import shutil
import threading
import time
import urllib.error
import urllib.request

import pytest

from provisioner import config, images
from provisioner.boot import overlay
from provisioner.tokens import load_or_create_secret
from testbed.wait import wait_for
from testbed.tinyimage import CACHE, DEFINITIONS
from testbed.vm import VM
from tests.fixtures.vms import switch_back_to_slurm

pytestmark = [pytest.mark.slow, pytest.mark.integration]

SWITCH_TIMEOUT_S = 240  # one switch: drain or cordon, IPMI reset, a TCG boot (~12 s idle), join


def fetched_urls(console: str) -> list[str]:
    """The URLs iPXE reports as fetched (`http://...... ok`), in order."""
    # On a slow download iPXE shows its progress on the same line first (digits, %, backspaces).
    return re.findall(r"(http://\S+?)\.\.\.[^\n]*? ok\b", console)


def cmdline(console: str) -> dict[str, str]:
    m = re.search(r"Command line: (.*)", console)
    assert m, "no kernel command line on the console"
    return dict(w.split("=", 1) for w in m.group(1).split() if "=" in w)


def boot_events(sim, name: str) -> list:
    return [e for e in sim.events([name], kinds=["booted"])]


def test_vm_boots_the_image_its_role_says(e2e_site):
    sim = e2e_site()  # sn11 in SLURM; its VM runs the slurm image
    vm = sim.vm("sn11")
    current = images.current(sim.image_root, "tiny")

    # Off, then on with a one-time network boot, through IPMI, as an admin does.
    off = sim.cli("power", "sn11", "off")
    assert off.returncode == 0, off.stderr
    wait_for(lambda: not vm.is_running(), 20, "the VM to power off")
    wait_for(lambda: not sim.slurm.running("slurmd:sn11"), 20, "sn11's slurmd to stop with its VM")
    mark = vm.serial_mark()
    on = sim.cli("power", "sn11", "on", "--netboot")
    assert on.returncode == 0, on.stderr
    wait_for(lambda: any(b.get("ok") or b.get("error") for b in sim.boots), sim.boot_timeout + 10, "sn11 to boot")
    record = sim.boots[-1]
    assert record["ok"], record
    assert (record["how"], record["bootdev"], record["role"]) == ("on", "network", "slurm")

    console = sim.console("sn11", mark)
    # iPXE asked the boot server for its own script, by MAC, then fetched what it named.
    urls = fetched_urls(console)
    assert urls[:2] == [f"{sim.guest_boot_url}/boot.ipxe", f"{sim.guest_boot_url}/ipxe"], urls
    assert f"provisioner: sn11 -> slurm image {current}" in console
    assert [u.rsplit("/", 1)[1] for u in urls[2:4]] == ["vmlinuz", "initramfs.img"]
    assert all(f"/images/tiny/{current}/" in u for u in urls[2:4]), urls
    assert urls[4].startswith(f"{sim.guest_boot_url}/overlay/sn11.cpio.gz"), urls
    args = cmdline(console)
    assert (args["provisioner.node"], args["provisioner.role"], args["provisioner.version"]) == ("sn11", "slurm", current)
    # The image's /init: the role and version it was given, the node's overlay (its hostname).
    assert re.search(rf"^PROVISIONER-BOOTED node=sn11 role=slurm version={current} overlay=yes hostname=sn11 ",
                     console, re.M), console[-2000:]
    assert f"PROVISIONER-CALLBACK-OK node=sn11 role=slurm version={current}" in console
    # An admin-requested boot: /init fetched the overlay's secret part, once; the token on the
    # kernel command line (readable by every user of the node) was spent by the callback.
    assert "PROVISIONER-SECRETS node=sn11 yes" in console
    assert len(sim.events(["sn11"], kinds=["secrets-served"])) == 1
    secrets_url = f"{args['provisioner.secrets'].replace(sim.guest_boot_url, sim.boot.url)}?token={args['provisioner.token']}"
    try:
        urllib.request.urlopen(secrets_url, timeout=10)
        raise AssertionError("the spent token still opens the secrets")
    except urllib.error.HTTPError as exc:
        assert exc.code == 403
    # A user of the booted node (nobody, from the image's after-boot script) gets nothing: not the
    # file, not the secret part with the token from /proc/cmdline nor with a new script's.
    wait_for(lambda: "USER-ATTACK" in sim.console("sn11", mark), 60, "the user's attempt on sn11")
    console = sim.console("sn11", mark)
    assert "AFTER-BOOT: USER-ATTACK uid=65534 file=denied cmdline-token=403 fresh-token=403 spent-callback=403" \
        in console, console[-3000:]
    # The callback, as the boot server recorded it.
    state = sim.state("sn11")
    assert (state.booted_role, state.booted_version) == ("slurm", current)
    assert state.booted_at >= record["started"]
    (event,) = boot_events(sim, "sn11")
    assert event.actor == "node:sn11" and event.data["role"] == "slurm"
    # The harness started sn11's real slurmd when the callback said slurm: SLURM serves it.
    wait_for(lambda: sim.in_slurm("sn11"), 60, "sn11 to register with slurmctld")
    assert sim.slurm.wait_job_running(sim.slurm.sbatch(nodelist="sn11"), 60) == "sn11"
    sim.slurm.scancel_all()


def test_balancer_switches_a_vm_to_k8s_and_back(e2e_site):
    sim = e2e_site()
    vm = sim.vm("sn11")
    current = images.current(sim.image_root, "tiny")

    # Kubernetes demand: kn11 is full, two pods are Unschedulable.
    sim.kube.add_pod("big-0", node="kn11", requests={"cpu": "1", "memory": "128Mi"})
    for i in range(2):
        sim.kube.add_pod(f"web-{i}", namespace="ml")
    for i in range(2):
        sim.kube.wait_unschedulable(f"web-{i}", "ml")
    mark = vm.serial_mark()

    def pods_on_sn11():
        pods = [p for p in sim.kube.pods() if p["metadata"]["name"].startswith("web")]
        return all(p["spec"].get("nodeName") == "sn11" and p["status"].get("phase") == "Running" for p in pods)

    # The scheduler binds the pods on the kubelet's Ready, maybe a pass before the balancer records
    # the switch done (seen in CI): wait for both.
    reports = sim.passes_until(lambda: pods_on_sn11() and sim.state("sn11").phase == "steady",
                               timeout=SWITCH_TIMEOUT_S, what="the pods to run on sn11, and the switch to end")
    moves = [(m["node"], m["to"]) for r in reports for m in r["moves"]]
    assert moves == [("sn11", "k8s")], json.dumps(reports, indent=1)[-3000:]
    steps = [s["action"] for r in reports for s in r["steps"] if s["node"] == "sn11"]
    assert steps[0] == "requested" and steps[-1] == "done" and "booting" in steps, steps
    # Which image booted: the console and the callback say k8s.
    console = sim.console("sn11", mark)
    assert re.search(rf"^PROVISIONER-BOOTED node=sn11 role=k8s version={current} overlay=yes", console, re.M)
    assert cmdline(console)["provisioner.role"] == "k8s"
    assert "PROVISIONER-SECRETS node=sn11 yes" in console  # the switch's boot window
    assert sim.state("sn11").booted_role == "k8s" and sim.state("sn11").phase == "steady"
    assert [b["role"] for b in sim.boots if b.get("ok")] == ["k8s"]
    assert sim.bmc_actions("sn11") == ["reset"]
    assert sim.serving("sn11") == {"k8s"}
    view = sim.slurm_view("sn11")
    assert view.down and view.reason == "k8s_connect"
    assert not sim.slurm.running("slurmd:sn11")

    # And back: the pods finish; SLURM demand (cn11 busy, one job Pending).
    console = switch_back_to_slurm(sim, "sn11", [("ml", f"web-{i}") for i in range(2)], current, SWITCH_TIMEOUT_S)
    assert cmdline(console)["provisioner.role"] == "slurm"
    assert "PROVISIONER-SECRETS node=sn11 yes" in console
    assert [e.data["role"] for e in boot_events(sim, "sn11")] == ["k8s", "slurm"]
    # The job runs on the real slurmd the harness started for sn11 when the callback said slurm.
    assert sim.slurm.running("slurmd:sn11")
    kn = sim.kube.node("sn11")
    assert kn["spec"].get("unschedulable") and kn["metadata"]["labels"]["sched"] == "slurm"


def test_publishing_new_versions_while_a_vm_boots(e2e_site):
    """While the VM boots, a rebuild runs and the current version flips between two complete
    versions every few milliseconds: the VM gets one version's files, all of them, and boots."""
    sim = e2e_site()
    vm = sim.vm("sn11")
    root = sim.image_root
    first = images.current(root, "tiny")
    second = images.build(DEFINITIONS, root, "tiny", cache=CACHE, publish=False, actor="test").version
    flips = [0]
    stop = threading.Event()

    def flip():
        while not stop.is_set():
            images.publish(root, "tiny", second if flips[0] % 2 == 0 else first)
            flips[0] += 1
            time.sleep(0.005)

    flipper = threading.Thread(target=flip, daemon=True)
    mark = vm.serial_mark()
    n_boots = len(sim.boots)
    try:
        flipper.start()
        r = sim.cli("power", "sn11", "boot", "--netboot")
        assert r.returncode == 0, r.stderr
        rebuild = sim.cli("image", "build", "tiny", "--cache", str(CACHE))  # a whole build meanwhile
        assert rebuild.returncode == 0, rebuild.stderr
        third = re.search(r"^tiny (\S+): published", rebuild.stdout, re.M).group(1)
        wait_for(lambda: len(sim.boots) > n_boots and (sim.boots[-1].get("ok") or sim.boots[-1].get("error")),
                 sim.boot_timeout + 10, "sn11 to boot")
    finally:
        stop.set()
        flipper.join(10)
    record = sim.boots[-1]
    assert record["ok"], record
    assert flips[0] > 100
    version = record["version"]
    assert version in (first, second, third)
    console = sim.console("sn11", mark)
    # Every file iPXE fetched was from the version its script named; the kernel got that version
    # on its command line, and the image's init called back with it.
    files = [u for u in fetched_urls(console) if "/images/" in u]
    assert len(files) == 2 and all(f"/images/tiny/{version}/" in u for u in files), files
    assert cmdline(console)["provisioner.version"] == version
    assert sim.state("sn11").booted_version == version
    # The files of every version are still exactly what their manifests say.
    for v in (first, second, third):
        for fname, f in images.get(root, "tiny", v).manifest["files"].items():
            assert (root / "tiny" / v / fname).stat().st_size == f["size"]
    images.publish(root, "tiny", first)


def test_a_vm_cannot_fetch_another_nodes_overlay(e2e_site):
    """A machine with cn11's NIC asks for sn11's overlay, from inside a VM through iPXE: with
    sn11's token (refused: not sn11's MAC) and with cn11's own overlay token and sn11's MAC
    spelled out (refused: not sn11's token). The control, sn11's token and MAC, is served."""
    sim = e2e_site()
    site = config.load(sim.config)
    secret = load_or_create_secret(site.secret_file)
    sn11, cn11 = site.nodes["sn11"], site.nodes["cn11"]
    version = images.current(sim.image_root, "tiny")
    # sn11's own boot got its overlay (its hostname came from it).
    assert re.search(r"^PROVISIONER-BOOTED node=sn11 .*overlay=yes hostname=sn11 ", sim.console("sn11"), re.M)

    base = f"{sim.guest_boot_url}/overlay/sn11.cpio.gz?image=tiny&version={version}"
    tries = {
        "1": f"{base}&token={overlay.token(secret, 'sn11')}&mac=${{netX/mac}}",  # its own MAC is cn11's
        "2": f"{base}&token={overlay.token(secret, 'cn11')}&mac={sn11.macs[0]}",
        "3": f"{base}&token={overlay.token(secret, 'sn11')}&mac={sn11.macs[0]}",  # control
    }
    lines = ["#!ipxe"] + [f"initrd --name try{k} {u} && echo THIEF-GOT-{k} || echo THIEF-REFUSED-{k}"
                          for k, u in tries.items()] + ["echo THIEF-DONE", "sleep 600"]
    folder = sim.image_root / "thief"
    folder.mkdir(exist_ok=True)
    (folder / "steal.ipxe").write_text("\n".join(lines) + "\n")
    thief = VM("thief", cn11.macs[0], f"{sim.guest_boot_url}/images/thief/steal.ipxe", sim.workdir / "vms")
    try:
        thief.start()
        thief.wait_for_serial(r"THIEF-DONE", sim.boot_timeout)
        console = thief.serial_text()
    finally:
        thief.cleanup()
        shutil.rmtree(folder)
    assert "THIEF-REFUSED-1" in console and "THIEF-REFUSED-2" in console, console[-2000:]
    assert "THIEF-GOT-1" not in console and "THIEF-GOT-2" not in console
    assert "THIEF-GOT-3" in console, console[-2000:]
    refused = [e.message for e in sim.events(["sn11"], kinds=["overlay-refused"])]
    assert any(f"MAC {cn11.macs[0]} is not one of this node's" in m for m in refused), refused
    assert any("wrong or no overlay token" in m for m in refused), refused
    # The refusal carries nothing of the overlay: the same request from the host gets a 403
    # with a one-line reason and no archive.
    url = tries["2"].replace(sim.guest_boot_url, sim.boot.url)
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(url, timeout=10)
    assert err.value.code == 403
    body = json.loads(err.value.read())
    assert body == {"ok": False, "error": "overlay of sn11 refused: wrong or no overlay token"}

"""End to end on the real images: a shared node is a qemu VM that network-boots the Debian slurm
image or the Debian k8s image (images/), and the balancer moves it between the
two on real pending work. Nothing of the node's work is played by the harness: the slurm image's
own slurmd registers with the test slurmctld and runs the batch job; the k8s image's own kubelet
joins the real API server with the client certificate provisioner had signed before the reboot
(from the overlay's secret part; checked: no TLS bootstrap happened), containerd runs the pod
from the locally built images. The test reads the job's and the pod's own output on the
node, over SSH (the key the overlay authorised).

World (testbed/vm_site.py ImageVmSite): cn31 a fixed SLURM node (a slurmd on the host), kn31 a
fixed Kubernetes node (a simulated kubelet), sn31 the shared VM. The first test's Kubernetes
demand is a Job queued in Kueue's real controller manager, its ProvisioningRequest served by
provisioner; the kexec test's is an Unschedulable pod.
"""

from __future__ import annotations

import base64
import json
import os
import re
import time
from pathlib import Path

import pytest

from provisioner.provisioning_demand import NODE_LABEL
from testbed.vm_site import REAL_POLICY, ImageVmSite, build_images
from testbed.wait import wait_for
from tests.fixtures.kueue import EXAMPLE, JOBS, NS, PRS, cond, delete_kueue_work
from tests.fixtures.slurm_cluster import require_slurm
from tests.fixtures.vms import require_vm_parts, running
from tests.support import missing, require_binary

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(3600)]

SWITCH_TIMEOUT_S = 900  # drain, IPMI reset, iPXE, the squashfs into RAM, systemd under TCG, join
KEXEC_RE = r"kexec_core: Starting new kernel|Rebooting with kexec"  # the kernel's or systemd's line


@pytest.fixture(scope="module")
def real_image_root(tmp_path_factory) -> Path:
    """The slurm and k8s images, built by the CLI into a private image root (from the build
    cache after the first build on this machine: seconds)."""
    if os.geteuid() != 0:
        missing("root (mmdebstrap --mode=root builds the Debian images)")
    for tool in ("mmdebstrap", "mksquashfs"):
        require_binary(tool)
    return build_images(tmp_path_factory.mktemp("real-images") / "root")


@pytest.fixture(scope="module")
def image_world(tmp_path_factory, real_image_root, kube_cluster):
    require_vm_parts()
    require_binary("ssh")
    site = ImageVmSite(require_slurm(tmp_path_factory.mktemp("image-site")), real_image_root, kube=kube_cluster,
                       fixed="cn31", shared="sn31", fixed_k8s="kn31", policy=REAL_POLICY)
    with running(site):
        yield site


@pytest.fixture
def image_site(image_world):
    """The module's world; the test fails on what the harness saw go wrong."""
    yield image_world
    image_world.check(image_world.boot_timeout + 30)


def _switch_times(sim: ImageVmSite, node: str) -> list[tuple[str, float]]:
    """(how, seconds) per switch since the last reset: the power action's event to the image's
    boot callback (`booted`), from the store. Printed, never asserted (rule 5)."""
    out, power = [], None
    for e in sim.store.events([node]):
        if e.id < sim.first_event:
            continue
        if e.kind == "power":
            power = e
        elif e.kind == "booted" and power is not None:
            out.append(((power.data or {}).get("method") or "?", round(e.ts - power.ts, 1)))
            power = None
    return out


def _job_output(sim: ImageVmSite, job: str, path: str) -> str:
    wait_for(lambda: sim.slurm.job_state(job) == ("", ""), 300, f"job {job} to finish")
    return sim.ssh("sn31", f"cat {path}").strip()


def _exe(pid: int) -> str:
    """The name a process was started by (argv[0]: Debian's slurmctld is an alternatives link
    to slurmctld-wlm, which /proc/PID/exe would show)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return os.path.basename(f.read().split(b"\0", 1)[0].decode())
    except OSError:  # gone meanwhile
        return ""


def _pod(name: str) -> dict:
    """A pod only sn31 can take (kn31 is full): the locally built busybox image, printing the
    node it runs on, then staying Running."""
    return {"metadata": {"name": name, "namespace": "default"},
            "spec": {"containers": [{
                "name": "main", "image": "provisioner.local/busybox:1", "imagePullPolicy": "Never",
                "command": ["sh", "-c", "echo pod-ran-on-$NODE_NAME; exec sleep 3600"],
                "env": [{"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}],
                "resources": {"requests": {"cpu": "100m", "memory": "32Mi"}}}],
                "terminationGracePeriodSeconds": 2, "automountServiceAccountToken": False}}


def _to_k8s(sim: ImageVmSite, pod: str) -> str:
    """Kubernetes demand (kn31 full, the pod Unschedulable) until the pod runs on sn31 in the k8s
    image; returns sn31's console since the switch began. Checks the move, the boot, the pod's
    own output on the node."""
    sim.kube.add_pod("big-0", node="kn31", requests={"cpu": "1", "memory": "128Mi"})
    sim.kube.api.create("/api/v1/namespaces/default/pods", _pod(pod))
    sim.kube.wait_unschedulable(pod, "default")
    mark, since = sim.vm("sn31").serial_mark(), time.time()

    def running() -> bool:
        p = sim.kube.pod(pod)
        return p["spec"].get("nodeName") == "sn31" and p["status"].get("phase") == "Running"

    reports = sim.passes_until(running, timeout=SWITCH_TIMEOUT_S, what=f"pod {pod} to run on sn31")
    moves = [(m["node"], m["to"]) for r in reports for m in r["moves"]]
    assert moves == [("sn31", "k8s")], json.dumps(reports, indent=1)[-3000:]
    console = sim.console("sn31", mark)
    assert re.search(r"PROVISIONER-BOOTED node=sn31 role=k8s version=\S+ failed_units=none", console, re.M), \
        console[-3000:]
    log = sim.ssh("sn31", f"cat /var/log/pods/default_{pod}_*/main/0.log")
    assert "pod-ran-on-sn31" in log, log
    _joined_with_provisioners_certificate(sim, since)
    return console


def _joined_with_provisioners_certificate(sim: ImageVmSite, since: float) -> None:
    """The kubelet joined with the client certificate provisioner had signed before the reboot
    (provisioner/kubelet_certs.py), not by TLS bootstrap: its overlay's kubeconfig is the one the
    kubelet uses (a bootstrapping kubelet rewrites it to point at its own pki/ files), and no
    CSR for sn31 came from a bootstrap token during this switch."""
    from datetime import datetime

    from provisioner import config, kubelet_certs

    creds = kubelet_certs.current(config.load(sim.config), "sn31")
    assert creds is not None, [e.message for e in sim.store.events(["sn31"]) if e.kind.startswith("kubelet-cert")]
    kubeconfig = sim.ssh("sn31", "cat /var/lib/kubelet/kubeconfig")
    assert base64.b64encode(creds.certificate).decode() in kubeconfig, kubeconfig[:300]
    assert sim.ssh("sn31", "stat -c %a /var/lib/kubelet/kubeconfig").strip() == "600"
    bootstrapped = [c["metadata"]["name"] for c in sim.kube.api.items("/apis/certificates.k8s.io/v1/"
                                                                      "certificatesigningrequests")
                    if c["spec"].get("username", "").startswith("system:bootstrap:")
                    and datetime.fromisoformat(c["metadata"]["creationTimestamp"].replace("Z", "+00:00"))
                    .timestamp() >= since - 1]
    assert not bootstrapped, f"sn31's kubelet bootstrapped: {bootstrapped}"


def _kueue_job(name: str) -> dict:
    """A Job for Kueue's queue `shared` (examples/kubernetes/kueue-provisioning.yaml), created
    suspended as Kueue wants it: one pod that needs a whole shared node (1 CPU: sn31's, as
    slurm.conf and the VM's kubelet say), printing the node it runs on, then done."""
    return {"apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": name, "namespace": NS, "labels": {"kueue.x-k8s.io/queue-name": "shared"}},
            "spec": {"parallelism": 1, "completions": 1, "backoffLimit": 0, "suspend": True, "template": {"spec": {
                "restartPolicy": "Never", "terminationGracePeriodSeconds": 2, "automountServiceAccountToken": False,
                "containers": [{
                    "name": "main", "image": "provisioner.local/busybox:1", "imagePullPolicy": "Never",
                    "command": ["sh", "-c", f"echo {name}-ran-on-$NODE_NAME"],
                    "env": [{"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}],
                    "resources": {"requests": {"cpu": "1", "memory": "32Mi"}}}]}}}}


def _to_k8s_by_kueue(sim: ImageVmSite, kueue, kubectl, name: str) -> str:
    """A Kueue Job asks for sn31 (in SLURM): Kueue's real manager creates the ProvisioningRequest,
    provisioner's passes (the CLI) switch sn31 to the k8s image, its real kubelet joins, the
    request becomes Provisioned, Kueue admits the Job, its pod runs on sn31 and ends. Returns
    sn31's console since the switch began. Checks the request, the move, the boot, the pod's
    own output on the node."""
    kubectl("apply", "-f", str(EXAMPLE))
    sim.kube.api.create(JOBS, _kueue_job(name))
    pr = wait_for(lambda: next(iter(sim.kube.api.items(PRS)), None), 120,
                  f"Kueue to create a ProvisioningRequest; Kueue's log:\n{kueue.log_tail()}")
    request = pr["metadata"]["name"]
    mark, since = sim.vm("sn31").serial_mark(), time.time()

    def done() -> dict | None:
        pods = [p for p in sim.kube.api.items(f"/api/v1/namespaces/{NS}/pods")
                if (p["metadata"].get("labels") or {}).get("job-name") == name]
        return next((p for p in pods if p["status"].get("phase") == "Succeeded"), None)

    reports = sim.passes_until(done, timeout=SWITCH_TIMEOUT_S, what=f"Kueue Job {name}'s pod to succeed on sn31")
    moves = [(m["node"], m["to"]) for r in reports for m in r["moves"]]
    assert moves == [("sn31", "k8s")], json.dumps(reports, indent=1)[-3000:]
    reason = next(r["moves"][0]["reason"] for r in reports if r["moves"])
    assert f"ProvisioningRequest {NS}/{request} asks for 1 node(s) at once (all or nothing)" in reason
    pr = sim.kube.api.get(f"{PRS}/{request}")
    assert cond(pr, "Provisioned")["status"] == "True", pr
    assert not sim.kube.api.get(f"{JOBS}/{name}")["spec"]["suspend"]  # Kueue admitted it
    pod = done()
    label = sim.kube.node("sn31")["metadata"]["labels"][NODE_LABEL]
    assert pod["spec"]["nodeName"] == "sn31" and pod["spec"]["nodeSelector"][NODE_LABEL] == label
    console = sim.console("sn31", mark)
    assert re.search(r"PROVISIONER-BOOTED node=sn31 role=k8s version=\S+ failed_units=none", console, re.M), \
        console[-3000:]
    # The container's output as the VM's containerd wrote it (`kubectl logs` cannot reach this
    # kubelet: the API server would dial the node's address, slirp's 10.0.2.15, not routable here).
    pod_name = pod["metadata"]["name"]
    log = sim.ssh("sn31", f"cat /var/log/pods/{NS}_{pod_name}_*/main/0.log")
    assert f"{name}-ran-on-sn31" in log, log
    _joined_with_provisioners_certificate(sim, since)
    assert kueue.pid, f"Kueue's manager exited; its log:\n{kueue.log_tail()}"
    # The Job and its request go: the booking ends with them, sn31 is free for SLURM again.
    delete_kueue_work(sim.kube.api)
    wait_for(lambda: not sim.kube.api.items(PRS) and done() is None, 120, "the Job's pod and request to be gone")
    return console


def _to_slurm(sim: ImageVmSite, pod: str | None, name: str) -> str:
    """The pod goes (if any), SLURM work waits (cn31 busy) until the job ran on sn31's own slurmd
    in the slurm image; returns the console since the switch began. Checks the move, the boot,
    the job's own output on the node."""
    if pod:
        sim.kube.api.delete(f"/api/v1/namespaces/default/pods/{pod}")
        wait_for(lambda: sim.kube.pod(pod) is None, 120, f"pod {pod} to be gone")
    sim.fill_fixed()
    job = sim.submit_pending(f"--job-name={name}", "--chdir=/tmp", f"--output=/tmp/{name}-%j.out",
                             wrap=f"echo {name}-on-$(hostname)")
    mark = sim.vm("sn31").serial_mark()
    reports = sim.passes_until(lambda: sim.slurm.job_state(job)[0] in ("RUNNING", "COMPLETING", ""),
                               timeout=SWITCH_TIMEOUT_S, what=f"job {job} to run on sn31")
    moves = [(m["node"], m["to"]) for r in reports for m in r["moves"]]
    assert moves == [("sn31", "slurm")], json.dumps(reports, indent=1)[-3000:]
    console = sim.console("sn31", mark)
    assert re.search(r"PROVISIONER-BOOTED node=sn31 role=slurm version=\S+ failed_units=none", console, re.M)
    assert _job_output(sim, job, f"/tmp/{name}-{job}.out") == f"{name}-on-sn31"
    return console


def test_a_vm_runs_a_job_then_a_kueue_job_then_a_job_on_the_real_images(image_site, kueue, kueue_work, kubectl):
    """What runs: the VM boots the real Debian images (slurm, then k8s, then slurm) over iPXE;
    the slurm image's own slurmd runs the batch jobs; Kueue's real controller manager (built
    from its Go module, testbed/kueue.py) queues a suspended Job and creates its
    ProvisioningRequest; `provisioner balance` (the CLI, one pass per call) switches sn31 out
    of SLURM for it; the k8s image's real kubelet joins the real API server; the request
    becomes Provisioned; Kueue admits the Job; the VM's containerd runs its pod, whose output
    is read from the node's pod log over SSH."""
    sim = image_site
    sim.reset(kubernetes={"provisioning_requests": True})  # the VM is rebooted only if not in slurm
    sim.slurm.wait_node_state("sn31", lambda s: s == "IDLE", timeout=300)

    # 1. In the slurm image: a batch job runs on the VM's own slurmd.
    job = sim.slurm.sbatch("--chdir=/tmp", "--output=/tmp/job-%j.out", nodelist="sn31",
                           wrap="echo job-ran-on-$(hostname)")
    assert _job_output(sim, job, f"/tmp/job-{job}.out") == "job-ran-on-sn31"

    # 2. Kueue asks for a whole shared node, all or nothing: provisioner switches sn31 for it.
    _to_k8s_by_kueue(sim, kueue, kubectl, "kueue-train")
    # The real parts, by their executables, while the node runs the k8s image.
    assert _exe(sim.vm("sn31").proc.pid) == "qemu-system-x86_64"
    assert _exe(sim.kube.plane.pids()["kube-apiserver"]) == "kube-apiserver"
    assert "slurmctld" in {_exe(pid) for pid in sim.slurm.marked_pids()}
    node = sim.kube.node("sn31")
    assert node["status"]["nodeInfo"]["kubeletVersion"] == "v1.34.3"
    assert node["status"]["nodeInfo"]["containerRuntimeVersion"].startswith("containerd://")
    assert node["metadata"]["labels"]["sched"] == "k8s"
    view = sim.slurm_view("sn31")
    assert view.down and view.reason == "k8s_connect"

    # 3. Back: SLURM work waits (cn31 busy); the job runs on sn31's slurmd again.
    _to_slurm(sim, None, "back")
    assert not sim.violations, sim.violations
    print(f"\nswitches of sn31 (power action -> boot callback): {_switch_times(sim, 'sn31')}")


def test_kexec_switches_the_vm_between_the_real_images_without_its_bmc(image_site):
    """The same switches with power method kexec+ipmi: provisioner SSHes into the node (its own
    host key, checked against the known_hosts `provisioner ssh known-hosts` wrote) and kexecs it
    straight into the other image; the BMC is never asked to reset it. The node presents the
    same key in both images, so the SSH after each switch is accepted."""
    sim = image_site
    sim.node_fields["sn31"] = {"power_method": "kexec+ipmi"}
    sim.reset(power={"ssh": {"user": "root", "key_file": str(sim.ssh_key), "known_hosts": str(sim.known_hosts),
                             "timeout_s": 120}})
    port = sim.ssh_ports["sn31"]
    (line,) = [x for x in sim.known_hosts.read_text().splitlines() if x.startswith(f"[127.0.0.1]:{port} ")]
    assert line.split()[1] == "ssh-ed25519"
    # the running VM (booted in the first test) has the node's own key, and no other
    assert sim.ssh("sn31", "cat /etc/ssh/ssh_host_ed25519_key.pub").split()[:2] == line.split()[1:3]
    assert sim.ssh("sn31", "ls /etc/ssh | grep ^ssh_host_").split() == ["ssh_host_ed25519_key",
                                                                         "ssh_host_ed25519_key.pub"]
    sim.slurm.wait_node_state("sn31", lambda s: s == "IDLE", timeout=300)

    # slurm -> k8s, then back, by kexec; the node's key is checked at every SSH
    for console in (_to_k8s(sim, "hello-kexec"), _to_slurm(sim, "hello-kexec", "kexec-back")):
        assert re.search(KEXEC_RE, console), console[-3000:]
        assert sim.bmc_actions("sn31") == [], sim.bmc_actions("sn31")
    times = _switch_times(sim, "sn31")
    assert [how for how, _ in times] == ["kexec", "kexec"], times
    assert not sim.violations, sim.violations
    print(f"\nswitches of sn31 by kexec (power action -> boot callback): {times}")

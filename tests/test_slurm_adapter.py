"""The SLURM adapter against a real cluster (munged, slurmctld, one slurmd per node; see
tests/fixtures/slurm_cluster.py): cn[01-02] are the fixed SLURM nodes, sn[01-04] the shared ones."""

from __future__ import annotations

import os
from dataclasses import replace

import pytest

from provisioner.clusters.slurm import PAPER_REASON, LocalRunner, SlurmAdapter
from provisioner import config
from provisioner.errors import OperationError
from provisioner.model import Site, SlurmSettings
from testbed.site import write_site
from testbed.wait import wait_for
from tests.fixtures.slurm_cluster import private_cluster
from tests.support import require_binary

pytestmark = pytest.mark.integration


@pytest.fixture
def cluster(slurm_cluster):
    slurm_cluster.reset_nodes()
    yield slurm_cluster


@pytest.fixture
def slurm_site(cluster, tmp_path) -> Site:
    """The default test site, its slurm section pointing at the test cluster."""
    return config.load(write_site(tmp_path / "site", slurm=cluster.site_section()))


@pytest.fixture
def slurm(slurm_site) -> SlurmAdapter:
    return SlurmAdapter(slurm_site.slurm)


def poll_node(slurm: SlurmAdapter, name: str, ok, what: str):
    return wait_for(lambda: (lambda n: n if ok(n) else None)(slurm.nodes(name)[name]), 20, f"{name} {what}")


class Recorder:
    """The real runner, plus a record of every command it ran (to show what was NOT run)."""

    def __init__(self, inner):
        self.inner, self.argvs = inner, []

    def run(self, argv, timeout):
        self.argvs.append(list(argv))
        return self.inner.run(argv, timeout)

    def where(self):
        return self.inner.where()


# --------------------------------------------------------------------------- observe


def test_observe_idle_cluster(slurm, slurm_site):
    snap = slurm.observe()
    assert list(snap.nodes) == list(slurm_site.nodes) == ["cn01", "cn02", "sn01", "sn02", "sn03", "sn04"]
    for node in snap.nodes.values():
        assert (node.state, node.flags, node.reason) == ("idle", frozenset(), None)
        assert node.available and node.responding and not node.busy and node.cpus == 1
        assert node.partitions == ("batch",) and node.slurmd_start_time
    assert snap.pending == ()


def test_fixed_nodes_full_new_job_pending_resources(cluster, slurm):
    # The shared nodes are "in Kubernetes" (the paper's down reason), the fixed ones run jobs.
    slurm.down("sn[01-04]", PAPER_REASON)
    running = [cluster.sbatch(nodelist=n) for n in ("cn01", "cn02")]
    for job in running:
        cluster.wait_job_running(job)
    waiting = cluster.sbatch("--job-name=needs a node")

    def pending():
        jobs = [j for j in slurm.pending_jobs() if j.job_id == waiting]
        return jobs[0] if jobs and jobs[0].reason == "Resources" else None
    job = wait_for(pending, 20, "the new job to pend with reason Resources")
    assert (job.partitions, job.num_nodes, job.num_cpus, job.user, job.name) == \
        (("batch",), 1, 1, "root", "needs a node")
    assert job.submit_time and not job.req_nodes

    snap = slurm.observe()
    assert all(snap.nodes[n].busy and snap.nodes[n].state == "allocated" for n in ("cn01", "cn02"))
    assert all(snap.nodes[n].down and snap.nodes[n].reason_is_ours for n in ("sn01", "sn02", "sn03", "sn04"))
    assert [j.job_id for j in snap.pending] == [waiting]


# --------------------------------------------------------------------------- act


def test_drain_draining_then_drained(cluster, slurm):
    job = cluster.sbatch(nodelist="sn01")
    cluster.wait_job_running(job)

    sn01 = slurm.drain("sn01", "to k8s: 2 pods Pending")["sn01"]
    assert sn01.draining and not sn01.drained and sn01.busy
    assert sn01.reason == "provisioner: to k8s: 2 pods Pending" and sn01.reason_is_ours
    assert (sn01.state, sn01.flags) == ("allocated", frozenset({"drain"}))
    assert cluster.job_state(job)[0] == "RUNNING"  # draining lets the job finish

    assert slurm.drain("sn01", "again")["sn01"].reason == "provisioner: to k8s: 2 pods Pending"  # idempotent

    cluster.run("scancel", job)
    sn01 = poll_node(slurm, "sn01", lambda n: n.drained, "drained")
    assert (sn01.state, sn01.flags, sn01.alloc_cpus) == ("idle", frozenset({"drain"}), 0)
    assert not sn01.available and not sn01.held_by_other


def test_down_drained_node_then_resume_starts_pending_job(cluster, slurm):
    slurm.drain("sn01", "to k8s")
    sn01 = slurm.down("sn01", PAPER_REASON)["sn01"]  # the paper's Table 1
    assert sn01.down and sn01.reason == PAPER_REASON and sn01.reason_is_ours

    # Everything else is busy or away: the next job can only run where sn01 comes back.
    slurm.down("sn[02-04]", "in k8s")
    for n in ("cn01", "cn02"):
        cluster.wait_job_running(cluster.sbatch(nodelist=n))
    waiting = cluster.sbatch()
    wait_for(lambda: cluster.job_state(waiting)[1] == "(Resources)", 20, "the job to pend (Resources)")

    sn01 = slurm.resume("sn01")["sn01"]
    assert not sn01.down and not sn01.drain and sn01.reason is None
    assert cluster.wait_job_running(waiting) == "sn01"
    assert poll_node(slurm, "sn01", lambda n: n.busy, "busy").state == "allocated"


def test_down_refuses_a_node_that_runs_jobs(cluster, slurm):
    job = cluster.sbatch(nodelist="sn02")
    cluster.wait_job_running(job)
    with pytest.raises(OperationError, match=r"not taking down sn02: jobs run there .* drain first"):
        slurm.down("sn[01-02]", PAPER_REASON)
    assert cluster.job_state(job)[0] == "RUNNING"
    assert not slurm.nodes("sn01")["sn01"].down  # nothing done to the other node either


def test_foreign_drain_is_not_ours_and_never_resumed(cluster, slurm):
    cluster.run("scontrol", "update", "nodename=sn02", "state=drain", "reason=RMA: bad DIMM, do not touch")
    slurm.drain("sn01", "to k8s")
    sn02 = slurm.nodes("sn02")["sn02"]
    assert sn02.drained and sn02.reason == "RMA: bad DIMM, do not touch"
    assert not sn02.reason_is_ours and sn02.held_by_other

    recorder = Recorder(slurm.runner)
    slurm = SlurmAdapter(slurm.settings, recorder)
    with pytest.raises(OperationError, match=r"not resuming sn02 IDLE\+DRAIN \(RMA: bad DIMM, do not touch\)"):
        slurm.resume("sn[01-02]")
    with pytest.raises(OperationError, match=r"someone else set that reason"):
        slurm.drain("sn02", "to k8s")  # would replace their reason with ours, making it "ours"
    with pytest.raises(OperationError, match=r"someone else set that reason"):
        slurm.down("sn02", PAPER_REASON)
    assert not [a for a in recorder.argvs if "update" in a]  # refused before any action
    nodes = slurm.nodes("sn[01-02]")
    assert nodes["sn02"].reason == "RMA: bad DIMM, do not touch" and nodes["sn02"].drained
    assert nodes["sn01"].drained and nodes["sn01"].reason_is_ours  # all or nothing


def test_paper_scripts_down_counts_as_ours(cluster, slurm):
    cluster.run("scontrol", "update", "nodename=sn03", "state=down", f"reason={PAPER_REASON}")
    assert slurm.nodes("sn03")["sn03"].reason_is_ours
    sn03 = slurm.resume("sn03")["sn03"]
    assert not sn03.down and sn03.reason is None
    # slurmctld marks a resumed DOWN node not responding until the slurmd answers its ping
    poll_node(slurm, "sn03", lambda n: n.available, "available")


def test_resume_refuses_a_node_whose_slurmd_is_not_running(cluster, slurm):
    slurm.down("sn03", "to k8s")
    cluster.stop_slurmd("sn03")  # the node rebooted into the Kubernetes image
    # slurmctld notices at its next ping of the node (every SlurmdTimeout/3)
    poll = wait_for(lambda: (lambda n: n if not n.responding else None)(slurm.nodes("sn03")["sn03"]), 40,
                    "sn03 not responding")
    assert poll.down and poll.reason_is_ours
    with pytest.raises(OperationError, match=r"not resuming sn03: slurmd there is not responding"):
        slurm.resume("sn03")
    cluster.start_slurmd("sn03")  # the node booted the SLURM image again
    sn03 = poll_node(slurm, "sn03", lambda n: n.responding, "responding")
    assert sn03.down and sn03.reason_is_ours  # ReturnToService=1 keeps our down
    assert not slurm.resume("sn03")["sn03"].down
    poll_node(slurm, "sn03", lambda n: n.available, "available")


def test_act_on_unknown_node_is_refused(slurm):
    with pytest.raises(OperationError, match=r"SLURM does not know node\(s\) nosuch\[1-2\]"):
        slurm.drain("nosuch[1-2]", "x")


def test_resume_of_nodes_in_service_does_nothing(slurm):
    recorder = Recorder(slurm.runner)
    nodes = SlurmAdapter(slurm.settings, recorder).resume("cn[01-02]")
    assert all(n.available for n in nodes.values())
    assert not [a for a in recorder.argvs if "update" in a]


# --------------------------------------------------------------------------- failures


@pytest.fixture
def small_cluster():
    """A second, private cluster (one node) that a test may break: stop its slurmctld, run its
    clients as another user. Also shows two clusters run side by side on free ports."""
    with private_cluster("provisioner-slurm-", nodes=["x1"], message_timeout=2) as cluster:  # clients give up after ~1 s
        yield cluster


def test_slurmctld_stopped_observe_fails_clearly_and_nothing_is_attempted(small_cluster):
    settings = SlurmSettings(slurm_conf=str(small_cluster.slurm_conf), timeout_s=15)
    recorder = Recorder(LocalRunner(settings))
    slurm = SlurmAdapter(settings, recorder)
    assert slurm.nodes()["x1"].available
    small_cluster.stop_slurmctld()

    with pytest.raises(OperationError) as err:
        slurm.observe()
    msg = str(err.value)
    assert "cannot read the node states" in msg and "Unable to contact slurm controller" in msg
    assert "check that slurmctld is running" in msg and "\n" not in msg

    recorder.argvs.clear()
    for act in (lambda: slurm.drain("x1", "r"), lambda: slurm.down("x1"), lambda: slurm.resume("x1")):
        with pytest.raises(OperationError, match="Unable to contact slurm controller"):
            act()
    assert recorder.argvs and not [a for a in recorder.argvs if "update" in a]

    # A client that hangs longer than slurm.timeout_s is cut off with its own message.
    with pytest.raises(OperationError, match=r"gave no answer within 0.3s; check that slurmctld"):
        SlurmAdapter(replace(settings, timeout_s=0.3)).nodes()


def test_slurm_refusal_carries_slurms_own_text(small_cluster, tmp_path):
    """bin_dir is honoured; here it holds a scontrol that runs as `nobody`: SLURM lets it read,
    but refuses its update, and that refusal is what the error says."""
    setpriv = require_binary("setpriv")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "scontrol"
    wrapper.write_text(f"#!/bin/sh\nexec {setpriv} --reuid=65534 --regid=65534 --clear-groups "
                       f"{require_binary('scontrol')} \"$@\"\n")
    wrapper.chmod(0o755)
    os.chmod(tmp_path, 0o755)
    slurm = SlurmAdapter(SlurmSettings(slurm_conf=str(small_cluster.slurm_conf), bin_dir=str(bin_dir)))
    assert slurm.nodes()["x1"].available
    with pytest.raises(OperationError) as err:
        slurm.drain("x1", "to k8s")
    assert str(err.value).startswith(
        "SLURM refused `scontrol update nodename=x1 state=drain 'reason=provisioner: to k8s'`: "
        "slurm_update error: Invalid user id; see slurmctld's log")
    assert small_cluster.node_state("x1") == "IDLE"

    missing_dir = SlurmAdapter(SlurmSettings(bin_dir=str(tmp_path / "nothing")))
    with pytest.raises(OperationError, match=r"nothing/scontrol not found; install the SLURM client"):
        missing_dir.nodes()


# --------------------------------------------------------------------------- over SSH


def test_over_ssh_on_the_controller(cluster, sshd):
    settings = SlurmSettings(mode="ssh", controller=sshd.target(), slurm_conf=str(cluster.slurm_conf),
                             timeout_s=20)
    slurm = SlurmAdapter(settings)
    snap = slurm.observe()
    assert set(snap.nodes) == {"cn01", "cn02", "sn01", "sn02", "sn03", "sn04"} and snap.pending == ()
    assert slurm.drain("sn02", "over ssh")["sn02"].reason == "provisioner: over ssh"
    assert slurm.down("sn02")["sn02"].down
    assert not slurm.resume("sn02")["sn02"].drain
    cluster.wait_node_state("sn02", lambda s: s == "IDLE")


def test_over_ssh_unknown_host_key_is_refused_before_anything(cluster, sshd):
    settings = SlurmSettings(mode="ssh", controller=sshd.target(known_hosts=sshd.other_known_hosts),
                             slurm_conf=str(cluster.slurm_conf), timeout_s=10)
    with pytest.raises(OperationError, match=r"ssh .*host key"):
        SlurmAdapter(settings).drain("sn02", "x")
    assert cluster.node_state("sn02") == "IDLE"

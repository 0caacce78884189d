"""SLURM asks for shared nodes itself (slurm.power_saving): the real slurmctld runs our
ResumeProgram / SuspendProgram / ResumeFailProgram (the wrappers `provisioner slurm programs`
writes), and the balancer answers through the same policy.

One world of its own (a real slurmctld configured for power saving, the session's real Kubernetes
control plane, BMC simulators, the boot server). Passes run as cron would (here every fraction of
a second, in this process); slurmctld's programs also start passes of their own.
"""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from provisioner.reconcile import CRASH_ENV
from provisioner.states import FAILED, STEADY
from testbed.power_saving import RESUME_TIMEOUT, SUSPEND_TIME, settle, start_site
from testbed.simnodes import SimSite
from tests.fixtures.slurm_cluster import require_slurm
from testbed.wait import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

@pytest.fixture(scope="module")
def ps_world(tmp_path_factory, kube_cluster):
    work = require_slurm(tmp_path_factory.mktemp("power-saving"))
    site, programs = start_site(work, kube_cluster)
    try:
        assert f"ResumeProgram={work}/bin/provisioner-slurm-resume" in programs
        yield site
    finally:
        site.stop()


@pytest.fixture
def ps_site(ps_world):
    """The module's world (each test resets it); the test fails on what the harness saw go wrong."""
    yield ps_world
    ps_world.check()


def passes_until(site: SimSite, done, timeout: float, what: str) -> None:
    site.passes_until(done, timeout=timeout, cli=False, what=what)


def asks(site: SimSite, node: str, kind: str | None = None) -> list:
    return [e for e in site.events([node]) if e.kind.startswith("ask") and (kind is None or e.data["kind"] == kind)]


def test_a_job_resumes_a_kubernetes_node_and_idle_suspends_it(ps_site):
    site = ps_site
    site.reset()
    settle(site)
    fixed_jobs = site.fill_fixed()  # the job must go to a shared node
    job = site.slurm.sbatch(wrap="echo ran on $SLURMD_NODENAME; sleep 1")
    # slurmctld gives the job a "powered down" shared node and runs our ResumeProgram: the ask is
    # in the store before any pass of ours ran (its own detached pass may already answer it).
    wait_for(lambda: any(e.kind == "ask" for n in ("ps01", "ps02") for e in asks(site, n, "resume")), 30,
             "slurmctld to run the ResumeProgram")
    node = next(n for n in ("ps01", "ps02") if any(e.kind == "ask" for e in asks(site, n, "resume")))
    ask = next(e for e in asks(site, node, "resume") if e.kind == "ask")
    assert ask.actor == "slurmctld" and f"JobId={job}" in ask.message and "resume" in ask.message
    passes_until(site, lambda: site.state(node).phase == STEADY and site.state(node).desired_role == "slurm",
                 60, f"{node} to switch to slurm")
    assert any(e.kind == "ask-granted" for e in asks(site, node, "resume"))
    out = site.slurm.workdir / "jobs" / f"{job}.out"
    wait_for(lambda: out.exists() and f"ran on {node}" in out.read_text(), 60, "the job's own output")
    assert not site.violations
    for j in fixed_jobs:
        site.slurm.run("scancel", j)

    # Idle for SuspendTime: slurmctld runs our SuspendProgram; Kubernetes wants nothing: powered off.
    passes_until(site, lambda: any(e.kind == "ask-done" and "powered off" in e.message for e in asks(site, node, "suspend")),
                 SUSPEND_TIME + 60, f"SuspendProgram for {node} and its answer")
    assert site.bmc_actions(node)[-1] == "off"
    assert site.slurm_view(node).powered_down and site.state(node).desired_role == "slurm"
    assert not site.violations


def test_a_node_that_does_not_come_back_fails_in_both_clusters(ps_site):
    site = ps_site
    site.reset()
    settle(site)
    site.bmc.set_fault("ps02", "stuck")  # power commands accepted, the node never boots
    site.fill_fixed()
    job = site.slurm.sbatch(nodelist="ps02", wrap="echo never")
    passes_until(site, lambda: site.state("ps02").phase == FAILED, RESUME_TIMEOUT + 60, "ps02 to fail")
    st = site.state("ps02")
    assert st.failed_reason  # ours (no boot callback, power failed) or slurmctld's ResumeTimeout, whichever came first
    # SLURM: DOWN with the reason, the job back in the queue (not killed, not lost).
    wait_for(lambda: site.slurm_view("ps02").down, 30, "ps02 DOWN in SLURM")
    view = site.slurm_view("ps02")
    assert view.reason and ("provisioner" in view.reason or "ResumeTimeout" in view.reason)
    state, _ = site.slurm.job_state(job)
    assert state == "PENDING"
    shown = json.loads(site.cli("nodes", "ps02", "--json").stdout)
    assert shown[0]["phase"] == "failed" and shown[0]["failed_reason"]
    site.slurm.run("scancel", job)
    site.bmc.set_fault("ps02", None)


def test_a_refused_resume_requeues_the_job_and_says_why(ps_site):
    site = ps_site
    site.reset()
    settle(site)
    assert site.cli("role", "ps01", "k8s", "--reason", "GPU maintenance by kube team").returncode == 0  # pin
    site.passes_until(lambda: site.slurm_view("ps01").drain, 30, cli=False, what="the pin held in SLURM")
    assert "pinned to k8s" in site.slurm_view("ps01").reason
    site.fill_fixed()
    job = site.slurm.sbatch(wrap="echo hi")
    # SLURM does not even ask for the held node: it takes ps02.
    passes_until(site, lambda: site.state("ps02").desired_role == "slurm", 60, "ps02 asked for and switching")
    assert site.state("ps01").desired_role == "k8s" and not any(e.kind == "ask" for e in asks(site, "ps01", "resume"))
    # Asked anyway (an admin runs the program by hand): refused, with the reason, in the history.
    proc = site.cli("slurm", "resume", "ps01")
    assert proc.returncode == 0 and "resume asked by slurmctld" in proc.stdout
    passes_until(site, lambda: any(e.kind == "ask-refused" for e in asks(site, "ps01", "resume")), 30, "the refusal")
    refused = next(e for e in asks(site, "ps01", "resume") if e.kind == "ask-refused")
    assert "pinned to k8s by an admin" in refused.message
    site.slurm.run("scancel", job)
    assert site.cli("release", "ps01").returncode == 0


def test_a_held_node_refuses_slurms_resume_for_good_and_is_not_powered(ps_site):
    """An admin holds ps01 (in Kubernetes, powered down for SLURM): the pass shows why in SLURM
    and on the Node, and when slurmctld asks for it anyway (a power up an admin of SLURM asks
    for: slurmctld runs the ResumeProgram), the ask is refused for good with the hold's reason,
    and nothing powers the node."""
    site = ps_site
    site.reset()
    settle(site)
    assert site.cli("hold", "ps01", "--reason", "DIMM swap").returncode == 0
    try:
        passes_until(site, lambda: site.slurm_view("ps01").drain, 30, "the hold shown in SLURM")
        assert "held for maintenance: DIMM swap" in site.slurm_view("ps01").reason
        assert site.kube.node("ps01")["metadata"]["annotations"]["provisioner/hold"] == "DIMM swap"
        before = site.bmc_actions("ps01")
        site.slurm.run("scontrol", "update", "nodename=ps01", "state=power_up")
        wait_for(lambda: any(e.kind == "ask" for e in asks(site, "ps01", "resume")), 30,
                 "slurmctld to run the ResumeProgram for ps01")
        passes_until(site, lambda: any(e.kind == "ask-refused" for e in asks(site, "ps01", "resume")), 30,
                     "the resume ask for held ps01 answered")
        refused = next(e for e in asks(site, "ps01", "resume") if e.kind == "ask-refused")
        assert "held for maintenance by admin:" in refused.message and "DIMM swap" in refused.message
        assert [a for a in site.store.open_asks() if a.node == "ps01"] == []  # final: nothing hangs
        assert not any(a in ("on", "reset", "cycle", "boot") for a in site.bmc_actions("ps01")[len(before):])
        assert site.state("ps01").desired_role == "k8s" and site.state("ps01").phase == STEADY
        # ... and SLURM's view converges back to powered down (the passes keep it so), not booted.
        passes_until(site, lambda: site.slurm_view("ps01").powered_down, 60, "ps01 powered down in SLURM again")
        assert not any(a in ("on", "reset", "cycle", "boot") for a in site.bmc_actions("ps01")[len(before):])
    finally:
        assert site.cli("unhold", "ps01").returncode == 0


def test_the_programs_run_with_slurmctlds_empty_environment(ps_site, tmp_path):
    """No PATH, no SLURM_CONF, no HOME: what slurmctld gives them. They return at once."""
    site = ps_site
    site.reset()
    resume_file = tmp_path / "resume.json"
    resume_file.write_text(json.dumps({"jobs": [{"job_id": 4242, "nodes": "ps[01-02]"}], "all_nodes": "ps[01-02]"}))
    wrapper = site.workdir / "bin" / "provisioner-slurm-resume"
    started = time.monotonic()
    proc = subprocess.run([str(wrapper), "ps[01-02],cn01"], env={"SLURM_RESUME_FILE": str(resume_file)},
                          capture_output=True, text=True, timeout=60, cwd="/")
    took = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr
    assert "ps[01-02]: resume asked by slurmctld" in proc.stdout and "cn01: not shared" in proc.stderr
    assert all(any("JobId=4242" in e.message for e in asks(site, n)) for n in ("ps01", "ps02"))
    print(f"resume program returned in {took:.2f} s")  # measured in the benchmark, not asserted
    # The asks are real: their switches run now; they end here, not in the next test.
    passes_until(site, lambda: not site.store.open_asks() and all(site.state(n).phase in (STEADY, FAILED)
                                                                   for n in ("ps01", "ps02")),
                 90, "the asks answered and their switches ended")


def test_the_pass_slurmctlds_program_started_is_killed_after_the_power_action(ps_site):
    """kill -9 of the detached pass the ResumeProgram started, right after its power action and
    before it recorded it: the passes after it see the node boot, grant the ask once, the job
    runs, and the node was powered exactly once."""
    site = ps_site
    site.reset()
    settle(site)
    # slurmctld may still ask about the earlier tests' nodes (a SuspendProgram): answered first,
    # so the only pass left to start is the one this test kills.
    passes_until(site, lambda: not site.store.open_asks(), 60, "slurmctld's earlier asks answered")
    assert all(site.state(n).desired_role == "k8s" for n in ("ps01", "ps02")), site.states()
    wrapper = site.workdir / "bin" / "provisioner-slurm-resume"
    original = wrapper.read_text()
    # The wrapper's environment is all the detached pass gets (slurmctld passes none).
    wrapper.write_text(original.replace("export PATH\n", f"export PATH\n{CRASH_ENV}=after-power; export {CRASH_ENV}\n"))
    try:
        before = {n: len(site.bmc_actions(n)) for n in ("ps01", "ps02")}
        answered = {n: len(asks(site, n, "resume")) for n in before}
        fixed_jobs = site.fill_fixed()
        job = site.slurm.sbatch(wrap="echo ran on $SLURMD_NODENAME; sleep 1")
        node = wait_for(lambda: next((n for n in before if len(site.bmc_actions(n)) > before[n]), None), 60,
                        "the detached pass to power a node (and die)")
    finally:
        wrapper.write_text(original)
    assert site.state(node).phase == "rebooting", site.states()  # killed before it recorded the power action
    passes_until(site, lambda: site.slurm.job_state(job)[0] in ("RUNNING", "COMPLETED")
                 and site.state(node).phase == STEADY, 90, f"{node} to join slurm and the job to run")
    assert site.state(node).desired_role == "slurm"
    assert len(site.bmc_actions(node)[before[node]:]) == 1, site.bmc_actions(node)  # powered once
    granted = [e for e in asks(site, node, "resume")[answered[node]:] if e.kind == "ask-granted"]
    assert len(granted) == 1, asks(site, node)
    for j in fixed_jobs:
        site.slurm.run("scancel", j)

"""Reclaim on the SLURM side against the real cluster (tests/fixtures/slurm_cluster.py): the jobs
on a drained node are requeued when they can be and run again elsewhere; a job that cannot be
requeued is reported and left to run."""

from __future__ import annotations

import pytest

from provisioner.errors import OperationError
from testbed.wait import wait_for
# The adapter tests' fixtures: the session's cluster reset, and an adapter pointed at it.
from tests.test_slurm_adapter import cluster, slurm, slurm_site  # noqa: F401

pytestmark = pytest.mark.integration


def test_a_requeueable_job_is_requeued_and_runs_again_elsewhere(cluster, slurm):
    job = cluster.sbatch("--requeue")
    node = cluster.wait_job_running(job)
    (seen,) = slurm.jobs_on(node)
    assert (seen.job_id, seen.state, seen.nodes, seen.requeueable) == (job, "RUNNING", (node,), True)
    with pytest.raises(OperationError, match="not drained by provisioner: drain it before requeueing"):
        slurm.requeue_jobs_on(node)
    slurm.drain(node, "reclaimed by Kubernetes")
    result = slurm.requeue_jobs_on(node)
    assert result.requeued == (job,) and result.kept == ()
    wait_for(lambda: not slurm.jobs_on(node), 30, f"{node} to be free of the requeued job")
    # Back in the queue with its id, held by SLURM's requeue delay (BeginTime: its old
    # credential must expire, about 2 min); the test lifts the delay instead of waiting for it.
    assert wait_for(lambda: cluster.job_state(job) == ("PENDING", "(BeginTime)") or None, 30, "the requeue delay")
    cluster.run("scontrol", "update", f"jobid={job}", "starttime=now")
    where = cluster.wait_job_running(job)
    assert where and where != node
    restarts = cluster.run("scontrol", "show", "job", "-o", job)
    assert "Restarts=1" in restarts


def test_a_job_that_cannot_be_requeued_is_kept_and_left_running(cluster, slurm):
    job = cluster.sbatch("--no-requeue", nodelist="sn02")
    cluster.wait_job_running(job)
    slurm.drain("sn02", "reclaimed by Kubernetes")
    result = slurm.requeue_jobs_on("sn02")
    assert result.requeued == ()
    assert result.kept == ((job, "submitted with --no-requeue (or JobRequeue=0)"),)
    assert result.remaining == (job,) and not result.free
    assert cluster.job_state(job)[0] == "RUNNING"  # nothing was done to it

"""The SLURM test cluster itself: nodes can join and leave at runtime, and stop() leaves nothing."""

from __future__ import annotations

import pytest

from testbed.slurm_cluster import SlurmCluster
from testbed.wait import wait_for
from tests.fixtures.slurm_cluster import require_slurm

pytestmark = pytest.mark.integration


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def test_the_test_worlds_slurm_cluster(slurm_cluster, tmp_path):
    """The harness itself, once: nodes join and leave at runtime, a second cluster beside the
    session's sees only its own jobs, and stop() leaves no process behind."""
    cluster = SlurmCluster(require_slurm(tmp_path / "c"), nodes=["x[1-2]"], started=["x1"])
    try:
        cluster.start()
        assert cluster.ctld_port != slurm_cluster.ctld_port
        # never registered (powered off / in the other cluster): UNKNOWN, later +NOT_RESPONDING
        assert cluster.node_state("x2").startswith("UNKNOWN")
        cluster.start_slurmd("x2")  # "booted the SLURM image"
        cluster.wait_node_state("x2", lambda s: s == "IDLE")

        job = cluster.sbatch(nodelist="x2")
        assert cluster.wait_job_running(job) == "x2"
        assert cluster.run("squeue", "-h", "-o", "%i %N").split() == [job, "x2"]
        assert slurm_cluster.run("squeue", "-h") == ""  # each sees only its own jobs
        daemons = [p.pid for p in cluster._procs.values()]
        cluster.stop_slurmd("x2")  # the job's slurmstepd and sleep outlive slurmd
        job_pids = wait_for(lambda: [p for p in cluster.marked_pids() if p not in daemons], 10, "job processes")
        assert all(alive(p) for p in job_pids)
    finally:
        cluster.stop()
    assert not [p for p in daemons + job_pids if alive(p)]
    assert cluster.marked_pids() == []
    cluster.stop()  # twice is fine
    assert slurm_cluster.node_state("cn01").startswith("IDLE")

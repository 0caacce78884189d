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


def test_nodes_join_and_leave_and_stop_leaves_nothing(tmp_path):
    cluster = SlurmCluster(require_slurm(tmp_path / "c"), nodes=["x[1-2]"], started=["x1"])
    try:
        cluster.start()
        # never registered (powered off / in the other cluster): UNKNOWN, later +NOT_RESPONDING
        assert cluster.node_state("x2").startswith("UNKNOWN")
        cluster.start_slurmd("x2")  # "booted the SLURM image"
        cluster.wait_node_state("x2", lambda s: s == "IDLE")

        job = cluster.sbatch(nodelist="x2")
        assert cluster.wait_job_running(job) == "x2"
        daemons = [p.pid for p in cluster._procs.values()]
        cluster.stop_slurmd("x2")  # the job's slurmstepd and sleep outlive slurmd
        job_pids = wait_for(lambda: [p for p in cluster.marked_pids() if p not in daemons], 10, "job processes")
        assert all(alive(p) for p in job_pids)
    finally:
        cluster.stop()
    assert not [p for p in daemons + job_pids if alive(p)]
    assert cluster.marked_pids() == []
    cluster.stop()  # twice is fine


def test_two_clusters_side_by_side(slurm_cluster, tmp_path):
    with SlurmCluster(require_slurm(tmp_path / "other"), nodes=["cn01"]) as other:
        assert other.ctld_port != slurm_cluster.ctld_port
        assert other.node_ports["cn01"] != slurm_cluster.node_ports["cn01"]
        other.sbatch()
        assert "cn01" in other.run("squeue", "-h", "-o", "%N") or other.run("squeue", "-h")
        assert slurm_cluster.run("squeue", "-h") == ""  # each sees only its own jobs
    assert slurm_cluster.node_state("cn01").startswith("IDLE")

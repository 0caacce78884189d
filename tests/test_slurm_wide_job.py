"""What the simulator assumes of slurmctld (22.05) while a wide job waits for a node that is on
the Kubernetes side, checked on a private real cluster of 4 nodes:
- the node drained (lent, as provisioner leaves it without power saving): slurmctld plans no start
  for the 4-node job and backfills the 1-node jobs behind it at once (engine.schedule_slurm);
- the node powered down (slurm.power_saving): slurmctld gives the 4-node job the node at once and
  waits for it to come up (the node ALLOCATED while powered down or powering up, the job CONFIGURING); the jobs behind it wait. The
  simulator does not model power saving (docs/lending.md)."""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

import pytest

from testbed.wait import wait_for
from tests.fixtures.slurm_cluster import private_cluster

pytestmark = pytest.mark.integration

NODES = ["w1", "w2", "w3", "w4"]


@pytest.fixture
def four():
    with tempfile.TemporaryDirectory(prefix="provisioner-slurm-noop-") as tmp:
        noop = Path(tmp) / "noop"
        noop.write_text("#!/bin/sh\nexit 0\n")
        noop.chmod(0o755)
        conf = "\n".join([
            "SchedulerParameters=batch_sched_delay=0,bf_interval=1",  # a backfill cycle every second
            f"ResumeProgram={noop}", f"SuspendProgram={noop}", "ResumeTimeout=300", "SuspendTime=3600",
            "SuspendTimeout=2", "SuspendExcNodes=w[1-3]", "ResumeRate=0", "SuspendRate=0",
        ])
        with private_cluster("provisioner-slurm-wide-", nodes=NODES, extra_conf=conf) as cluster:
            yield cluster


def small_jobs(cluster) -> list[str]:
    return [cluster.sbatch("--time=60", wrap="sleep 600") for _ in range(3)]


def test_a_wide_job_waiting_for_a_drained_node_is_backfilled_around(four):
    four.run("scontrol", "update", "nodename=w4", "state=drain", "reason=lent to kubernetes")
    wide = four.sbatch("--time=60", nodes=4, cpus=4, wrap="sleep 600")
    small = small_jobs(four)
    for job in small:
        four.wait_job_running(job, timeout=30)
    assert four.job_state(wide)[0] == "PENDING"


def test_a_wide_job_takes_a_powered_down_node_and_waits_for_it(four):
    four.stop_slurmd("w4")
    four.run("scontrol", "update", "nodename=w4", "state=power_down_force")
    four.wait_node_state("w4", lambda s: "POWERED_DOWN" in s, timeout=30)
    wide = four.sbatch("--time=60", nodes=4, cpus=4, wrap="sleep 600")
    wait_for(lambda: four.job_state(wide)[0] == "CONFIGURING" or None, 30, "the wide job to take w4")
    state = four.node_state("w4")  # 22.05 prints ALLOCATED+POWERED_DOWN until the resume runs, then POWERING_UP
    assert state.startswith("ALLOCATED") and ("POWERING_UP" in state or "POWERED_DOWN" in state), state
    small = small_jobs(four)
    wait_for(lambda: all(four.job_state(j)[0] == "PENDING" for j in small) or None, 10, "the small jobs listed")
    subprocess.run(["sleep", "5"], check=False)  # five backfill cycles
    assert [four.job_state(j)[0] for j in small] == ["PENDING"] * 3

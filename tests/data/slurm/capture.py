"""Re-captures the real SLURM outputs in this folder (the parser tests read them).

    .venv/bin/python -m tests.data.slurm.capture

Starts a real cluster (tests/fixtures/slurm_cluster.py), walks it through the states the adapter
must read, and at each moment writes what the adapter's own commands print
(`scontrol show node -o`, squeue with the adapter's format), plus `sinfo -h -N -o '%N|%T|%E'`
for the same moment: its compact states with the `* ~ # % !` suffixes are the cross-check.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

from provisioner.clusters.slurm import CLIENT_ENV, SHOW_NODES, SQUEUE_FORMAT
from testbed.slurm_cluster import SlurmCluster
from testbed.wait import wait_for

HERE = Path(__file__).resolve().parent
SINFO = ("sinfo", "-h", "-N", "-o", "%N|%T|%E")
SQUEUE_ALL = ("squeue", "-h", "-r", "-o", SQUEUE_FORMAT)  # all states: the parser keeps PENDING


def capture(c: SlurmCluster, moment: str) -> None:
    env = {**c.env, **CLIENT_ENV}
    header = f"# slurm {c.run('scontrol', '--version').strip()}, {time.strftime('%Y-%m-%d')}, moment: {moment}\n"
    for suffix, argv in (("scontrol-show-node", SHOW_NODES), ("squeue", SQUEUE_ALL), ("sinfo", SINFO)):
        out = subprocess.run(argv, env=env, capture_output=True, text=True, check=True).stdout
        (HERE / f"{moment}.{suffix}.txt").write_text(f"# {' '.join(argv)}\n" + header + out)
    print(f"captured {moment}")


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="slurm-capture-"))
    # Count-only GPUs are refused at registration on 22.05: give them (empty) device files.
    (work / "dev").mkdir()
    for i in (0, 1):
        (work / "dev" / f"gpu{i}").touch()
    (work / "gres.conf").write_text(f"NodeName=sn[1-3] Name=gpu Type=a100 File={work}/dev/gpu[0-1]\n")
    cluster = SlurmCluster(
        work, nodes=("cn[1-2]", "sn[1-3]"), cpus=2, slurmd_timeout=6,
        partitions={"batch": "cn[1-2],sn[1-3]", "gpu": "sn[1-3]"},
        node_options={"sn[1-3]": "Gres=gpu:a100:2"},
        extra_conf="GresTypes=gpu\nSuspendProgram=/bin/true\nResumeProgram=/bin/true\n"
                   "SuspendTimeout=4\nResumeTimeout=30\nSuspendTime=3600\n",
    )
    with cluster as c:
        # -- busy: every kind of node and pending job at once
        a = c.sbatch("--job-name=full", cpus=2, nodelist="cn1")
        c.sbatch("--job-name=half", cpus=1, nodelist="cn2")
        d = c.sbatch("--job-name=on sn1", cpus=2, nodelist="sn1", partition="gpu")
        for job in (a, d):
            c.wait_job_running(job)
        c.run("scontrol", "update", "nodename=sn1", "state=drain", "reason=provisioner: to k8s (3 pods Pending)")
        c.run("scontrol", "update", "nodename=sn2", "state=drain", "reason=bad DIMM | replace on Tuesday  [ticket 42]")
        c.run("scontrol", "update", "nodename=sn3", "state=down", "reason=k8s_connect")
        # free text after Reason= on the same line
        c.run("scontrol", "update", "nodename=sn2", "comment=rack 12, slot 3", "extra=owner=ops team")
        c.sbatch("--job-name=two nodes", cpus=4, nodes=2)
        c.sbatch("--job-name=wants sn2", nodelist="sn2", partition="gpu")
        c.sbatch("--job-name=later", "--begin=now+3600")
        c.sbatch("--job-name=after full", f"--dependency=afterok:{a}")
        c.sbatch("--job-name=my job | with pipes", "--array=1-3")
        c.sbatch("--job-name=gpu job", "--gres=gpu:a100:1", partition="gpu")
        c.sbatch("--job-name=either", partition="gpu,batch", cpus=2)
        wait_for(lambda: "Resources" in c.run(*SQUEUE_ALL), 20, "a job pending (Resources)")
        time.sleep(1)
        capture(c, "busy")

        # -- after: sn1 drained when its job ended; cn2's slurmd stopped (not responding)
        c.run("scancel", d)
        c.wait_node_state("sn1", lambda s: s == "IDLE+DRAIN")
        c.stop_slurmd("cn2")
        c.wait_node_state("cn2", lambda s: "NOT_RESPONDING" in s, timeout=60)
        capture(c, "after")

        # -- power: cn1 asked to power down (!), powering down (%), powered down (~), powering up (#)
        c.scancel_all()
        c.run("scontrol", "update", "nodename=cn1", "state=power_down")
        capture(c, "power-down-asked")
        c.wait_node_state("cn1", lambda s: "POWERING_DOWN" in s)
        capture(c, "powering-down")
        c.wait_node_state("cn1", lambda s: "POWERED_DOWN" in s)
        capture(c, "powered-down")
        c.run("scontrol", "update", "nodename=cn1", "state=power_up")
        c.wait_node_state("cn1", lambda s: "POWERING_UP" in s)
        capture(c, "powering-up")


if __name__ == "__main__":
    sys.exit(main())

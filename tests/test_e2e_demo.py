"""`make demo`'s scripted run, end to end: scripts/demo.py --duration starts the whole thing
(real SLURM, a real Kubernetes control plane, the boot server, two VMs booting the tiny image,
simulated kubelets), submits work itself, and exits 0 once sn01 went to Kubernetes and came back,
each time booting the other image. It runs with `--redfish sn01`: sn01 is powered by Redfish
(sushy-tools' emulator in front of our libvirtd), sn02 by an IPMI BMC simulator; the IPMI path of
a switch is what tests/test_e2e_vm.py runs. Afterwards nothing it started may still run."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from testbed.redfish_bmc import PASSWORD
from tests.fixtures.slurm_cluster import require_slurm
from tests.fixtures.vms import require_vm_parts
from tests.support import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.integration]


@pytest.fixture
def short_dir():
    """pytest's tmp_path is too deep for slurmstepd's socket paths under the demo's folder."""
    folder = Path(tempfile.mkdtemp(prefix="demo-"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_scripted_demo_moves_a_vm_both_ways_and_leaves_nothing_running(short_dir, tiny_image):
    # tiny_image: the kernel package is downloaded (or skipped/failed) before the demo needs it
    require_vm_parts()
    workdir = require_slurm(short_dir) / "demo"
    proc = subprocess.run([sys.executable, "scripts/demo.py", "--duration", "240", "--every", "2",
                           "--workdir", str(workdir), "--redfish", "sn01"], cwd=ROOT, capture_output=True, text=True, timeout=420,
                          stdin=subprocess.DEVNULL)
    out = proc.stdout
    assert proc.returncode == 0, out[-4000:] + proc.stderr[-2000:]
    assert "MOVE sn01 -> k8s: 1 pod Pending (Unschedulable) in namespace ml" in out
    assert "MOVE sn01 -> slurm: 1 job Pending (Resources) in partition batch" in out
    for role in ("k8s", "slurm"):
        assert f"console: PROVISIONER-BOOTED node=sn01 role={role} " in out
    assert "pod ml/train-1 running on sn01" in out
    # Both of sn01's reboots went by Redfish; sn02 kept its IPMI BMC simulator.
    assert "libvirtd and sushy-tools' Redfish emulator for sn01" in out and "IPMI BMC simulators for sn02" in out
    assert out.count("sn01 booting: power redfish boot with one-time network boot") == 2, out[-4000:]
    assert PASSWORD not in out + proc.stderr
    assert "scenario complete" in out and "everything stopped" in out
    # What to type from another shell is printed.
    assert "provisioner role sn01 k8s --reason test --now" in out and "sbatch --wrap" in out
    left = subprocess.run(["pgrep", "-f", str(workdir)], capture_output=True, text=True).stdout.split()
    assert not left, f"the demo left processes running: {left}"

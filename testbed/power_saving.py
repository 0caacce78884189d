"""A SimSite whose slurmctld runs provisioner's power-saving programs (slurm.power_saving): the
world of tests/test_slurm_power_saving.py and of the reaction benchmark (bench/reaction.py).

Shared nodes ps[01-02] start on the Kubernetes side (node names of their own: the session's
Kubernetes control plane may also serve the balance world's sn01...). `settle()` runs passes until
SLURM shows them powered down and free to ask for.
"""

from __future__ import annotations

from pathlib import Path

from testbed.kube_cluster import KubeCluster
from testbed.simnodes import SimSite

RESUME_TIMEOUT = 40
SUSPEND_TIME = 6
SHARED = ("ps01", "ps02")
PROGRAMS = ("resume", "suspend", "resume-fail")


def power_saving_conf(bindir: Path) -> str:
    """slurm.conf lines: our programs in `bindir`, short timeouts, the fixed nodes excluded."""
    return "\n".join([
        f"ResumeProgram={bindir}/provisioner-slurm-resume",
        f"SuspendProgram={bindir}/provisioner-slurm-suspend",
        f"ResumeFailProgram={bindir}/provisioner-slurm-resume-fail",
        f"ResumeTimeout={RESUME_TIMEOUT}",
        f"SuspendTime={SUSPEND_TIME}",
        "SuspendTimeout=2",
        "ResumeRate=0",
        "SuspendRate=0",
        "SuspendExcNodes=cn[01-02]",
    ])


def start_site(work: Path, kube: KubeCluster) -> tuple[SimSite, str]:
    """Start the world; returns it and what `provisioner slurm programs` printed."""
    bindir = work / "bin"
    # slurmctld turns power saving off for good when a program is missing at its start (a
    # reconfigure does not turn it on again): placeholders now, the real ones once site.yaml exists.
    bindir.mkdir(parents=True, exist_ok=True)
    for name in PROGRAMS:
        stub = bindir / f"provisioner-slurm-{name}"
        stub.write_text("#!/bin/sh\nexit 0\n")
        stub.chmod(0o755)
    site = SimSite(work, shared="ps[01-02]", fixed_k8s="", roles={n: "k8s" for n in SHARED}, kube=kube,
                   boot_delay=1.5,  # firmware time: slurmctld wants the boot after its resume
                   slurm_conf=power_saving_conf(bindir), slurm_settings={"power_saving": True},
                   policy={"phase_timeout_s": 20, "max_retries": 0})
    site.start()
    try:
        proc = site.cli("slurm", "programs", "--dir", str(bindir))
        if proc.returncode != 0:
            raise RuntimeError(f"provisioner slurm programs failed: {proc.stderr}")
    except BaseException:
        site.stop()
        raise
    return site, proc.stdout


def powered_down_and_free(site: SimSite, name: str) -> bool:
    v = site.slurm_view(name)
    return v.powered_down and not (v.drain or v.down) and "powering_down" not in v.flags


def settle(site: SimSite, timeout: float = 60) -> None:
    """Passes until SLURM shows the Kubernetes-side nodes powered down and free to ask for."""
    site.passes_until(lambda: all(powered_down_and_free(site, n) for n in SHARED), timeout=timeout, cli=False,
                      what="SLURM to show the k8s-side nodes powered down and free: "
                           + "; ".join(f"{n} {site.slurm.node_state(n)}" for n in SHARED))

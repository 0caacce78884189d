"""The test world's own checks fail closed (testbed/simnodes.py, SimSite.check()): "no reboot
while work runs" and "the node booted what it was told" rest on observations the harness makes;
when one cannot be made, the test fails instead of reading the silence as "all well". One test
for the harness itself, so that a green suite means those checks were made."""

from __future__ import annotations

import pytest

from testbed.wait import wait_for

pytestmark = pytest.mark.integration


def test_the_harness_fails_closed(balance_site, monkeypatch, tmp_path):
    sim = balance_site()  # every shared node idle in SLURM

    # squeue cannot answer while a node is powered off: never read as "no jobs ran there".
    (tmp_path / "squeue").write_text("#!/bin/sh\necho 'squeue: error: slurmctld unreachable' >&2\nexit 1\n")
    (tmp_path / "squeue").chmod(0o755)
    monkeypatch.setitem(sim.slurm.env, "PATH", f"{tmp_path}:{sim.slurm.env['PATH']}")
    assert sim.cli("power", "sn01", "off").returncode == 0
    wait_for(lambda: sim.errors, 20, "the harness to record the check it could not make")
    monkeypatch.undo()
    with pytest.raises(AssertionError, match=r"sn01: could not check for running work before power off.*squeue"):
        sim.check()

    # The BMC's power hook fails: the reader keeps going, the test fails.
    def broken(event):
        raise RuntimeError("hook broken on purpose")

    monkeypatch.setattr(sim.bmc, "on_power", broken)
    assert sim.cli("power", "sn02", "off").returncode == 0
    wait_for(lambda: any(e.get("event") == "hook-error" for e in list(sim.bmc.events)), 20, "the hook's error")
    monkeypatch.undo()
    with pytest.raises(AssertionError, match=r"BMC hook for sn02: RuntimeError\('hook broken on purpose'\)"):
        sim.check()

    # The boot server refuses the callback (it comes from an address that is not the node's):
    # the image stops there, its slurmd never joins.
    monkeypatch.setattr(sim.nodes["sn03"], "ip", "127.0.0.99")
    assert sim.cli("power", "sn03", "reset", "--netboot").returncode == 0
    wait_for(lambda: any(b["node"] == "sn03" and ("error" in b or b["ok"]) for b in sim.boots), 20, "sn03's boot")
    sim.wait_idle()
    (boot,) = [b for b in sim.boots if b["node"] == "sn03"]
    assert (boot["ok"], boot["callback"], boot.get("joined")) == (False, 403, None), boot
    assert not sim.slurm.running("slurmd:sn03") and sim.nodes["sn03"].role is None
    with pytest.raises(AssertionError, match=r"sn03: boot \(reset\): boot callback refused \(HTTP 403\)"):
        sim.check()


def test_two_live_worlds_never_share_a_node_name_on_one_control_plane(balance_site, kube_cluster):
    """Every world on the session's control plane (the balance world, the VM worlds, the PostgreSQL
    and power-saving ones) runs under names of its own: a second world that reuses one is refused
    at its start, so no test can read another world's Node as its own."""
    sim = balance_site()
    with pytest.raises(AssertionError, match=r"already used by another live world.*'sn01'"):
        kube_cluster.claim("another-world", ["zz01", "sn01"])
    kube_cluster.claim("another-world", ["zz01"])  # a name of its own: taken
    kube_cluster.release("another-world")
    assert sim.kube is kube_cluster

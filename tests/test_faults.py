"""Faults a site meets, each in the middle of a switch, against the real daemons of the test world
(testbed/simnodes.py: real slurmctld/slurmd, the real Kubernetes control plane with simulated
kubelets, BMC simulators, the real boot server; the passes are the real CLI's or the same code in
this process). Each asserts the outcome: the switch converges, rolls back, or ends `failed` with
its reason; no work is killed (the fixture's check); nothing is stranded (every shared node steady
and serving exactly the side the store says)."""

from __future__ import annotations

import email.utils
import errno
import json
import os
import re
import sqlite3
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from provisioner.reconcile import CRASH_ENV
from testbed.boot_server import clock_offset_env
from testbed.simnodes import provisioner_cmd
from testbed.site import write_site
from tests.fixtures.balance import k8s_wants_a_node, running, settled, slurm_wants_a_node, web_bound
from tests.support import ROOT, missing

pytestmark = pytest.mark.integration

ALL_K8S = {n: "k8s" for n in ("sn01", "sn02", "sn03", "sn04")}


def killed_mid_switch(sim, point: str) -> None:
    """One CLI pass, SIGKILLed by the product's own crash point: the switch is under way."""
    proc, _ = sim.balance(env={CRASH_ENV: point})
    assert proc.returncode == -9, (proc.returncode, proc.stderr)
    assert sim.state("sn01").phase not in ("steady", "failed"), sim.states()


# --------------------------------------------------------------------------- a cluster's daemon goes away


def test_the_api_server_stops_mid_switch_and_comes_back(balance_site):
    """sn01 is cordoned in Kubernetes on its way to SLURM when the API server stops. No pass may
    power it (the re-check before the power action cannot be made); each says so and exits. The
    API server comes back: the switch finishes, sn01 rebooted once, no job or pod killed."""
    sim = balance_site(roles=ALL_K8S)
    jobs, pending = slurm_wants_a_node(sim)
    killed_mid_switch(sim, "after-cordon")
    phase = sim.state("sn01").phase
    sim.kube.plane.stop_apiserver()
    try:
        for _ in range(2):
            proc, report = sim.balance()
            assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
            assert report and any("check that the API server is up" in e for e in report["errors"]), \
                (proc.stderr, report)
        assert sim.bmc_actions("sn01") == [] and sim.state("sn01").phase == phase
    finally:
        sim.kube.plane.start_apiserver()
    sim.passes_until(lambda: sim.slurm.job_state(pending)[0] == "RUNNING" and settled(sim), timeout=90,
                     what="the switch to finish once the API server is back", cli=False)
    assert sim.serving("sn01") == {"slurm"} and sim.booted_once("sn01")
    assert running(sim, jobs)
    # The simulated kubelets could not heartbeat during the outage: that, and nothing else, went wrong.
    outage = sim.take_errors()
    assert all(re.search(r"simulated kubelets: .*(Connection refused|Read timed out)", e) for e in outage), outage


def test_slurmctld_restarts_mid_switch(balance_site):
    """sn01 is down in SLURM on its way to Kubernetes when slurmctld stops. No pass powers it
    meanwhile; slurmctld comes back with its saved state (the reason, the running jobs): the
    switch finishes, the jobs on the fixed nodes never stopped."""
    sim = balance_site()
    jobs = k8s_wants_a_node(sim)
    killed_mid_switch(sim, "after-down")
    sim.slurm.stop_slurmctld()
    try:
        proc, report = sim.balance()
        assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
        assert sim.bmc_actions("sn01") == []
    finally:
        sim.slurm.start_slurmctld()
    sim.slurm.wait_node_state("cn01", lambda s: s.startswith("ALLOCATED") or s.startswith("MIXED"), timeout=60)
    assert running(sim, jobs)

    sim.passes_until(lambda: web_bound(sim) and settled(sim), timeout=90,
                     what="the switch to finish once slurmctld is back", cli=False)
    assert sim.serving("sn01") == {"k8s"} and sim.booted_once("sn01")
    assert running(sim, jobs)


# --------------------------------------------------------------------------- clocks


def test_a_boot_server_two_minutes_behind_still_sees_its_nodes_through(balance_site):
    """The boot server's host clock is 2 minutes behind the balancer's (libfaketime under
    `provisioner serve`): the callbacks it records carry its time. The switch still converges:
    sn01 boots once, joins, and no pass takes its callback for a stale one."""
    sim = balance_site()
    sim.restart_boot_server(env=clock_offset_env(-120))
    with urllib.request.urlopen(f"{sim.boot.url}/healthz", timeout=10) as r:
        behind = time.time() - email.utils.parsedate_to_datetime(r.headers["Date"]).timestamp()
    assert 100 < behind < 140, f"the boot server's clock is {behind:.0f} s behind, not 120"
    jobs = k8s_wants_a_node(sim)

    sim.passes_until(lambda: web_bound(sim) and settled(sim), timeout=90,
                     what="sn01's switch with the boot server's clock behind", cli=False)
    assert sim.serving("sn01") == {"k8s"} and sim.booted_once("sn01")
    assert running(sim, jobs)


# --------------------------------------------------------------------------- the node


def test_a_node_that_never_calls_back_fails_visibly_and_serves_nothing_twice(balance_site):
    """The BMC answers, the node powers and fetches its script, then its image hangs before the
    boot callback. After the phase timeout and the retries the switch ends `failed` with the
    reason; the node is not left serving a side the store does not say, and the others move."""
    sim = balance_site(policy={"phase_timeout_s": 6, "max_retries": 1})
    jobs = k8s_wants_a_node(sim)
    sim.hang.add("sn01")
    sim.passes_until(lambda: sim.state("sn01").phase == "failed", timeout=120,
                     what="sn01's switch to fail after its timeouts", cli=False)
    st = sim.state("sn01")
    assert st.failed_reason and ("callback" in st.failed_reason or "boot" in st.failed_reason), st.failed_reason
    assert len([b for b in sim.boots if b["node"] == "sn01" and b.get("hung")]) == 2  # the first try + 1 retry
    assert sim.serving("sn01") == set()  # powered, hung: serves nobody, and the store says failed
    proc = sim.cli("nodes", "sn01", "--json")
    (row,) = json.loads(proc.stdout)
    assert row["phase"] == "failed" and row["failed_reason"] == st.failed_reason
    assert running(sim, jobs)


def test_a_node_removed_from_the_shared_pool_mid_switch(balance_site):
    """An admin edits site.yaml while sn01 switches: sn01 is now a SLURM-only node. The passes
    finish the switch or roll it back (either way the node ends steady, serving one side), and
    they warn that sn01 left the shared pool while switching."""
    sim = balance_site(roles=ALL_K8S)
    jobs, _ = slurm_wants_a_node(sim)
    killed_mid_switch(sim, "after-cordon")
    sim.pools["sn01"] = "slurm"
    sim.config = sim.write_config()
    # Passes until the switch ends, whatever the pace of the node's boot and registration (a
    # count of passes was a race with slurmd's registration on a loaded machine).
    outputs = []
    deadline = time.monotonic() + 90
    while True:
        proc, report = sim.balance()
        outputs.append(proc.stdout + proc.stderr)
        if sim.state("sn01").phase == "steady":
            break
        assert time.monotonic() < deadline, (sim.states(), outputs[-1])
        time.sleep(0.2)
    assert len(sim.serving("sn01")) == 1
    assert any("sn01" in out and "pool" in out for out in outputs), outputs
    assert running(sim, jobs)


# --------------------------------------------------------------------------- the store's disk


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs of its own (mount needs root: skipped locally without it, a failure in CI)."""
    folder = tmp_path / "small"
    folder.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(folder)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        missing(f"a small tmpfs for the store (mount: {proc.stderr.strip()})")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def fill(folder: Path) -> None:
    """Write a file until the disk is full."""
    with open(folder / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc


def cli_json(path, *args) -> list:
    proc = run_cli(path, *args, "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def run_cli(path, *args) -> subprocess.CompletedProcess:
    return subprocess.run([*provisioner_cmd(), "--config", str(path), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)


def test_the_stores_disk_fills_mid_switch(tmp_path, small_disk):
    """sn01 is switching (requested) when the store's disk fills. The next write (an admin's
    `role` on sn02) fails with one clear line that names the store and the full disk, exit 1;
    the store keeps exactly what it had: no half-written node row, no event without its change."""
    path = write_site(tmp_path / "site", site={"store": str(small_disk / "state.db")})
    assert run_cli(path, "role", "sn01", "k8s", "--reason", "before the disk filled").returncode == 0
    # The boot server keeps the store open (so its WAL and shared-memory files stay); its WAL
    # emptied, the next write must grow it: the COMMIT is what meets the full disk.
    server = sqlite3.connect(small_disk / "state.db")
    try:
        server.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        nodes, history = cli_json(path, "nodes"), cli_json(path, "history")
        fill(small_disk)

        proc = run_cli(path, "role", "sn02", "k8s", "--reason", "while the disk is full")
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 1 and len(lines) == 1, proc.stderr
        assert str(small_disk / "state.db") in lines[0] and ("full" in lines[0] or "space" in lines[0]), lines
        assert "Traceback" not in proc.stderr and "sqlite3." not in proc.stderr
        assert cli_json(path, "nodes") == nodes  # readable while full, and unchanged
        (small_disk / "filler").unlink()
        assert cli_json(path, "nodes") == nodes and cli_json(path, "history") == history
    finally:
        server.close()
    # Space again: the same command goes through.
    assert run_cli(path, "role", "sn02", "k8s", "--reason", "after").returncode == 0

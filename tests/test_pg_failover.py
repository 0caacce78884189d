"""Failover of the balancer between two hosts sharing a PostgreSQL store: host A's
pass is killed with SIGKILL in the middle of a switch (right after the power action, before it
is recorded: the hardest point), and host B's passes finish it: no node stranded, no node
powered twice. The real world of testbed/simnodes.py (slurmctld/slurmd, the Kubernetes control
plane, BMC simulators, the boot endpoint), its site.store pointed at the real PostgreSQL of
tests/fixtures/postgres.py; the two hosts are two site configs in different folders."""

from __future__ import annotations

import pytest

from provisioner import config
from provisioner.reconcile import CRASH_ENV
from tests.fixtures.balance import k8s_wants_a_node
from tests.fixtures.postgres import pg_sim_site

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pg_world(tmp_path_factory, kube_cluster, postgres_server):
    with pg_sim_site(tmp_path_factory.mktemp("pg-sim"), kube_cluster, postgres_server, "failover",
                     shared="pf[01-04]", fixed_k8s="kf01") as sim:
        yield sim


@pytest.fixture
def pg_sim(pg_world):
    """The module's world (each test resets it); the test fails on what the harness saw go wrong."""
    yield pg_world
    pg_world.check()


@pytest.mark.parametrize("point", ["after-power", "before-power", "after-down"])
def test_host_a_killed_mid_switch_host_b_finishes_it(pg_sim, point):
    sim = pg_sim
    sim.reset()  # also: the config is host A's again
    host_a = sim.config
    host_b = sim.write_config(folder=sim.workdir / "host-b-site", store={"state_dir": str(sim.workdir / "host-b")})
    site_a, site_b = config.load(host_a), config.load(host_b)
    assert site_a.store_url == site_b.store_url and site_a.store != site_b.store  # one store, two hosts
    assert sim.store.backend == "postgresql"
    jobs = k8s_wants_a_node(sim)

    # Host A's pass (the CLI, as cron runs it) dies at the crash point, pf01 mid-switch.
    proc, _ = sim.balance(env={CRASH_ENV: point})
    assert proc.returncode == -9, (proc.returncode, proc.stderr)
    assert sim.state("pf01").phase != "steady"

    # Host B: its first pass does not find a stale lock (the killed pass's connection is gone).
    sim.config = host_b
    proc, report = sim.balance()
    assert proc.returncode == 0 and report is not None, proc.stderr
    sim.passes_until(lambda: all(p["spec"].get("nodeName") for p in sim.kube.pods()
                                 if p["metadata"]["name"].startswith("web"))
                     and all(s.phase == "steady" and sim.serving(n) == {s.desired_role}
                             for n, s in sim.store.nodes(sim.shared).items()),
                     timeout=90, what=f"host B to finish the switch after kill -9 {point} on host A", cli=False)

    # 0 stranded: every shared node steady, serving the side the store says; pf01 went to k8s.
    states = sim.store.nodes(sim.shared)
    stranded = [n for n, s in states.items() if s.phase != "steady" or sim.serving(n) != {s.desired_role}]
    assert stranded == []
    assert sim.serving("pf01") == {"k8s"} and states["pf01"].desired_role == "k8s"
    # 0 duplicate power actions: the BMC booted pf01 once per successful power action recorded
    # (IPMI's own retries aside), and the store recorded one power action for it.
    boots, attempts = sim.reboots("pf01")
    power_events = sim.events(["pf01"], kinds=["power"])
    if point == "after-power":
        assert boots == 1, (boots, sim.bmc_actions("pf01"))
    assert 1 <= boots <= max(attempts, 1), (boots, attempts, sim.bmc_actions("pf01"))
    assert len([e for e in power_events if (e.data or {}).get("ok")]) <= 1, [e.message for e in power_events]
    others = [n for n in sim.shared if n != "pf01" and sim.bmc_actions(n)]
    assert others == [], {n: [(e.kind, e.actor, e.message) for e in sim.events([n])][-8:]
                          for n in others}
    assert all(sim.slurm.job_state(j)[0] == "RUNNING" for j in jobs)
    assert not sim.violations
    # Host B's passes are recorded as such in the shared history.
    assert any(e.kind in ("phase", "switched") for e in sim.events(["pf01"]))

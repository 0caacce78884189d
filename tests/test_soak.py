"""The soak against the real daemons (testbed/soak.py), 3 minutes: two `provisioner run` hosts
sharing the session's PostgreSQL, each with its boot server, the real slurmctld and Kubernetes
control plane, simulated kubelets and BMCs, a seeded workload and seeded faults (kill -9 of a
daemon, a boot server, the database; a silent BMC; the API server and slurmctld restarted).
SOAK_SEED=N replays a seed; `make soak` runs it longer (bench/soak.py)."""

from __future__ import annotations

import os

import pytest

from testbed.soak import Soak
from tests.fixtures.postgres import pg_sim_site

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DURATION_S = 180


@pytest.fixture
def soak_world(tmp_path_factory, kube_cluster, postgres_server):
    with pg_sim_site(tmp_path_factory.mktemp("soak"), kube_cluster, postgres_server, "soak",
                     shared="sk[01-04]", fixed_k8s="kk01") as sim:
        yield sim


def test_the_soak_ends_every_switch_and_harms_nothing(soak_world, postgres_server):
    seed = int(os.environ["SOAK_SEED"]) if os.environ.get("SOAK_SEED") else None
    result = Soak(soak_world, postgres_server, seed=seed, duration_s=DURATION_S).run()
    print(result.summary())  # the counters in CI's log, passed or not
    assert result.switches_done > 0 and sum(result.faults_injected.values()) > 0, result.summary()
    assert result.nodes_stranded == [], result.summary()
    assert result.work_killed == [], result.summary()
    assert result.double_power == [], result.summary()
    assert result.asks_unanswered == [], result.summary()
    assert result.harness_errors == [], result.summary()
    soak_world.check()

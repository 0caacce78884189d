"""Lending's fields in the site config (homes, grace, lending limits) and what `check` prints."""

import subprocess
import sys

import pytest

from provisioner import config
from testbed.site import write_site
from tests.test_config import load_error, rewrite


def test_home_defaults_to_the_static_split_and_can_be_set(tmp_path):
    site = config.load(write_site(tmp_path))
    assert {n.home_side for n in site.nodes.values() if n.shared} == {"slurm"}
    path = rewrite(write_site(tmp_path / "b"), lambda d: d["nodes"][1].__setitem__("home", "k8s"))
    site = config.load(path)
    assert site.nodes["sn01"].home == "k8s" and site.nodes["sn01"].default_role == "slurm"
    assert site.policy.reclaim_grace_s == {"slurm": 1800, "k8s": 300}
    assert site.policy.lending_limit == {"slurm": None, "k8s": None}


def _policy(**fields):
    return lambda d: d.setdefault("policy", {}).update(fields)


@pytest.mark.parametrize("edit, field, words", [
    (lambda d: d["nodes"][1].__setitem__("home", "gpu"), "nodes[1].home", "must be one of slurm, k8s"),
    (lambda d: d["nodes"][0].__setitem__("home", "k8s"), "nodes[0].home", "belongs to slurm"),
    (_policy(reclaim_grace_s={"k8s": -5}), "policy.reclaim_grace_s.k8s", "must be >= 0, got -5"),
    (_policy(reclaim_grace_s={"mesos": 5}), "policy.reclaim_grace_s.mesos", "unknown field"),
    (_policy(reclaim_requeue="never"), "policy.reclaim_requeue", "never"),
    (_policy(lending_limit={"slurm": 5}), "policy.lending_limit.slurm", "5 is more than the 4 shared node(s)"),
    (_policy(lending_limit={"k8s": 1}), "policy.lending_limit.k8s", "more than the 0 shared node(s) whose home is k8s"),
])
def test_lending_errors_name_the_field(tmp_path, edit, field, words):
    err = load_error(rewrite(write_site(tmp_path), edit))
    assert err.field == field, str(err)
    assert words in str(err)


def cli(*args):
    return subprocess.run([sys.executable, "-m", "provisioner", *args], capture_output=True, text=True, timeout=60)


def test_check_prints_the_reclaim_bound_and_fails_in_one_line(tmp_path):
    path = rewrite(write_site(tmp_path), _policy(reclaim_grace_s={"k8s": 240}, lending_limit={"slurm": 2}))
    out = cli("--config", str(path), "check")
    assert out.returncode == 0, out.stderr
    assert ("lending: slurm: 4 home shared node(s), lends at most 2 at once; a lent one is back within "
            "420 s + its switch (demand_persist_s=120 + a pass 60 s + k8s's reclaim_grace_s=240") in out.stdout
    # Kubernetes' home nodes lent to SLURM: the weaker bound, a job whose requeue costs more
    # than waiting for it is waited for (and the old one with reclaim_requeue: always).
    k8s = next(line for line in out.stdout.splitlines() if "lending: k8s:" in line)
    assert "slurm's reclaim_grace_s=1800" in k8s
    assert ("or, busy with a job whose requeue would cost more than waiting for it (reclaim_requeue=cheaper: "
            "more node-hours run than the wait it saves), at that job's end; a job that cannot be requeued") in k8s
    always = rewrite(path, _policy(reclaim_requeue="always"))
    out = cli("--config", str(always), "check")
    assert out.returncode == 0, out.stderr
    assert "whose requeue would cost more" not in out.stdout and "a job that cannot be requeued holds it" in out.stdout
    bad = rewrite(path, _policy(lending_limit={"slurm": 9}))
    out = cli("--config", str(bad), "check")
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0
    assert f"{bad}: policy.lending_limit.slurm: 9 is more than" in out.stderr

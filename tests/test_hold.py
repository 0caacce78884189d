"""Maintenance holds (`provisioner hold` / `unhold`) on in-process fakes: the balancer never
moves a held node (it is kept out of the moves when the snapshot is built), slurmctld's asks for
it are answered at once and for good, nothing is powered, drained or cordoned for it, and the CLI
says what it did in one line (errors too). The real slurmctld's side: test_slurm_power_saving.py."""

from __future__ import annotations

import json

import pytest

from provisioner import cli
from provisioner.clusters.slurm import PendingJob, SlurmSnapshot
from provisioner.reconcile import Reconciler
from provisioner.states import K8S, SLURM
from provisioner.store import Store
from tests.fakes import FakeKube, FakePower, FakeSlurm, kube_node, slurm_node
from tests.test_switch_regressions import SHARED, Clock, make_site


def run(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def k8s_world(tmp_path):
    """Every shared node steady in Kubernetes, idle; SLURM has a job pending that wants one."""
    site = make_site(tmp_path, power_saving=False)
    store = Store(site.store)
    store.seed((n.name, n.default_role) for n in site.nodes.values())
    for n in SHARED:
        store.update(n, actor="test", kind="test", message="arranged", desired_role=K8S, booted_role=K8S)
    slurm = FakeSlurm(**{n.name: slurm_node(n.name, state="down" if n.name in SHARED else "allocated")
                         for n in site.nodes.values()})
    job = PendingJob("12", "Resources", ("batch",), 1, 4)
    slurm.observe = lambda: SlurmSnapshot(dict(slurm.state), (job,))
    kube = FakeKube(**{n: kube_node(n) for n in SHARED})
    power = FakePower()
    rec = Reconciler(site, store, slurm=slurm, kube=kube, power=power, clock=Clock())
    yield site, store, slurm, kube, rec, power
    store.close()


def test_the_balancer_never_moves_a_held_node(k8s_world):
    site, store, slurm, kube, rec, power = k8s_world
    others = [n for n in SHARED if n != "sn01"]
    assert store.hold(others, actor="admin:test", reason="DIMM swap") == others
    # The snapshot the policy decides on: the held nodes cannot move, the free one can.
    world = rec.observe()
    snap = {n.name: n for n in rec.snapshot(world, record_demand=False).nodes}
    assert [n for n, v in snap.items() if v.pinned] == others
    assert rec.run_pass().moves == []  # demand first seen: it must last before a node moves
    rec.clock.now += 3600
    report = rec.run_pass(dry_run=True)
    assert [(m.node, m.to_role) for m in report.moves] == [("sn01", SLURM)]
    assert any(line.startswith("sn02: held for maintenance by admin:test since ") and "DIMM swap" in line
               for line in report.notes)
    # All held: nothing moves, and the dry run says why for each.
    store.hold(["sn01"], actor="admin:test", reason="firmware")
    report = rec.run_pass()
    assert report.moves == [] and store.nodes(SHARED)["sn01"].desired_role == K8S
    assert sum("the balancer leaves it alone" in n for n in report.notes) == len(SHARED)
    # Held means left alone, not taken out of service: no cordon, no drain, no power action;
    # Kubernetes shows why on the Node (an annotation).
    assert {c[0] for c in kube.calls} == {"mark_hold"} and power.calls == []
    assert [c for c in slurm.calls if c[0] == "drain"] == []
    assert {n: k.hold for n, k in kube.state.items()} == {"sn01": "firmware", "sn02": "DIMM swap",
                                                          "sn03": "DIMM swap", "sn04": "DIMM swap"}
    assert not any(k.unschedulable for k in kube.state.values())
    # Unheld: the mark goes, and the node is movable again.
    assert store.unhold(["sn01"], actor="admin:test", reason="done") == ["sn01"]
    assert [m.node for m in rec.run_pass(dry_run=True).moves] == ["sn01"]
    rec.run_pass()
    assert kube.state["sn01"].hold is None and kube.state["sn02"].hold == "DIMM swap"


def test_a_hold_made_while_a_pass_decides_is_rechecked_before_the_switch(k8s_world, monkeypatch):
    site, store, slurm, kube, rec, power = k8s_world
    assert rec.run_pass().moves == []
    rec.clock.now += 3600
    snapshot = rec.snapshot

    def held_right_after_the_snapshot(*args, **kwargs):
        snap = snapshot(*args, **kwargs)
        store.hold(["sn01", "sn02", "sn03", "sn04"], actor="admin:test", reason="DIMM swap")
        return snap

    monkeypatch.setattr(rec, "snapshot", held_right_after_the_snapshot)
    report = rec.run_pass()
    assert [m.node for m in report.moves] == ["sn01"]  # decided on what was observed ...
    assert store.get("sn01").phase == "steady" and store.get("sn01").desired_role == K8S  # ... not carried out
    assert any(n.startswith("sn01: not moved: held for maintenance") for n in report.notes)


def test_an_admins_role_on_a_held_node_is_refused(k8s_world, capsys):
    site, store, *_ = k8s_world
    store.hold(["sn02"], actor="admin:test", reason="DIMM swap")
    assert run(capsys, "--config", str(site.path), "role", "sn[01-02]", "slurm", "--reason", "x") == (
        2, "", "provisioner: sn02 held for maintenance: `provisioner unhold sn02` first "
               "(`provisioner nodes sn02` says why)\n")
    assert store.get("sn01").desired_role == K8S  # nothing of the node set was changed


@pytest.fixture
def ps_world(tmp_path):
    """SLURM power saving: sn01 in Kubernetes (powered down for SLURM), sn02 idle in SLURM."""
    site = make_site(tmp_path, power_saving=True)
    store = Store(site.store)
    store.seed((n.name, n.default_role) for n in site.nodes.values())
    store.update("sn01", actor="test", kind="test", message="arranged", desired_role=K8S, booted_role=K8S)
    slurm = FakeSlurm(**{n.name: slurm_node(n.name) for n in site.nodes.values()})
    kube = FakeKube(**{n: kube_node(n, role=None) for n in SHARED})
    power = FakePower()
    rec = Reconciler(site, store, slurm=slurm, kube=kube, power=power, clock=Clock())
    yield store, slurm, rec, power
    store.close()


def test_asks_for_a_held_node_are_answered_at_once_and_power_nothing(ps_world):
    store, slurm, rec, power = ps_world
    store.hold(["sn01", "sn02"], actor="admin:test", reason="DIMM swap")
    # slurmctld gave sn01 a job (powering it up) and let sn02 go idle.
    slurm.set("sn01", flags=frozenset({"powered_down", "powering_up"}), state="allocated", alloc_cpus=4)
    store.add_asks(["sn01"], "resume", source="slurmctld", reason="JobId=7", actor="slurmctld")
    store.add_asks(["sn02"], "suspend", source="slurmctld", reason="SuspendProgram", actor="slurmctld")
    report = rec.run_pass()
    assert store.open_asks() == []  # final: nothing left for slurmctld to wait on
    refused = store.events(["sn01"], kinds=["ask-refused"])
    assert len(refused) == 1 and "held for maintenance by admin:test" in refused[0].message \
        and "DIMM swap" in refused[0].message and "provisioner unhold sn01" in refused[0].message
    done = store.events(["sn02"], kinds=["ask-done"])
    assert len(done) == 1 and "not powered off: held for maintenance by admin:test" in done[0].message \
        and "DIMM swap" in done[0].message
    assert power.calls == []  # neither booted for the job nor powered off for SLURM
    # SLURM requeues the job now (as for any refused resume), told why; both stay where they were.
    assert slurm.state["sn01"].reason.startswith("provisioner: resume refused: held for maintenance")
    assert "powered_down" in slurm.state["sn01"].flags
    assert store.get("sn01").desired_role == K8S and store.get("sn02").desired_role == SLURM
    assert not any(m.node == "sn01" for m in report.moves)
    # Later, SLURM (which took sn02 for powered down) gives it a job: refused as well, drained.
    slurm.set("sn02", flags=frozenset({"powered_down", "powering_up"}), state="allocated", alloc_cpus=4)
    store.add_asks(["sn02"], "resume", source="slurmctld", reason="JobId=8", actor="slurmctld")
    rec.run_pass()
    assert store.open_asks() == [] and power.calls == [] and slurm.state["sn02"].drain
    # Unheld: the drains the hold made are lifted (sn02 in SLURM; sn01 by the power-saving view),
    # free for SLURM to ask for again.
    slurm.set("sn02", flags=frozenset({"powered_down", "drain"}), state="idle")
    store.unhold(["sn01", "sn02"], actor="admin:test", reason="done")
    rec.run_pass()
    assert not slurm.state["sn02"].drain and not slurm.state["sn01"].drain


def test_cli_hold_and_unhold(site, capsys):
    config = str(site.path)
    assert run(capsys, "--config", config, "hold", "sn[01-02]", "--reason", "DIMM swap") == (
        0, "sn[01-02]: held for maintenance: the balancer, slurmctld's asks and power saving leave them alone\n", "")
    assert run(capsys, "--config", config, "hold", "sn[01-03]", "--reason", "DIMM swap") == (
        0, "sn03: held for maintenance: the balancer, slurmctld's asks and power saving leave them alone\n"
           "sn[01-02]: already held with that reason\n", "")
    code, out, err = run(capsys, "--config", config, "nodes", "sn01")
    assert code == 0 and "HELD" in out and "held: DIMM swap (admin:" in out
    code, out, err = run(capsys, "--config", config, "nodes", "sn[01-04]", "--json")
    rows = {r["name"]: r for r in json.loads(out)}
    assert rows["sn01"]["held"] and rows["sn01"]["hold"]["reason"] == "DIMM swap"
    assert rows["sn01"]["hold"]["actor"].startswith("admin:") and rows["sn01"]["hold"]["since"].endswith("+00:00")
    assert not rows["sn04"]["held"] and rows["sn04"]["hold"] is None
    code, out, err = run(capsys, "--config", config, "unhold", "sn[01-04]", "--json")
    assert code == 0 and [(r["name"], r["changed"], r["held"]) for r in json.loads(out)] == [
        ("sn01", True, False), ("sn02", True, False), ("sn03", True, False), ("sn04", False, False)]
    code, out, err = run(capsys, "--config", config, "history", "sn01", "--json")
    kinds = [(e["kind"], e["data"]["reason"]) for e in json.loads(out) if e["kind"] in ("hold", "unhold")]
    assert kinds == [("hold", "DIMM swap"), ("unhold", "maintenance done")]


@pytest.mark.parametrize("argv, message", [
    (("hold", "sn01"), "the following arguments are required: --reason"),
    (("hold", "sn[01-", "--reason", "x"), "bad hostlist expression"),
    (("hold", "sn99", "--reason", "x"), "sn99"),
    (("hold", "cn01", "--reason", "x"), "cn01 not in the shared pool"),
    (("unhold", "sn[01-"), "bad hostlist expression"),
])
def test_cli_hold_errors_are_one_line(site, capsys, argv, message):
    code, out, err = run(capsys, "--config", str(site.path), *argv)
    assert code == 2 and out == "" and err.count("\n") == 1 and message in err, err


def test_cli_hold_refuses_a_node_in_a_switch(site, capsys):
    config = str(site.path)
    assert run(capsys, "--config", config, "role", "sn01", "k8s", "--reason", "x")[0] == 0
    assert run(capsys, "--config", config, "hold", "sn01", "--reason", "x") == (
        2, "", "provisioner: sn01 in the middle of a switch: `provisioner role sn01 --cancel` or let it end "
               "(`provisioner nodes sn01`), then hold\n")

"""What the CLI used to do itself and now calls: an admin's role change, `--now` included
(Reconciler.change_role -> RoleChange), and the image listing (images.listing: versions x pins x
roles). Both directly, on in-process fakes and a hand-made built image, and through the CLI,
whose output must stay what it was."""

from __future__ import annotations

import json

import pytest

from provisioner import cli, images
from provisioner.errors import UsageError
from provisioner.reconcile import Reconciler, pass_lock
from provisioner.states import K8S, REQUESTED, SLURM, STEADY
from provisioner.store import Store
from tests.fakes import FakeKube, FakePower, FakeSlurm, kube_node, slurm_node
from tests.support import fake_built_image
from testbed.site import write_site

SHARED = ("sn01", "sn02", "sn03", "sn04")


@pytest.fixture
def world(site):
    """The default test site's store, and fakes of both clusters and of power that know its
    shared nodes (all idle in SLURM, none holding pods)."""
    store = Store(site.store)
    store.seed((n.name, n.default_role) for n in site.nodes.values())
    slurm = FakeSlurm(**{n: slurm_node(n) for n in SHARED})
    kube = FakeKube(**{n: kube_node(n, role=None) for n in SHARED})
    power = FakePower()
    return store, Reconciler(site, store, slurm=slurm, kube=kube, power=power), power


# --------------------------------------------------------------------------- Reconciler.change_role


def test_change_role_requests_and_pins(world):
    store, rec, power = world
    change = rec.change_role(["sn01", "sn02"], K8S, actor="admin:test", reason="maintenance")
    assert (change.requested, change.pinned, change.now, change.report, change.ok) == \
        (["sn01", "sn02"], [], False, None, True)
    st = store.get("sn01")
    assert (st.phase, st.target_role, st.pinned, st.switch_actor) == (REQUESTED, K8S, True, "admin:test")
    assert power.calls == []  # nothing beyond the request without now

    stay = rec.change_role(["sn03"], SLURM, actor="admin:test", reason="stay")
    assert (stay.requested, stay.pinned) == ([], ["sn03"]) and store.get("sn03").pinned


def test_change_role_refuses_nodes_outside_the_shared_pool(world):
    store, rec, _ = world
    with pytest.raises(UsageError, match=r"cn01 not in the shared pool: only shared nodes change role"):
        rec.change_role(["sn01", "cn01"], K8S, actor="admin:test", reason="x")
    assert store.get("sn01").phase == STEADY  # nothing was requested


def test_change_role_now_carries_the_switch_as_far_as_it_goes(world):
    store, rec, power = world
    change = rec.change_role(["sn01"], K8S, actor="admin:test", reason="now", now=True)
    assert change.ok and change.locked is None
    assert [s.action for s in change.report.steps] == ["draining", "rebooting", "booting"]
    assert power.calls == [("boot", ("sn01",), True)]
    assert store.get("sn02").phase == STEADY  # only the nodes asked for


def test_change_role_now_while_another_pass_runs_leaves_it_to_that_pass(world, site):
    store, rec, power = world
    with pass_lock(site):
        change = rec.change_role(["sn01"], K8S, actor="admin:test", reason="now", now=True, wait_s=0)
    assert change.report is None and "another balance pass is running" in change.locked
    assert store.get("sn01").phase == REQUESTED and power.calls == []


# --------------------------------------------------------------------------- images.listing


@pytest.fixture
def built(tmp_path):
    """A site whose slurm role boots a hand-made built image `tiny` (v2 current); sn02 is pinned to v1."""
    folder = tmp_path / "site"
    fake_built_image(folder / "images", "tiny", ["v1", "v2"], current="v2")
    path = write_site(folder, images={"slurm": {"image": "tiny"}})
    from provisioner import config

    site = config.load(path)
    store = Store(site.store)
    store.seed((n.name, n.default_role) for n in site.nodes.values())
    store.pin_image(["sn02", "sn01"], "tiny", "v1", actor="t", reason="r")
    return site, store


def test_listing_joins_versions_pins_and_roles(built):
    site, store = built
    roles = {r: i.name for r, i in site.images.items()}
    found = images.listing(site.image_root, site.image_definitions, store.image_pins(), roles)
    assert [(r["image"], r["version"], r["current"], r["pinned_nodes"], r["roles"]) for r in found.rows] == [
        ("tiny", "v1", False, ["sn01", "sn02"], ["slurm"]), ("tiny", "v2", True, [], ["slurm"])]
    assert found.unbuilt == ("k8s", "slurm")  # defined in the repository's images/, never built here
    one = images.listing(site.image_root, site.image_definitions, [], roles, name="tiny")
    assert [r["version"] for r in one.rows] == ["v1", "v2"] and one.unbuilt == ()
    with pytest.raises(UsageError, match="no image nope: not defined in .* and never built"):
        images.listing(site.image_root, site.image_definitions, [], roles, name="nope")


# --------------------------------------------------------------------------- the CLI's output


def run(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_role_output(site, capsys):
    config = str(site.path)
    assert run(capsys, "--config", config, "role", "sn[01-02]", "k8s", "--reason", "test") == (0, (
        "sn[01-02]: switch to k8s requested, pinned (test)\n"
        "the next `provisioner balance` pass carries it out (or run role again with --now); "
        "follow it with `provisioner nodes sn[01-02]`\n"), "")
    assert run(capsys, "--config", config, "role", "sn01", "k8s", "--reason", "again") == (
        0, "sn01: already k8s; pinned there\n", "")
    assert run(capsys, "--config", config, "role", "sn03", "slurm", "--reason", "x", "--now") == (
        0, "sn03: already slurm; pinned there\n", "")
    assert run(capsys, "--config", config, "role", "cn01", "k8s", "--reason", "x") == (
        2, "", f"provisioner: cn01 not in the shared pool: only shared nodes change role "
               f"(change pool in {site.path} first)\n")


def test_cli_role_now_output(world, site, capsys, monkeypatch):
    _, rec, power = world
    monkeypatch.setattr(cli, "_reconciler", lambda ctx: rec)
    config = str(site.path)
    assert run(capsys, "--config", config, "role", "sn01", "k8s", "--reason", "now", "--now") == (0, (
        "sn01: switch to k8s requested, pinned (now)\n"
        "sn01: draining: draining in SLURM (now)\n"
        "sn01: rebooting: drained and down in SLURM (k8s_connect); will boot the k8s image\n"
        "sn01: booting: power ipmi boot with one-time network boot\n"), "")
    power.ok = False
    code, out, _ = run(capsys, "--config", config, "role", "sn02", "k8s", "--reason", "dead bmc", "--now")
    assert code == 1 and out.endswith("sn02: power: failed: BMC did not answer within 5s (2 attempts) [FAILED]\n")


def test_cli_role_now_while_another_pass_runs(world, site, capsys, monkeypatch):
    _, rec, _ = world

    class NoWait:  # the real wait is a minute
        def change_role(self, *args, **kwargs):
            return rec.change_role(*args, wait_s=0, **kwargs)

    monkeypatch.setattr(cli, "_reconciler", lambda ctx: NoWait())
    with pass_lock(site):
        code, out, err = run(capsys, "--config", str(site.path), "role", "sn03", "k8s", "--reason", "busy", "--now")
    assert (code, err) == (0, "") and out.splitlines() == [
        "sn03: switch to k8s requested, pinned (busy)",
        f"another balance pass is running (lock {site.store}.balance.lock); it will carry the switch on"]


def test_cli_image_list_output(built, capsys):
    site, _ = built
    config = str(site.path)
    code, out, err = run(capsys, "--config", config, "image", "list")
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].split() == ["IMAGE", "VERSION", "CURRENT", "SIZE", "BUILT", "KERNEL", "PINNED"]
    assert [line.split() for line in lines[1:3]] == [["tiny", "v1", "0", "B", "-", "-", "sn[01-02]"],
                                                     ["tiny", "v2", "*", "0", "B", "-", "-"]]
    assert lines[3:] == ["not built yet: k8s, slurm (`provisioner image build NAME`)"]
    code, out, _ = run(capsys, "--config", config, "image", "list", "tiny", "--json")
    rows = json.loads(out)
    assert code == 0 and [(r["version"], r["pinned_nodes"], r["roles"]) for r in rows] == \
        [("v1", ["sn01", "sn02"], ["slurm"]), ("v2", [], ["slurm"])]
    assert run(capsys, "--config", config, "image", "list", "nope")[0] == 2

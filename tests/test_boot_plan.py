"""One boot plan (provisioner/boot/plan.py) for every way a node boots: a node pinned to an image
version gets that version from its iPXE script (the boot endpoint), from `provisioner render`,
and from a kexec (the command line power/ssh builds). Fast: a hand-made built image, no daemons."""

from __future__ import annotations

import pytest

from provisioner import config
from provisioner.boot.app import create_app
from provisioner.boot.plan import BootPlan, BootPlanner, NoBoot, choose_role, plan
from provisioner.cli import main
from provisioner.images.versions import Resolver
from provisioner.power import ssh
from provisioner.reconcile import power_nodes
from provisioner.remote import CommandResult
from provisioner.store import Store
from provisioner.tokens import load_or_create_secret, node_token
from testbed.site import mac, write_site
from tests.support import fake_built_image

OLD, NEW = "20250101-000000", "20250202-000000"


@pytest.fixture
def pinned_site(tmp_path):
    """Both roles boot the built image `tiny` (current: NEW); sn02 is pinned to OLD; sn02 and sn03
    reboot by kexec."""
    folder = tmp_path / "site"
    fake_built_image(folder / "images", "tiny", [OLD, NEW], current=NEW)
    nodes = [{"name": f"sn0{i}", "pool": "shared", "default_role": "slurm", "macs": [mac(i, 3)],
              "ip": f"10.0.3.{i}", "bmc": {"address": "127.0.0.1"},
              "power_method": "ipmi" if i == 1 else "kexec"} for i in (1, 2, 3)]
    path = write_site(folder, nodes=nodes, images={"slurm": {"image": "tiny", "cmdline": "quiet"},
                                                   "k8s": {"image": "tiny"}})
    site = config.load(path)
    store = Store(site.store)
    store.seed((n.name, n.default_role) for n in site.nodes.values())
    store.pin_image(["sn02"], "tiny", OLD, actor="test", reason="rollback")
    return site, store


# --------------------------------------------------------------------------- the three ways a node boots


def test_ipxe_script_boots_the_pinned_version(pinned_site):
    site, _ = pinned_site
    client = create_app(site).test_client()
    pinned = client.get(f"/ipxe?mac={mac(2, 3)}").text
    assert f"/images/tiny/{OLD}/vmlinuz" in pinned and f"provisioner.version={OLD}" in pinned
    assert f"/overlay/sn02.cpio.gz?image=tiny&version={OLD}&" in pinned
    other = client.get(f"/ipxe?mac={mac(1, 3)}").text
    assert f"/images/tiny/{NEW}/vmlinuz" in other and f"provisioner.version={NEW}" in other


def test_render_prints_the_script_the_endpoint_serves(pinned_site, capsys):
    site, _ = pinned_site
    served = create_app(site).test_client().get(f"/ipxe?mac={mac(2, 3)}").text
    assert main(["--config", str(site.path), "render", "sn02"]) == 0
    out = capsys.readouterr().out
    assert f"provisioner.version={OLD}" in out and out == served


def test_kexec_command_boots_the_pinned_version(pinned_site):
    site, store = pinned_site
    node = site.nodes["sn02"]
    argv = ssh.kexec_argv(BootPlanner(site, load_or_create_secret(site.secret_file), store).plan(node), node.macs[0])
    assert argv[:4] == ["sh", "-c", ssh.KEXEC_SCRIPT, "provisioner-kexec"]
    kernel, append, *initrds = argv[4:]
    assert kernel == f"{site.boot_url}/images/tiny/{OLD}/vmlinuz"
    assert f"provisioner.version={OLD}" in append and "provisioner.role=slurm" in append
    assert initrds[0] == f"{site.boot_url}/images/tiny/{OLD}/initramfs.img"
    assert f"version={OLD}&" in initrds[1] and initrds[1].endswith(f"mac={node.macs[0]}")  # no ${netX/mac}


def test_power_nodes_kexecs_each_node_into_its_own_plan(pinned_site, monkeypatch):
    """The whole kexec path (power_nodes -> run_action -> ssh.kexec) with SSH replaced by a
    recorder: the pinned node gets its pinned version, the other the current one, and the
    kernel command line is the one its iPXE script carries."""
    site, store = pinned_site
    sent = {}

    def fake_run(target, argv, timeout, env=None):
        sent[target.host] = argv
        return CommandResult(-1, "", "")  # the node dropped the connection: it is going down

    monkeypatch.setattr(ssh.remote, "run", fake_run)
    results = power_nodes(site, [site.nodes["sn02"], site.nodes["sn03"]], "reset", store=store, actor="test")
    assert [(r.ok, r.method) for r in results] == [(True, "kexec"), (True, "kexec")], results
    assert sent["10.0.3.2"][4].endswith(f"/tiny/{OLD}/vmlinuz") and sent["10.0.3.3"][4].endswith(f"/tiny/{NEW}/vmlinuz")
    script = create_app(site).test_client().get(f"/ipxe?mac={mac(2, 3)}").text
    assert f" {sent['10.0.3.2'][5]} || goto failed" in script  # the same kernel arguments
    events = [e for e in store.events(["sn02", "sn03"]) if e.kind == "power"]
    assert sorted(e.node for e in events) == ["sn02", "sn03"] and events[0].actor == "test"


def test_a_kexec_node_with_no_image_fails_with_the_reason(pinned_site, monkeypatch):
    site, store = pinned_site
    store.pin_image(["sn02"], "tiny", "20000101-000000", actor="test", reason="gone")
    monkeypatch.setattr(ssh.remote, "run", lambda *a, **k: pytest.fail("no SSH without an image"))
    [res] = power_nodes(site, [site.nodes["sn02"]], "reset", store=store)
    assert not res.ok and res.error_kind == "ssh"
    assert "pinned to version 20000101-000000, which does not exist" in res.error


# --------------------------------------------------------------------------- the pure parts


def test_choose_role():
    assert choose_role("k8s", "slurm") == "k8s"
    assert choose_role(None, "slurm") == "slurm"


def test_plan_over_plain_data(site):
    node, secret = site.nodes["sn01"], b"s" * 32
    p = plan(node, "k8s", site.images["k8s"], secret, boot_url="http://b", image_root="/srv/images")
    assert isinstance(p, BootPlan) and p.ok and (p.role, p.version, p.image, p.pin) == ("k8s", "1", None, None)
    assert p.kernel_url == "http://b/images/k8s/vmlinuz" and p.initrd_urls == ("http://b/images/k8s/initrd.img",)
    assert p.files[0] == ("k8s/vmlinuz", "/srv/images/k8s/vmlinuz") and p.template == "k8s.ipxe.j2"
    assert p.args == (f"console=ttyS0 provisioner.node=sn01 provisioner.role=k8s provisioner.version=1 "
                      f"provisioner.callback=http://b/api/v1/nodes/sn01/booted "
                      f"provisioner.token={node_token(secret, 'sn01')}")
    assert p.initrds_for("aa:bb") == p.initrd_urls  # no overlay
    # the same data, the same plan
    assert p == plan(node, "k8s", site.images["k8s"], secret, boot_url="http://b", image_root="/srv/images")


def test_plan_of_a_built_image_says_why_not(pinned_site):
    site, _ = pinned_site
    node, image = site.nodes["sn01"], site.images["slurm"]
    common = dict(boot_url="http://b", image_root=str(site.image_root))
    none = plan(node, "slurm", image, b"s" * 32, version=None, **common)
    assert isinstance(none, NoBoot) and not none.ok
    assert none.reason == "node sn01: image tiny has no published version; run `provisioner image build tiny`"
    gone = plan(node, "slurm", image, b"s" * 32, version="x1", pin="x1", **common)
    assert gone.reason == "node sn01: image tiny pinned to version x1, which does not exist under the image root"
    pub = Resolver(site.image_root).get("tiny", OLD)
    ok = plan(node, "slurm", image, b"s" * 32, version=OLD, pin=OLD, published=pub, **common)
    assert ok.ok and ok.pin == OLD and ok.cmdline == "panic=10 quiet" and ok.overlay_url


def test_planner_reads_role_pin_and_files(pinned_site):
    site, store = pinned_site
    planner = BootPlanner(site, b"s" * 32, store)
    assert planner.plan("sn02").version == OLD and planner.plan("sn01").version == NEW
    store.set_role(["sn01"], "k8s", actor="test", reason="r", pin=True)
    assert planner.plan("sn01").role == "k8s"
    assert planner.plan("sn02") is planner.plan("sn02")  # made once, reused on the hot path
    (site.image_root / "tiny" / OLD / "vmlinuz").unlink()
    missing = planner.plan("sn02")
    assert not missing.ok and f"is missing tiny/{OLD}/vmlinuz" in missing.reason
    assert planner.plan("sn02", check_files=False).ok  # kexec: the node fetches (and checks) the files
    assert BootPlanner(site, b"s" * 32).plan("sn02").version == NEW  # no store: default role, no pin

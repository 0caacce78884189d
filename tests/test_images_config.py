"""The site config's built-image roles (images.ROLE.image) and overlay section, and how the
renderer resolves a built image per request (current version, pins, missing files)."""

from __future__ import annotations

import shutil

import pytest

from provisioner import config, images
from provisioner.boot.app import create_app
from provisioner.boot.plan import BootPlanner
from provisioner.boot.render import Renderer
from provisioner.errors import ConfigError
from provisioner.store import Store
from provisioner.tokens import load_or_create_secret
from testbed.site import mac, write_site
from testbed.tinyimage import clone_root, tiny_site


def load(tmp_path, **sections):
    return config.load(write_site(tmp_path / "s", **sections))


def test_a_role_may_name_a_built_image(tmp_path):
    site = load(tmp_path, images={"slurm": {"image": "slurm", "cmdline": "quiet"},
                                  "k8s": {"version": "1", "kernel": "k8s/vmlinuz", "initrds": ["k8s/initrd.img"]}})
    assert site.images["slurm"].name == "slurm" and site.images["slurm"].cmdline == "quiet"
    assert not site.images["slurm"].resolved and site.images["k8s"].resolved and site.images["k8s"].name is None
    assert site.image_definitions.name == "images" and (site.image_definitions / "tiny" / "image.yaml").is_file()


@pytest.mark.parametrize("images_section, field, words", [
    ({"slurm": {"image": "slurm", "kernel": "slurm/vmlinuz"}}, "images.slurm.kernel", "not with image"),
    ({"slurm": {"image": "slurm", "version": "3"}}, "images.slurm.version", "not with image"),
    ({"slurm": {"image": "../etc"}}, "images.slurm.image", "must be an image name"),
    ({"slurm": {"image": "slurm", "template": "nope.ipxe.j2"}}, "images.slurm.template", "does not exist"),
    ({"slurm": {"image": "slurm", "rootfs": "x"}}, "images.slurm.rootfs", "not with image"),
])
def test_built_image_errors(tmp_path, images_section, field, words):
    k8s = {"version": "1", "kernel": "k8s/vmlinuz"}
    with pytest.raises(ConfigError) as err:
        load(tmp_path, images={**images_section, "k8s": k8s})
    assert err.value.field == field and words in err.value.message


def test_overlay_section(tmp_path):
    (tmp_path / "munge.key").write_bytes(b"\x00" * 32)
    site = load(tmp_path, overlay={"files": {"munge_key": str(tmp_path / "munge.key")},
                                   "values": {"kube_api_server": "https://10.0.0.1:6443", "port": 6443}})
    assert site.overlay.files == {"munge_key": str(tmp_path / "munge.key")}
    assert site.overlay.values == {"kube_api_server": "https://10.0.0.1:6443", "port": "6443"}
    assert "munge" not in repr(site.overlay)  # the paths and values stay out of reprs and tracebacks
    assert load(tmp_path, overlay=None).overlay.files == {}


@pytest.mark.parametrize("section, field, words", [
    ({"files": {"munge_key": "/no/such/file"}}, "overlay.files.munge_key", "does not exist"),
    ({"files": {"Munge-Key": "x"}}, "overlay.files.Munge-Key", "lower case letters, digits and _"),
    ({"files": ["x"]}, "overlay.files", "must be a mapping"),
    ({"values": {"a": ["x"]}}, "overlay.values.a", "must be a string"),
    ({"values": {"a": None}}, "overlay.values.a", "is required"),
    ({"secrets": {}}, "overlay.secrets", "unknown field"),
])
def test_overlay_errors(tmp_path, section, field, words):
    with pytest.raises(ConfigError) as err:
        load(tmp_path, overlay=section)
    assert err.value.field == field and words in err.value.message
    assert "site.yaml" in str(err.value)


def test_overlay_key_in_both_sections(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match=r"overlay.values.k: given in both"):
        load(tmp_path, overlay={"files": {"k": str(tmp_path / "f")}, "values": {"k": "v"}})


# --------------------------------------------------------------------------- resolving per request


@pytest.mark.integration  # builds (and, the first time, downloads) the tiny image
def test_renderer_follows_current_and_pins(tiny_image, tmp_path):
    root = clone_root(tiny_image, tmp_path)
    site = config.load(tiny_site(tmp_path / "site", root, images={"slurm": {"image": "tiny", "cmdline": "quiet"},
                                                                  "k8s": {"image": "tiny"}}))
    store = Store(site.store)
    store.seed((n.name, n.default_role) for n in site.nodes.values())
    renderer = Renderer(site)
    planner = BootPlanner(site, load_or_create_secret(site.secret_file), store)
    node = site.nodes["sn01"]

    def script(role="slurm"):
        return renderer.node(planner.plan(node, role))

    v1 = tiny_image.version
    first = script()
    assert first.ok and f"/images/tiny/{v1}/vmlinuz" in first.text and f"provisioner.version={v1}" in first.text
    assert "console=ttyS0,115200 panic=10 quiet provisioner.node=sn01" in first.text  # image's, then site's
    assert script() is first  # cached while nothing changes

    # a second version (a copy with another name is enough for the renderer) published
    v2 = "29990101-000000"
    shutil.copytree(root / "tiny" / v1, root / "tiny" / v2)
    images.publish(root, "tiny", v2)
    assert f"provisioner.version={v2}" in script().text  # the next request sees it
    store.pin_image(["sn01"], "tiny", v1, actor="t", reason="r")
    assert f"provisioner.version={v1}" in script().text

    store.pin_image(["sn01"], "tiny", "20000101-000000", actor="t", reason="r")
    gone = script()
    assert not gone.ok and "pinned to version 20000101-000000, which does not exist" in gone.text
    store.unpin_image(["sn01"], actor="t", reason="r")
    (root / "tiny" / v2 / "initramfs.img").unlink()
    broken = script()
    assert not broken.ok and f"version {v2} is missing tiny/{v2}/initramfs.img" in broken.text
    # kexec gets the same plan (current version, the overlay too)
    plan = planner.plan(node, "k8s", check_files=False)
    assert plan.kernel_url.endswith(f"/images/tiny/{v2}/vmlinuz") and plan.overlay_url


@pytest.mark.integration  # builds (and, the first time, downloads) the tiny image
def test_boot_endpoint_applies_a_nodes_pin(tiny_image, tmp_path):
    root = clone_root(tiny_image, tmp_path)
    site = config.load(tiny_site(tmp_path / "site", root))
    v2 = "29990101-000000"
    shutil.copytree(root / "tiny" / tiny_image.version, root / "tiny" / v2)
    images.publish(root, "tiny", v2)
    client = create_app(site).test_client()
    Store(site.store).pin_image(["sn02"], "tiny", tiny_image.version, actor="t", reason="r")
    assert f"provisioner.version={v2}" in client.get(f"/ipxe?mac={mac(1, 3)}").text
    assert f"provisioner.version={tiny_image.version}" in client.get(f"/ipxe?mac={mac(2, 3)}").text
    Store(site.store).unpin_image(["sn02"], actor="t", reason="r")
    assert f"provisioner.version={v2}" in client.get(f"/ipxe?mac={mac(2, 3)}").text

"""Per-node overlays: the real slurm and k8s overlay templates, and the boot endpoint serving a
node its own overlay (and nobody else's) from a real `provisioner serve`."""

from __future__ import annotations

import base64
import gzip
import json
import os
import re
import secrets
import shutil
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from provisioner import config
from provisioner.boot import overlay
from provisioner.boot.app import create_app
from provisioner.boot.boots import Boots
from provisioner.errors import OperationError
from provisioner.images.definition import load as load_definition
from provisioner.images.versions import Published
from provisioner.store import Store
from provisioner.tokens import load_or_create_secret
from testbed.boot_server import BootServer
from testbed.site import mac
from tests.support import free_port, require_binary
from testbed.tinyimage import DEFINITIONS, build_tiny, clone_root, tiny_site

BOOTSTRAP_TOKEN = "abcdef.0123456789abcdef"
SLURM_MARKER = "ClusterName=overlay-test-cluster"


def write_secrets(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "slurm_conf": folder / "slurm.conf",
        "munge_key": folder / "munge.key",
        "kube_ca": folder / "ca.crt",
        "kube_bootstrap_token": folder / "bootstrap-token",
    }
    files["slurm_conf"].write_text(f"{SLURM_MARKER}\nSlurmctldHost=ctl(10.0.0.1)\nNodeName=sn[01-03] CPUs=1\n")
    files["munge_key"].write_bytes(secrets.token_bytes(1024))
    files["kube_ca"].write_text("-----BEGIN CERTIFICATE-----\nTUlJQ0NBQ0FB\n-----END CERTIFICATE-----\n")
    files["kube_bootstrap_token"].write_text(BOOTSTRAP_TOKEN + "\n")
    return files


def overlay_section(files: dict[str, Path], **values) -> dict:
    return {"files": {k: str(v) for k, v in files.items()},
            "values": {"kube_api_server": "https://10.0.0.1:6443", **values}}


def unpack(data: bytes, dest: Path) -> str:
    """Unpack a gzip'd newc archive with Debian's cpio (an independent reader); returns `cpio -tv`."""
    cpio = require_binary("cpio")
    raw = gzip.decompress(data)
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run([cpio, "-idm", "--quiet", "--no-absolute-filenames"], input=raw, cwd=dest, check=True,
                   capture_output=True)
    # numeric ids: the host may have users with the image's uids (Debian's prometheus package adds uid 104)
    return subprocess.run([cpio, "-tv", "--numeric-uid-gid", "--quiet"], input=raw, capture_output=True, check=True).stdout.decode()


# --------------------------------------------------------------------------- the real templates (no build)


def published_from_definition(name: str, ids: dict[str, tuple[int, int]] | None = None) -> Published:
    """The overlay part of a version of the slurm or k8s image, straight from its definition
    (those images are not built in the tests: see test_images.py)."""
    d = load_definition(DEFINITIONS, name)
    ids = ids or {}
    entries = tuple(e.as_dict() | dict(zip(("uid", "gid"), ids.get(e.owner, (0, 0)))) for e in d.overlay)
    return Published(image=name, version="20260101-000000", kernel="", initrds=(), rootfs=None, cmdline=d.cmdline,
                     overlay=entries, folder=str(d.folder), paths=())


@pytest.fixture
def secret_files(tmp_path):
    return write_secrets(tmp_path / "secrets")


def _site(tmp_path, secret_files, **values):
    from testbed.site import write_site

    return config.load(write_site(tmp_path / "site", overlay=overlay_section(secret_files, **values)))


def test_slurm_overlay(tmp_path, secret_files):
    site = _site(tmp_path, secret_files)
    pub = published_from_definition("slurm", {"munge": (104, 107)})
    listing = unpack(overlay.build(site, site.nodes["sn02"], "slurm", pub, secret=None), tmp_path / "out")
    root = tmp_path / "out" / "provisioner" / "overlay"
    assert (root / "etc/hostname").read_text() == "sn02\n"
    assert (root / "etc/slurm/slurm.conf").read_text() == secret_files["slurm_conf"].read_text()
    assert (root / "etc/munge/munge.key").read_bytes() == secret_files["munge_key"].read_bytes()
    assert 'SLURMD_OPTIONS="-N sn02"' in (root / "etc/default/slurmd").read_text()
    assert not (root / "root/.ssh/authorized_keys").exists()  # optional, and the site names none
    key = next(line for line in listing.splitlines() if line.endswith("provisioner/overlay/etc/munge/munge.key"))
    assert key.startswith("-r--------") and re.search(r"\s104\s+107\s", key)  # uid/gid of munge in the image
    assert re.search(r"^drwx------ .* provisioner$", listing, re.M)


def test_k8s_overlay(tmp_path, secret_files):
    site = _site(tmp_path, secret_files, kube_cluster_dns="10.32.0.10")
    pub = published_from_definition("k8s")
    unpack(overlay.build(site, site.nodes["sn01"], "k8s", pub, secret=None), tmp_path / "out")
    root = tmp_path / "out" / "provisioner" / "overlay"
    kubeconfig = yaml.safe_load((root / "etc/kubernetes/bootstrap-kubelet.conf").read_text())
    cluster = kubeconfig["clusters"][0]["cluster"]
    assert cluster["server"] == "https://10.0.0.1:6443"
    assert base64.b64decode(cluster["certificate-authority-data"]) == secret_files["kube_ca"].read_bytes()
    assert kubeconfig["users"][0]["user"]["token"] == BOOTSTRAP_TOKEN
    assert (root / "etc/kubernetes/pki/ca.crt").read_bytes() == secret_files["kube_ca"].read_bytes()
    kubelet = yaml.safe_load((root / "var/lib/kubelet/config.yaml").read_text())
    assert kubelet["clusterDNS"] == ["10.32.0.10"] and kubelet["clusterDomain"] == "cluster.local"
    assert "--hostname-override=sn01 --node-labels=sched=k8s" in (root / "etc/default/kubelet").read_text()


def test_overlay_errors_name_the_setting_never_the_secret(tmp_path, secret_files):
    files = dict(secret_files)
    del files["munge_key"]
    from testbed.site import write_site

    site = config.load(write_site(tmp_path / "a", overlay={"files": {k: str(v) for k, v in files.items()}}))
    with pytest.raises(OperationError, match=r"image slurm needs overlay.files.munge_key for /etc/munge/munge.key; "
                                             r"set it in .*site.yaml"):
        overlay.build(site, site.nodes["sn01"], "slurm", published_from_definition("slurm"), secret=None)
    with pytest.raises(OperationError, match=r"bootstrap-kubelet.conf.j2 of k8s .*: overlay.values.kube_api_server "
                                             r"is not set in .*site.yaml"):
        overlay.build(site, site.nodes["sn01"], "k8s", published_from_definition("k8s"), secret=None)
    # a binary file used in a template (instead of copy:) is refused by name, its bytes unshown
    files["kube_bootstrap_token"] = secret_files["munge_key"]
    site = config.load(write_site(tmp_path / "b", overlay=overlay_section(files)))
    with pytest.raises(OperationError, match=r"overlay.files.kube_bootstrap_token is binary"):
        overlay.build(site, site.nodes["sn01"], "k8s", published_from_definition("k8s"), secret=True)


def test_the_public_part_holds_no_secret(tmp_path, secret_files):
    """What iPXE loads (any user who knows the node's MAC can ask for it) holds only files every
    user of the node may read; the rest is the secret part, which /init fetches as root."""
    site = _site(tmp_path, secret_files, kube_cluster_dns="10.32.0.10")
    for role, secret_paths in (("slurm", {"/etc/munge/munge.key", "/etc/ssh/ssh_host_ed25519_key"}),
                               ("k8s", {"/etc/kubernetes/bootstrap-kubelet.conf", "/etc/ssh/ssh_host_ed25519_key"})):
        pub = published_from_definition(role)
        public = {e["path"] for e, _ in overlay.render_files(site, site.nodes["sn01"], role, pub, secret=False)}
        hidden = {e["path"] for e, _ in overlay.render_files(site, site.nodes["sn01"], role, pub, secret=True)}
        assert secret_paths <= hidden and not secret_paths & public and "/etc/hostname" in public, role
        assert all(not overlay.is_secret(e) for e in pub.overlay if e["path"] in public)


# --------------------------------------------------------------------------- served by the real boot endpoint


@pytest.fixture(scope="module")
def overlay_server(tiny_image, tmp_path_factory):
    """A real `provisioner serve`. slurm boots a built image whose overlay carries the slurm and
    k8s secrets; k8s boots the tiny image. sn01 is at 127.0.0.1 (so its source check passes),
    sn02 at 10.0.3.2 (so it fails from here), sn03 has no address."""
    base = tmp_path_factory.mktemp("overlay-server")
    root = clone_root(tiny_image, base)
    defs = base / "defs"
    shutil.copytree(DEFINITIONS / "_common", defs / "_common")
    (defs / "secrets" / "overlay").mkdir(parents=True)
    for src in ("slurm/overlay/hostname.j2", "k8s/overlay/bootstrap-kubelet.conf.j2"):
        shutil.copy(DEFINITIONS / src, defs / "secrets" / "overlay")
    (defs / "secrets" / "image.yaml").write_text("""builder: initramfs
kernel: {package: linux-image-amd64, modules: [virtio_net, virtio_pci]}
cmdline: console=ttyS0
overlay:
  - {path: /etc/hostname, template: hostname.j2}
  - {path: /etc/slurm/slurm.conf, copy: slurm_conf}
  - {path: /etc/munge/munge.key, copy: munge_key, mode: "0400"}
  - {path: /etc/kubernetes/bootstrap-kubelet.conf, template: bootstrap-kubelet.conf.j2, mode: "0600"}
""")
    built = build_tiny(root, name="secrets", definitions=defs)
    files = write_secrets(base / "secrets-files")
    port = free_port()
    nodes = [{"name": "sn01", "pool": "shared", "mac": mac(1, 3), "ip": "127.0.0.1", "bmc": {"address": "127.0.0.1"}},
             {"name": "sn02", "pool": "shared", "mac": mac(2, 3), "ip": "10.0.3.2", "bmc": {"address": "127.0.0.1"}},
             {"name": "sn03", "pool": "shared", "mac": mac(3, 3), "bmc": {"address": "127.0.0.1"}}]
    cfg = tiny_site(base / "site", root, nodes=nodes,
                    site={"boot_url": f"http://127.0.0.1:{port}", "listen": f"127.0.0.1:{port}"},
                    images={"slurm": {"image": "secrets"}, "k8s": {"image": "tiny"}},
                    overlay=overlay_section(files))
    server = BootServer(cfg, port, base / "serve.log").start()
    try:
        server.site = config.load(cfg)
        server.secret = load_or_create_secret(server.site.secret_file)
        server.files = files
        server.version = built.version
        yield server
    finally:
        server.stop()


def get(url: str) -> tuple[int, bytes, dict]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


def overlay_url(server, node: str, *, token_for: str | None = None, mac_: str | None = None, **params) -> str:
    token = overlay.token(server.secret, token_for or node)
    url = f"{server.url}/overlay/{node}.cpio.gz?token={token}&mac={mac_ or server.site.nodes[node].macs[0]}"
    return url + "".join(f"&{k}={v}" for k, v in params.items())


@pytest.mark.integration
def test_script_names_the_overlay_with_its_own_token(overlay_server):
    status, body, _ = get(f"{overlay_server.url}/ipxe?mac={mac(1, 3)}")
    text = body.decode()
    line = next(line for line in text.splitlines() if line.startswith("initrd --name overlay"))
    tok = overlay.token(overlay_server.secret, "sn01")
    assert line == (f"initrd --name overlay {overlay_server.url}/overlay/sn01.cpio.gz?image=secrets"
                    f"&version={overlay_server.version}&token={tok}&mac=${{netX/mac}} || goto failed")
    boot = Boots.for_site(overlay_server.site).token("sn01")
    assert tok != boot  # not the callback token: that one is this boot's
    assert f"provisioner.token={boot}" in text
    assert f"provisioner.secrets={overlay_server.url}/overlay/sn01/secrets" in text
    assert text.index("initramfs.img") < text.index("/overlay/sn01.cpio")  # the image first, the overlay on top


@pytest.mark.integration
def test_the_node_gets_its_own_overlay(overlay_server, tmp_path):
    # as iPXE asks: the URL from the script with ${netX/mac} filled in
    text = get(f"{overlay_server.url}/ipxe?mac={mac(1, 3)}")[1].decode()
    url = re.search(r"^initrd --name overlay (\S+)", text, re.M).group(1).replace("${netX/mac}", mac(1, 3))
    status, data, headers = get(url)
    assert status == 200 and headers["Content-Type"] == "application/gzip" and headers["Cache-Control"] == "no-store"
    listing = unpack(data, tmp_path)
    root = tmp_path / "provisioner" / "overlay"
    assert (root / "etc/hostname").read_text() == "sn01\n"
    assert (root / "etc/slurm/slurm.conf").read_text() == overlay_server.files["slurm_conf"].read_text()
    # the secret files are not in what iPXE loads (test_boot_secrets.py: the secret part)
    assert not (root / "etc/munge").exists() and not (root / "etc/kubernetes").exists()
    assert "munge" not in listing and re.search(r"^drwx------ .* provisioner$", listing, re.M)
    # sn03 (no address configured) gets its own
    status, data, _ = get(overlay_url(overlay_server, "sn03"))
    assert status == 200
    unpack(data, tmp_path / "sn03")
    assert (tmp_path / "sn03/provisioner/overlay/etc/hostname").read_text() == "sn03\n"


def _refusals(server) -> list[tuple[str, str]]:
    s = server
    callback_token = Boots.for_site(s.site).token("sn01")
    return [
        ("another node's token", overlay_url(s, "sn01", token_for="sn03")),
        ("another node's MAC", overlay_url(s, "sn01", mac_=mac(3, 3))),
        ("its token on another node", overlay_url(s, "sn03", token_for="sn01")),
        ("no token", f"{s.url}/overlay/sn01.cpio.gz?mac={mac(1, 3)}"),
        ("the callback token", f"{s.url}/overlay/sn01.cpio.gz?token={callback_token}&mac={mac(1, 3)}"),
        ("no MAC", f"{s.url}/overlay/sn01.cpio.gz?token={overlay.token(s.secret, 'sn01')}"),
        ("iPXE variable unexpanded", overlay_url(s, "sn01", mac_="${netX/mac}")),
        ("wrong source address", overlay_url(s, "sn02")),  # sn02 is 10.0.3.2; we are 127.0.0.1
    ]


@pytest.mark.integration
def test_another_nodes_token_mac_or_address_is_refused(overlay_server):
    secret_bits = _secret_strings(overlay_server)
    for what, url in _refusals(overlay_server):
        status, body, headers = get(url)
        assert status == 403, what
        assert headers["Content-Type"] == "application/json", what
        assert not body.startswith(b"\x1f\x8b") and len(body) < 300, what  # no archive, nothing of it
        for s in secret_bits:
            assert s.encode() not in body, (what, s)
    events = Store(overlay_server.site.store).events(kinds=["overlay-refused"])
    assert {e.node for e in events} >= {"sn01", "sn02", "sn03"}
    assert any("source 127.0.0.1 is not the node's address 10.0.3.2" in e.message for e in events)
    assert get(f"{overlay_server.url}/overlay/zz99.cpio.gz?token=x&mac={mac(1, 3)}")[0] == 404


@pytest.mark.integration
def test_only_the_overlay_of_the_image_the_node_boots(overlay_server, tmp_path):
    store = Store(overlay_server.site.store)
    store.set_role(["sn03"], "k8s", actor="test", reason="switch", pin=True)
    try:
        # its script now boots the tiny image; the slurm image's overlay (with the munge key) is refused
        status, body, _ = get(overlay_url(overlay_server, "sn03", image="secrets"))
        assert status == 409 and b"munge" not in body
        status, data, _ = get(overlay_url(overlay_server, "sn03", image="tiny"))
        assert status == 200
        unpack(data, tmp_path)
        info = (tmp_path / "provisioner/overlay/etc/provisioner/overlay-info").read_text()
        assert "node=sn03" in info and "role=k8s" in info and "image=tiny" in info
        assert not (tmp_path / "provisioner/overlay/etc/munge").exists()
    finally:
        store.set_role(["sn03"], "slurm", actor="test", reason="back", pin=True)


def _secret_strings(server) -> list[str]:
    key = server.files["munge_key"].read_bytes()
    return [BOOTSTRAP_TOKEN, SLURM_MARKER, key.hex()[:32], base64.b64encode(key).decode()[:32],
            *(overlay.token(server.secret, n) for n in ("sn01", "sn02", "sn03")),
            *(Boots.for_site(server.site).token(n) for n in ("sn01", "sn02", "sn03"))]


@pytest.mark.integration
def test_secrets_never_in_events_or_the_server_log(overlay_server):
    for _what, url in _refusals(overlay_server):
        get(url)
    assert get(overlay_url(overlay_server, "sn01"))[0] == 200
    events = Store(overlay_server.site.store).events()
    text = json.dumps([e.as_dict() for e in events]) + overlay_server.log_path.read_text(errors="replace")
    assert any(e.kind == "overlay-served" for e in events)
    for s in _secret_strings(overlay_server):
        assert s not in text, s


@pytest.mark.integration  # builds (and, the first time, downloads) the tiny image
def test_an_overlay_that_cannot_be_built_is_refused_with_the_reason(tiny_image, tmp_path):
    """Through the Flask app: the tiny image's overlay needs nothing from the site, so give it a
    template that needs a value the site does not set."""
    root = clone_root(tiny_image, tmp_path)
    info = root / "tiny" / tiny_image.version / "overlay" / "overlay-info.j2"
    os.chmod(info, 0o644)
    info.write_text("{{ values.rack }}\n")
    site = config.load(tiny_site(tmp_path / "site", root, nodes=[
        {"name": "sn01", "pool": "shared", "mac": mac(1, 3), "bmc": {"address": "127.0.0.1"}}]))
    client = create_app(site).test_client()
    secret = load_or_create_secret(site.secret_file)
    r = client.get(f"/overlay/sn01.cpio.gz?token={overlay.token(secret, 'sn01')}&mac={mac(1, 3)}")
    assert r.status_code == 409 and "provisioner history sn01" in r.json["error"]
    failed = Store(site.store).events(kinds=["overlay-failed"])
    assert len(failed) == 1 and "overlay.values.rack is not set" in failed[0].message

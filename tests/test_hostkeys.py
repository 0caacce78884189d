"""Per-node SSH host keys (provisioner/hostkeys.py): made once per node and kept, in OpenSSH
format; the known_hosts lines of `provisioner ssh known-hosts`; the overlays' host_key entries;
the image build removing the keys openssh-server made; the definition's host_key errors."""

from __future__ import annotations

import json
import stat
import subprocess
from pathlib import Path

import pytest

from provisioner import cli, config, hostkeys
from provisioner.boot import overlay
from provisioner.errors import ConfigError, OperationError
from provisioner.images.builder import remove_host_keys
from provisioner.images.definition import load as load_definition
from provisioner.model import DEFAULT_IMAGE_DEFINITIONS
from testbed.site import mac, write_site
from tests.support import require_binary
from tests.test_overlay import overlay_section, published_from_definition, unpack, write_secrets


def definitions(tmp_path: Path, text: str) -> Path:
    """A definitions folder with one image `img` (image.yaml = text) and the shared _common."""
    import shutil

    from testbed.tinyimage import DEFINITIONS

    defs = tmp_path / "defs"
    (defs / "img" / "overlay").mkdir(parents=True)
    shutil.copytree(DEFINITIONS / "_common", defs / "_common")
    (defs / "img" / "image.yaml").write_text(text)
    return defs


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.fixture
def site(tmp_path):
    nodes = [
        {"name": "sn01", "pool": "shared", "default_role": "slurm", "macs": [mac(1, 3)], "ip": "10.0.3.1",
         "bmc": {"address": "127.0.0.1"}},
        {"name": "sn02", "pool": "shared", "default_role": "slurm", "macs": [mac(2, 3)], "ip": "10.0.3.2",
         "ssh_host": "127.0.0.1", "ssh_port": 2222, "bmc": {"address": "127.0.0.1"}},
        {"name": "sn03", "pool": "shared", "default_role": "k8s", "macs": [mac(3, 3)],
         "ssh_host": "sn03.mgmt", "bmc": {"address": "127.0.0.1"}},
        {"name": "cn01", "pool": "slurm", "macs": [mac(1, 1)], "bmc": {"address": "127.0.0.1"}},
    ]
    secrets = write_secrets(tmp_path / "secrets")
    return config.load(write_site(tmp_path / "site", nodes=nodes, overlay=overlay_section(secrets)))


def test_a_key_is_made_once_per_node_and_kept(site):
    folder = site.store.parent / "host-keys"
    assert not folder.exists()
    first = hostkeys.get(site, "sn01")
    assert first.path == folder / "sn01" / "ssh_host_ed25519_key"
    assert first.private.startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----\n")
    assert first.public.startswith("ssh-ed25519 AAAA") and first.public.endswith(" root@sn01")
    inode = first.path.stat().st_ino
    again = hostkeys.get(site, "sn01")
    assert (again.private, again.public, again.path.stat().st_ino) == (first.private, first.public, inode)
    other = hostkeys.get(site, "sn02")
    assert other.public.split()[1] != first.public.split()[1]
    assert (_mode(folder), _mode(folder / "sn01"), _mode(first.path)) == (0o700, 0o700, 0o600)
    pub = folder / "sn01" / "ssh_host_ed25519_key.pub"
    assert pub.read_text() == first.public + "\n" and _mode(pub) == 0o644
    assert sorted(p.name for p in (folder / "sn01").iterdir()) == ["ssh_host_ed25519_key",
                                                                   "ssh_host_ed25519_key.pub"]  # no temp left


def test_openssh_reads_the_key(site):
    keygen = require_binary("ssh-keygen")
    key = hostkeys.get(site, "sn01")
    derived = subprocess.run([keygen, "-y", "-f", str(key.path)], capture_output=True, text=True, check=True)
    assert derived.stdout.split()[:2] == key.public.split()[:2]


def test_a_damaged_key_says_what_to_do(site):
    key = hostkeys.get(site, "sn01")
    key.path.write_text("not a key\n")
    with pytest.raises(OperationError, match=r"node sn01: its SSH host key .*ssh_host_ed25519_key is not an OpenSSH "
                                             r"private key .* remove the file to make a new one .*known-hosts"):
        hostkeys.get(site, "sn01")


def test_known_hosts_lines_use_the_names_provisioners_ssh_uses(site):
    rows = hostkeys.known_hosts(site, ["sn01", "sn02", "sn03", "cn01"])
    keys = {n: hostkeys.get(site, n).public.split()[1] for n in ("sn01", "sn02", "sn03", "cn01")}
    assert [r["line"] for r in rows] == [
        f"10.0.3.1 ssh-ed25519 {keys['sn01']}",  # its ip, port 22: a bare host
        f"[127.0.0.1]:2222 ssh-ed25519 {keys['sn02']}",  # ssh_host and ssh_port
        f"sn03.mgmt ssh-ed25519 {keys['sn03']}",  # ssh_host
        f"cn01 ssh-ed25519 {keys['cn01']}",  # neither: its name
    ]


def test_known_hosts_follow_power_ssh_port(tmp_path):
    nodes = [{"name": "sn01", "pool": "shared", "default_role": "slurm", "macs": [mac(1, 3)], "ip": "10.0.3.1",
              "bmc": {"address": "127.0.0.1"}}]
    site = config.load(write_site(tmp_path / "site", nodes=nodes, power={"ssh": {"port": 2200}}))
    assert hostkeys.known_hosts(site, ["sn01"])[0]["host"] == "[10.0.3.1]:2200"


def test_cli_known_hosts(site, capsys):
    assert cli.main(["--config", str(site.path), "ssh", "known-hosts", "sn[01-02]"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [r["line"] for r in hostkeys.known_hosts(site, ["sn01", "sn02"])]
    assert cli.main(["--config", str(site.path), "ssh", "known-hosts", "sn02", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert (row["node"], row["host"], row["type"]) == ("sn02", "[127.0.0.1]:2222", "ssh-ed25519")
    assert row["file"] == str(site.store.parent / "host-keys" / "sn02" / "ssh_host_ed25519_key")
    assert cli.main(["--config", str(site.path), "ssh", "known-hosts", "xx01"]) == 2
    assert "unknown node(s) xx01" in capsys.readouterr().err


def test_known_hosts_lines_are_what_openssh_checks(site, tmp_path):
    """ssh-keygen -F finds each node under the name and port its line gives."""
    keygen = require_binary("ssh-keygen")
    known = tmp_path / "known_hosts"
    known.write_text("".join(r["line"] + "\n" for r in hostkeys.known_hosts(site, ["sn01", "sn02"])))
    for name in ("10.0.3.1", "[127.0.0.1]:2222"):
        r = subprocess.run([keygen, "-F", name, "-f", str(known)], capture_output=True, text=True)
        assert r.returncode == 0 and "ssh-ed25519" in r.stdout, (name, r.stdout, r.stderr)


@pytest.mark.parametrize("image", ["slurm", "k8s"])
def test_the_overlay_carries_the_nodes_own_key(site, tmp_path, image):
    require_binary("cpio")
    pub = published_from_definition(image)
    listing = unpack(overlay.build(site, site.nodes["sn01"], image, pub, secret=None), tmp_path / "a")
    root = tmp_path / "a" / "provisioner" / "overlay" / "etc" / "ssh"
    key = hostkeys.get(site, "sn01")
    assert (root / "ssh_host_ed25519_key").read_bytes() == key.private
    assert (root / "ssh_host_ed25519_key.pub").read_text() == key.public + "\n"
    lines = {line.rsplit(" ", 1)[-1]: line for line in listing.splitlines()}
    assert lines["provisioner/overlay/etc/ssh/ssh_host_ed25519_key"].startswith("-rw------- ")
    assert lines["provisioner/overlay/etc/ssh/ssh_host_ed25519_key.pub"].startswith("-rw-r--r-- ")
    # another node gets its own
    unpack(overlay.build(site, site.nodes["sn02"], image, pub, secret=None), tmp_path / "b")
    other = (tmp_path / "b" / "provisioner" / "overlay" / "etc" / "ssh" / "ssh_host_ed25519_key").read_bytes()
    assert other == hostkeys.get(site, "sn02").private != key.private


def test_both_images_give_a_node_the_same_key(site):
    got = {}
    for image in ("slurm", "k8s"):
        files = overlay.render_files(site, site.nodes["sn03"], image, published_from_definition(image))
        got[image] = {e["path"]: data for e, data in files if e.get("host_key")}
    assert got["slurm"] == got["k8s"] and len(got["slurm"]) == 2


def test_the_definitions_take_the_key_from_the_overlay():
    for image in ("slurm", "k8s"):
        d = load_definition(DEFAULT_IMAGE_DEFINITIONS, image)
        entries = {e.path: (e.host_key, e.mode) for e in d.overlay if e.host_key}
        assert entries == {"/etc/ssh/ssh_host_ed25519_key": ("private", 0o600),
                           "/etc/ssh/ssh_host_ed25519_key.pub": ("public", 0o644)}
    dropin = d.common / "rootfs" / "etc" / "ssh" / "sshd_config.d" / "provisioner-host-key.conf"
    assert "HostKey /etc/ssh/ssh_host_ed25519_key" in dropin.read_text().splitlines()


BASE = "builder: debian\nkernel: {package: linux-image-amd64}\noverlay:\n"


@pytest.mark.parametrize("entry, field, words", [
    ("{path: /etc/ssh/k, host_key: secret}", "overlay[0].host_key", "must be private"),
    ("{path: /etc/ssh/k, host_key: private}", "overlay[0].mode", "readable by its owner only"),
    ("{path: /etc/ssh/k, host_key: private, mode: \"0640\"}", "overlay[0].mode", "use \"0600\""),
    ("{path: /etc/ssh/k, host_key: public, copy: k}", "overlay[0]", "exactly one of template"),
    ("{path: /etc/ssh/k, host_key: public, optional: true}", "overlay[0].optional", "only copy entries"),
])
def test_host_key_entry_errors_name_the_file_and_the_field(tmp_path, entry, field, words):
    defs = definitions(tmp_path, BASE + f"  - {entry}\n")
    with pytest.raises(ConfigError) as err:
        load_definition(defs, "img")
    assert err.value.field == field and words in err.value.message, err.value
    assert str(defs / "img" / "image.yaml") in str(err.value)


def test_cli_says_config_error_for_a_bad_host_key_entry(tmp_path, capsys):
    defs = definitions(tmp_path, BASE + "  - {path: /etc/ssh/k, host_key: secret}\n")
    path = write_site(tmp_path / "site", site={"image_definitions": str(defs)})
    assert cli.main(["--config", str(path), "image", "build", "img"]) == 2
    err = capsys.readouterr().err
    assert "config error" in err and "image.yaml: overlay[0].host_key" in err


def test_the_build_removes_the_roots_host_keys(tmp_path):
    ssh = tmp_path / "root" / "etc" / "ssh"
    ssh.mkdir(parents=True)
    for name in ("ssh_host_rsa_key", "ssh_host_rsa_key.pub", "ssh_host_ed25519_key", "ssh_host_ecdsa_key.pub",
                 "sshd_config", "moduli"):
        (ssh / name).write_text("x")
    assert remove_host_keys(tmp_path / "root") == ["ssh_host_ecdsa_key.pub", "ssh_host_ed25519_key",
                                                   "ssh_host_rsa_key", "ssh_host_rsa_key.pub"]
    assert sorted(p.name for p in ssh.iterdir()) == ["moduli", "sshd_config"]
    assert remove_host_keys(tmp_path / "nothing") == []

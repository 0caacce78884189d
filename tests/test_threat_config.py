"""The small holes of the threat model (docs/security.md), each written as the attack: a weak or
readable token secret, a published folder over the private files, a source address spelled
another way, a flood of valid callbacks, a config file that is not text."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from provisioner import config
from provisioner.boot.app import create_app
from provisioner.boot.boots import Boots
from provisioner.boot.service import same_address
from provisioner.errors import ConfigError, OperationError
from provisioner.store import Store
from provisioner.tokens import load_or_create_secret
from testbed.site import mac, write_site


def check(config_path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "provisioner", "--config", str(config_path), "check"],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("content, mode, says", [
    (b"", 0o600, "shorter than 32 bytes"),
    (b"short\n", 0o600, "shorter than 32 bytes"),
    (b"a" * 64 + b"\n", 0o644, "readable by group or others"),
    (b"a" * 64 + b"\n", 0o640, "readable by group or others"),
])
def test_a_weak_or_readable_secret_is_refused_with_how_to_make_one(tmp_path, content, mode, says):
    """An empty key makes every token computable offline; a readable one hands them to every
    local user. It is refused, never used (nor silently replaced under running servers)."""
    path = write_site(tmp_path / "site")
    secret = tmp_path / "site" / "secret"
    secret.write_bytes(content)
    os.chmod(secret, mode)
    r = check(path)
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"{path}: site.secret_file: " in r.stderr and says in r.stderr
    assert "openssl rand -hex 32" in r.stderr or f"chmod 600 {secret}" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    with pytest.raises(OperationError, match=says):
        load_or_create_secret(secret)
    assert secret.read_bytes() == content  # left as it was, for the admin to replace


def test_a_missing_secret_is_made_private_and_long(tmp_path):
    secret = tmp_path / "state" / "secret"
    data = load_or_create_secret(secret)
    assert len(data) >= 32 and (os.stat(secret).st_mode & 0o077) == 0
    assert load_or_create_secret(secret) == data


@pytest.mark.parametrize("field, target", [
    ("image_root", "."),  # the config folder holds the store, the secret and the BMC password file
    ("image_root", "state"),
    ("templates", "."),
    ("image_root", "/"),
])
def test_a_published_folder_over_private_files_is_a_config_error(tmp_path, field, target):
    folder = tmp_path / "site"
    (folder / "state").mkdir(parents=True)
    path = write_site(folder, site={"store": str(folder / "state" / "state.db"),
                                    "secret_file": str(folder / "state" / "secret")})
    text = path.read_text()
    import yaml

    data = yaml.safe_load(text)
    data["site"][field] = str((folder / target).resolve()) if target != "/" else "/"
    if field == "image_root":
        data["images"] = {r: {"version": "1", "kernel": "vmlinuz", "initrds": []} for r in ("slurm", "k8s")}
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as exc:
        config.load(path, check_files=False)
    assert exc.value.field == f"site.{field}" and "nodes could download it" in exc.value.message
    r = check(path)
    assert r.returncode == 2 and f"site.{field}" in r.stderr


def test_a_state_dir_around_the_image_root_is_refused(tmp_path):
    folder = tmp_path / "site"
    path = write_site(folder, site={"store": "postgresql://p@127.0.0.1:5432/db", "state_dir": str(folder),
                                    "secret_file": str(tmp_path / "secret")})
    with pytest.raises(ConfigError) as exc:
        config.load(path, check_files=False)
    assert exc.value.field == "site.image_root" and "site.state_dir" in exc.value.message


@pytest.mark.parametrize("data", [b"\x00\x01\x02binary\xff\xfe", b"site:\n  name: \xff\xfe\n", b"\x1f\x8b\x08\x00gzip"])
def test_a_config_that_is_not_text_gives_the_one_line_error(tmp_path, data):
    path = tmp_path / "site.yaml"
    path.write_bytes(data)
    r = check(path)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "not a text file" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("source, ip, same", [
    ("10.0.3.1", "10.0.3.1", True),
    ("::ffff:10.0.3.1", "10.0.3.1", True),  # a server on [::] sees IPv4 clients so
    ("::ffff:10.0.3.1", "::ffff:10.0.3.1", True),
    ("10.0.3.1", "::ffff:10.0.3.1", True),
    ("fe80::1%eth0", "fe80::1", True),
    ("2001:db8::1", "2001:db8:0:0::1", True),
    ("::ffff:10.0.3.2", "10.0.3.1", False),
    ("10.0.3.10", "10.0.3.1", False),
    ("", "10.0.3.1", False),
    (None, "10.0.3.1", False),
    ("not-an-address", "10.0.3.1", False),
])
def test_the_source_check_compares_addresses(source, ip, same):
    assert same_address(source, ip) is same


def test_callbacks_and_overlays_from_an_ipv4_node_behind_a_dual_stack_listener(tmp_path):
    site = config.load(write_site(tmp_path / "site"))
    client = create_app(site).test_client()
    tok = Boots.for_site(site).token("sn01")
    r = client.post("/api/v1/nodes/sn01/booted", data={"role": "slurm", "token": tok},
                    environ_base={"REMOTE_ADDR": "::ffff:10.0.3.1"})
    assert r.status_code == 200, r.json
    r = client.post("/api/v1/nodes/sn02/booted", data={"role": "slurm", "token": Boots.for_site(site).token("sn02")},
                    environ_base={"REMOTE_ADDR": "::ffff:10.0.3.1"})  # sn01's address, sn02's token
    assert r.status_code == 403


def test_a_flood_of_valid_callbacks_records_one_boot(tmp_path):
    """Each callback needs a fresh token (anyone may ask for the script), so a user could mint
    and spend them in a loop: accepted callbacks are limited per node."""
    site = config.load(write_site(tmp_path / "site"))
    app = create_app(site)
    app.extensions["provisioner.boot"].callbacks.every_s = 3600  # the limit, whatever the host's speed
    client = app.test_client()
    codes = []
    for _ in range(20):
        client.get(f"/ipxe?mac={mac(1, 3)}")
        codes.append(client.post("/api/v1/nodes/sn01/booted", data={"role": "slurm",
                                 "token": Boots.for_site(site).token("sn01")},
                                 environ_base={"REMOTE_ADDR": "10.0.3.1"}).status_code)
    assert codes[0] == 200 and set(codes[1:]) == {429}
    assert len(Store(site.store).events(["sn01"], kinds=["booted"])) == 1


@pytest.mark.parametrize("port, says", [(None, "source port unknown"), (40000, "source port 40000 is not privileged"),
                                        (0, "source port 0 is not privileged")])
def test_the_secret_part_wants_a_privileged_port_before_anything_else(tmp_path, port, says):
    """Checked before the token: a user's process learns nothing about the token it tried."""
    site = config.load(write_site(tmp_path / "site"))
    service = create_app(site).extensions["provisioner.boot"]
    store = Store(site.store)
    store.grant_boot(["sn01"], actor="t", reason="r")
    reply = service.secrets("sn01", token=Boots.for_site(site).token("sn01"), source="10.0.3.1", source_port=port)
    assert reply.status == 403 and says in reply.body["error"]
    assert "served" not in reply.body["error"] and store.boot_row("sn01")["secrets_at"] is None

"""The real boot server (gunicorn) and the CLI, as an admin and as hostile clients see them."""

import http.client
import json
import random
import urllib.request

import pytest

from testbed.boot_server import cli
from testbed.site import mac

pytestmark = pytest.mark.integration


def get(server, path):
    with urllib.request.urlopen(server.url + path, timeout=10) as r:
        return r.status, r.read().decode()


def test_admin_scenario(boot_server):
    """The issue's walk-through, up to what needs no cluster: the script, a forced role recorded
    and pinned, the exact script for the other role, the history. The switch itself (drain,
    reboot, the script turning to k8s) runs through the balancer: tests/test_balance_*.py."""
    status, text = get(boot_server, f"/ipxe?mac={mac(1, 3)}")
    assert status == 200 and "images/slurm/vmlinuz" in text and "provisioner.node=sn01" in text

    r = cli(boot_server.config, "role", "sn01", "k8s", "--reason", "test")
    assert r.returncode == 0, r.stderr
    assert "switch to k8s requested, pinned (test)" in r.stdout
    # Until SLURM has drained it, the node keeps booting its SLURM image.
    status, text = get(boot_server, f"/ipxe?mac={mac(1, 3).upper().replace(':', '-')}")
    assert status == 200 and "images/slurm/vmlinuz" in text

    nodes = json.loads(cli(boot_server.config, "nodes", "sn[01-02]", "--json", check=True).stdout)
    assert [(n["name"], n["phase"], n["target_role"], n["pinned"]) for n in nodes] == [
        ("sn01", "requested", "k8s", True), ("sn02", "steady", None, False)]
    rendered = cli(boot_server.config, "render", "sn01", "--role", "k8s", check=True).stdout
    status, text = get(boot_server, "/ipxe?mac=" + mac(1, 3))
    assert "images/k8s/vmlinuz" in rendered and rendered == text.replace("slurm", "k8s")

    history = cli(boot_server.config, "history", "sn01", check=True).stdout
    assert "switch to k8s requested (pinned): test" in history
    events = json.loads(cli(boot_server.config, "history", "sn01", "--json", check=True).stdout)
    assert events[-1]["kind"] == "switch" and events[-1]["data"]["reason"] == "test"

    assert cli(boot_server.config, "release", "sn01").returncode == 0
    assert json.loads(cli(boot_server.config, "nodes", "sn01", "--json").stdout)[0]["pinned"] is False


def test_cli_exit_codes(boot_server, tmp_path):
    assert cli(boot_server.config, "check").returncode == 0
    r = cli(boot_server.config, "role", "cn01", "k8s", "--reason", "x")
    assert r.returncode == 2 and "shared pool" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = cli(boot_server.config, "nodes", "sn[01-")
    assert r.returncode == 2 and "bad hostlist" in r.stderr
    r = cli(boot_server.config, "role", "sn01", "gpu")  # not a role: one line, with an example
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "(e.g. `provisioner role" in r.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text(boot_server.config.read_text().replace(mac(2, 3), mac(1, 3)))
    r = cli(bad, "check")
    assert r.returncode == 2 and str(bad) in r.stderr and "nodes[1].macs[1]" in r.stderr and "duplicate MAC" in r.stderr


def hostile_requests(n: int, seed: int = 7):
    rnd = random.Random(seed)
    paths = [
        "/images/../site.yaml", "/images/..%2fsite.yaml", "/images/%2e%2e/site.yaml", "/images/%2e%2e%2fsecret",
        "/images//etc/passwd", "/images/slurm/../../secret", "/images/slurm/%00", "/images/./../state.db",
        "/images/" + "a/" * 300, "/../../etc/passwd", "/ipxe/../site.yaml", "/images/slurm",
        "/api/v1/nodes/../../site.yaml/booted",
    ]
    for i in range(n):
        kind = i % 6
        if kind == 0:
            yield "GET", rnd.choice(paths), None, {}
        elif kind == 1:
            junk = "".join(rnd.choice("abcdef0123456789:-%$%{}'\"<>;|&\\/") for _ in range(rnd.randint(0, 40)))
            yield "GET", f"/ipxe?mac={junk}", None, {}
        elif kind == 2:
            yield "GET", "/ipxe?mac=" + "A" * rnd.choice([100, 2000, 3500]) + "&x=" + "y" * rnd.randint(0, 400), None, {}
        elif kind == 3:
            yield rnd.choice(["POST", "PUT", "DELETE", "PATCH", "OPTIONS"]), rnd.choice(["/ipxe?mac=x", "/boot.ipxe", "/images/slurm/vmlinuz", "/healthz"]), b"x=1", {}
        elif kind == 4:
            body = rnd.choice([b"", b"role=slurm", b'{"role": "k8s"}', b"\xff\xfe" * 50, b"{" * 100, b"role=" + b"x" * 5000])
            yield "POST", f"/api/v1/nodes/{rnd.choice(['sn01', 'zz', 'sn01%00', '..'])}/booted", body, {
                "Content-Type": rnd.choice(["application/json", "application/x-www-form-urlencoded", "text/plain"])}
        else:
            yield "GET", "/images/slurm/vmlinuz", None, {"Range": rnd.choice(["bytes=9999-", "bytes=-0", "bytes=x", "bytes=5-1"])}


def test_a_thousand_hostile_requests(boot_server):
    """No 5xx, and nothing outside the image folder is ever served."""
    site_dir = boot_server.config.parent
    # the token secret, the BMC password, site.yaml, the SQLite store
    secrets = [(site_dir / "secret").read_text().strip(), "s3cret-bmc-pw", "secret_file:", "SQLite format 3"]
    conn = http.client.HTTPConnection("127.0.0.1", boot_server.port, timeout=10)
    codes, lost = {}, []
    for method, path, body, headers in hostile_requests(1000):
        try:
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read().decode(errors="replace")
        except (http.client.HTTPException, ConnectionError) as exc:
            lost.append((method, path, repr(exc)))
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", boot_server.port, timeout=10)
            continue
        codes[resp.status] = codes.get(resp.status, 0) + 1
        assert resp.status < 500, (method, path, resp.status, data[:200])
        for s in secrets:
            assert s not in data, (method, path)
        if resp.will_close:
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", boot_server.port, timeout=10)
    assert not lost, f"{len(lost)} requests got no answer, e.g. {lost[:3]}"  # every one is answered
    status, text = get(boot_server, f"/ipxe?mac={mac(1, 3)}")  # and still serves nodes
    assert status == 200 and "images/slurm/vmlinuz" in text

"""The boot-storm deployment: nginx in front of `provisioner serve`, serving the scripts
`provisioner prerender --watch` keeps current and the image files; the rest goes to the app.

It must answer hostile clients as the app alone does, and a change must reach the scripts within
the documented delay (one poll interval plus one pass)."""

import http.client
import shutil
import time
import urllib.request

import pytest

from provisioner import config
from provisioner.model import DEFAULT_TEMPLATES
from provisioner.store import Store
from testbed.boot_nginx import BootNginx, nginx_binary
from testbed.boot_server import BootServer
from testbed.process import free_port
from testbed.site import mac, write_site
from tests.support import missing
from tests.test_serve import hostile_requests

pytestmark = pytest.mark.integration

DELAY_S = 0.2 + 1.0  # poll interval + a pass on a small site, with room for a loaded machine


@pytest.fixture
def deployment(tmp_path):
    if nginx_binary() is None:
        missing("nginx (Debian nginx-light; make system-deps)")
    port, app_port = free_port(), free_port()
    templates = tmp_path / "templates"
    shutil.copytree(DEFAULT_TEMPLATES, templates)
    config = write_site(tmp_path / "site", site={"boot_url": f"http://127.0.0.1:{port}",
                                                 "listen": f"127.0.0.1:{port}", "templates": str(templates)})
    dep = BootNginx(config, port, tmp_path / "deploy").start()
    # The app alone on the same site, as the reference for every answer.
    app = BootServer(config, app_port, tmp_path / "app.log").start()
    yield dep, app, templates
    app.stop()
    dep.stop()


def _get(url):
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.status, r.read().decode()


def _ask(port, method, path, body, headers):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read().decode(errors="replace")
    except (http.client.HTTPException, ConnectionError):
        return None, ""
    finally:
        conn.close()


def test_hostile_requests_answered_as_by_the_app(deployment):
    """The 1,000 requests of tests/test_serve.py: no 5xx, no secret, and the app's own answer
    (status and bytes) on the boot paths and on everything else but a few refusals (below)."""
    dep, app, _ = deployment
    site_dir = dep.config.parent
    secrets = [(site_dir / "secret").read_text().strip(), "s3cret-bmc-pw", "secret_file:", "SQLite format 3"]
    answered, differ = 0, []
    for method, path, body, headers in hostile_requests(1000):
        got = _ask(dep.port, method, path, body, headers)
        ref = _ask(app.port, method, path, body, headers)
        if got[0] is None:
            continue
        answered += 1
        assert got[0] < 500, (method, path, got)
        for s in secrets:
            assert s not in got[1], (method, path)
        if got != ref:
            differ.append((method, path, headers.get("Range"), got[0], ref[0]))
    assert answered >= 950
    # Where the answers differ: the same status with another error page or redirect (nginx's
    # text for a 416; a Location naming the port the client used), or nginx's 400 for a URL it
    # will not parse (a NUL, a path above the root) where the app said 404. Never on a boot path,
    # never a 2xx, never a status class the app did not give.
    for method, path, rng, status, ref_status in differ:
        assert not path.startswith(("/ipxe", "/boot.ipxe")), (method, path, status, ref_status)
        assert status >= 300 and ref_status >= 300, (method, path, status, ref_status)
        assert status == ref_status or (status == 400 and 400 <= ref_status < 500), (method, path, status, ref_status)
    status, text = _get(f"{dep.url}/ipxe?mac={mac(1, 3)}")
    assert status == 200 and "images/slurm/vmlinuz" in text


def test_scripts_are_the_apps_bytes(deployment):
    dep, app, _ = deployment
    for m in (mac(1, 3), mac(2, 3), mac(1, 3).upper(), mac(1, 3).replace(":", "-"), "zz", "", "52:54:00:99:99:99"):
        assert _get(f"{dep.url}/ipxe?mac={m}") == _get(f"{app.url}/ipxe?mac={m}"), m
    for query in (f"MAC={mac(1, 3)}", f"mac={mac(1, 3)}&mac=zz", f"x=1&mac={mac(1, 3)}", f"mac={mac(1, 3)}&x=1",
                  f"mac=zz&mac={mac(1, 3)}", "mac=52%3a54%3a00%3a03%3a00%3a01"):
        assert _get(f"{dep.url}/ipxe?{query}") == _get(f"{app.url}/ipxe?{query}"), query
    assert _get(f"{dep.url}/boot.ipxe") == _get(f"{app.url}/boot.ipxe")
    assert _get(f"{dep.url}/images/slurm/vmlinuz") == (200, "slurm kernel\n")


def _until(url, want, timeout):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if _get(url) == want:
            return time.monotonic() - t0
        time.sleep(0.01)
    raise AssertionError(f"{url} not updated within {timeout} s: {_get(url)[1][:300]}")


def test_role_change_and_template_edit_reach_the_files_within_the_delay(deployment):
    dep, app, templates = deployment
    url = f"{dep.url}/ipxe?mac={mac(1, 3)}"
    assert "images/slurm/vmlinuz" in _get(url)[1]
    Store(config.load(dep.config).store).set_role(["sn01"], "k8s", actor="test", reason="test", pin=True)
    want = _get(f"{app.url}/ipxe?mac={mac(1, 3)}")  # the app sees it at once
    assert want[0] == 200 and "images/k8s/vmlinuz" in want[1]
    assert _until(url, want, DELAY_S) <= DELAY_S

    base = templates / "_linux.ipxe.j2"
    base.write_text(base.read_text() + "# edited by the test\n")
    want = _get(f"{app.url}/ipxe?mac={mac(2, 3)}")
    assert "# edited by the test" in want[1]
    assert _until(f"{dep.url}/ipxe?mac={mac(2, 3)}", want, DELAY_S) <= DELAY_S


def test_callbacks_keep_the_nodes_address_behind_nginx(deployment):
    """serve --behind-proxy takes the node's address from nginx's X-Forwarded-For (loopback here)."""
    dep, _, _ = deployment
    status, body = _ask(dep.port, "POST", "/api/v1/nodes/zz/booted", b"role=slurm",
                        {"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 404 and "unknown node" in body

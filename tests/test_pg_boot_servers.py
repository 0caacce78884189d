"""Several boot servers on one PostgreSQL store, and the database restarted under them.

Two "hosts" are two site configs in different folders (each its own site.state_dir), the same
site.store URL and the same secret_file contents; each runs the real `provisioner serve`
(gunicorn). Against Debian's real PostgreSQL (testbed/postgres.py): the session's server for the
two-server test, a server of its own for the restart test (it is stopped in the middle)."""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.request

import pytest

from provisioner import config
from provisioner.reconcile import Reconciler
from provisioner.store import Store
from testbed.boot_server import BootServer, cli
from testbed.postgres import PASSWORD, PostgresServer
from testbed.process import free_port
from testbed.site import mac, write_site
from tests.fakes import FakeKube, FakePower, FakeSlurm, slurm_node

pytestmark = pytest.mark.integration

SECRET = "ab" * 32 + "\n"  # the site's token secret: the same contents on every host


def host(tmp_path, name: str, url: str, password_file, port: int):
    folder = tmp_path / name
    folder.mkdir(parents=True)
    (folder / "secret").write_text(SECRET)
    (folder / "secret").chmod(0o600)
    return write_site(folder, site={"name": "shared-site", "store": url, "store_password_file": str(password_file),
                                    "state_dir": str(folder / "state"), "secret_file": str(folder / "secret"),
                                    "boot_url": f"http://127.0.0.1:{port}", "listen": f"127.0.0.1:{port}",
                                    "check_callback_source": False})


def get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.status, r.read().decode()


def post(url: str, data: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(data).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def arg(script: str, name: str) -> str:
    m = re.search(rf"provisioner\.{name}=(\S+)", script)
    assert m, (name, script)
    return m.group(1)


@pytest.fixture
def two_servers(tmp_path, pg_url):
    url, pw = pg_url
    ports = free_port(), free_port()
    configs = [host(tmp_path, f"host-{x}", url, pw, p) for x, p in zip("ab", ports)]
    servers = []
    try:
        for x, c, p in zip("ab", configs, ports):
            servers.append(BootServer(c, p, tmp_path / f"serve-{x}.log").start())
        yield servers
    finally:
        for s in servers:
            s.stop()


def test_any_boot_server_answers_any_node_and_takes_any_callback(two_servers):
    a, b = two_servers
    site_a, site_b = config.load(a.config), config.load(b.config)
    assert site_a.store_url == site_b.store_url and site_a.store != site_b.store  # one store, two hosts
    node_mac = mac(1, 3)  # sn01

    for s in (a, b):
        status, text = get(f"{s.url}/ipxe?mac={node_mac}")
        assert status == 200 and "images/slurm/vmlinuz" in text and "provisioner.node=sn01" in text

    # A role change written through host A's CLI is seen through host B's CLI...
    r = cli(a.config, "role", "sn01", "k8s", "--reason", "two hosts")
    assert r.returncode == 0, r.stderr
    nodes = json.loads(cli(b.config, "nodes", "sn01", "--json", check=True).stdout)
    assert (nodes[0]["phase"], nodes[0]["target_role"], nodes[0]["pinned"]) == ("requested", "k8s", True)
    # ... and by both servers on their next request: SLURM still, until the drain is recorded ...
    for s in (a, b):
        assert "images/slurm/vmlinuz" in get(f"{s.url}/ipxe?mac={node_mac}")[1]
    # ... then, once the balancer (host A's store) has recorded the drain, k8s on both.
    store_a = Store(site_a.store_url, password_file=site_a.store_password_file)
    try:
        store_a.update("sn01", actor="balancer", kind="phase", message="drained (test)", phase="rebooting",
                       desired_role="k8s", phase_since=time.time())
        scripts = {s.url: get(f"{s.url}/ipxe?mac={node_mac}")[1] for s in (a, b)}
        for text in scripts.values():
            assert "images/k8s/vmlinuz" in text and "provisioner.role=k8s" in text
        # Same secret, same token on both; each names its own callback URL.
        script_a = scripts[a.url]
        token = arg(script_a, "token")
        assert token == arg(scripts[b.url], "token")
        assert arg(script_a, "callback").startswith(a.url)

        # The node booted from A's script calls back to B: accepted, recorded once.
        before = len(store_a.events(["sn01"]))
        status, body = post(f"{b.url}/api/v1/nodes/sn01/booted", {"role": "k8s", "version": "1", "token": token})
        assert status == 200 and body["booted_role"] == "k8s" and body["desired_role"] == "k8s", body
        booted = [e for e in store_a.events(["sn01"]) if e.kind == "booted"]
        assert len(booted) == 1 and len(store_a.events(["sn01"])) == before + 1, [e.message for e in booted]
        st = store_a.get("sn01")
        assert (st.booted_role, st.booted_version) == ("k8s", "1")
        # Host A's CLI shows what B recorded; a wrong token is refused by either.
        nodes = json.loads(cli(a.config, "nodes", "sn01", "--json", check=True).stdout)
        assert nodes[0]["booted_role"] == "k8s"
        for s in (a, b):
            assert post(f"{s.url}/api/v1/nodes/sn01/booted", {"role": "k8s", "token": "0" * 32})[0] == 403
        assert len([e for e in store_a.events(["sn01"]) if e.kind == "booted"]) == 1
    finally:
        store_a.close()


# --------------------------------------------------------------------------- restart under load


@pytest.fixture
def own_postgres(tmp_path):
    """A PostgreSQL server of this test's own: it is stopped and started again in the middle."""
    pg = PostgresServer()
    try:
        pg.start()
        yield pg
    finally:
        pg.stop()


class Loop(threading.Thread):
    """A node asking for its script as fast as one client can, every answer kept."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url = url
        self.answers: list[tuple[float, int, str]] = []
        self.errors: list[str] = []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            try:
                status, text = get(self.url)
                self.answers.append((time.monotonic(), status, text))
            except urllib.error.HTTPError as exc:
                self.answers.append((time.monotonic(), exc.code, exc.read().decode(errors="replace")))
            except OSError as exc:  # no answer at all: as bad as a 5xx
                self.errors.append(repr(exc))
            time.sleep(0.005)


def test_database_restart_under_load(tmp_path, own_postgres):
    pg = own_postgres
    url = pg.create_database("restart")
    port = free_port()
    config_path = host(tmp_path, "host-a", url, pg.password_file, port)
    site = config.load(config_path)
    server = BootServer(config_path, port, tmp_path / "serve.log").start()
    loop = Loop(f"{server.url}/ipxe?mac={mac(1, 3)}")
    try:
        assert cli(config_path, "role", "sn01", "k8s", "--reason", "before the outage").returncode == 0
        store = Store(url, password_file=pg.password_file)
        rows_before = {t: store.count_rows(t) for t in ("nodes", "events", "asks", "demand", "image_pins")}
        nodes_before = store.nodes()
        store.close()

        loop.start()
        time.sleep(1.0)
        t_down = time.monotonic()
        pg.pause()
        down_at = time.monotonic()
        # A balance pass during the outage: exit 1, one line that names the store, nothing written.
        r = cli(config_path, "balance")
        assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and f"127.0.0.1:{pg.port}/restart" in lines[0] and "store" in lines[0], r.stderr
        assert "Traceback" not in r.stderr and PASSWORD not in r.stderr
        assert r.stdout == ""
        # The CLI's reads fail the same way.
        r = cli(config_path, "nodes", "sn01")
        assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "store" in r.stderr
        time.sleep(max(0.0, 4.0 - (time.monotonic() - down_at)))
        t_up = time.monotonic()
        pg.resume()
        up_at = time.monotonic()
        # The server comes back by itself: its workers connect again on the next request.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if loop.answers and "images/slurm/vmlinuz" in loop.answers[-1][2] and loop.answers[-1][0] > up_at:
                break
            time.sleep(0.1)
        time.sleep(1.0)
        loop.halt.set()
        loop.join(15)
        # The outage is in the metrics: the waiting scripts counted as store_unavailable.
        _, text = get(f"{server.url}/metrics")
        counted = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                      if line.startswith("provisioner_boot_requests_total{") and 'outcome="store_unavailable"' in line)
        assert re.search(r"^provisioner_store_up 1\.0$", text, re.M), text[-1500:]
    finally:
        loop.halt.set()
        loop.join(15)
        server.stop()

    assert not loop.errors, loop.errors[:5]
    statuses = {s for _, s, _ in loop.answers}
    assert statuses == {200}, statuses
    during = [text for t, _, text in loop.answers if down_at + 0.2 < t < t_up]
    after = [text for t, _, text in loop.answers if t > up_at]
    assert len(during) >= 10, len(during)
    waiting = [text for text in during if "state store unavailable" in text]
    assert waiting == during, [t[:300] for t in during if t not in waiting][:3]
    assert all("images/" not in text and "sleep" in text for text in waiting), waiting[0]
    outage = [text for text in (t for _, _, t in loop.answers) if "state store unavailable" in text]
    assert counted == len(outage), (counted, len(outage))
    # After the restart: the right script again, without restarting the server.
    assert after and "images/slurm/vmlinuz" in after[-1] and "provisioner.node=sn01" in after[-1]
    tail = after[len(after) // 2:]
    assert all("images/slurm/vmlinuz" in text for text in tail), [t[:200] for t in tail if "slurm" not in t][:3]
    # Before the outage too: the script, and nothing else, while the database was up.
    before = [text for t, _, text in loop.answers if t < t_down]
    assert before and all("images/slurm/vmlinuz" in text for text in before)

    # Nothing half-written during the outage: the rows are those of before.
    store = Store(url, password_file=pg.password_file)
    try:
        assert {t: store.count_rows(t) for t in rows_before} == rows_before
        assert store.nodes() == nodes_before
        assert store.get("sn01").phase == "requested"
        # The next pass after the restart converges: it reaches the store and carries the switch
        # on (in process, with the stand-in clusters of tests/fakes.py: no SLURM here).
        slurm = FakeSlurm(**{n: slurm_node(n) for n in site.nodes})
        rec = Reconciler(site, store, slurm=slurm, kube=FakeKube(), power=FakePower())
        report = rec.run_pass()
        assert not report.errors, report.errors
        assert store.get("sn01").phase != "requested", (report.steps, report.notes)
        assert store.count_rows("events") > rows_before["events"]
    finally:
        store.close()

    log = (tmp_path / "serve.log").read_text(errors="replace")
    assert "Traceback" not in log, log[-3000:]

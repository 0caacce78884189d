"""Fan-out over many BMCs (run_action; power_nodes records the events) and the `provisioner power` CLI, against
the simulator."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading

import pytest

from provisioner import config
from provisioner.power import PowerResult, fan_out, run_action
from provisioner.reconcile import power_nodes
from provisioner.store import Store
from tests.fixtures.bmc import BMC_PASSWORD, bmc_site
from tests.support import ROOT

pytestmark = pytest.mark.integration

PROVISIONER = str(ROOT / ".venv" / "bin" / "provisioner")


def test_fan_out_keeps_order_and_respects_the_cap():
    lock, running, peak = threading.Lock(), [0], [0]

    def work(i):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        threading.Event().wait(0.02)
        with lock:
            running[0] -= 1
        return i * 10

    assert fan_out(list(range(20)), work, limit=3) == [i * 10 for i in range(20)]
    assert peak[0] <= 3
    assert fan_out([], work, limit=3) == []


def test_eight_nodes_two_faulty_six_succeed(tmp_path, bmcs):
    site = config.load(bmc_site(tmp_path / "site", bmcs))
    store = Store(site.store)
    store.seed((n.name, n.default_role) for n in site.nodes.values())
    bmcs.set_fault("bn03", "silent")
    bmcs.set_fault("bn06", "busy")
    results = power_nodes(site, list(site.nodes.values()), "on", netboot=True, store=store, actor="test")

    assert [r.node for r in results] == [f"bn{i:02d}" for i in range(1, 9)]
    ok = [r.node for r in results if r.ok]
    assert ok == ["bn01", "bn02", "bn04", "bn05", "bn07", "bn08"]
    by = {r.node: r for r in results}
    assert by["bn03"].error_kind == "timeout" and by["bn06"].error_kind == "busy"
    for name in ok:
        assert by[name].state == "on" and by[name].netboot and by[name].method == "ipmi"
        boot = bmcs.state(name)["boots"][-1]
        assert (boot["how"], boot["bootdev"], boot["persistent"]) == ("on", "network", False)
    assert bmcs.state("bn03")["actions"] == [] and bmcs.state("bn06")["actions"] == []

    events = [e for e in store.events() if e.kind == "power"]
    assert sorted(e.node for e in events) == sorted(by)
    failed = {e.node: e for e in events if not e.data["ok"]}
    assert set(failed) == {"bn03", "bn06"}
    assert "FAILED" in failed["bn03"].message and "did not answer" in failed["bn03"].message
    assert all(BMC_PASSWORD not in (e.message + json.dumps(e.data)) for e in events)


def test_status_records_no_event(tmp_path, bmcs):
    site = config.load(bmc_site(tmp_path / "site", bmcs, names=["bn01", "bn02"]))
    store = Store(site.store)
    store.seed((n.name, n.default_role) for n in site.nodes.values())
    results = power_nodes(site, list(site.nodes.values()), "status", store=store)
    assert [(r.ok, r.state) for r in results] == [(True, "off"), (True, "off")]
    assert [e for e in store.events() if e.kind == "power"] == []


def test_one_node_exception_does_not_stop_the_others(tmp_path, bmcs):
    # A node whose BMC name does not resolve: an error for that node only.
    path = bmc_site(tmp_path / "site", bmcs, names=["bn01", "bn02"])
    text = path.read_text().replace("address: 127.0.0.1", "address: bmc-does-not-exist.invalid", 1)
    path.write_text(text)
    site = config.load(path)
    results = run_action(site, list(site.nodes.values()), "on")
    assert [r.ok for r in results] == [False, True]
    assert isinstance(results[0], PowerResult) and results[0].error


# ------------------------------------------------------------------------------------ CLI


def cli(site_path, *args) -> subprocess.CompletedProcess:
    return subprocess.run([PROVISIONER, "--config", str(site_path), *args], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)


def test_cli_power_json_and_exit_codes(tmp_path, bmcs):
    path = bmc_site(tmp_path / "site", bmcs)
    res = cli(path, "power", "bn[01-08]", "on", "--netboot", "--json")
    assert res.returncode == 0, res.stderr
    rows = json.loads(res.stdout)
    assert [(r["node"], r["ok"], r["state"], r["netboot"]) for r in rows] == \
        [(f"bn{i:02d}", True, "on", True) for i in range(1, 9)]

    res = cli(path, "power", "bn[01-02]", "status")
    assert res.returncode == 0
    assert res.stdout.splitlines()[0].split() == ["NODE", "ACTION", "RESULT", "POWER", "METHOD", "DETAIL"]
    assert res.stdout.splitlines()[1].split()[:5] == ["bn01", "status", "ok", "on", "ipmi"]

    bmcs.set_fault("bn02", "password")
    res = cli(path, "power", "bn[01-02]", "reset", "--json", "--force")  # no cluster here to ask about work
    assert res.returncode == 1
    rows = json.loads(res.stdout)
    assert [(r["ok"], r["error_kind"]) for r in rows] == [(True, None), (False, "auth")]
    assert "power reset failed on bn02 (1 of 2)" in res.stderr

    res = cli(path, "power", "nosuchnode", "status")
    assert res.returncode == 2 and "unknown node" in res.stderr
    res = cli(path, "power", "bn01", "explode")
    assert res.returncode == 2


def test_password_never_appears_in_output_events_or_logs(tmp_path, bmcs):
    """Every fault and every action, then grep everything the user or an auditor sees."""
    path = bmc_site(tmp_path / "site", bmcs)
    bmcs.set_fault("bn02", "password")
    bmcs.set_fault("bn03", "silent")
    bmcs.set_fault("bn04", "busy")
    seen = []
    res = cli(path, "power", "bn[01-05]", "on", "--netboot", "--json")
    seen += [res.stdout, res.stderr]
    bmcs.set_fault("bn03", None)  # silence costs the whole timeout: once is enough
    for i, action in enumerate(("reset", "soft", "reset")):  # the last: 0xD5 (off)
        res = cli(path, "power", "bn[01-05]", action, "--force", *(["--json"] if i % 2 else ["--netboot"]))
        seen += [res.stdout, res.stderr]
    history = cli(path, "history", "--json", "--limit", "0")
    assert history.returncode == 0
    seen += [history.stdout, history.stderr]
    text = "\n".join(seen)
    assert "did not answer" in text and "busy (0xC0)" in text and "wrong user name or password" in text
    assert "0xD5" in text
    assert BMC_PASSWORD not in text
    # The store's files themselves (events and their data) hold no password either.
    store = config.load(path).store
    for f in (store, store.with_name(store.name + "-wal")):
        if f.exists():
            assert BMC_PASSWORD.encode() not in f.read_bytes()


def test_password_never_appears_in_logs(tmp_path, bmcs, caplog):
    caplog.set_level(logging.DEBUG)
    site = config.load(bmc_site(tmp_path / "site", bmcs, names=["bn01", "bn02", "bn03"]))
    bmcs.set_fault("bn02", "password")
    bmcs.set_fault("bn03", "busy")  # (silence is logged the same way, and costs the whole timeout)
    for action in ("on", "reset", "cycle"):
        results = run_action(site, list(site.nodes.values()), action, netboot=True)
        assert [r.ok for r in results] == [True, False, False]
    assert "retrying" in caplog.text  # the log did get written
    assert BMC_PASSWORD not in caplog.text


def test_cli_module_entry_point_works_too(tmp_path, bmcs):
    path = bmc_site(tmp_path / "site", bmcs, names=["bn01"])
    assert bmcs.state("bn01")["power"] == "off"
    res = subprocess.run([sys.executable, "-m", "provisioner", "--config", str(path), "power", "bn01", "on", "--json"],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert [(r["node"], r["ok"], r["state"]) for r in json.loads(res.stdout)] == [("bn01", True, "on")]
    assert bmcs.state("bn01")["power"] == "on" and bmcs.state("bn01")["actions"] == ["on"]

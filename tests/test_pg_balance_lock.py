"""The balancer's one-pass-at-a-time lock across hosts, on PostgreSQL (reconcile.pass_lock with a
postgresql:// site.store): a session-level advisory lock on a connection of its own, held for the
pass. Two "hosts" are two site configs (different folders) on the same database; a pass is a
process holding the lock. Against the real PostgreSQL server of tests/fixtures/postgres.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from provisioner import config
from provisioner.reconcile import PassLocked, pass_lock
from testbed.site import write_site

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

HOLDER = """
import sys, time
from provisioner import config
from provisioner.reconcile import pass_lock
site = config.load(sys.argv[1])
with pass_lock(site, wait_s=float(sys.argv[3])):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
print("released", flush=True)
"""


def host(tmp_path, name: str, pg_url, site_name: str = "shared-site"):
    url, pw = pg_url
    return write_site(tmp_path / name, site={"name": site_name, "store": url, "store_password_file": str(pw),
                                             "state_dir": str(tmp_path / name / "state")})


def hold(site_path, seconds: float = 60.0, wait_s: float = 0.0) -> subprocess.Popen:
    """A process of another host holding the site's pass lock (returns once it holds it)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(site_path), str(seconds), str(wait_s)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    line = proc.stdout.readline()
    assert line.strip() == "held", (line, proc.stderr.read() if proc.poll() is not None else "")
    return proc


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)


def test_one_pass_across_hosts_and_wait_s(tmp_path, pg_url):
    a, b = host(tmp_path, "host-a", pg_url), host(tmp_path, "host-b", pg_url)
    site_b = config.load(b)
    holder = hold(a)
    try:
        with pytest.raises(PassLocked, match="another balance pass is running"):
            with pass_lock(site_b):
                pass
        t = time.monotonic()
        with pytest.raises(PassLocked, match=r"held by server process \d+"):
            with pass_lock(site_b, wait_s=1.0):
                pass
        assert 1.0 <= time.monotonic() - t < 5
        # Another site on the same database has a lock of its own.
        with pass_lock(config.load(host(tmp_path, "other", pg_url, site_name="other-site"))):
            pass
    finally:
        stop(holder)


def test_a_waiting_pass_gets_the_lock_when_the_holder_finishes(tmp_path, pg_url):
    a, b = host(tmp_path, "host-a", pg_url), host(tmp_path, "host-b", pg_url)
    holder = hold(a, seconds=1.5)
    try:
        t = time.monotonic()
        with pass_lock(config.load(b), wait_s=30):
            waited = time.monotonic() - t
        assert 0.5 < waited < 15, waited
        assert holder.wait(10) == 0 and "released" in holder.stdout.read()
    finally:
        stop(holder)


def test_the_lock_of_a_killed_pass_is_released(tmp_path, pg_url):
    """kill -9 of the pass holding the lock: its connection closes, PostgreSQL drops the lock,
    and the other host's pass goes ahead (no stale lock, no operator step)."""
    a, b = host(tmp_path, "host-a", pg_url), host(tmp_path, "host-b", pg_url)
    site_b = config.load(b)
    holder = hold(a)
    try:
        with pytest.raises(PassLocked):
            with pass_lock(site_b):
                pass
        os.kill(holder.pid, signal.SIGKILL)
        assert holder.wait(10) == -signal.SIGKILL
        t = time.monotonic()
        with pass_lock(site_b, wait_s=30):
            pass
        assert time.monotonic() - t < 10
    finally:
        stop(holder)


def test_many_processes_at_once_one_holds(tmp_path, pg_url):
    """Ten passes from two hosts at once, none waiting: exactly one gets the lock."""
    sites = [host(tmp_path, "host-a", pg_url), host(tmp_path, "host-b", pg_url)]
    argv = [[sys.executable, "-c", HOLDER, str(sites[i % 2]), "120", "0"] for i in range(10)]
    procs = [subprocess.Popen(a, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT) for a in argv]
    try:
        deadline = time.monotonic() + 90
        while sum(p.poll() is not None for p in procs) < 9 and time.monotonic() < deadline:
            time.sleep(0.05)
        running = [p for p in procs if p.poll() is None]
        assert len(running) == 1, f"{len(running)} passes hold the lock at once"
        assert running[0].stdout.readline().strip() == "held"
    finally:
        for p in procs:
            stop(p)
    refused = [p.stderr.read() for p in procs if p is not running[0]]
    assert all("another balance pass is running" in e for e in refused), refused


def test_the_lock_connection_asks_the_server_for_keepalives(tmp_path, pg_url):
    """A host that vanishes without closing its connection (power loss) must lose the lock too:
    the server probes the lock's connection (its tcp_keepalives_* for that session)."""
    from provisioner.store.postgres import connect

    url, pw = pg_url
    with connect(url, pw) as c:
        settings = {k: c.execute(f"SHOW {k}").fetchone()[0]
                    for k in ("tcp_keepalives_idle", "tcp_keepalives_interval", "tcp_keepalives_count")}
    assert settings == {"tcp_keepalives_idle": "15", "tcp_keepalives_interval": "5", "tcp_keepalives_count": "6"}


def test_a_pass_whose_lock_connection_was_lost_stops_before_its_next_write(tmp_path, pg_url):
    """The lock's connection ends (here: its backend terminated, as a database restart or a cut
    would): PostgreSQL has released the lock, and the pass's next check raises LockLost instead
    of writing alongside the other host's pass, which takes the lock now."""
    from provisioner.store.postgres import connect
    from provisioner.switch.locks import LockLost, check_held

    a, b = host(tmp_path, "host-a", pg_url), host(tmp_path, "host-b", pg_url)
    site_a, site_b = config.load(a), config.load(b)
    url, pw = pg_url
    with pass_lock(site_a):
        check_held()  # held: no error
        admin = connect(url, pw)
        try:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' AND granted "
                          "AND pid <> pg_backend_pid()")
        finally:
            admin.close()
        with pytest.raises(LockLost, match="was lost"):
            check_held()
        with pass_lock(site_b, wait_s=10):  # the other host's pass gets the lock
            pass

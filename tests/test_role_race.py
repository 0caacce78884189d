"""Two admins run `provisioner role` on the same node at the same moment. Each command reads the
node, then writes; the test holds the store's write lock until both have read and are waiting to
write (seen in /proc: asleep in SQLite's busy handler with the store open), then lets them write
one after the other in a given order (the others SIGSTOPped meanwhile). So the race is not left
to chance: every run is the interleaving a site meets once a year.

What must hold is what a sequential run of the two would give, in one order or the other: both
answers honest (a command that says "pinned" left the pin it says; one that lost says so and exits
non-zero), and `provisioner nodes --json` and `provisioner history` agree with what was printed."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess

import pytest

from testbed.simnodes import provisioner_cmd
from testbed.site import write_site
from testbed.wait import wait_for
from tests.support import ROOT, awaits_fix


def cli(path, *args) -> subprocess.CompletedProcess:
    return subprocess.run([*provisioner_cmd(), "--config", str(path), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)


def waiting_for_the_store(pid: int, db: str) -> bool:
    """The process has the store open and sleeps (SQLite's busy handler: clock_nanosleep/nanosleep)."""
    try:
        syscall = open(f"/proc/{pid}/syscall").read().split()[0]
        fds = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
    except OSError:
        return False
    return syscall in ("230", "35") and db in fds


def race(path, db: str, *commands: tuple[str, ...]) -> list[subprocess.CompletedProcess]:
    """Start the commands at once; once all have read the node and wait to write, let them write
    in the order given: each one runs to its end before the next is continued."""
    lock = sqlite3.connect(db, isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")
    procs = [subprocess.Popen([*provisioner_cmd(), "--config", str(path), *c], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=ROOT) for c in commands]
    out = []
    try:
        wait_for(lambda: all(waiting_for_the_store(p.pid, db) for p in procs), 60,
                 "every command to wait for the store's write lock")
        for p in procs[1:]:
            p.send_signal(signal.SIGSTOP)
        lock.execute("ROLLBACK")
        for p, c in zip(procs, commands):
            p.send_signal(signal.SIGCONT)
            stdout, stderr = p.communicate(timeout=60)
            out.append(subprocess.CompletedProcess(c, p.returncode, stdout, stderr))
    finally:
        lock.close()
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.kill()
                p.wait()
    return out


@pytest.fixture
def shared_site(tmp_path):
    path = write_site(tmp_path / "site")
    assert cli(path, "init").returncode == 0  # the store and the secret exist
    assert cli(path, "nodes", "sn01").returncode == 0
    return path, str(tmp_path / "site" / "state.db")


def pin(path) -> tuple:
    """sn01's (target role, pinned, pin reason), as `provisioner nodes --json` shows them."""
    proc = cli(path, "nodes", "sn01", "--json")
    assert proc.returncode == 0, proc.stderr
    (row,) = json.loads(proc.stdout)
    return row["target_role"], row["pinned"], row["pin_reason"]


def test_two_admins_ask_the_same_switch(shared_site):
    path, db = shared_site
    first, second = race(path, db, ("role", "sn01", "k8s", "--reason", "admin A"),
                         ("role", "sn01", "k8s", "--reason", "admin B"))
    # As if one after the other: A requested the switch, B found it under way and pinned there.
    assert first.returncode == 0 and "sn01: switch to k8s requested, pinned (admin A)" in first.stdout, first
    assert second.returncode == 0 and "sn01: already k8s; pinned there" in second.stdout, second
    assert pin(path) == ("k8s", True, "admin A")


def test_two_admins_ask_opposite_roles_the_switch_first(shared_site):
    path, db = shared_site
    to_k8s, stay = race(path, db, ("role", "sn01", "k8s", "--reason", "admin A wants k8s"),
                        ("role", "sn01", "slurm", "--reason", "admin B keeps slurm"))
    assert to_k8s.returncode == 0 and "sn01: switch to k8s requested, pinned" in to_k8s.stdout, to_k8s
    # B comes second: the node is switching away, B is told so and to try again; nothing of B's stays.
    assert stay.returncode == 1 and "sn01 is switching to k8s" in stay.stderr, stay
    assert pin(path) == ("k8s", True, "admin A wants k8s")
    assert [e["kind"] for e in switch_and_pin_events(path)] == ["switch"]


def test_two_admins_ask_opposite_roles_the_pin_first(shared_site):
    path, db = shared_site
    stay, to_k8s = race(path, db, ("role", "sn01", "slurm", "--reason", "admin B keeps slurm"),
                        ("role", "sn01", "k8s", "--reason", "admin A wants k8s"))
    # B first: its pin held until A's switch replaced it, as if they had run one after the other.
    assert stay.returncode == 0 and "sn01: already slurm; pinned there" in stay.stdout, stay
    assert to_k8s.returncode == 0 and "sn01: switch to k8s requested, pinned" in to_k8s.stdout, to_k8s
    assert pin(path) == ("k8s", True, "admin A wants k8s")
    assert [e["kind"] for e in switch_and_pin_events(path)] == ["pin", "switch"]


def switch_and_pin_events(path) -> list[dict]:
    proc = cli(path, "history", "sn01", "--json")
    assert proc.returncode == 0, proc.stderr
    return [e for e in json.loads(proc.stdout) if e["kind"] in ("switch", "pin")]

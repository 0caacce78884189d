"""State store: migrations, seeding, role changes with events, compare-and-set, concurrency."""

import multiprocessing
import sqlite3

import pytest

from provisioner.errors import OperationError
from provisioner.store import SCHEMA_VERSION, Store


def test_migrates_and_reopens(tmp_path):
    db = tmp_path / "s.db"
    s = Store(db)
    assert s.schema_version() == SCHEMA_VERSION
    s.close()
    assert Store(db).schema_version() == SCHEMA_VERSION


def test_refuses_a_newer_schema(tmp_path):
    db = tmp_path / "s.db"
    Store(db).close()
    c = sqlite3.connect(db)
    c.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 5}")
    c.close()
    with pytest.raises(OperationError, match="upgrade provisioner"):
        Store(db)


def test_seed_adds_only_unknown_nodes(tmp_path):
    s = Store(tmp_path / "s.db")
    assert s.seed([("a", "slurm"), ("b", "k8s")]) == ["a", "b"]
    s.set_role(["a"], "k8s", actor="t", reason="r", pin=True)
    assert s.seed([("a", "slurm"), ("b", "k8s"), ("c", "slurm")]) == ["c"]
    assert s.get("a").desired_role == "k8s"  # seeding never overrides what the store knows


def test_role_pin_release_are_recorded(tmp_path):
    s = Store(tmp_path / "s.db")
    s.seed([("a", "slurm")])
    assert s.set_role(["a"], "k8s", actor="admin:x", reason="maintenance", pin=True) == ["a"]
    assert s.set_role(["a"], "k8s", actor="admin:x", reason="again", pin=True) == []
    st = s.get("a")
    assert (st.desired_role, st.pinned, st.pin_reason) == ("k8s", True, "maintenance")
    assert s.release(["a"], actor="admin:x", reason="done") == ["a"]
    assert s.release(["a"], actor="admin:x", reason="done") == []
    kinds = [(e.kind, e.actor) for e in s.events(["a"], include_site=False)]
    assert kinds == [("role", "admin:x"), ("release", "admin:x")]


def test_event_log_is_append_only(tmp_path):
    s = Store(tmp_path / "s.db")
    s.add_event("a", "t", "note", "hello")
    conn = s._conn()
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        conn.execute("UPDATE events SET message = 'x'")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        conn.execute("DELETE FROM events")


def test_compare_and_set(tmp_path):
    s = Store(tmp_path / "s.db")
    s.seed([("a", "slurm")])
    assert s.update("a", actor="t", kind="phase", message="m", expect={"phase": "steady"}, phase="draining")
    assert not s.update("a", actor="t", kind="phase", message="m", expect={"phase": "steady"}, phase="x")
    assert s.get("a").phase == "draining"
    assert len(s.events(["a"], include_site=False)) == 1  # the refused update recorded nothing
    with pytest.raises(ValueError):
        s.update("a", actor="t", kind="k", message="m", bogus=1)


def test_failed_transaction_leaves_no_trace(tmp_path):
    s = Store(tmp_path / "s.db")
    s.seed([("a", "slurm")])
    with pytest.raises(OperationError):
        s.set_role(["a", "ghost"], "k8s", actor="t", reason="r", pin=True)
    assert s.get("a").desired_role == "slurm"  # 'a' was rolled back with 'ghost'
    assert [e.kind for e in s.events()] == ["seed"]


def _hammer(db, worker, rounds):
    s = Store(db)
    for i in range(rounds):
        role = "k8s" if (i + worker) % 2 else "slurm"
        s.set_role([f"n{i % 4}"], role, actor=f"w{worker}", reason=str(i), pin=False)
        s.add_event(None, f"w{worker}", "note", f"{worker}-{i}")
        s.desired_role("n0")


def test_concurrent_processes(tmp_path):
    """The boot server, cron passes and the CLI at once: no 'database is locked', no lost event."""
    db = tmp_path / "s.db"
    Store(db).seed([(f"n{i}", "slurm") for i in range(4)])
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_hammer, args=(db, w, 40)) for w in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * 6
    notes = [e for e in Store(db).events(kinds=["note"])]
    assert len(notes) == 6 * 40
    assert len({e.message for e in notes}) == 6 * 40


def test_migrates_an_old_store_keeping_its_data(tmp_path):
    from provisioner.store import MIGRATIONS, split_sql

    db = tmp_path / "old.db"
    c = sqlite3.connect(db, isolation_level=None)
    for stmt in split_sql(MIGRATIONS[0]):
        c.execute(stmt)
    c.execute("PRAGMA user_version = 1")
    c.execute("INSERT INTO nodes (name, desired_role, pinned, updated_at) VALUES ('a', 'k8s', 1, 1.0)")
    c.close()
    s = Store(db)
    assert s.schema_version() == SCHEMA_VERSION
    st = s.get("a")
    assert (st.desired_role, st.pinned, st.switch_reason) == ("k8s", True, None)


def test_demand_persistence_bookkeeping(tmp_path):
    s = Store(tmp_path / "s.db")
    assert s.set_demand({"slurm": 3, "k8s": 0}, now=100.0) == {"slurm": None, "k8s": None}
    assert s.set_demand({"slurm": 2, "k8s": 1}, now=160.0) == {"slurm": 100.0, "k8s": None}
    assert s.set_demand({"slurm": 0, "k8s": 1}, now=220.0) == {"slurm": None, "k8s": 160.0}
    assert s.set_demand({"slurm": 1, "k8s": 1}, now=280.0) == {"slurm": None, "k8s": 160.0}  # blinked: starts over
    assert s.demand_since() == {"slurm": 280.0, "k8s": 160.0}

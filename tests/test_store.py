"""State store: migrations, seeding, role changes with events, compare-and-set, concurrency.

Every test runs on both backends: SQLite (a file) and PostgreSQL (a fresh database on the
session's real server, tests/fixtures/postgres.py)."""

import multiprocessing
import sqlite3

import pytest

from provisioner.errors import OperationError
from provisioner.store import SCHEMA_VERSION, Store


class SqliteBackend:
    name = "sqlite"

    def __init__(self, tmp_path):
        self.target, self.password_file = tmp_path / "s.db", None
        self.append_only_error = sqlite3.DatabaseError

    def open(self) -> Store:
        return Store(self.target)

    def set_schema_version(self, version: int) -> None:
        c = sqlite3.connect(self.target)
        c.execute(f"PRAGMA user_version = {version}")
        c.close()

    def old_store_with_a_node(self) -> None:
        """A store at schema version 1 holding node a (k8s, pinned)."""
        from provisioner.store.sqlite import MIGRATIONS, split_sql

        c = sqlite3.connect(self.target, isolation_level=None)
        for stmt in split_sql(MIGRATIONS[0]):
            c.execute(stmt)
        c.execute("PRAGMA user_version = 1")
        c.execute("INSERT INTO nodes (name, desired_role, pinned, updated_at) VALUES ('a', 'k8s', 1, 1.0)")
        c.close()


class PgBackend:
    name = "postgresql"

    def __init__(self, url, password_file):
        import psycopg

        self.target, self.password_file = url, password_file
        self.append_only_error = psycopg.errors.RaiseException

    def open(self) -> Store:
        return Store(self.target, password_file=self.password_file)

    def raw(self):
        import psycopg

        return psycopg.connect(self.target, password=self.password_file.read_text().strip(), autocommit=True)

    def set_schema_version(self, version: int) -> None:
        with self.raw() as c:
            c.execute("UPDATE provisioner_schema SET version = %s", (version,))

    def old_store_with_a_node(self) -> None:
        from provisioner.store.postgres import MIGRATIONS

        with self.raw() as c:
            c.execute(MIGRATIONS[0])
            c.execute("CREATE TABLE provisioner_schema (version INTEGER NOT NULL)")
            c.execute("INSERT INTO provisioner_schema VALUES (1)")
            c.execute("INSERT INTO nodes (name, desired_role, pinned, updated_at) VALUES ('a', 'k8s', 1, 1.0)")


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request, tmp_path):
    if request.param == "sqlite":
        return SqliteBackend(tmp_path)
    return PgBackend(*request.getfixturevalue("pg_url"))


def test_migrates_and_reopens(backend):
    s = backend.open()
    assert s.backend == backend.name
    assert s.schema_version() == SCHEMA_VERSION
    s.close()
    assert backend.open().schema_version() == SCHEMA_VERSION


def test_refuses_a_newer_schema(backend):
    backend.open().close()
    backend.set_schema_version(SCHEMA_VERSION + 5)
    with pytest.raises(OperationError, match="upgrade provisioner"):
        backend.open()


def test_seed_adds_only_unknown_nodes(backend):
    s = backend.open()
    assert s.seed([("a", "slurm"), ("b", "k8s")]) == ["a", "b"]
    s.set_role(["a"], "k8s", actor="t", reason="r", pin=True)
    assert s.seed([("a", "slurm"), ("b", "k8s"), ("c", "slurm")]) == ["c"]
    assert s.get("a").desired_role == "k8s"  # seeding never overrides what the store knows


def test_role_pin_release_are_recorded(backend):
    s = backend.open()
    s.seed([("a", "slurm")])
    assert s.set_role(["a"], "k8s", actor="admin:x", reason="maintenance", pin=True) == ["a"]
    assert s.set_role(["a"], "k8s", actor="admin:x", reason="again", pin=True) == []
    st = s.get("a")
    assert (st.desired_role, st.pinned, st.pin_reason) == ("k8s", True, "maintenance")
    assert s.release(["a"], actor="admin:x", reason="done") == ["a"]
    assert s.release(["a"], actor="admin:x", reason="done") == []
    kinds = [(e.kind, e.actor) for e in s.events(["a"], include_site=False)]
    assert kinds == [("role", "admin:x"), ("release", "admin:x")]


def test_event_log_is_append_only(backend):
    s = backend.open()
    s.add_event("a", "t", "note", "hello")
    conn = s._conn()
    with pytest.raises(backend.append_only_error, match="append-only"):
        conn.execute("UPDATE events SET message = 'x'")
    with pytest.raises(backend.append_only_error, match="append-only"):
        conn.execute("DELETE FROM events")
    assert [e.message for e in s.events()] == ["hello"]


def test_compare_and_set(backend):
    s = backend.open()
    s.seed([("a", "slurm")])
    assert s.update("a", actor="t", kind="phase", message="m", expect={"phase": "steady"}, phase="draining")
    assert not s.update("a", actor="t", kind="phase", message="m", expect={"phase": "steady"}, phase="x")
    assert s.get("a").phase == "draining"
    assert len(s.events(["a"], include_site=False)) == 1  # the refused update recorded nothing
    with pytest.raises(ValueError):
        s.update("a", actor="t", kind="k", message="m", bogus=1)


def test_failed_transaction_leaves_no_trace(backend):
    s = backend.open()
    s.seed([("a", "slurm")])
    with pytest.raises(OperationError):
        s.set_role(["a", "ghost"], "k8s", actor="t", reason="r", pin=True)
    assert s.get("a").desired_role == "slurm"  # 'a' was rolled back with 'ghost'
    assert [e.kind for e in s.events()] == ["seed"]


def _hammer(db, password_file, worker, rounds):
    s = Store(db, password_file=password_file)
    for i in range(rounds):
        role = "k8s" if (i + worker) % 2 else "slurm"
        s.set_role([f"n{i % 4}"], role, actor=f"w{worker}", reason=str(i), pin=False)
        s.add_event(None, f"w{worker}", "note", f"{worker}-{i}")
        s.desired_role("n0")


def test_concurrent_processes(backend):
    """The boot server, cron passes and the CLI at once: no 'database is locked', no lost event."""
    db = backend.target
    backend.open().seed([(f"n{i}", "slurm") for i in range(4)])
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_hammer, args=(db, backend.password_file, w, 40)) for w in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * 6
    notes = [e for e in backend.open().events(kinds=["note"])]
    assert len(notes) == 6 * 40
    assert len({e.message for e in notes}) == 6 * 40


def test_migrates_an_old_store_keeping_its_data(backend):
    backend.old_store_with_a_node()
    s = backend.open()
    assert s.schema_version() == SCHEMA_VERSION
    st = s.get("a")
    assert (st.desired_role, st.pinned, st.switch_reason) == ("k8s", True, None)


def test_demand_persistence_bookkeeping(backend):
    s = backend.open()
    assert s.set_demand({"slurm": 3, "k8s": 0}, now=100.0) == {"slurm": None, "k8s": None}
    assert s.set_demand({"slurm": 2, "k8s": 1}, now=160.0) == {"slurm": 100.0, "k8s": None}
    assert s.set_demand({"slurm": 0, "k8s": 1}, now=220.0) == {"slurm": None, "k8s": 160.0}
    assert s.set_demand({"slurm": 1, "k8s": 1}, now=280.0) == {"slurm": None, "k8s": 160.0}  # blinked: starts over
    assert s.demand_since() == {"slurm": 280.0, "k8s": 160.0}


def test_asks_and_image_pins(backend):
    s = backend.open()
    s.seed([("a", "slurm"), ("b", "slurm")])
    ids = s.add_asks(["a", "b"], "resume", source="slurmctld", reason="job 7", actor="slurmctld")
    assert ids == sorted(ids) and s.last_ask_id() == ids[-1]
    assert [a.node for a in s.open_asks()] == ["a", "b"]
    assert s.close_ask(s.open_asks()[0], "granted", "ok", actor="balancer")
    assert not s.close_ask(s.asks()[0], "granted", "again", actor="balancer")  # answered once
    assert [a.node for a in s.open_asks()] == ["b"]
    assert s.pin_image(["a"], "slurm-img", "2", actor="t", reason="rollback") == ["a"]
    assert s.image_pin("a", "slurm-img") == "2" and s.image_pin("b", "slurm-img") is None
    assert s.pin_image(["a"], "slurm-img", "3", actor="t", reason="newer") == ["a"]
    assert [(p["node"], p["version"]) for p in s.image_pins()] == [("a", "3")]
    assert s.unpin_image(["a"], actor="t", reason="done") == ["a"] and s.image_pins() == []
    kinds = [e.kind for e in s.events(["a"], kinds=["ask", "ask-granted", "image-pin", "image-unpin"])]
    assert kinds == ["ask", "ask-granted", "image-pin", "image-pin", "image-unpin"]


def _cas(db, password_file, worker, barrier):
    s = Store(db, password_file=password_file)
    barrier.wait()
    won = s.update("a", actor=f"w{worker}", kind="switch", message="start", expect={"phase": "steady"},
                   phase="requested", target_role="k8s")
    raise SystemExit(0 if won else 3)


def test_compare_and_set_across_processes_one_winner(backend):
    """Eight passes see `a` steady and start a switch at the same moment: exactly one does."""
    backend.open().seed([("a", "slurm")])
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(8)
    procs = [ctx.Process(target=_cas, args=(backend.target, backend.password_file, w, barrier)) for w in range(8)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert sorted(p.exitcode for p in procs) == [0] + [3] * 7
    assert len(backend.open().events(["a"], kinds=["switch"], include_site=False)) == 1


def filled(s: Store) -> Store:
    s.seed([("a", "slurm"), ("b", "k8s")])
    s.set_role(["a"], "k8s", actor="admin:x", reason="maintenance", pin=True)
    s.update("b", actor="balancer", kind="switch", message="to slurm", expect={"phase": "steady"},
             phase="cordoning", target_role="slurm", phase_since=12.5, power_at=13.25)
    s.add_asks(["a"], "resume", source="slurmctld", reason="job 1", actor="slurmctld")
    s.close_ask(s.open_asks()[0], "refused", "pinned", actor="balancer")
    s.add_asks(["b"], "suspend", source="slurmctld", reason="idle", actor="slurmctld")
    s.pin_image(["b"], "slurm-img", "7", actor="admin:x", reason="rollback")
    s.set_demand({"slurm": 2, "k8s": 0}, now=100.5)
    s.hold(["b"], actor="admin:x", reason="DIMM swap")
    return s


def test_store_copy_sqlite_to_postgresql(tmp_path, pg_url):
    from provisioner.store.postgres import copy_store

    src = filled(Store(tmp_path / "s.db"))
    url, pw = pg_url
    dst = Store(url, password_file=pw)
    copied = copy_store(src, dst)
    assert copied == {"nodes": 2, "events": len(src.events()), "asks": 2, "image_pins": 1, "demand": 1,
                      "holds": 1}
    for table in ("nodes", "events", "asks", "image_pins", "demand", "holds"):
        assert dst.table_rows(table) == src.table_rows(table), table
    assert dst.nodes() == src.nodes() and [e.as_dict() for e in dst.events()] == [e.as_dict() for e in src.events()]
    # New rows continue after the copied ids.
    dst.add_event(None, "t", "note", "after the copy")
    assert dst.events()[-1].id == src.events()[-1].id + 1
    assert dst.add_asks(["a"], "resume", source="s", reason="r", actor="s") == [3]
    # A second copy is refused: the target is not empty.
    with pytest.raises(OperationError, match="not empty"):
        copy_store(src, dst)


def test_store_copy_command(tmp_path, pg_url, capsys):
    from provisioner.cli import main
    from testbed.site import write_site

    site = write_site(tmp_path / "site")
    filled(Store(tmp_path / "site" / "state.db"))
    url, pw = pg_url
    assert main(["--config", str(site), "store", "copy", "--to", url, "--password-file", str(pw)]) == 0
    out = capsys.readouterr().out
    assert "8 nodes row(s)" in out and "2 asks row(s)" in out  # a, b and the site's 6 and "1 image pins row(s)" in out
    assert "1 demand row(s)" in out and url in out
    assert pw.read_text().strip() not in out
    assert main(["--config", str(site), "store", "copy", "--to", url, "--password-file", str(pw)]) == 1
    assert "is not empty" in capsys.readouterr().err


def test_postgresql_site_config_and_errors_hide_the_password(tmp_path, pg_url):
    from provisioner import config
    from provisioner.errors import ConfigError
    from provisioner.store import open_store
    from testbed.site import write_site

    url, pw = pg_url
    site = config.load(write_site(tmp_path / "site", site={"store": url, "store_password_file": str(pw),
                                                           "state_dir": str(tmp_path / "state")}))
    assert (site.store_url, site.store_password_file, site.store) == (url, pw, tmp_path / "state" / "store")
    assert open_store(site).backend == "postgresql"
    with pytest.raises(ConfigError, match="not in the URL") as exc:
        config.load(write_site(tmp_path / "bad", site={"store": url.replace("provisioner@", "provisioner:pw1@")}))
    assert "pw1" not in str(exc.value)
    with pytest.raises(OperationError) as exc:
        Store(url.replace("provisioner@", "provisioner:wrong-pw@"))
    assert "wrong-pw" not in str(exc.value) and "password authentication failed" in str(exc.value)


def _use_after_fork(store, q):
    store.add_event(None, "child", "note", "from the forked child")
    q.put(store.get("a").desired_role)
    store.close()  # closes the child's own connection; the inherited one was disowned
    import gc

    gc.collect()  # as a worker's exit would: the inherited connection object is finalized here


def test_a_forked_child_does_not_end_its_parents_connection(backend):
    """The boot server opens the store, then forks its workers: each worker connects anew, and
    the parent's connection (SQLite handle, PostgreSQL session) keeps working."""
    s = backend.open()
    s.seed([("a", "slurm")])
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    for _ in range(2):
        p = ctx.Process(target=_use_after_fork, args=(s, q))
        p.start()
        p.join(60)
        assert p.exitcode == 0 and q.get(timeout=5) == "slurm"
    s.add_event(None, "parent", "note", "the parent's connection still works")
    assert [e.actor for e in s.events(kinds=["note"])] == ["child", "child", "parent"]


def test_a_boot_after_the_power_intent_is_stamped_no_earlier_than_the_power_action(backend):
    """The boot server's clock may be behind the balancer's: the store's order, not the two
    clocks, says that a token issued and a callback recorded after the power intent are of the
    boot that power action started."""
    import time

    s = backend.open()
    s.seed([("n1", "slurm"), ("n2", "slurm")])
    ahead = time.time() + 120  # the balancer's clock, 2 min ahead of this "boot server"
    s.update("n1", actor="t", kind="t", message="t", phase="rebooting", target_role="k8s", phase_since=ahead - 1,
             power_at=ahead)
    assert s.issue_boot("n1", "a" * 32, time.time(), None)  # the script of this boot: its token
    assert s.boot_row("n1")["issued_at"] == ahead
    assert s.record_booted("n1", "k8s", "1", actor="t", source=None, spend="a" * 32)
    assert s.get("n1").booted_at == ahead
    assert s.record_booted("n2", "slurm", "1", actor="t", source=None)  # no switch: its own time
    assert s.get("n2").booted_at < ahead - 60


def test_boots_compare_and_set(backend):
    """The boots rows (provisioner/boot/boots.py): a token is issued over the one expected, spent
    once with its callback, and the secrets served once per window."""
    s = backend.open()
    s.seed([("n1", "slurm")])
    assert s.boot_row("n1") is None
    assert s.issue_boot("n1", "a" * 32, 10.0, None)
    assert not s.issue_boot("n1", "b" * 32, 11.0, None)  # another worker issued meanwhile
    assert s.boot_row("n1")["nonce"] == "a" * 32 and s.boot_rows()["n1"]["issued_at"] == 10.0
    assert s.serve_boot_secrets("n1", "a" * 32, 5.0, 12.0)
    assert not s.serve_boot_secrets("n1", "a" * 32, 5.0, 13.0)  # once per window
    assert not s.record_booted("n1", "slurm", "1", actor="t", source=None, spend="b" * 32)
    assert s.record_booted("n1", "slurm", "1", actor="t", source=None, spend="a" * 32)
    assert not s.record_booted("n1", "slurm", "1", actor="t", source=None, spend="a" * 32)  # spent
    assert [e.kind for e in s.events(["n1"])].count("booted") == 1
    s.grant_boot(["n1"], actor="admin", reason="test")
    row = s.boot_row("n1")
    assert row["granted_by"] == "admin" and row["spent_at"] is not None
    assert s.issue_boot("n1", "c" * 32, 20.0, "a" * 32) and s.boot_row("n1")["spent_at"] is None

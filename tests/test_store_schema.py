"""The store's one schema (provisioner/store/schema.py), rendered for SQLite and for PostgreSQL:
every migration applied in order to a fresh SQLite file and to a real PostgreSQL database
(tests/fixtures/postgres.py) gives the tables, columns, indexes and append-only triggers below,
and a store at any older version migrates to the same schema as a fresh one."""

from __future__ import annotations

import sqlite3

import pytest

from provisioner.store import SCHEMA_VERSION, Store
from provisioner.store.schema import DIALECTS, MIGRATIONS, migrations, render
from provisioner.store.sqlite import split_sql

# Every table's columns in order, in SQLite's types. PostgreSQL's: TYPES below, and the ids
# (INTEGER PRIMARY KEY AUTOINCREMENT) are bigint.
TABLES = {
    "nodes": "name TEXT, desired_role TEXT, booted_role TEXT, booted_version TEXT, booted_at REAL, "
             "pinned INTEGER, pin_reason TEXT, phase TEXT, target_role TEXT, phase_since REAL, "
             "attempts INTEGER, failed_reason TEXT, last_switch_at REAL, updated_at REAL, "
             "switch_reason TEXT, switch_actor TEXT, k8s_boot_id TEXT, power_at REAL, "
             "reclaim_deadline REAL, reclaim_work TEXT, evict_refused_at REAL, evict_refused TEXT",
    "events": "id INTEGER, ts REAL, node TEXT, actor TEXT, kind TEXT, message TEXT, data TEXT",
    "demand": "side TEXT, since REAL, amount INTEGER",
    "image_pins": "node TEXT, image TEXT, version TEXT, reason TEXT, actor TEXT, since REAL",
    "asks": "id INTEGER, node TEXT, kind TEXT, source TEXT, reason TEXT, created_at REAL, closed_at REAL, "
            "outcome TEXT, message TEXT",
    "boots": "node TEXT, nonce TEXT, issued_at REAL, spent_at REAL, secrets_at REAL, secrets_window REAL, "
             "granted_at REAL, granted_by TEXT",
    "holds": "node TEXT, reason TEXT, actor TEXT, since REAL",
}
TYPES = {"TEXT": "text", "INTEGER": "integer", "REAL": "double precision"}
INDEXES = {"events_node", "asks_open"}
TRIGGERS = {
    "sqlite": {"events_append_only_update", "events_append_only_delete"},
    "postgresql": {"events_append_only_update", "events_append_only_delete", "events_append_only_truncate"},
}


def expected(dialect: str) -> dict:
    tables = {}
    for table, spec in TABLES.items():
        cols = [tuple(c.split()) for c in spec.split(", ")]
        if dialect == "postgresql":
            cols = [(n, "bigint" if n == "id" else TYPES[t]) for n, t in cols]
        tables[table] = cols
    return {"tables": tables, "indexes": INDEXES, "triggers": TRIGGERS[dialect]}


def sqlite_schema(path) -> dict:
    c = sqlite3.connect(path)
    try:
        names = [r[0] for r in c.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")]
        return {
            "tables": {t: [(r[1], r[2]) for r in c.execute(f"PRAGMA table_info({t})")] for t in names},
            "indexes": {r[0] for r in c.execute(
                "SELECT name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL")},
            "triggers": {r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'")},
            # the statements as SQLite keeps them: a store migrated from an older version must
            # hold exactly what a fresh one does
            "sql": sorted(r[0] for r in c.execute("SELECT sql FROM sqlite_master WHERE sql IS NOT NULL")),
        }
    finally:
        c.close()


def pg_schema(conn) -> dict:
    tables: dict = {}
    for table, column, kind in conn.execute(
            "SELECT table_name, column_name, data_type FROM information_schema.columns "
            "WHERE table_schema = 'public' AND table_name <> 'provisioner_schema' "
            "ORDER BY table_name, ordinal_position"):
        tables.setdefault(table, []).append((column, kind))
    return {
        "tables": tables,
        "indexes": {r[0] for r in conn.execute(
            "SELECT indexname FROM pg_indexes WHERE schemaname = 'public' AND indexname NOT LIKE '%_pkey'")},
        "triggers": {r[0] for r in conn.execute("SELECT tgname FROM pg_trigger WHERE NOT tgisinternal")},
        "sql": sorted(
            [r[0] for r in conn.execute(
                "SELECT pg_get_triggerdef(oid) FROM pg_trigger WHERE NOT tgisinternal")]
            + [r[0] for r in conn.execute(
                "SELECT indexdef FROM pg_indexes WHERE schemaname = 'public'")]
            + [r[0] for r in conn.execute(
                "SELECT prosrc FROM pg_proc WHERE pronamespace = 'public'::regnamespace")]
            + [str(r) for r in conn.execute(
                "SELECT table_name, column_name, column_default, is_nullable FROM information_schema.columns "
                "WHERE table_schema = 'public' ORDER BY table_name, ordinal_position")]),
    }


def without_sql(schema: dict) -> dict:
    return {k: v for k, v in schema.items() if k != "sql"}


def test_the_rendering_differs_only_where_the_dialects_do():
    assert len(MIGRATIONS) == SCHEMA_VERSION == len(migrations("sqlite")) == len(migrations("postgresql"))
    for sql in migrations("postgresql"):
        assert "AUTOINCREMENT" not in sql and " REAL" not in sql and "APPEND ONLY" not in sql
    for sql in migrations("sqlite"):
        assert "APPEND ONLY" not in sql
    # what is neither a type nor the append-only marker is the same text in both
    assert render("ALTER TABLE t ADD COLUMN realm TEXT;", "postgresql") == "ALTER TABLE t ADD COLUMN realm TEXT;"
    with pytest.raises(ValueError, match="unknown SQL dialect"):
        render("", "mysql")
    assert DIALECTS == ("sqlite", "postgresql")


def sqlite_at(path, version: int) -> None:
    """An SQLite store at `version`, made by the rendered migrations alone (as an older
    provisioner left it)."""
    c = sqlite3.connect(path, isolation_level=None)
    for sql in migrations("sqlite")[:version]:
        for statement in split_sql(sql):
            c.execute(statement)
    c.execute(f"PRAGMA user_version = {version}")
    c.close()


def test_sqlite_every_version_migrates_to_the_schema(tmp_path):
    sqlite_at(tmp_path / "all.db", SCHEMA_VERSION)
    fresh = sqlite_schema(tmp_path / "all.db")
    assert without_sql(fresh) == expected("sqlite")
    for version in range(SCHEMA_VERSION):
        path = tmp_path / f"v{version}.db"
        sqlite_at(path, version)
        s = Store(path)
        assert s.schema_version() == SCHEMA_VERSION
        s.close()
        assert sqlite_schema(path) == fresh, f"a store at version {version}"


@pytest.mark.integration
def test_postgresql_every_version_migrates_to_the_schema(postgres_server):
    pg = postgres_server

    def at(version: int) -> str:
        url = pg.create_database(f"schema_v{version}")
        with pg.connect(f"schema_v{version}") as c:
            for sql in migrations("postgresql")[:version]:
                c.execute(sql)
            if version:
                c.execute("CREATE TABLE provisioner_schema (version INTEGER NOT NULL)")
                c.execute("INSERT INTO provisioner_schema VALUES (%s)", (version,))
        return url

    at(SCHEMA_VERSION)
    with pg.connect(f"schema_v{SCHEMA_VERSION}") as c:
        fresh = pg_schema(c)
    assert without_sql(fresh) == expected("postgresql")
    # the same tables and columns, in order, on both backends
    assert {t: [n for n, _ in cols] for t, cols in fresh["tables"].items()} == \
        {t: [n for n, _ in cols] for t, cols in expected("sqlite")["tables"].items()}
    for version in range(SCHEMA_VERSION):
        s = Store(at(version), password_file=pg.password_file)
        assert s.schema_version() == SCHEMA_VERSION
        s.close()
        with pg.connect(f"schema_v{version}") as c:
            assert pg_schema(c) == fresh, f"a store at version {version}"

"""The store's schema, written once and rendered for each backend (render()).

Each migration is SQLite's text. PostgreSQL's differs in three things only, rendered here:
- REAL (a float: epoch seconds) is DOUBLE PRECISION;
- INTEGER PRIMARY KEY AUTOINCREMENT (an id that is never reused) is BIGSERIAL PRIMARY KEY;
- `APPEND ONLY table;` (not SQL: a line of its own) stands for the triggers that make a table
  append-only: in SQLite a trigger that raises on UPDATE and on DELETE; in PostgreSQL one
  function and triggers on UPDATE, DELETE and TRUNCATE.
SQLite records the version in `PRAGMA user_version`, PostgreSQL in the table provisioner_schema.
"""

from __future__ import annotations

import re

DIALECTS = ("sqlite", "postgresql")

# Each entry migrates from version i to i+1. Append, never edit a shipped one: databases of both
# kinds at every version must keep migrating the same way.
MIGRATIONS: list[str] = [
    # 0 -> 1: nodes and events
    """
    CREATE TABLE nodes (
        name            TEXT PRIMARY KEY,
        desired_role    TEXT NOT NULL,
        booted_role     TEXT,
        booted_version  TEXT,
        booted_at       REAL,
        pinned          INTEGER NOT NULL DEFAULT 0,
        pin_reason      TEXT,
        phase           TEXT NOT NULL DEFAULT 'steady',
        target_role     TEXT,
        phase_since     REAL,
        attempts        INTEGER NOT NULL DEFAULT 0,
        failed_reason   TEXT,
        last_switch_at  REAL,
        updated_at      REAL NOT NULL
    );
    CREATE TABLE events (
        id       INTEGER PRIMARY KEY AUTOINCREMENT,
        ts       REAL NOT NULL,
        node     TEXT,
        actor    TEXT NOT NULL,
        kind     TEXT NOT NULL,
        message  TEXT NOT NULL,
        data     TEXT
    );
    CREATE INDEX events_node ON events (node, id);
    APPEND ONLY events;
    """,
    # 1 -> 2: the balancer's bookkeeping: why and by whom a switch was started, and since when
    # each side's demand has been seen (demand must persist before it moves a node).
    """
    ALTER TABLE nodes ADD COLUMN switch_reason TEXT;
    ALTER TABLE nodes ADD COLUMN switch_actor TEXT;
    CREATE TABLE demand (
        side   TEXT PRIMARY KEY,
        since  REAL NOT NULL,
        amount INTEGER NOT NULL DEFAULT 0
    );
    """,
    # 2 -> 3: per-node image version pins (rollback of one node to an older built version).
    # A separate table, so the nodes row (and NodeState) stays as it is.
    """
    CREATE TABLE image_pins (
        node     TEXT NOT NULL,
        image    TEXT NOT NULL,
        version  TEXT NOT NULL,
        reason   TEXT,
        actor    TEXT,
        since    REAL NOT NULL,
        PRIMARY KEY (node, image)
    );
    """,
    # 3 -> 4: the Kubernetes bootID the node's Node object showed before its reboot. A node
    # counts as joined only once its kubelet reports another one: a Ready condition left over
    # from before the reboot (the node-lifecycle controller notices a silent kubelet only after
    # its grace period) must not pass for the new image's kubelet.
    # power_at: written right before a switch's power action, so that a pass that dies between
    # the action and its record does not make the next pass power the node a second time.
    """
    ALTER TABLE nodes ADD COLUMN k8s_boot_id TEXT;
    ALTER TABLE nodes ADD COLUMN power_at REAL;
    """,
    # 4 -> 5: asks: a scheduler (slurmctld's ResumeProgram/SuspendProgram/ResumeFailProgram) or
    # an event asks for a node now. Recorded by the fast command slurmctld runs, answered by the
    # next pass (the policy grants or refuses it, with the reason), then closed.
    """
    CREATE TABLE asks (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        node        TEXT NOT NULL,
        kind        TEXT NOT NULL,
        source      TEXT NOT NULL,
        reason      TEXT NOT NULL,
        created_at  REAL NOT NULL,
        closed_at   REAL,
        outcome     TEXT,
        message     TEXT
    );
    CREATE INDEX asks_open ON asks (closed_at, id);
    """,
    # 5 -> 6: boots: each node's current boot token (only its random nonce: the token is an HMAC
    # of it under the site secret), whether the callback spent it, in which boot window its
    # overlay's secret part was served, and an admin's request to boot it (a boot window).
    """
    CREATE TABLE boots (
        node            TEXT PRIMARY KEY,
        nonce           TEXT,
        issued_at       REAL,
        spent_at        REAL,
        secrets_at      REAL,
        secrets_window  REAL,
        granted_at      REAL,
        granted_by      TEXT
    );
    """,
    # 6 -> 7: reclaims. A reclaim's grace deadline and what happens to the work after it
    # (evict | requeue), kept while its switch runs; the last eviction a PodDisruptionBudget
    # refused (when, and its message), kept on the node so later passes hold it for cooldown_s.
    """
    ALTER TABLE nodes ADD COLUMN reclaim_deadline REAL;
    ALTER TABLE nodes ADD COLUMN reclaim_work TEXT;
    ALTER TABLE nodes ADD COLUMN evict_refused_at REAL;
    ALTER TABLE nodes ADD COLUMN evict_refused TEXT;
    """,
    # 7 -> 8: maintenance holds (`provisioner hold`): the balancer, slurmctld's asks and power
    # saving leave a held node alone. A table of its own: a hold outlives any switch state.
    """
    CREATE TABLE holds (
        node    TEXT PRIMARY KEY,
        reason  TEXT NOT NULL,
        actor   TEXT NOT NULL,
        since   REAL NOT NULL
    );
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)

_APPEND_ONLY = re.compile(r"^(\s*)APPEND ONLY (\w+);$", re.M)

# The triggers of `APPEND ONLY {table};`, per dialect ({i}: the line's indent).
APPEND_ONLY = {
    "sqlite": (
        "{i}CREATE TRIGGER {table}_append_only_update BEFORE UPDATE ON {table}\n"
        "{i}    BEGIN SELECT RAISE(ABORT, 'the event log is append-only'); END;\n"
        "{i}CREATE TRIGGER {table}_append_only_delete BEFORE DELETE ON {table}\n"
        "{i}    BEGIN SELECT RAISE(ABORT, 'the event log is append-only'); END;"
    ),
    "postgresql": (
        "{i}CREATE FUNCTION {table}_append_only() RETURNS trigger LANGUAGE plpgsql AS $$\n"
        "{i}    BEGIN RAISE EXCEPTION 'the event log is append-only'; END $$;\n"
        "{i}CREATE TRIGGER {table}_append_only_update BEFORE UPDATE ON {table}\n"
        "{i}    FOR EACH ROW EXECUTE FUNCTION {table}_append_only();\n"
        "{i}CREATE TRIGGER {table}_append_only_delete BEFORE DELETE ON {table}\n"
        "{i}    FOR EACH ROW EXECUTE FUNCTION {table}_append_only();\n"
        "{i}CREATE TRIGGER {table}_append_only_truncate BEFORE TRUNCATE ON {table}\n"
        "{i}    FOR EACH STATEMENT EXECUTE FUNCTION {table}_append_only();"
    ),
}


def render(migration: str, dialect: str) -> str:
    """One migration's SQL for `dialect` (sqlite | postgresql)."""
    if dialect not in DIALECTS:
        raise ValueError(f"unknown SQL dialect {dialect!r}")
    sql = _APPEND_ONLY.sub(lambda m: APPEND_ONLY[dialect].format(i=m[1], table=m[2]), migration)
    if dialect == "postgresql":
        sql = sql.replace("INTEGER PRIMARY KEY AUTOINCREMENT", "BIGSERIAL PRIMARY KEY")
        sql = re.sub(r"\bREAL\b", "DOUBLE PRECISION", sql)
    return sql


def migrations(dialect: str) -> list[str]:
    """Every migration rendered for `dialect`: entry i migrates from version i to i+1."""
    return [render(m, dialect) for m in MIGRATIONS]

"""The state store in PostgreSQL (site.store: postgresql://USER@HOST:PORT/DB), through psycopg 3.

The same Store interface and the same guarantees as the SQLite store (sqlite.py), for sites that
run the balancer on more than one host:

- the same schema (schema.py, rendered in PostgreSQL's types), its version recorded in the
  table provisioner_schema and migrated forward on open, under the write lock below;
- writes are serialized like SQLite's single writer: every write transaction first takes a
  transaction-level advisory lock (pg_advisory_xact_lock on WRITE_LOCK_KEY), so a read-modify-
  write (compare-and-set update(expect=...), seed, set_demand) cannot race another process;
  readers never wait (MVCC);
- the event log is append-only, enforced by the database: a trigger raises on UPDATE and DELETE
  of events (as SQLite's triggers do);
- the password comes from site.store_password_file or libpq's own PGPASSWORD / ~/.pgpass, never
  from the URL; messages show the URL without it (redact()).

balance_lock() is the balancer's one-pass-at-a-time lock across hosts: a session-level advisory
lock on a connection of its own, held for the pass; PostgreSQL releases it when that connection
ends, also when the pass is killed (SIGKILL closes its socket; TCP keepalives notice a host that
vanished).
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from provisioner.errors import OperationError
from provisioner.store.base import Store
from provisioner.store.schema import SCHEMA_VERSION, migrations

MIGRATIONS = migrations("postgresql")

# The tables a site's state is made of, in the order store copy writes them.
TABLES = Store.COPY_TABLES
SERIAL_TABLES = ("events", "asks")

WRITE_LOCK_KEY = int.from_bytes(hashlib.sha256(b"provisioner:store-write").digest()[:8], "big", signed=True)
# A connection idle this long is asked `SELECT 1` before use (a restart of the server is seen
# only when a statement fails).
PING_AFTER_S = 2.0
# TCP keepalives both ways: the client notices a server that vanished, and the server (its
# tcp_keepalives_* settings, set per session) a client whose host vanished without closing its
# connections (power loss, network split): then its session ends and the pass lock it held is
# released within about 15 + 5 * 6 = 45 s.
KEEPALIVES = {"keepalives": 1, "keepalives_idle": 15, "keepalives_interval": 5, "keepalives_count": 6}
SERVER_KEEPALIVES = "-c tcp_keepalives_idle=15 -c tcp_keepalives_interval=5 -c tcp_keepalives_count=6"


def redact(url: str) -> str:
    """The URL without a password (for every message and log line)."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = (f"{parts.username}@" if parts.username else "") + host + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def read_password(password_file: Any) -> str | None:
    if not password_file:
        return None
    try:
        return Path(password_file).read_text().strip()
    except OSError as exc:
        raise OperationError(f"cannot read the store password file {password_file}: "
                             f"{exc.strerror or exc}; check site.store_password_file") from None


def connect(url: str, password_file: Any = None, timeout_s: float = 30.0, *, autocommit: bool = True,
            read_only: bool = False):
    """A psycopg connection to the store URL (password from the file, else libpq's PGPASSWORD).
    read_only: every transaction of the session is read-only (the server refuses any write)."""
    try:
        import psycopg
    except ImportError:
        raise OperationError("site.store is a PostgreSQL URL but psycopg is not installed "
                             "(pip install 'psycopg[binary]')") from None
    kwargs: dict[str, Any] = {"autocommit": autocommit, "connect_timeout": max(1, int(min(timeout_s, 10))),
                              "application_name": "provisioner", **KEEPALIVES,
                              # a write waits for the write lock at most timeout_s, like SQLite's busy timeout
                              "options": f"-c lock_timeout={int(timeout_s * 1000)} {SERVER_KEEPALIVES}"
                                         + (" -c default_transaction_read_only=on" if read_only else "")}
    password = read_password(password_file)
    if password is not None:
        kwargs["password"] = password
    try:
        return psycopg.connect(url, **kwargs)
    except psycopg.Error as exc:
        hint = "check site.store"
        if "database" in str(exc) and "does not exist" in str(exc):
            hint = "create the database (examples/postgresql/provisioner.sql), then `provisioner init`"
        raise OperationError(f"cannot connect to the store {redact(url)}: {_first_line(exc)}; {hint}") from None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [exc.__class__.__name__])[0]


class Row(tuple):
    """A result row read like sqlite3.Row: by index, by column name, and dict(row)."""

    def __new__(cls, names: list[str], values: Any):
        row = super().__new__(cls, values)
        row.names = names
        return row

    def __getitem__(self, key):  # type: ignore[override]
        if isinstance(key, str):
            return tuple.__getitem__(self, self.names.index(key))
        return tuple.__getitem__(self, key)

    def keys(self) -> list[str]:
        return list(self.names)


def _row_factory(cursor):
    names = [c.name for c in cursor.description or ()]
    return lambda values: Row(names, values)


class PgConnection:
    """A psycopg connection that takes the store's SQL as written for SQLite: `?` parameters
    (the store's SQL has no other `?` and no `%`)."""

    def __init__(self, raw, where: str):
        self.raw, self.where = raw, where

    def execute(self, sql: str, args: Any = ()):
        import psycopg

        try:
            return self.raw.execute(sql.replace("?", "%s"), tuple(args) if args else None)
        except psycopg.errors.LockNotAvailable as exc:
            raise OperationError(f"store {self.where} is busy ({_first_line(exc)}); try again") from None
        except psycopg.OperationalError as exc:
            raise OperationError(f"store {self.where}: {_first_line(exc)}") from None

    def close(self) -> None:
        self.raw.close()


class PgStore(Store):
    """The store in one PostgreSQL database. Connections are per thread and per process."""

    backend = "postgresql"

    def __init__(self, url: str, timeout_s: float = 30.0, password_file: Any = None, read_only: bool = False):
        self.url = url
        self.where = redact(url)
        self.path = None
        self.password_file = password_file
        self.timeout_s = timeout_s
        self.read_only = read_only
        self._local = threading.local()
        if read_only:
            self.check_readable()
            return
        self._migrate()

    # -- connections ---------------------------------------------------------------

    def _conn(self) -> PgConnection:
        conn = getattr(self._local, "conn", None)
        now = time.monotonic()
        if conn is not None and not (conn.raw.closed or conn.raw.broken) \
                and now - getattr(self._local, "used", now) > PING_AFTER_S:
            # psycopg learns that the server restarted only when a statement fails: ask first, so
            # a restart while this thread was idle costs a reconnect, not a failed request.
            import psycopg

            try:
                conn.raw.execute("SELECT 1")
            except psycopg.Error:
                pass  # broken now: connected again just below
        self._local.used = now
        if conn is not None and (conn.raw.closed or conn.raw.broken):
            conn = None  # the server restarted or the connection dropped: connect again
        if conn is None or getattr(self._local, "pid", None) != os.getpid():
            # (psycopg never closes a connection it inherited through fork(): the parent's stays up)
            raw = connect(self.url, self.password_file, self.timeout_s, read_only=self.read_only)
            raw.row_factory = _row_factory
            conn = PgConnection(raw, self.where)
            self._local.conn = conn
            self._local.pid = os.getpid()  # a forked worker must not reuse its parent's connection
        return conn

    @contextmanager
    def transaction(self) -> Iterator[PgConnection]:
        """One transaction holding the store's write lock (writers one at a time, as in SQLite)."""
        import psycopg

        conn = self._conn()
        try:
            with conn.raw.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(?)", (WRITE_LOCK_KEY,))
                yield conn
        except psycopg.OperationalError as exc:
            raise OperationError(f"store {self.where}: {_first_line(exc)}") from None

    def _version(self, conn: PgConnection) -> int:
        row = conn.execute("SELECT to_regclass('provisioner_schema') IS NOT NULL").fetchone()
        if not row[0]:
            return 0
        row = conn.execute("SELECT max(version) FROM provisioner_schema").fetchone()
        return int(row[0] or 0)

    def _migrate(self) -> None:
        version = self._version(self._conn())
        if version == SCHEMA_VERSION:
            return
        self.refuse_newer(version)
        with self.transaction() as c:
            # Re-read under the write lock: another process may have migrated meanwhile.
            c.execute("CREATE TABLE IF NOT EXISTS provisioner_schema (version INTEGER NOT NULL)")
            version = self._version(c)
            self.refuse_newer(version)
            for i in range(version, SCHEMA_VERSION):
                c.raw.execute(MIGRATIONS[i])  # no parameters: several statements at once
                c.execute("DELETE FROM provisioner_schema")
                c.execute("INSERT INTO provisioner_schema (version) VALUES (?)", (i + 1,))

    def schema_version(self) -> int:
        return self._version(self._conn())

    # -- SQL that differs ----------------------------------------------------------

    def in_list(self, column: str) -> str:
        return f"{column} = ANY(?)"

    def list_arg(self, values: list) -> Any:
        return [str(v) for v in values]


# --------------------------------------------------------------------------- the balancer's lock


def site_lock_key(site_name: str) -> int:
    """The advisory lock key of a site's balancer (a signed 64-bit int from the site's name)."""
    digest = hashlib.sha256(f"provisioner:balance:{site_name}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class LockBusy(Exception):
    """Another session holds the advisory lock."""


@contextmanager
def balance_lock(url: str, password_file: Any, site_name: str, wait_s: float = 0.0) -> Iterator[int]:
    """pg_try_advisory_lock on the site's key, on a connection of its own held until the end of
    the block (closing it releases the lock; so does the death of this process). Tries every
    0.1 s for wait_s; raises LockBusy with the holder's pid (as PostgreSQL sees the client) when
    the lock stays taken. Yields a BalanceLease: its alive() tells whether the lock is still held."""
    key = site_lock_key(site_name)
    conn = connect(url, password_file)
    try:
        deadline = time.monotonic() + wait_s
        while True:
            if conn.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()[0]:
                break
            if time.monotonic() >= deadline:
                holder = conn.execute(
                    "SELECT a.client_addr, a.pid FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
                    "WHERE l.locktype = 'advisory' AND l.granted AND l.classid = %s::bigint::oid "
                    "AND l.objid = %s::bigint::oid AND l.objsubid = 1",
                    ((key >> 32) & 0xFFFFFFFF, key & 0xFFFFFFFF)).fetchone()
                who = f" (held by server process {holder[1]}" + (f" for {holder[0]}" if holder[0] else "") + ")" \
                    if holder else ""
                raise LockBusy(f"advisory lock {key} on {redact(url)}{who}")
            time.sleep(0.1)
        yield BalanceLease(key, conn, redact(url))
    finally:
        conn.close()


class BalanceLease:
    """The advisory lock a pass holds, on its own connection. PostgreSQL ends a session lock
    with the session: once the connection is gone (a restart, a cut, a terminated backend) the
    lock may be another host's, and a connection made again would not hold it."""

    def __init__(self, key: int, conn: Any, where: str):  # a psycopg connection (autocommit)
        self.key, self.conn, self.where = key, conn, where
        self.backend = conn.execute("SELECT pg_backend_pid()").fetchone()[0]

    def alive(self) -> bool:
        if self.conn.closed or self.conn.broken:
            return False
        try:
            row = self.conn.execute(
                "SELECT pg_backend_pid(), count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
                "AND pid = pg_backend_pid() AND classid = %s::bigint::oid AND objid = %s::bigint::oid",
                ((self.key >> 32) & 0xFFFFFFFF, self.key & 0xFFFFFFFF)).fetchone()
        except Exception:  # noqa: BLE001 - any failure to ask means the lock cannot be trusted
            return False
        return row[0] == self.backend and row[1] > 0


# --------------------------------------------------------------------------- store copy


def copy_store(source: Store, target: Store) -> dict[str, int]:
    """Copy every row of a site's state (nodes, events, asks, image pins, demand) from `source`
    into an empty `target` in one transaction, keeping event and ask ids. Returns rows per table.
    Refuses a target that holds any row."""
    counts = {t: target.count_rows(t) for t in TABLES}
    if any(counts.values()):
        held = ", ".join(f"{n} {t}" for t, n in counts.items() if n)
        raise OperationError(f"the target store {target.where} is not empty ({held}); copy only into an empty one")
    copied = {}
    rows = {t: source.table_rows(t) for t in TABLES}
    with target.transaction() as c:
        for table in TABLES:
            for row in rows[table]:
                cols = list(row)
                c.execute(f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' for _ in cols)})",
                          tuple(row[k] for k in cols))
            copied[table] = len(rows[table])
        if isinstance(target, PgStore):
            for table in SERIAL_TABLES:  # the next id follows the copied ones
                c.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                          f"(SELECT COALESCE(max(id), 0) + 1 FROM {table}), false)")
    return copied

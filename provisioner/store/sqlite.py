"""The store in SQLite (the embedded default: site.store is a file path).

Several processes use it at once (the boot server's workers, the cron-run balancer, the CLI), so:
WAL journal (readers never block the writer), a busy timeout instead of "database is locked"
errors, and every write in a `BEGIN IMMEDIATE` transaction (SQLite's one writer). The schema
(schema.py) is versioned with `PRAGMA user_version` and migrated forward on open.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from provisioner.errors import OperationError, UsageError
from provisioner.store.base import INIT_HINT, Store
from provisioner.store.schema import SCHEMA_VERSION, migrations

MIGRATIONS = migrations("sqlite")


class SqliteStore(Store):
    """One SQLite database. Connections are per thread (the WSGI server uses threads)."""

    backend = "sqlite"

    def __init__(self, path: str | os.PathLike, timeout_s: float = 30.0, password_file: Any = None,
                 read_only: bool = False):
        self.path = Path(path)
        self.where = str(self.path)  # for messages
        self.timeout_s = timeout_s
        self.read_only = read_only
        self._local = threading.local()
        if read_only:
            if not self.path.is_file():
                raise UsageError(f"no store at {self.where} yet (site.store): {INIT_HINT}")
            self.check_readable()
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OperationError(
                f"cannot create the store folder {self.path.parent}: {exc.strerror}; check site.store"
            ) from None
        self._migrate()

    # -- connections ---------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None or getattr(self._local, "pid", None) != os.getpid():
            try:
                if self.read_only:
                    # Not mode=ro: a read-only reader of a WAL database leaves its -wal and -shm
                    # files behind. query_only refuses writes; the WAL files a reader needs go
                    # again when it closes, so a listing leaves the folder as it found it.
                    conn = sqlite3.connect(self.path, timeout=self.timeout_s, isolation_level=None)
                    conn.execute("PRAGMA query_only=ON")
                    conn.row_factory = sqlite3.Row
                    self._local.conn, self._local.pid = conn, os.getpid()
                    return conn
                conn = sqlite3.connect(self.path, timeout=self.timeout_s, isolation_level=None)
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
                conn.execute("PRAGMA foreign_keys=ON")
            except sqlite3.Error as exc:
                raise OperationError(f"cannot open the store {self.where}: {exc}; check site.store") from None
            conn.row_factory = sqlite3.Row
            self._local.conn = conn
            self._local.pid = os.getpid()  # a forked worker must not reuse its parent's handle
        return conn

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE: takes the write lock up front, so read-modify-write cannot race."""
        conn = self._conn()
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            raise OperationError(f"store {self.where} is busy ({exc}); try again") from None
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException as exc:
            if conn.in_transaction:  # a failed COMMIT may have rolled back already
                conn.execute("ROLLBACK")
            if isinstance(exc, sqlite3.OperationalError) and \
                    getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
                raise OperationError(f"store {self.where}: its disk is full, nothing was written; "
                                     f"free space on that filesystem and run the command again") from None
            raise

    def _migrate(self) -> None:
        conn = self._conn()
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version == SCHEMA_VERSION:
            return
        self.refuse_newer(version)
        with self.transaction() as c:
            # Re-read under the write lock: another process may have migrated meanwhile.
            version = c.execute("PRAGMA user_version").fetchone()[0]
            self.refuse_newer(version)
            for i in range(version, SCHEMA_VERSION):
                for statement in split_sql(MIGRATIONS[i]):
                    c.execute(statement)
                c.execute(f"PRAGMA user_version = {i + 1}")

    def schema_version(self) -> int:
        return self._conn().execute("PRAGMA user_version").fetchone()[0]

    # -- SQL that differs ----------------------------------------------------------

    def in_list(self, column: str) -> str:
        return f"{column} IN (SELECT value FROM json_each(?))"

    def list_arg(self, values: list) -> Any:
        return json.dumps(values)


def split_sql(script: str) -> list[str]:
    """Split a migration into statements (executescript would COMMIT our transaction)."""
    out, buf = [], ""
    for line in script.strip().splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):  # knows that a trigger's BEGIN ... END; is one statement
            out.append(buf.strip())
            buf = ""
    if buf.strip():
        out.append(buf.strip())
    return out

"""The store's interface and the SQL both backends run: per-node roles and transition phases,
an append-only event log, asks, boots, image pins, holds and demand.

`Store(target)` opens the backend the target names: a path, SQLite (sqlite.py: the embedded
default); a postgresql:// URL, PostgreSQL (postgres.py). Both keep the same schema (schema.py),
the same compare-and-set and the same append-only event log: every write runs in a transaction
that holds the store's one write lock and also appends its event, so a change and its audit
record land together or not at all. The SQL here is written so that both run it; a backend gives
the connection, the transaction, the migration and the few statements that differ (in_list).
`open_store(site)` opens the site's store.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from provisioner.errors import OperationError, UsageError
from provisioner.states import BOOTING, REBOOTING, ROLES
from provisioner.store.schema import SCHEMA_VERSION


_NODE_COLUMNS = (
    "name", "desired_role", "booted_role", "booted_version", "booted_at", "pinned", "pin_reason",
    "phase", "target_role", "phase_since", "attempts", "failed_reason", "last_switch_at", "updated_at",
    "switch_reason", "switch_actor", "k8s_boot_id", "power_at",
    "reclaim_deadline", "reclaim_work", "evict_refused_at", "evict_refused",
)


@dataclass(frozen=True)
class NodeState:
    name: str
    desired_role: str
    booted_role: str | None
    booted_version: str | None
    booted_at: float | None
    pinned: bool
    pin_reason: str | None
    phase: str
    target_role: str | None
    phase_since: float | None
    attempts: int
    failed_reason: str | None
    last_switch_at: float | None
    updated_at: float
    switch_reason: str | None = None
    switch_actor: str | None = None
    k8s_boot_id: str | None = None  # status.nodeInfo.bootID before the last reboot (None: no Node then)
    power_at: float | None = None  # when the last switch power action was about to be sent
    # A reclaim (policy.Move.reclaim): its work is moved at reclaim_deadline (the end of its
    # grace), by reclaim_work (evict | requeue). None: an idle move.
    reclaim_deadline: float | None = None
    reclaim_work: str | None = None
    # The last reclaim eviction a PodDisruptionBudget refused: when, and the budget's message.
    evict_refused_at: float | None = None
    evict_refused: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in _NODE_COLUMNS}


@dataclass(frozen=True)
class Ask:
    """A scheduler's request for one node (see asks.py for the kinds)."""

    id: int
    node: str
    kind: str
    source: str
    reason: str
    created_at: float
    closed_at: float | None = None
    outcome: str | None = None
    message: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "node": self.node, "kind": self.kind, "source": self.source, "reason": self.reason,
                "created": iso(self.created_at), "closed": iso(self.closed_at), "outcome": self.outcome,
                "message": self.message}


HELD = "held for maintenance"  # how a hold is said everywhere (drain reasons, asks' answers, events)


@dataclass(frozen=True)
class Hold:
    """An admin's maintenance hold on a node: provisioner leaves it alone until `unhold`."""

    node: str
    reason: str
    actor: str
    since: float

    def describe(self) -> str:
        return f"{HELD} by {self.actor} since {iso(self.since)}: {self.reason}"

    def as_dict(self) -> dict[str, Any]:
        return {"reason": self.reason, "actor": self.actor, "since": iso(self.since)}


@dataclass(frozen=True)
class Event:
    id: int
    ts: float
    node: str | None
    actor: str
    kind: str
    message: str
    data: dict | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "time": iso(self.ts), "ts": self.ts, "node": self.node,
            "actor": self.actor, "kind": self.kind, "message": self.message, "data": self.data,
        }


def iso(ts: float | None) -> str | None:
    """Epoch seconds -> UTC with its offset (2026-12-03T11:00:00.123+00:00): one reading on every
    host, whatever its time zone."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds")


def default_actor() -> str:
    import pwd

    user = os.environ.get("SUDO_USER") or os.environ.get("USER")
    if not user:
        try:
            user = pwd.getpwuid(os.getuid()).pw_name
        except KeyError:
            user = str(os.getuid())
    return f"admin:{user}"


def is_url(target: Any) -> bool:
    """A PostgreSQL store URL (postgresql:// or postgres://), rather than an SQLite file path."""
    return isinstance(target, str) and target.split("://", 1)[0] in ("postgresql", "postgres") and "://" in target


INIT_HINT = "`provisioner init` creates it (so do `serve`, `balance` and `run`)"


def open_store(site: Any, timeout_s: float = 30.0, read_only: bool = False) -> "Store":
    """The site's store: site.store_url (PostgreSQL) when the config gives one, else the SQLite
    file site.store. read_only (the listings): the store is opened read-only and must exist at
    the current schema; nothing is created or migrated (Store.check_readable)."""
    url = getattr(site, "store_url", None)
    if url:
        return Store(url, timeout_s=timeout_s, password_file=getattr(site, "store_password_file", None),
                     read_only=read_only)
    return Store(site.store, timeout_s=timeout_s, read_only=read_only)


class Store:
    """The store interface. Store(target) returns the backend's store (sqlite.SqliteStore for a
    path, postgres.PgStore for a postgresql:// URL); both have these methods."""

    backend = ""
    # The backends by name, registered by the package (provisioner/store/__init__.py), so that
    # this module imports neither of them.
    BACKENDS: dict[str, type[Store]] = {}

    def __new__(cls, target: Any = None, *args: Any, **kwargs: Any):
        if cls is Store:
            cls = Store.BACKENDS["postgresql" if is_url(target) else "sqlite"]
        return super().__new__(cls)

    # What a backend gives: its connection per thread (self._local.conn: execute() with `?`
    # parameters, rows read by index and by column name, close()), its write transaction, its
    # schema version and the SQL that differs.
    where: str
    read_only: bool

    def _conn(self) -> Any:
        raise NotImplementedError

    def transaction(self) -> Any:
        raise NotImplementedError

    def schema_version(self) -> int:
        raise NotImplementedError

    def close(self) -> None:
        """Close this thread's connection (the next call opens another)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def in_list(self, column: str) -> str:
        """SQL: `column` is one of the values of one parameter (list_arg)."""
        raise NotImplementedError

    def list_arg(self, values: list) -> Any:
        raise NotImplementedError

    def refuse_newer(self, version: int) -> None:
        if version > SCHEMA_VERSION:
            raise OperationError(f"store {self.where} has schema version {version}, newer than this provisioner "
                                 f"({SCHEMA_VERSION}); upgrade provisioner")

    def check_readable(self) -> None:
        """For a listing (read_only), on both backends: the store must be at this provisioner's
        schema. A listing never creates nor migrates it: it says which command does."""
        version = self.schema_version()
        if version == 0:
            raise UsageError(f"no store at {self.where} yet (site.store): {INIT_HINT}")
        self.refuse_newer(version)
        if version != SCHEMA_VERSION:
            raise UsageError(f"store {self.where} has schema version {version}, this provisioner reads "
                             f"{SCHEMA_VERSION}: `provisioner init` migrates it")

    # -- nodes ---------------------------------------------------------------------

    def seed(self, nodes: Iterable[tuple[str, str]], actor: str = "config") -> list[str]:
        """Insert (name, default_role) for nodes the store does not know yet. Returns the new names."""
        nodes = list(nodes)
        conn = self._conn()
        known = {r[0] for r in conn.execute("SELECT name FROM nodes")}
        missing = [(n, r) for n, r in nodes if n not in known]
        if not missing:
            return []
        now = time.time()
        added = []
        with self.transaction() as c:
            for name, role in missing:
                cur = c.execute(
                    "INSERT INTO nodes (name, desired_role, updated_at) VALUES (?, ?, ?) ON CONFLICT (name) DO NOTHING",
                    (name, role, now),
                )
                if cur.rowcount:
                    added.append(name)
            if added:
                from provisioner.nodeset import fold

                self._event(c, now, None, actor, "seed", f"added {fold(added)} from the site config",
                            {"nodes": added})
        return added

    def get(self, name: str) -> NodeState | None:
        row = self._conn().execute("SELECT * FROM nodes WHERE name = ?", (name,)).fetchone()
        return _node(row) if row else None

    def desired_role(self, name: str) -> str | None:
        """The boot endpoint's hot path: one indexed read."""
        row = self._conn().execute("SELECT desired_role FROM nodes WHERE name = ?", (name,)).fetchone()
        return row[0] if row else None

    def nodes(self, names: Iterable[str] | None = None) -> dict[str, NodeState]:
        rows = self._conn().execute("SELECT * FROM nodes").fetchall()
        states = {r["name"]: _node(r) for r in rows}
        if names is None:
            return states
        return {n: states[n] for n in names if n in states}

    def set_role(self, names: list[str], role: str, *, actor: str, reason: str, pin: bool) -> list[str]:
        """Set the desired role (and pin) of nodes in one transaction. Returns the nodes changed."""
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}")
        now = time.time()
        changed = []
        with self.transaction() as c:
            for name in names:
                row = c.execute("SELECT desired_role, pinned FROM nodes WHERE name = ?", (name,)).fetchone()
                if row is None:
                    raise OperationError(f"node {name} is not in the store; run `provisioner check`")
                old_role, old_pinned = row["desired_role"], bool(row["pinned"])
                new_pinned = pin or old_pinned
                if old_role == role and old_pinned == new_pinned:
                    continue
                c.execute(
                    "UPDATE nodes SET desired_role = ?, pinned = ?, pin_reason = CASE WHEN ? = 1 THEN ? ELSE pin_reason END,"
                    " updated_at = ? WHERE name = ?",
                    (role, int(new_pinned), int(pin), reason, now, name),
                )
                what = f"desired role {old_role} -> {role}" if old_role != role else f"role {role}"
                if pin:
                    what += " (pinned)"
                self._event(c, now, name, actor, "role", f"{what}: {reason}",
                            {"old": old_role, "new": role, "pinned": new_pinned, "reason": reason})
                changed.append(name)
        return changed

    def release(self, names: list[str], *, actor: str, reason: str) -> list[str]:
        now = time.time()
        changed = []
        with self.transaction() as c:
            for name in names:
                cur = c.execute(
                    "UPDATE nodes SET pinned = 0, pin_reason = NULL, updated_at = ? WHERE name = ? AND pinned = 1",
                    (now, name),
                )
                if cur.rowcount:
                    self._event(c, now, name, actor, "release", f"unpinned: {reason}", {"reason": reason})
                    changed.append(name)
        return changed

    def record_booted(self, name: str, role: str, version: str | None, *, actor: str, source: str | None,
                      spend: str | None = None) -> bool:
        """The boot callback. spend: the nonce of the boot token it presented, spent in the same
        transaction (False, nothing recorded: it was spent already or is not the current one)."""
        now = time.time()
        with self.transaction() as c:
            row = c.execute("SELECT desired_role, booted_role FROM nodes WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise OperationError(f"node {name} is not in the store")
            if spend is not None and c.execute(
                    "UPDATE boots SET spent_at = ? WHERE node = ? AND nonce = ? AND spent_at IS NULL",
                    (now, name, spend)).rowcount != 1:
                return False
            c.execute(
                "UPDATE nodes SET booted_role = ?, booted_version = ?, booted_at = ?, updated_at = ? WHERE name = ?",
                (role, version, _since_power(c, name, now), now, name),
            )
            note = "" if role == row["desired_role"] else f" (desired role is {row['desired_role']})"
            self._event(c, now, name, actor, "booted", f"booted {role} image version {version or '?'}{note}",
                        {"role": role, "version": version, "source": source})
        return True

    def update(self, name: str, *, actor: str, kind: str, message: str,
               expect: dict[str, Any] | None = None, data: dict | None = None, **fields: Any) -> bool:
        """Compare-and-set on one node: apply `fields` only if the row still matches `expect`.

        Returns False (and changes nothing) when another process moved the node meanwhile. This is
        what keeps the reconciler's state machine consistent under concurrent passes.
        """
        bad = set(fields) - set(_NODE_COLUMNS) - {"name"} | (set(expect or {}) - set(_NODE_COLUMNS))
        if bad:
            raise ValueError(f"unknown node column(s): {sorted(bad)}")
        now = time.time()
        fields = {**fields, "updated_at": now}
        with self.transaction() as c:
            row = c.execute("SELECT * FROM nodes WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise OperationError(f"node {name} is not in the store")
            for k, v in (expect or {}).items():
                if row[k] != v:
                    return False
            sets = ", ".join(f"{k} = ?" for k in fields)
            c.execute(f"UPDATE nodes SET {sets} WHERE name = ?", (*fields.values(), name))
            self._event(c, now, name, actor, kind, message, data)
        return True

    # -- boots (provisioner/boot/boots.py decides; these only read and compare-and-set) --------

    def boot_row(self, name: str) -> dict[str, Any] | None:
        row = self._conn().execute("SELECT * FROM boots WHERE node = ?", (name,)).fetchone()
        return {k: row[k] for k in row.keys()} if row is not None else None

    def boot_rows(self) -> dict[str, dict[str, Any]]:
        rows = self._conn().execute("SELECT * FROM boots").fetchall()
        return {r["node"]: {k: r[k] for k in r.keys()} for r in rows}

    def issue_boot(self, name: str, nonce: str, now: float, expect: str | None) -> bool:
        """A new boot token (its nonce) for `name`, if its current one is still `expect`."""
        with self.transaction() as c:
            c.execute("INSERT INTO boots (node) VALUES (?) ON CONFLICT (node) DO NOTHING", (name,))
            where = "nonce IS NULL" if expect is None else "nonce = ?"
            # A token written after an admin's grant is of the boot it granted: no earlier than the
            # grant, whose time is the admin's host's (the store's order, as for a power action).
            grant = c.execute("SELECT granted_at FROM boots WHERE node = ?", (name,)).fetchone()
            issued = max(_since_power(c, name, now), (grant["granted_at"] if grant else None) or 0)
            cur = c.execute(f"UPDATE boots SET nonce = ?, issued_at = ?, spent_at = NULL WHERE node = ? AND {where}",
                            (nonce, issued, name) + (() if expect is None else (expect,)))
            return cur.rowcount == 1

    def serve_boot_secrets(self, name: str, nonce: str, window: float, now: float) -> bool:
        """Once per boot window: False when they were served in this window already."""
        with self.transaction() as c:
            cur = c.execute("UPDATE boots SET secrets_at = ?, secrets_window = ? WHERE node = ? AND nonce = ? "
                            "AND spent_at IS NULL AND (secrets_window IS NULL OR secrets_window <> ?)",
                            (now, window, name, nonce, window))
            return cur.rowcount == 1

    def grant_boot(self, names: list[str], *, actor: str, reason: str, now: float | None = None) -> None:
        """A boot we asked for outside a switch (an admin's, or slurmctld's resume of a node that
        stays in SLURM): opens the nodes' boot windows (provisioner/boot/boots.py)."""
        now = time.time() if now is None else now
        with self.transaction() as c:
            for name in names:
                c.execute("INSERT INTO boots (node) VALUES (?) ON CONFLICT (node) DO NOTHING", (name,))
                c.execute("UPDATE boots SET granted_at = ?, granted_by = ? WHERE node = ?", (now, actor, name))
                self._event(c, now, name, actor, "boot-granted", f"boot window opened: {reason}", {"reason": reason})

    def end_boot_grant(self, name: str, granted_at: float) -> None:
        """Close the window a grant opened (its power action failed: no boot is coming)."""
        with self.transaction() as c:
            c.execute("UPDATE boots SET granted_at = NULL, granted_by = NULL WHERE node = ? AND granted_at = ?",
                      (name, granted_at))

    # -- image version pins ----------------------------------------------------------

    def image_pin(self, node: str, image: str) -> str | None:
        """The boot endpoint's hot path when a role uses a built image: one primary-key read."""
        row = self._conn().execute(
            "SELECT version FROM image_pins WHERE node = ? AND image = ?", (node, image)).fetchone()
        return row[0] if row else None

    def image_pins(self, image: str | None = None) -> list[dict[str, Any]]:
        sql, args = "SELECT * FROM image_pins", ()
        if image is not None:
            sql, args = sql + " WHERE image = ?", (image,)
        return [dict(r) for r in self._conn().execute(sql + " ORDER BY image, node", args)]

    def pin_image(self, nodes: list[str], image: str, version: str, *, actor: str, reason: str) -> list[str]:
        """Pin nodes to one version of an image (in one transaction). Returns the nodes changed."""
        now = time.time()
        changed = []
        with self.transaction() as c:
            for name in nodes:
                row = c.execute("SELECT version FROM image_pins WHERE node = ? AND image = ?",
                                (name, image)).fetchone()
                if row is not None and row[0] == version:
                    continue
                c.execute(
                    "INSERT INTO image_pins (node, image, version, reason, actor, since) VALUES (?, ?, ?, ?, ?, ?)"
                    " ON CONFLICT (node, image) DO UPDATE SET version = excluded.version,"
                    " reason = excluded.reason, actor = excluded.actor, since = excluded.since",
                    (name, image, version, reason, actor, now),
                )
                old = row[0] if row else None
                self._event(c, now, name, actor, "image-pin",
                            f"image {image} pinned to version {version}"
                            + (f" (was {old})" if old else "") + f": {reason}",
                            {"image": image, "version": version, "old": old, "reason": reason})
                changed.append(name)
        return changed

    def unpin_image(self, nodes: list[str], image: str | None = None, *, actor: str, reason: str) -> list[str]:
        """Drop nodes' version pins (of one image, or all). Returns the nodes changed."""
        now = time.time()
        changed = []
        with self.transaction() as c:
            for name in nodes:
                sql, args = "SELECT image, version FROM image_pins WHERE node = ?", [name]
                if image is not None:
                    sql, args = sql + " AND image = ?", [name, image]
                rows = c.execute(sql, args).fetchall()
                for r in rows:
                    c.execute("DELETE FROM image_pins WHERE node = ? AND image = ?", (name, r["image"]))
                    self._event(c, now, name, actor, "image-unpin",
                                f"image {r['image']} unpinned from version {r['version']}: {reason}",
                                {"image": r["image"], "version": r["version"], "reason": reason})
                if rows:
                    changed.append(name)
        return changed

    # -- maintenance holds ------------------------------------------------------------

    def holds(self, names: Iterable[str] | None = None) -> dict[str, Hold]:
        rows = self._conn().execute("SELECT * FROM holds ORDER BY node").fetchall()
        holds = {r["node"]: Hold(r["node"], r["reason"], r["actor"], r["since"]) for r in rows}
        if names is None:
            return holds
        return {n: holds[n] for n in names if n in holds}

    def hold(self, names: list[str], *, actor: str, reason: str) -> list[str]:
        """Hold nodes for maintenance (a held node's reason is replaced). Returns the nodes changed."""
        now = time.time()
        changed = []
        with self.transaction() as c:
            for name in names:
                row = c.execute("SELECT reason FROM holds WHERE node = ?", (name,)).fetchone()
                if row is not None and row["reason"] == reason:
                    continue
                c.execute("INSERT INTO holds (node, reason, actor, since) VALUES (?, ?, ?, ?) ON CONFLICT (node)"
                          " DO UPDATE SET reason = excluded.reason, actor = excluded.actor, since = excluded.since",
                          (name, reason, actor, now))
                self._event(c, now, name, actor, "hold", f"{HELD}: {reason}",
                            {"reason": reason, "old": row["reason"] if row else None})
                changed.append(name)
        return changed

    def unhold(self, names: list[str], *, actor: str, reason: str) -> list[str]:
        """End nodes' holds. Returns the nodes changed."""
        now = time.time()
        changed = []
        with self.transaction() as c:
            for name in names:
                row = c.execute("SELECT reason FROM holds WHERE node = ?", (name,)).fetchone()
                if row is None:
                    continue
                c.execute("DELETE FROM holds WHERE node = ?", (name,))
                self._event(c, now, name, actor, "unhold", f"hold ended ({row['reason']}): {reason}",
                            {"reason": reason, "hold": row["reason"]})
                changed.append(name)
        return changed

    # -- demand persistence ----------------------------------------------------------

    def demand_since(self) -> dict[str, float]:
        return {r["side"]: r["since"] for r in self._conn().execute("SELECT side, since FROM demand")}

    def set_demand(self, amounts: dict[str, int], now: float) -> dict[str, float | None]:
        """Record which sides have demand now. A side keeps its first-seen time while its demand
        lasts, and loses it as soon as one pass sees none (demand that blinks starts over).
        Returns the first-seen time of each side BEFORE this pass (None: new or no demand)."""
        with self.transaction() as c:
            before = {r["side"]: r["since"] for r in c.execute("SELECT side, since FROM demand")}
            for side, amount in amounts.items():
                if amount > 0 and side not in before:
                    c.execute("INSERT INTO demand (side, since, amount) VALUES (?, ?, ?)", (side, now, amount))
                elif amount > 0:
                    c.execute("UPDATE demand SET amount = ? WHERE side = ?", (amount, side))
                else:
                    c.execute("DELETE FROM demand WHERE side = ?", (side,))
        return {side: before.get(side) if amounts.get(side, 0) > 0 else None for side in amounts}

    # -- asks ----------------------------------------------------------------------

    def add_asks(self, nodes: Iterable[str], kind: str, *, source: str, reason: str, actor: str) -> list[int]:
        """Record one open ask per node (and an event each, for `history`). Fast: one transaction."""
        now, ids = time.time(), []
        with self.transaction() as c:
            for node in nodes:
                ask_id = c.execute("INSERT INTO asks (node, kind, source, reason, created_at) VALUES (?, ?, ?, ?, ?)"
                                   " RETURNING id", (node, kind, source, reason, now)).fetchone()[0]
                ids.append(ask_id)
                self._event(c, now, node, actor, "ask", f"{source} asks: {kind}: {reason}",
                            {"ask": ask_id, "kind": kind, "source": source})
        return ids

    def open_asks(self) -> list[Ask]:
        rows = self._conn().execute("SELECT * FROM asks WHERE closed_at IS NULL ORDER BY id").fetchall()
        return [Ask(**dict(r)) for r in rows]

    def last_ask_id(self) -> int:
        """The newest ask's id (0: none yet): a waiting pass loop compares it to wake up early."""
        row = self._conn().execute("SELECT max(id) FROM asks").fetchone()
        return int(row[0] or 0)

    def asks(self, limit: int = 100) -> list[Ask]:
        rows = self._conn().execute("SELECT * FROM asks ORDER BY id DESC LIMIT ?", (int(limit),)).fetchall()
        return [Ask(**dict(r)) for r in reversed(rows)]

    def close_ask(self, ask: Ask, outcome: str, message: str, *, actor: str) -> bool:
        """Answer an ask once (granted / refused / done / ...); its answer goes to the history."""
        now = time.time()
        with self.transaction() as c:
            cur = c.execute("UPDATE asks SET closed_at = ?, outcome = ?, message = ? WHERE id = ? AND closed_at IS NULL",
                            (now, outcome, message, ask.id))
            if cur.rowcount:
                self._event(c, now, ask.node, actor, "ask-" + outcome,
                            f"{ask.source} asked {ask.kind}: {outcome}: {message}",
                            {"ask": ask.id, "kind": ask.kind, "source": ask.source, "outcome": outcome})
        return bool(cur.rowcount)

    # -- whole tables (store copy) -------------------------------------------------

    COPY_TABLES = ("nodes", "events", "asks", "image_pins", "demand", "holds")

    def count_rows(self, table: str) -> int:
        if table not in self.COPY_TABLES:
            raise ValueError(f"unknown table {table!r}")
        return int(self._conn().execute(f"SELECT count(*) FROM {table}").fetchone()[0])

    def table_rows(self, table: str) -> list[dict[str, Any]]:
        """Every row of one of the state tables, as dicts, in key order."""
        if table not in self.COPY_TABLES:
            raise ValueError(f"unknown table {table!r}")
        order = {"nodes": "name", "events": "id", "asks": "id", "image_pins": "node, image", "demand": "side",
                 "holds": "node"}[table]
        return [dict(r) for r in self._conn().execute(f"SELECT * FROM {table} ORDER BY {order}")]

    # -- events --------------------------------------------------------------------

    def add_event(self, node: str | None, actor: str, kind: str, message: str, data: dict | None = None) -> None:
        with self.transaction() as c:
            self._event(c, time.time(), node, actor, kind, message, data)

    def _event(self, c, ts, node, actor, kind, message, data) -> None:
        c.execute(
            "INSERT INTO events (ts, node, actor, kind, message, data) VALUES (?, ?, ?, ?, ?, ?)",
            (ts, node, actor, kind, message, json.dumps(data, sort_keys=True) if data is not None else None),
        )

    def events(self, nodes: Iterable[str] | None = None, limit: int | None = None,
               kinds: Iterable[str] | None = None, include_site: bool = True) -> list[Event]:
        """Events oldest first; the last `limit` of them when limit is given."""
        where, args = [], []
        if nodes is not None:
            where.append(f"({self.in_list('node')}" + (" OR node IS NULL)" if include_site else ")"))
            args.append(self.list_arg(list(nodes)))
        if kinds is not None:
            where.append(self.in_list("kind"))
            args.append(self.list_arg(list(kinds)))
        sql = "SELECT * FROM events"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY id DESC"
        if limit:
            sql += f" LIMIT {int(limit)}"
        rows = self._conn().execute(sql, args).fetchall()
        return [
            Event(r["id"], r["ts"], r["node"], r["actor"], r["kind"], r["message"],
                  json.loads(r["data"]) if r["data"] else None)
            for r in reversed(rows)
        ]


def _node(row: Any) -> NodeState:
    d = dict(row)
    d["pinned"] = bool(d["pinned"])
    return NodeState(**d)


def _since_power(c: Any, name: str, now: float) -> float:
    """The time to stamp on a boot's record (its token, its callback) written in transaction c.

    `now` is this host's clock (the boot server's), a switch's power_at the balancer's. Which came
    first is decided by the store's order, not by the two clocks: written once the power intent
    is (rebooting with power_at, or booting), the record is of the boot that power action started,
    so it is stamped no earlier than it, however far behind this host's clock is."""
    row = c.execute("SELECT phase, phase_since, power_at FROM nodes WHERE name = ?", (name,)).fetchone()
    if row is None or row["power_at"] is None:
        return now
    if row["phase"] == BOOTING or (row["phase"] == REBOOTING and row["power_at"] >= (row["phase_since"] or 0)):
        return max(now, row["power_at"])
    return now

"""The state store: one interface (Store, open_store and the records they return), two backends
beside each other: SQLite (sqlite.py, the embedded default) and PostgreSQL (postgres.py), one
schema (schema.py) rendered for both. Store(path) opens SQLite, Store("postgresql://...") opens
PostgreSQL; base.py holds the SQL both run.
"""

from provisioner.store.base import (
    HELD, INIT_HINT, Ask, Event, Hold, NodeState, Store, default_actor, is_url, iso, open_store,
)
from provisioner.store.postgres import PgStore
from provisioner.store.schema import SCHEMA_VERSION
from provisioner.store.sqlite import SqliteStore

Store.BACKENDS.update(sqlite=SqliteStore, postgresql=PgStore)

__all__ = [
    "HELD", "INIT_HINT", "SCHEMA_VERSION", "Ask", "Event", "Hold", "NodeState", "PgStore", "SqliteStore", "Store",
    "default_actor", "is_url", "iso", "open_store",
]

"""Hostlist expressions (node[01-16,20]) through python-hostlist, with our error type."""

from __future__ import annotations

from collections.abc import Iterable

import hostlist

from provisioner.errors import UsageError


class NodeSetError(UsageError):
    pass


def expand(expr: str) -> list[str]:
    """node[01-03] -> [node01, node02, node03]. Raises NodeSetError on bad syntax or empty sets."""
    if not isinstance(expr, str) or not expr.strip():
        raise NodeSetError("empty node set")
    try:
        names = hostlist.expand_hostlist(expr.strip())
    except hostlist.BadHostlist as exc:
        raise NodeSetError(f"bad hostlist expression {expr!r}: {exc}") from None
    if not names:
        raise NodeSetError(f"hostlist expression {expr!r} names no node")
    return names


def fold(names: Iterable[str]) -> str:
    """[node01, node02, node05] -> node[01-02,05]."""
    names = list(names)
    return hostlist.collect_hostlist(names) if names else ""


def select(expr: str | None, known: Iterable[str]) -> list[str]:
    """Expand `expr` and check every name is known; None selects all of `known` in order."""
    known = list(known)
    if expr is None:
        return known
    names = expand(expr)
    known_set = set(known)
    unknown = [n for n in names if n not in known_set]
    if unknown:
        raise NodeSetError(
            f"unknown node(s) {fold(unknown)}: not in the site config (see `provisioner nodes`)"
        )
    return names

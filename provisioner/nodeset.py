"""Hostlist expressions (node[01-16,20]) through python-hostlist, with our error type."""

from __future__ import annotations

from collections.abc import Iterable

import hostlist

from provisioner.errors import UsageError


class NodeSetError(UsageError):
    pass


# The right form, shown with every error about one.
EXAMPLE = "'sn[01-04,07]', 'sn01,cn02' or '@shared' (every node of a pool)"


def expand(expr: str) -> list[str]:
    """node[01-03] -> [node01, node02, node03]. Raises NodeSetError on bad syntax or empty sets."""
    if not isinstance(expr, str) or not expr.strip():
        raise NodeSetError("empty node set")
    try:
        names = hostlist.expand_hostlist(expr.strip())
    except hostlist.BadHostlist as exc:
        raise NodeSetError(f"bad hostlist expression {expr!r}: {exc}; write it like {EXAMPLE}") from None
    if not names:
        raise NodeSetError(f"hostlist expression {expr!r} names no node")
    return names


def fold(names: Iterable[str]) -> str:
    """[node01, node02, node05] -> node[01-02,05]."""
    names = list(names)
    return hostlist.collect_hostlist(names) if names else ""


def split(expr: str) -> list[str]:
    """Top-level comma-separated parts: 'sn[01-02],@k8s' -> ['sn[01-02]', '@k8s']."""
    parts, depth, cur = [], 0, ""
    for ch in expr:
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return [*parts, cur]


def select(expr: str | None, known: Iterable[str], groups: dict[str, list[str]] | None = None) -> list[str]:
    """Expand `expr` and check every name is known; None selects all of `known` in order.
    `@NAME` parts name a group (a pool: @shared, @slurm, @k8s) from `groups`."""
    known = list(known)
    if expr is None:
        return known
    names = []
    for part in split(expr.strip()) if isinstance(expr, str) and "@" in expr else [expr]:
        if part.startswith("@"):
            if part[1:] not in (groups or {}):
                raise NodeSetError(f"unknown group {part} (known: {', '.join('@' + g for g in groups or {})}); "
                                   f"write node sets like {EXAMPLE}")
            names += groups[part[1:]]
        else:
            names += expand(part)
    names = list(dict.fromkeys(names))
    known_set = set(known)
    unknown = [n for n in names if n not in known_set]
    if unknown:
        raise NodeSetError(
            f"unknown node(s) {fold(unknown)}: not in the site config (see `provisioner nodes`)"
        )
    return names

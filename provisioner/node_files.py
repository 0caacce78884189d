"""Per-node secret files in the state folder: `KIND/NODE/FILE` beside site.store (the folder the
boot server, which renders overlays, and the CLI both write), folders 0700, files 0600 unless
told. Used for the SSH host keys (provisioner.hostkeys) and the kubelet's client credentials
(provisioner.kubelet_certs). Back the folder up with the store.

Safe with several processes at once (boot server workers, the CLI): a file made once
(make_once) is written under a temporary name and linked into place, so whoever links second
reads the first one's; a file replaced (replace) is renamed into place whole.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from provisioner.model import Site


def folder(site: Site, kind: str) -> Path:
    return site.store.parent / kind


def path(site: Site, kind: str, node: str, name: str) -> Path:
    return folder(site, kind) / node / name


def _node_folder(site: Site, kind: str, node: str) -> Path:
    base = folder(site, kind)
    d = base / node
    for p in (base, d):
        p.mkdir(mode=0o700, parents=True, exist_ok=True)
    return d


def _write_tmp(d: Path, name: str, data: bytes, mode: int) -> Path:
    tmp = d / f".{name}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    return tmp


def make_once(site: Site, kind: str, node: str, name: str, make: Callable[[], bytes]) -> tuple[bytes, bool]:
    """The file's content, made with make() (0600) the first time. Also whether this call made
    it (the caller may then write what derives from it). Raises OSError."""
    p = path(site, kind, node, name)
    if p.exists():
        return p.read_bytes(), False
    d = _node_folder(site, kind, node)
    tmp = _write_tmp(d, name, make(), 0o600)
    try:
        os.link(tmp, p)  # never replaces a file another process made meanwhile
        made = True
    except FileExistsError:
        made = False
    finally:
        tmp.unlink(missing_ok=True)
    return p.read_bytes(), made


def replace(site: Site, kind: str, node: str, name: str, data: bytes, mode: int = 0o600) -> Path:
    """Write the file whole (readers see the old or the new content, never a part). Raises OSError."""
    d = _node_folder(site, kind, node)
    p = d / name
    _write_tmp(d, name, data, mode).replace(p)
    return p


def read(site: Site, kind: str, node: str, name: str) -> bytes | None:
    """The file's content, or None when there is none. Raises OSError on other errors."""
    try:
        return path(site, kind, node, name).read_bytes()
    except FileNotFoundError:
        return None

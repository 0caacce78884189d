"""A node's overlay: the small extra initrd (newc cpio, gzip) with the files that make a shared
image this node's: hostname, the role's config and secrets (slurm.conf + munge key, or the
kubelet bootstrap kubeconfig). Rendered per request from the templates of the image version the
node boots (copied into the version folder at build) and the files the site config names
(overlay.files / overlay.values), in memory: secrets are never written to disk or logged.

The kernel unpacks it under /provisioner/overlay; the image's /init copies the files into place.
Two parts (provisioner/boot/boots.py, docs/security.md):
- the public part, what any user of the booted node may read anyway (files readable by all on
  the node: hostname, slurm.conf, ...): the initrd iPXE loads, with a per-node token (an HMAC
  with its own purpose) in its URL, checked with its MAC and source address;
- the secret part (every file not readable by all on the node: the munge key, host keys,
  kubelet credentials; or an entry with `secret: true`): fetched by the image's /init, as root,
  once per boot, with the boot's token, only in a boot window (BootService.secrets).

Entries: `template` (rendered), `copy` (a site file, byte for byte) or `host_key` (private /
public: the node's own SSH host key, provisioner.hostkeys, made the first time it is needed).
A template entry with `kubelet_client: true` is rendered with the node's kubelet client
credentials (provisioner.kubelet_certs) and only when provisioner holds a valid certificate for
the node; otherwise the file is left out (the k8s image's kubelet then bootstraps).
"""

from __future__ import annotations

import base64
import os
import time
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import quote

import jinja2

from provisioner import hostkeys, kubelet_certs
from provisioner.errors import OperationError
from provisioner.images.cpio import gzip_archive
from provisioner.images.versions import Published
from provisioner.model import Node, Site
from provisioner.tokens import check_token, node_token

PURPOSE = "overlay"
PREFIX = "provisioner/overlay"


def token(secret: bytes, node: str) -> str:
    return node_token(secret, node, PURPOSE)


def check(secret: bytes, node: str, presented: str | None) -> bool:
    return check_token(secret, node, presented, PURPOSE)


def is_secret(entry: Mapping) -> bool:
    """A file the node's users may not read (not readable by others on the node) is secret; so
    is always the kubelet's client key."""
    if entry.get("kubelet_client"):
        return True
    if entry.get("secret") is not None:
        return bool(entry["secret"])
    return not int(str(entry.get("mode") or "0644"), 8) & 0o004


def has_secrets(pub: Published | None) -> bool:
    return bool(pub and any(is_secret(e) for e in pub.overlay))


def secrets_url(boot_url: str, node: str) -> str:
    """Where /init fetches the secret part (the boot token goes with it, not in the URL)."""
    return f"{boot_url}/overlay/{quote(node)}/secrets"


def url(boot_url: str, secret: bytes, node: str, pub: Published) -> str:
    """The overlay URL in the node's iPXE script. iPXE fills in ${netX/mac}: the MAC of the NIC
    that booted, which the endpoint checks against the node's MACs."""
    return (f"{boot_url}/overlay/{quote(node)}.cpio.gz?image={quote(pub.image)}"
            f"&version={quote(pub.version)}&token={token(secret, node)}&mac=${{netX/mac}}")


class _Files(Mapping):
    """overlay.files for templates: each file read (as text) only when a template uses it. An
    unset key is an Undefined with a hint, so `| default(...)` still works."""

    def __init__(self, env: jinja2.Environment, site: Site, section: str):
        self.env, self.site, self.section = env, site, section
        self.source = site.overlay.files if section == "files" else site.overlay.values

    def __getitem__(self, key):
        if key not in self.source:
            return self.env.undefined(hint=f"overlay.{self.section}.{key} is not set in {self.site.path}", name=key)
        if self.section == "values":
            return self.source[key]
        data = _read(self.site, key)
        try:
            return data.decode()
        except UnicodeDecodeError:
            raise OperationError(f"overlay.files.{key} is binary: the image's overlay must `copy:` it, "
                                 "not use it in a template") from None

    def __getattr__(self, key):
        if key.startswith("_"):
            raise AttributeError(key)
        return self[key]

    def __iter__(self):
        return iter(self.source)

    def __len__(self):
        return len(self.source)


def _read(site: Site, key: str) -> bytes:
    path = site.overlay.files[key]
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise OperationError(f"cannot read overlay.files.{key} ({path}): {exc.strerror}; "
                             f"fix it in {site.path}") from None


_envs: dict[str, jinja2.Environment] = {}


def _env(folder: str) -> jinja2.Environment:
    # One environment per version folder: its templates never change, so compile once.
    env = _envs.get(folder)
    if env is None:
        env = jinja2.Environment(loader=jinja2.FileSystemLoader(os.path.join(folder, "overlay")),
                                 undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=True)
        env.filters["b64encode"] = lambda s: base64.b64encode(s.encode() if isinstance(s, str) else s).decode()
        if len(_envs) > 64:
            _envs.clear()
        _envs[folder] = env
    return env


def render_files(site: Site, node: Node, role: str, pub: Published, secret: bool | None = None
                 ) -> list[tuple[dict, bytes]]:
    """(entry, content) for each file of the node's overlay (secret: only the secret part, or only
    the public one; None: both). Raises OperationError naming the template or the site setting at
    fault (never a secret's value)."""
    env = _env(pub.folder)
    ctx = {
        "node": {"name": node.name, "pool": node.pool, "ip": node.ip, "macs": list(node.macs)},
        "role": role,
        "image": {"name": pub.image, "version": pub.version},
        "site": {"name": site.name, "boot_url": site.boot_url},
        "files": _Files(env, site, "files"),
        "values": _Files(env, site, "values"),
    }
    out = []
    for entry in pub.overlay:
        if secret is not None and is_secret(entry) != secret:
            continue
        if entry.get("copy"):
            key = entry["copy"]
            if key not in site.overlay.files:
                if entry.get("optional"):
                    continue
                raise OperationError(f"image {pub.image} needs overlay.files.{key} for {entry['path']}; "
                                     f"set it in {site.path}")
            data = _read(site, key)
        elif entry.get("host_key"):
            data = hostkeys.get(site, node.name).content(entry["host_key"])
        else:
            extra = {}
            if entry.get("kubelet_client"):
                creds = kubelet_certs.for_overlay(site, node.name)
                if creds is None:
                    continue
                extra = {"kubelet_client": {"certificate": creds.certificate.decode(), "key": creds.key.decode()}}
            try:
                data = env.get_template(entry["template"]).render({**ctx, **extra}).encode()
            except jinja2.UndefinedError as exc:
                raise OperationError(f"overlay template {entry['template']} of {pub.image} {pub.version}: "
                                     f"{exc.message}") from None
            except jinja2.TemplateError as exc:
                raise OperationError(f"overlay template {entry['template']} of {pub.image} {pub.version}: "
                                     f"{type(exc).__name__}: {exc.message}") from None
        out.append((entry, data))
    return out


def build(site: Site, node: Node, role: str, pub: Published, secret: bool | None = False) -> bytes:
    """The node's overlay (by default its public part; see render_files) as a gzip-compressed
    newc cpio archive."""
    files = render_files(site, node, role, pub, secret)

    def fill(w) -> None:
        # 0700: the unpacked secrets are root's only, until /init has copied them into place.
        w.dir("provisioner", 0o700)
        w.dir(PREFIX, 0o700)
        for entry, data in files:
            name = PREFIX + entry["path"]
            w.parents(name)
            w.file(name, data, int(entry["mode"], 8), entry.get("uid", 0), entry.get("gid", 0))

    return gzip_archive(fill, mtime=int(time.time()))

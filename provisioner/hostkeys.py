"""Per-node SSH host keys: one ed25519 key per node, made by provisioner the first time it is
needed and kept, delivered to the node in its overlay (image.yaml `host_key:` entries).

Why: an image is shared by every node that boots it, so keys made at image build time (what
openssh-server's postinst does) would be every node's private key, and the slurm and k8s images
would show the same node two different keys, so that a strict known_hosts (power.ssh.known_hosts)
refuses the node after each switch. The image build removes those keys
(builder.remove_host_keys); a node's key follows the node, whichever image it boots.

Where: `host-keys/NODE/ssh_host_ed25519_key` (0600, OpenSSH format) and `.pub` beside it, in
the folder of site.store (default /var/lib/provisioner/host-keys/): the state folder that the
boot server (which renders overlays) and the CLI both write. The folder and each node's folder
are 0700. Back it up with the store: a lost key is a new key, and known_hosts must be rewritten
(`provisioner ssh known-hosts`).

`provisioner ssh known-hosts [NODESET]` prints the known_hosts lines for the nodes, under the
names provisioner's SSH uses (remote.target_for): write them once to power.ssh.known_hosts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from provisioner import node_files
from provisioner.errors import OperationError
from provisioner.model import Node, Site

FOLDER = "host-keys"
PRIVATE = "ssh_host_ed25519_key"
PUBLIC = PRIVATE + ".pub"
KINDS = ("private", "public")  # what an overlay entry's host_key may name


@dataclass(frozen=True)
class HostKey:
    node: str
    path: Path  # the private key file
    private: bytes  # OpenSSH private key format, as sshd reads it (0600 on the node)
    public: str  # "ssh-ed25519 AAAA... root@NODE" (one line, no newline)

    @property
    def key_type(self) -> str:
        return self.public.split()[0]

    @property
    def key_b64(self) -> str:
        return self.public.split()[1]

    def content(self, kind: str) -> bytes:
        """What an overlay `host_key: KIND` entry holds."""
        if kind == "private":
            return self.private
        if kind == "public":
            return (self.public + "\n").encode()
        raise ValueError(f"host_key must be one of {', '.join(KINDS)}, not {kind!r}")


def folder(site: Site) -> Path:
    return node_files.folder(site, FOLDER)


def get(site: Site, node: str) -> HostKey:
    """The node's host key, made (and kept) the first time (node_files.make_once: safe with
    several processes at once)."""
    path = node_files.path(site, FOLDER, node, PRIVATE)
    try:
        data, made = node_files.make_once(site, FOLDER, node, PRIVATE, _new_key)
        if made:
            node_files.replace(site, FOLDER, node, PUBLIC, (_public_line(_load(data), node) + "\n").encode(), 0o644)
    except OSError as exc:
        raise OperationError(f"node {node}: cannot read or make its SSH host key {path}: "
                             f"{exc.strerror or exc}; the folder of site.store must be writable by provisioner "
                             f"(the boot server and the CLI)") from None
    try:
        key = _load(data)
    except (ValueError, TypeError) as exc:
        raise OperationError(f"node {node}: its SSH host key {path} is not an OpenSSH private key ({exc}); "
                             f"remove the file to make a new one (then rewrite known_hosts with "
                             f"`provisioner ssh known-hosts`)") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise OperationError(f"node {node}: {path} is not an ed25519 key; remove it to make a new one")
    return HostKey(node, path, data, _public_line(key, node))


def _load(data: bytes):
    return serialization.load_ssh_private_key(data, password=None)


def _new_key() -> bytes:
    return ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())


def _public_line(key: ed25519.Ed25519PrivateKey, node: str) -> str:
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return f"{pub.decode()} root@{node}"


def known_host_name(site: Site, node: Node) -> str:
    """The name provisioner's SSH looks the node up under in known_hosts: `host` for port 22,
    else `[host]:port`, host and port as remote.target_for picks them (ssh_host, else ip; the
    node's ssh_port, else power.ssh.port). A node with neither ssh_host nor ip: its name."""
    from provisioner import remote

    try:
        target = remote.target_for(node, site.power.ssh)
        host, port = target.host, int(target.port)
    except OperationError:
        host, port = node.name, site.power.ssh.port
    return host if port == 22 else f"[{host}]:{port}"


def known_hosts(site: Site, names: list[str]) -> list[dict]:
    """Per node: node, host (as in known_hosts), type, key, line (the known_hosts line), file
    (the private key's path). A node without a key gets one now."""
    rows = []
    for name in names:
        key = get(site, name)
        host = known_host_name(site, site.nodes[name])
        rows.append({"node": name, "host": host, "type": key.key_type, "key": key.key_b64,
                     "line": f"{host} {key.key_type} {key.key_b64}", "file": str(key.path)})
    return rows

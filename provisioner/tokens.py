"""Per-node tokens: HMAC of the node name under a site secret.

The token goes into the node's kernel command line; the node presents it on its boot callback
(and, later, to fetch its own overlay). Derived rather than stored, so every worker of the boot
server and the CLI agree without sharing state, and rotating the secret revokes all of them.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from provisioner.errors import OperationError


def load_or_create_secret(path: Path) -> bytes:
    try:
        data = path.read_bytes().strip()
        if len(data) >= 32:
            return data
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise OperationError(f"cannot read the token secret {path}: {exc.strerror}; check site.secret_file") from None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
        # link() fails if another process created it first: then everyone uses that one.
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
        return path.read_bytes().strip()
    except OSError as exc:
        raise OperationError(f"cannot create the token secret {path}: {exc.strerror}; check site.secret_file") from None


def node_token(secret: bytes, node: str, purpose: str = "node") -> str:
    return hmac.new(secret, f"{purpose}:{node}".encode(), hashlib.sha256).hexdigest()[:32]


def check_token(secret: bytes, node: str, presented: str | None, purpose: str = "node") -> bool:
    if not presented or not isinstance(presented, str):
        return False
    return hmac.compare_digest(node_token(secret, node, purpose), presented)

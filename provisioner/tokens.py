"""Tokens: HMACs under the site secret (site.secret_file).

- `node_token(secret, node, purpose)`: derived from the node's name (the overlay's non-secret
  part uses one); every worker of the boot server and the CLI agree without sharing state, and
  rotating the secret revokes all of them.
- `boot_token(secret, node, nonce)`: the token of one boot (provisioner/boot/boots.py). The store
  keeps only the random nonce, so its rows alone give nobody a token; the callback spends it.

The secret file is refused (never silently replaced) when it is shorter than MIN_SECRET bytes or
readable by group or others: a short key lets anyone compute tokens offline, a readable one
hands them to every local user. `secret_problem()` says what is wrong and how to make a good one
(`provisioner check` shows it).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
from pathlib import Path

from provisioner.errors import OperationError

MIN_SECRET = 32


def make_hint(path: Path) -> str:
    return (f"make a new one: `rm -f {path}` and start `provisioner serve` (it writes one), or "
            f"`(umask 077; openssl rand -hex 32 > {path})`; every node's boot token changes with it")


def secret_problem(path: Path) -> str | None:
    """What is wrong with an existing secret file (None: fine, or not there yet)."""
    try:
        st = os.stat(path)
        if stat.S_IMODE(st.st_mode) & 0o077:
            return f"the token secret {path} is readable by group or others (mode {stat.S_IMODE(st.st_mode):04o}); " \
                   f"run `chmod 600 {path}`"
        if len(Path(path).read_bytes().strip()) < MIN_SECRET:
            return f"the token secret {path} is shorter than {MIN_SECRET} bytes; {make_hint(path)}"
    except FileNotFoundError:
        return None
    except PermissionError:
        return None  # not ours to read (the CLI as another user): the boot server checks it
    except OSError as exc:
        return f"cannot read the token secret {path}: {exc.strerror}"
    return None


def load_or_create_secret(path: Path) -> bytes:
    path = Path(path)
    problem = secret_problem(path)
    if problem:
        raise OperationError(f"{problem} (site.secret_file)")
    try:
        return _read(path)
    except FileNotFoundError:
        pass
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
        return _read(path)
    except OSError as exc:
        raise OperationError(f"cannot create the token secret {path}: {exc.strerror}; check site.secret_file") from None


def _read(path: Path) -> bytes:
    data = path.read_bytes().strip()
    if len(data) < MIN_SECRET:  # another process's half-written file is never used as a key
        raise OperationError(f"the token secret {path} is shorter than {MIN_SECRET} bytes; {make_hint(path)}")
    return data


def node_token(secret: bytes, node: str, purpose: str = "node") -> str:
    return hmac.new(secret, f"{purpose}:{node}".encode(), hashlib.sha256).hexdigest()[:32]


def check_token(secret: bytes, node: str, presented: str | None, purpose: str = "node") -> bool:
    if not presented or not isinstance(presented, str):
        return False
    return hmac.compare_digest(node_token(secret, node, purpose), presented)


def boot_token(secret: bytes, node: str, nonce: str) -> str:
    """The token of the boot whose store row holds `nonce`."""
    return node_token(secret, f"{node}:{nonce}", "boot")


def new_nonce() -> str:
    return secrets.token_hex(16)

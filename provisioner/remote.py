"""Run a command on another host over SSH (paramiko): key authentication, checked host keys.

Used by the Slurm adapter (commands on the controller) and by the SSH power methods (reboot,
kexec). An unknown or changed host key is an error, never silently accepted: a provisioning tool
that trusts any host would hand node tokens and root commands to whoever answers on that address.

`target` is anything with .host .port .user .key_file .known_hosts (model.SshTarget, or one built
by `target_for()` from a node and the power.ssh settings).
"""

from __future__ import annotations

import logging
import os
import select
import shlex
import socket
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import paramiko

from provisioner.errors import OperationError
from provisioner.model import SshPower, SshTarget

log = logging.getLogger(__name__)

_CHUNK = 65536


@dataclass(frozen=True)
class CommandResult:
    returncode: int  # -1 when the remote side sent no exit status (killed by a signal, link lost)
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def target_for(node: Any, ssh: SshPower) -> SshTarget:
    """The SSH target of a node: node.ssh_host (default: its IP), the node's ssh_port when set
    to something other than 22, else power.ssh.port; user/key/known_hosts from power.ssh."""
    host = getattr(node, "ssh_host", None) or getattr(node, "ip", None)
    if not host:
        raise OperationError(f"node {node.name} has no ssh_host or ip; set one in the site config to use SSH")
    node_port = getattr(node, "ssh_port", 22) or 22
    return SshTarget(host=host, port=node_port if node_port != 22 else ssh.port, user=ssh.user,
                     key_file=ssh.key_file, known_hosts=ssh.known_hosts)


def describe(target: Any) -> str:
    return f"{target.user}@{target.host}:{target.port}"


def command_line(argv: Sequence[str], env: Mapping[str, str] | None = None) -> str:
    """argv (+ env) -> one shell-safe command line. Environment goes through `env K=V ...`
    because sshd drops client-sent variables unless AcceptEnv lists them."""
    if isinstance(argv, (str, bytes)) or not argv:
        raise TypeError("argv must be a non-empty list of strings")
    words = [str(a) for a in argv]
    if env:
        words = ["env", *[f"{k}={v}" for k, v in env.items()], *words]
    return shlex.join(words)


class Connection:
    """One authenticated SSH connection; run several commands on it without reconnecting."""

    def __init__(self, target: Any, client: paramiko.SSHClient):
        self.target = target
        self.client = client

    def run(self, argv: Sequence[str], timeout: float, env: Mapping[str, str] | None = None) -> CommandResult:
        return self.run_line(command_line(argv, env), timeout)

    def run_line(self, line: str, timeout: float) -> CommandResult:
        """Run a command line as the remote shell reads it (for admin-configured commands)."""
        where = describe(self.target)
        name = line.split(None, 1)[0] if line.strip() else "''"
        deadline = time.monotonic() + timeout
        try:
            transport = self.client.get_transport()
            if transport is None or not transport.is_active():
                raise OperationError(f"ssh {where}: connection closed; retry")
            chan = transport.open_session(timeout=timeout)
            chan.setblocking(False)
            chan.exec_command(line)
            out, err = bytearray(), bytearray()
            while True:
                progressed = False
                while chan.recv_ready():
                    out += chan.recv(_CHUNK)
                    progressed = True
                while chan.recv_stderr_ready():
                    err += chan.recv_stderr(_CHUNK)
                    progressed = True
                if chan.exit_status_ready() and (chan.eof_received or chan.closed) \
                        and not chan.recv_ready() and not chan.recv_stderr_ready():
                    break
                if chan.closed and not chan.recv_ready() and not chan.recv_stderr_ready():
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    chan.close()
                    raise OperationError(f"ssh {where}: {name} did not finish within {timeout:g}s; "
                                         f"check the host or raise the timeout")
                if not progressed:
                    select.select([chan], [], [], min(left, 0.2))
            code = chan.recv_exit_status() if chan.exit_status_ready() else -1
            chan.close()
        except OperationError:
            raise
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise OperationError(f"ssh {where}: running {name} failed: {_one_line(exc)}; check the host") from None
        return CommandResult(code, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"))

    def close(self) -> None:
        self.client.close()


@contextmanager
def connect(target: Any, timeout: float) -> Iterator[Connection]:
    """Connect and authenticate with the target's key; host key checked against known_hosts."""
    where = describe(target)
    client = paramiko.SSHClient()
    known = getattr(target, "known_hosts", None)
    try:
        if known:
            client.load_host_keys(os.path.expanduser(known))
        else:
            client.load_system_host_keys()
    except (OSError, paramiko.SSHException) as exc:
        client.close()
        raise OperationError(f"ssh {where}: cannot read known_hosts {known or '~/.ssh/known_hosts'}: "
                             f"{_one_line(exc)}; fix the known_hosts setting") from None
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    key_file = getattr(target, "key_file", None)
    try:
        client.connect(
            hostname=target.host,
            port=int(target.port),
            username=target.user,
            key_filename=os.path.expanduser(key_file) if key_file else None,
            look_for_keys=not key_file,
            allow_agent=False,
            timeout=timeout,
            banner_timeout=timeout,
            auth_timeout=timeout,
        )
    except paramiko.BadHostKeyException:
        client.close()
        raise OperationError(f"ssh {where}: host key CHANGED (does not match {known or 'known_hosts'}); "
                             f"verify the host before updating known_hosts") from None
    except paramiko.AuthenticationException:
        client.close()
        raise OperationError(f"ssh {where}: key authentication refused; install the public key of "
                             f"{key_file or 'the default key'} in the user's authorized_keys") from None
    except paramiko.SSHException as exc:
        client.close()
        if "not found in known_hosts" in str(exc):
            raise OperationError(f"ssh {where}: unknown host key (not in {known or '~/.ssh/known_hosts'}); "
                                 f"check its fingerprint, then add it to known_hosts") from None
        raise OperationError(f"ssh {where}: {_one_line(exc)}; check sshd on the host") from None
    except (socket.timeout, TimeoutError):
        client.close()
        raise OperationError(f"ssh {where}: no answer within {timeout:g}s; check the host is up") from None
    except OSError as exc:
        client.close()
        raise OperationError(f"ssh {where}: cannot connect: {exc.strerror or _one_line(exc)}; "
                             f"check the host and port") from None
    conn = Connection(target, client)
    try:
        yield conn
    finally:
        conn.close()


def run(target: Any, argv: Sequence[str], timeout: float, env: Mapping[str, str] | None = None) -> CommandResult:
    """Run argv on the target (connect + run + close). A non-zero exit is a result, not an error;
    connect/auth failures and timeouts raise OperationError. `timeout` bounds each step."""
    with connect(target, timeout) as conn:
        return conn.run(argv, timeout, env)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:200]

"""provisioner.remote against a real sshd on loopback."""

from __future__ import annotations

import pytest

from provisioner import remote
from provisioner.errors import OperationError
from provisioner.model import Node, SshPower
from tests.support import free_port

pytestmark = pytest.mark.integration


def test_command_line_quotes_every_word():
    line = remote.command_line(["echo", "a b", "$HOME", "it's"], env={"SLURM_CONF": "/x y/slurm.conf"})
    assert line == "env 'SLURM_CONF=/x y/slurm.conf' echo 'a b' '$HOME' 'it'\"'\"'s'"
    with pytest.raises(TypeError):
        remote.command_line("echo hi")


def test_run_returns_output_and_exit_code(sshd):
    res = remote.run(sshd.target(), ["sh", "-c", "echo out; echo err >&2; exit 3"], timeout=10)
    assert res == remote.CommandResult(3, "out\n", "err\n")
    assert not res.ok


def test_argv_reaches_the_remote_side_unchanged(sshd):
    words = ["a b", "$HOME", "it's", "*", "semi;colon", "new\nline", ""]
    res = remote.run(sshd.target(), ["printf", "[%s]\\n", *words], timeout=10)
    assert res.ok
    assert res.stdout == "".join(f"[{w}]\n" for w in words)


def test_env_is_passed(sshd):
    res = remote.run(sshd.target(), ["sh", "-c", 'echo "$SLURM_CONF"'], timeout=10,
                     env={"SLURM_CONF": "/etc/slurm dir/slurm.conf"})
    assert res.stdout == "/etc/slurm dir/slurm.conf\n"


def test_large_output_on_both_streams(sshd):
    res = remote.run(sshd.target(), ["sh", "-c", "head -c 300000 /dev/zero | tr '\\0' a; "
                                                 "head -c 200000 /dev/zero | tr '\\0' b >&2"], timeout=20)
    assert res.ok
    assert len(res.stdout) == 300000 and set(res.stdout) == {"a"}
    assert len(res.stderr) == 200000 and set(res.stderr) == {"b"}


def test_connection_runs_several_commands(sshd):
    with remote.connect(sshd.target(), timeout=10) as conn:
        assert conn.run(["echo", "1"], timeout=10).stdout == "1\n"
        assert conn.run(["echo", "2"], timeout=10).stdout == "2\n"


def test_unknown_host_key_is_refused(sshd, tmp_path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    with pytest.raises(OperationError, match="unknown host key") as info:
        remote.run(sshd.target(known_hosts=str(empty)), ["true"], timeout=10)
    assert "\n" not in str(info.value)
    assert empty.read_text() == ""  # nothing was added behind our back


def test_changed_host_key_is_refused(sshd):
    with pytest.raises(OperationError, match="host key CHANGED"):
        remote.run(sshd.target(known_hosts=sshd.other_known_hosts), ["true"], timeout=10)


def test_wrong_key_is_refused(sshd, tmp_path):
    import subprocess

    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "k")], check=True)
    with pytest.raises(OperationError, match="key authentication refused"):
        remote.run(sshd.target(key_file=str(tmp_path / "k")), ["true"], timeout=10)


def test_connection_refused(sshd):
    with pytest.raises(OperationError, match="cannot connect"):
        remote.run(sshd.target(port=free_port()), ["true"], timeout=5)


def test_command_timeout(sshd):
    with pytest.raises(OperationError, match="did not finish within 0.5s"):
        remote.run(sshd.target(), ["sleep", "5"], timeout=0.5)


def test_target_for_node():
    node = Node(name="n1", pool="shared", default_role="slurm", macs=("52:54:00:00:00:01",), ip="10.0.0.1")
    t = remote.target_for(node, SshPower(user="admin", port=2222, key_file="/k", known_hosts="/kh"))
    assert (t.host, t.port, t.user, t.key_file, t.known_hosts) == ("10.0.0.1", 2222, "admin", "/k", "/kh")
    node2 = Node(name="n2", pool="shared", default_role="slurm", macs=("52:54:00:00:00:02",),
                 ssh_host="n2-mgmt", ssh_port=2200)
    assert remote.target_for(node2, SshPower()).port == 2200
    with pytest.raises(OperationError, match="no ssh_host or ip"):
        remote.target_for(Node(name="n3", pool="slurm", default_role="slurm", macs=()), SshPower())

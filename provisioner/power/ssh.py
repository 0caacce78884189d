"""Reboot a running node over SSH: a graceful reboot, or a kexec straight into a role's image.

Both go through provisioner.remote (key authentication, host keys checked against
power.ssh.known_hosts). kexec skips the firmware POST (minutes on real servers): the node fetches
the role's kernel and initrd from the boot endpoint, the same files and the same kernel command
line the iPXE script would give it (the caller's boot plan, provisioner/boot/plan.py, not rebuilt
here), loads them and jumps. When the node goes away mid-command (it is rebooting) that counts as
done; the boot callback is what confirms the new image, as with any other boot.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from provisioner import remote
from provisioner.errors import OperationError
from provisioner.model import Node, Site

# Runs on the node as `sh -c SCRIPT provisioner-kexec KERNEL_URL APPEND [INITRD_URL...]`: URLs and
# the command line are positional parameters, so nothing in them is ever parsed by the shell.
# Several initrds are concatenated (kexec takes one; concatenated cpio archives are valid).
KEXEC_SCRIPT = r"""set -eu
kernel_url=$1; append=$2; shift 2
dir=$(mktemp -d /tmp/provisioner-kexec.XXXXXX)
trap 'rm -rf "$dir"' EXIT
fetch() {
    if command -v curl >/dev/null 2>&1; then curl -fsS --retry 2 -o "$2" "$1"
    else wget -q -O "$2" "$1"; fi
}
fetch "$kernel_url" "$dir/kernel"
n=0
for url in "$@"; do
    n=$((n + 1)); fetch "$url" "$dir/initrd.$n"; cat "$dir/initrd.$n" >> "$dir/initrd"
done
if [ "$n" -gt 0 ]; then kexec -l "$dir/kernel" --initrd="$dir/initrd" --append="$append"
else kexec -l "$dir/kernel" --append="$append"; fi
# A clean shutdown first where systemd runs the node; otherwise jump at once.
if [ -d /run/systemd/system ]; then systemctl kexec; else kexec -e; fi
"""


@dataclass(frozen=True)
class SshOutcome:
    returncode: int  # -1: the node dropped the connection (it is going down), which is success
    note: str


def reboot(site: Site, node: Node) -> SshOutcome:
    """Run power.ssh.reboot_command on the node (as its shell reads it: it is the admin's line)."""
    cfg = site.power.ssh
    target = remote.target_for(node, cfg)
    with remote.connect(target, cfg.timeout_s) as conn:
        res = conn.run_line(cfg.reboot_command, cfg.timeout_s)
    return _outcome(node, "reboot command", res)


class KexecImage(Protocol):
    """What a kexec needs to know of the image to boot: provisioner.boot.plan.BootPlan has it
    (the caller makes the plan; power control does not read the store or the image root)."""

    ok: bool  # True
    role: str
    kernel_url: str
    args: str

    def initrds_for(self, mac: str) -> tuple[str, ...]: ...


def kexec_argv(image: KexecImage, mac: str) -> list[str]:
    """The exact command the node is asked to run to kexec into `image`. mac: the node's MAC for
    its overlay URL (iPXE fills in ${netX/mac}; over SSH the node is known, its first MAC stands in)."""
    return ["sh", "-c", KEXEC_SCRIPT, "provisioner-kexec", image.kernel_url, image.args, *image.initrds_for(mac)]


def kexec(site: Site, node: Node, image: KexecImage) -> SshOutcome:
    cfg = site.power.ssh
    res = remote.run(remote.target_for(node, cfg), kexec_argv(image, node.macs[0]), cfg.timeout_s)
    return _outcome(node, f"kexec into {image.role}", res)


def _outcome(node: Node, what: str, res: remote.CommandResult) -> SshOutcome:
    if res.returncode == 0:
        return SshOutcome(0, f"{what}: done")
    if res.returncode == -1:
        return SshOutcome(-1, f"{what}: the node closed the connection (going down)")
    tail = " ".join(res.stderr.strip().splitlines()[-2:])[:200] or "no error output"
    raise OperationError(f"node {node.name}: {what} exited with {res.returncode}: {tail}; "
                         f"check the command on the node")

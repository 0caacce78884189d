"""The shape of a site: what `config.load()` returns, as plain frozen dataclasses.

A Site is the boot server's settings plus one Image per role (slurm, k8s), the Nodes (each in a
pool: slurm, k8s or shared) and the settings the balancer (Policy), the cluster adapters
(SlurmSettings, KubernetesSettings), the power drivers (PowerSettings) and the per-node overlays
(OverlaySettings) read. Nothing here reads files or validates: provisioner/config.py builds these
from the YAML; everything else only reads them.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

POWER_METHODS = ("ipmi", "ssh", "kexec", "kexec+ipmi")
BMC_PROTOCOLS = ("ipmi", "redfish")
BMC_BOOT_MODES = ("uefi", "legacy")
SHARE_RULES = ("proportional", "slurm-first", "k8s-first")
# Which jobs a reclaim requeues after the grace: those whose requeue loses less work than the
# wait it saves the home side (the others run to their end), or every one that can be.
REQUEUE_RULES = ("cheaper", "always")

# Image names, versions and overlay keys: safe in paths and URLs.
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")

# The iPXE template a role boots unless the image or the node names another.
ROLE_TEMPLATE = "{role}.ipxe.j2"


def shipped(name: str) -> Path:
    """A folder provisioner ships for a site to copy and edit (images, pxe-templates): inside the
    package when installed (setup.py copies them there, as provisioner/data/NAME), else at the
    top level of the checkout this package is in (a checkout, an editable install)."""
    package = Path(__file__).resolve().parent
    installed = package / "data" / name
    return installed if installed.is_dir() else package.parent / name


# What a site gets when it names no folder of its own: the shipped iPXE templates and image definitions.
DEFAULT_TEMPLATES = shipped("pxe-templates")
DEFAULT_IMAGE_DEFINITIONS = shipped("images")

_MAC_RE = re.compile(r"^[0-9a-f]{12}$")


def normalize_mac(value: str) -> str | None:
    """Any common MAC spelling (aa:bb.., AA-BB-.., aabb.cc.., bare hex) -> 'aa:bb:cc:dd:ee:ff',
    the form Node.macs holds. Returns None when it is not a MAC (the config and the boot endpoint
    both use it)."""
    if not isinstance(value, str) or len(value) > 32:
        return None
    bare = re.sub(r"[:\-.]", "", value.strip().lower())
    if not _MAC_RE.match(bare):
        return None
    return ":".join(bare[i : i + 2] for i in range(0, 12, 2))


@dataclass(frozen=True)
class Bmc:
    address: str
    port: int = 623  # 443 for Redfish
    user: str = "admin"
    password: str = field(default="", repr=False)  # never printed: repr=False
    password_file: str | None = None
    protocol: str = "ipmi"  # one of BMC_PROTOCOLS
    # Redfish only: TLS is verified against ca_file (else the system's trust store), or not at
    # all with insecure (which `provisioner check` warns about); system is the Redfish
    # ComputerSystem id (None: the only one the BMC lists); http_boot_uri asks for a one-time
    # UEFI HTTP boot of that URL where the BMC offers it (else PXE); boot_mode goes with the
    # override (pyghmi always sends one).
    ca_file: str | None = None
    insecure: bool = False
    system: str | None = None
    http_boot_uri: str | None = None
    boot_mode: str = "uefi"

    def __repr__(self) -> str:  # belt and braces: no password in tracebacks or logs
        return f"Bmc(protocol={self.protocol!r}, address={self.address!r}, port={self.port}, user={self.user!r})"


@dataclass(frozen=True)
class Node:
    name: str
    pool: str
    default_role: str
    macs: tuple[str, ...]
    ip: str | None = None
    bmc: Bmc | None = None
    power_method: str = "ipmi"
    ssh_host: str | None = None
    ssh_port: int = 22
    template: str | None = None  # overrides the role's template for this node
    # The side a shared node belongs to when both want it (lent to the other side while its home
    # has no work for it, reclaimed when its home has). None: its default_role (the static split).
    home: str | None = None

    @property
    def shared(self) -> bool:
        return self.pool == "shared"

    @property
    def home_side(self) -> str:
        return self.home or self.default_role


@dataclass(frozen=True)
class Image:
    """A role's image: explicit files (kernel, initrds) or, with `name`, a built image whose
    version and files come from its published version (resolved per request by the renderer)."""

    role: str
    version: str
    kernel: str  # relative to site.image_root
    initrds: tuple[str, ...] = ()
    rootfs: str | None = None
    cmdline: str = ""
    template: str | None = None  # default: ROLE_TEMPLATE
    name: str | None = None  # a built image (site.image_definitions/NAME/image.yaml); kernel etc. then empty
    overlay: bool = False  # resolved built versions only: the node gets its overlay initrd

    @property
    def resolved(self) -> bool:
        return self.name is None or bool(self.kernel)

    def files(self) -> list[str]:
        return [self.kernel, *self.initrds, *([self.rootfs] if self.rootfs else [])]


@dataclass(frozen=True)
class Policy:
    min_nodes: dict[str, int] = field(default_factory=lambda: {"slurm": 0, "k8s": 0})
    cooldown_s: int = 600
    demand_persist_s: int = 120
    max_in_flight: int = 2
    share_rule: str = "proportional"  # one of SHARE_RULES
    phase_timeout_s: int = 900
    max_retries: int = 2
    # Lending and reclaim: the grace a side's work gets on a node its home reclaims (pods: then
    # evicted; jobs: then requeued when they can be), and how many of a side's home nodes may be
    # lent to the other side at once (None: no limit; Kueue's lendingLimit). Jobs get longer: they
    # run for hours and a requeue loses all of it (docs/lending.md has the simulated trade-off).
    reclaim_grace_s: dict[str, int] = field(default_factory=lambda: {"slurm": 1800, "k8s": 300})
    lending_limit: dict[str, int | None] = field(default_factory=lambda: {"slurm": None, "k8s": None})
    reclaim_requeue: str = "cheaper"  # one of REQUEUE_RULES (policy.requeue_pays)


@dataclass(frozen=True)
class SshTarget:
    host: str
    port: int = 22
    user: str = "root"
    key_file: str | None = None
    known_hosts: str | None = None


@dataclass(frozen=True)
class SlurmSettings:
    mode: str = "local"  # local: run scontrol/sinfo/squeue here; ssh: on the controller
    slurm_conf: str | None = None
    bin_dir: str | None = None
    controller: SshTarget | None = None
    reason_prefix: str = "provisioner:"
    timeout_s: int = 30
    # SLURM asks for shared nodes itself (ResumeProgram/SuspendProgram, docs/event-driven.md):
    # shared nodes in Kubernetes are "powered down" for SLURM, and pending jobs are not polled.
    power_saving: bool = False


@dataclass(frozen=True)
class KubernetesSettings:
    kubeconfig: str | None = None
    in_cluster: bool = False
    context: str | None = None
    label_key: str = "sched"
    timeout_s: int = 10
    delete_node: bool = False
    provisioning_requests: bool = False  # serve ProvisioningRequests of provisioner's class
    booking_s: int = 600  # provisioned nodes stay booked for a request this long (then BookingExpired)
    # Issue the kubelet's client certificate before a switch to k8s powers the node (kubelet_certs).
    kubelet_certificates: bool = True


@dataclass(frozen=True)
class SshPower:
    user: str = "root"
    port: int = 22
    key_file: str | None = None
    known_hosts: str | None = None
    reboot_command: str = "systemctl reboot"
    timeout_s: int = 10


@dataclass(frozen=True)
class PowerSettings:
    timeout_s: float = 5.0
    retries: int = 2
    fanout: int = 32
    ssh: SshPower = field(default_factory=SshPower)
    # Redfish: how long an accepted power action may take to show in the power state (a BMC may
    # run it as a task); IPMI verifies within timeout_s.
    settle_s: float = 30.0


@dataclass(frozen=True)
class OverlaySettings:
    """What per-node overlays are rendered from: `files` (key -> path, read when an overlay is
    built; secrets such as the munge key live here) and plain `values` (key -> string)."""

    files: dict[str, str] = field(default_factory=dict, repr=False)
    values: dict[str, str] = field(default_factory=dict, repr=False)


@dataclass(frozen=True)
class RunSettings:
    """`provisioner run`, the long-running balancer: a pass every interval_s (every
    busy_interval_s while a node switches), and one at once when a scheduler's ask is recorded
    (the store polled every ask_poll_s) or, with watch_kubernetes, a pod turns Unschedulable."""

    interval_s: float = 60.0
    ask_poll_s: float = 0.5
    busy_interval_s: float = 2.0
    watch_kubernetes: bool = True


@dataclass(frozen=True)
class Site:
    path: Path
    name: str
    boot_url: str
    listen: str
    store: Path
    image_root: Path
    templates: Path
    secret_file: Path
    check_callback_source: bool
    images: dict[str, Image]
    nodes: dict[str, Node]  # in config order
    policy: Policy
    slurm: SlurmSettings
    kubernetes: KubernetesSettings
    power: PowerSettings
    image_definitions: Path = DEFAULT_IMAGE_DEFINITIONS
    overlay: OverlaySettings = field(default_factory=OverlaySettings)
    run: RunSettings = field(default_factory=RunSettings)
    # site.store as a postgresql:// URL (no password in it): the store is there, and `store`
    # names a local path in site.state_dir whose siblings hold this host's files (locks, sockets).
    store_url: str | None = None
    store_password_file: Path | None = None  # the PostgreSQL password (else libpq's PGPASSWORD)
    # The overlay's secret part only to a request from a source port below 1024 (only root on the
    # node can send one); off for firmware that cannot (as Warewulf's `secure` overlays).
    secrets_privileged_port: bool = True
    boot_window_s: float = 3600.0  # how long an admin-requested boot may take to fetch its secrets

    def node_by_mac(self) -> dict[str, Node]:
        return {mac: node for node in self.nodes.values() for mac in node.macs}

    def resolve(self, p: str | os.PathLike) -> Path:
        """Paths in the config are relative to the config file's folder."""
        p = Path(os.path.expanduser(str(p)))
        return p if p.is_absolute() else (self.path.parent / p)

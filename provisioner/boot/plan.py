"""What a node boots now: its role, image, version and the exact URLs and kernel arguments.

One answer for every way a node boots: the iPXE script (boot endpoint and `provisioner render`)
and kexec over SSH get the same plan, so a node pinned to an image version boots that version
whichever way it is rebooted.

- `choose_role()` and `plan()` are pure: plain data in, a BootPlan (or NoBoot, with the reason)
  out.
- `BootPlanner` reads what they need: the desired role and version pins from the store, the
  published versions under site.image_root, and checks that the image files are there.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from typing import ClassVar
from urllib.parse import quote

from provisioner.boot import overlay
from provisioner.boot.boots import Boots
from provisioner.model import ROLE_TEMPLATE, Image, Node, Site
from provisioner.images.versions import Published, Resolver
from provisioner.tokens import node_token


@dataclass(frozen=True)
class BootPlan:
    ok: ClassVar[bool] = True

    node: str
    role: str
    image: str | None  # the built image (images.ROLE.image); None: the config names the files
    version: str
    pin: str | None  # the node's version pin of that image, when it has one
    kernel_url: str
    initrd_urls: tuple[str, ...]
    rootfs_url: str | None
    overlay_url: str | None  # iPXE form: ${netX/mac} is the MAC of the NIC that booted
    cmdline: str  # the image's own arguments (a built image's, then the config's)
    args: str  # the whole kernel command line: cmdline + provisioner.* arguments
    callback_url: str
    token: str
    template: str
    files: tuple[tuple[str, str], ...]  # (path under the image root, absolute path) of the boot files
    published: Published | None = field(default=None, compare=False, repr=False)

    def initrds_for(self, mac: str) -> tuple[str, ...]:
        """The initrd URLs with the overlay's ${netX/mac} filled in: for a boot that is not iPXE
        (kexec), where the node, and so its MAC, is known beforehand."""
        if self.overlay_url is None:
            return self.initrd_urls
        return (*self.initrd_urls, self.overlay_url.replace("${netX/mac}", mac))


@dataclass(frozen=True)
class NoBoot:
    """The node must not boot an image now; `reason` (one line, starting with the node's name)
    says why and what to do."""

    ok: ClassVar[bool] = False

    node: str
    role: str
    image: str | None
    reason: str


def choose_role(desired: str | None, default_role: str) -> str:
    """The role a node boots: the desired one in the store, else its default role (a node the
    store does not know yet)."""
    return desired or default_role


def plan(node: Node, role: str, image: Image, secret: bytes, *, boot_url: str, image_root: str,
         version: str | None = None, pin: str | None = None, current: str | None = None,
         published: Published | None = None, token: str | None = None) -> BootPlan | NoBoot:
    """The plan for `node` booting `role`, whose image in the config is `image`.

    For a built image (image.name): `version` is the version to boot (the node's `pin`, a version
    asked for, or the `current` published one; None: none is published) and `published` what
    the image root holds of it (None: not there). For an image given by its files they are
    ignored. `token`: the token of this boot (provisioner/boot/boots.py); None: the node's
    derived one (no store to check a boot token against).
    """
    if image.name is None:
        version, pin = image.version, None
        kernel, initrds, rootfs, cmdline = image.kernel, image.initrds, image.rootfs, image.cmdline
        files = image.files()
        paths = [os.path.join(image_root, f) for f in files]
        published = None
    else:
        if version is None:
            return NoBoot(node.name, role, image.name, f"node {node.name}: image {image.name} has no published "
                                                       f"version; run `provisioner image build {image.name}`")
        if published is None:
            what = "pinned to" if version == pin else "published as current:" if version == current else "asked for"
            return NoBoot(node.name, role, image.name,
                          f"node {node.name}: image {image.name} {what} version {version}, which does not exist "
                          "under the image root")
        kernel, initrds, rootfs = published.kernel, published.initrds, published.rootfs
        cmdline = " ".join(c for c in (published.cmdline, image.cmdline) if c)
        files = [kernel, *initrds, *([rootfs] if rootfs else [])]
        paths = list(published.paths)

    def url(rel: str) -> str:
        return f"{boot_url}/images/{quote(rel)}"

    token = token or node_token(secret, node.name)
    callback = f"{boot_url}/api/v1/nodes/{quote(node.name)}/booted"
    rootfs_url = url(rootfs) if rootfs else None
    args = [cmdline, f"provisioner.node={node.name}", f"provisioner.role={role}", f"provisioner.version={version}",
            f"provisioner.callback={callback}", f"provisioner.token={token}"]
    if rootfs_url:
        args.append(f"provisioner.rootfs={rootfs_url}")
    if overlay.has_secrets(published):  # /init fetches them as root, with this boot's token
        args.append(f"provisioner.secrets={overlay.secrets_url(boot_url, node.name)}")
    return BootPlan(
        node=node.name, role=role, image=image.name, version=version, pin=pin,
        kernel_url=url(kernel), initrd_urls=tuple(url(p) for p in initrds), rootfs_url=rootfs_url,
        # The per-node overlay initrd: built images whose definition has one.
        overlay_url=overlay.url(boot_url, secret, node.name, published) if published and published.overlay else None,
        cmdline=cmdline, args=" ".join(a for a in args if a), callback_url=callback, token=token,
        template=node.template or image.template or ROLE_TEMPLATE.format(role=role),
        files=tuple(zip(files, paths)), published=published,
    )


class BootPlanner:
    """Plans from the store (desired role, version pins) and the image root (published versions).

    On the boot endpoint's hot path: per call one store read for the role (and one for a built
    image's pin), one readlink(2) for the current version, a stat(2) per boot file; a plan
    already made for the same node, role and version is reused (it depends on nothing else)."""

    def __init__(self, site: Site, secret: bytes, store=None, tokens=None):
        self.site = site
        self.secret = secret
        self.store = store  # None: every node boots its default role, unpinned
        # The boot token of a node (name -> token): the store's boots (provisioner/boot/boots.py);
        # without a store the derived one.
        if tokens is None and store is not None and hasattr(store, "boot_row"):
            tokens = Boots(secret, store, site.boot_window_s).token
        self.tokens = tokens
        self.resolver = Resolver(site.image_root)
        self._image_root = str(site.image_root)
        self._plans: dict[tuple, BootPlan] = {}
        self._max_plans = 4 * len(site.nodes) + 64

    def role(self, node: Node) -> str:
        return choose_role(self.store.desired_role(node.name) if self.store else None, node.default_role)

    def plan(self, node: Node | str, role: str | None = None, *, version: str | None = None,
             check_files: bool = True) -> BootPlan | NoBoot:
        """What `node` boots now: `role` (default: its desired role), `version` of a built image
        (default: its pin, else the published one). check_files: a plan whose files are missing
        under the image root is NoBoot. Store errors (ProvisionerError) go to the caller."""
        if isinstance(node, str):
            node = self.site.nodes[node]
        role = role or self.role(node)
        image = self.site.images[role]
        pin = current = pub = None
        if image.name is not None:
            pin = self.store.image_pin(node.name, image.name) if self.store else None
            if not (version or pin):
                current = self.resolver.current(image.name)
            version = version or pin or current
            pub = self.resolver.get(image.name, version) if version else None
        token = self.tokens(node.name) if self.tokens else None
        key = (node.name, role, image.name, version, pin, token)
        made = self._plans.get(key)
        if made is None:
            made = plan(node, role, image, self.secret, boot_url=self.site.boot_url, image_root=self._image_root,
                        version=version, pin=pin, current=current, published=pub, token=token)
            if not made.ok:
                return made  # not kept: the version may be published any moment
            if len(self._plans) >= self._max_plans:
                self._plans.clear()
            self._plans[key] = made
        if check_files:
            # Checked on every call, not cached: an image removed from disk shows on the next boot.
            missing = [rel for rel, path in made.files if not _is_file(path)]
            if missing:
                return NoBoot(node.name, role, image.name,
                              f"node {node.name}: image {role} version {made.version} is missing "
                              f"{', '.join(missing)} under the image root")
        return made


def _is_file(path: str) -> bool:
    """Path.is_file() without pathlib's per-call objects (the boot endpoint calls it per request)."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False

"""Renders iPXE scripts from the admin's Jinja2 templates (pxe-templates/).

Shared by the boot endpoint and `provisioner render`, so what the CLI prints is exactly what a
node gets. Rendering never raises to the caller: a broken template or a missing image file gives
the `unknown` script with the reason, and if even that template is broken, a built-in one.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from urllib.parse import quote

import jinja2
import jinja2.meta
from jinja2 import nodes as jnodes

from provisioner.boot import overlay
from provisioner.errors import OperationError
from provisioner.images.versions import Published, Resolver
from provisioner.model import Image, Node, Site
from provisioner.tokens import node_token

RETRY_S = 30

# iPXE expands ${...} and treats || && # specially; text that came from outside (a MAC a client
# sent, a reason) is reduced to characters that are inert in an `echo` line.
_UNSAFE = re.compile(r"[^A-Za-z0-9 ._:,/()=+@-]")

FALLBACK = """#!ipxe
echo provisioner: the boot endpoint cannot render a script ({reason}); asking again in {retry} s
sleep {retry}
chain --autofree {boot_url}/boot.ipxe
"""


def ipxe_safe(text: object, limit: int = 200) -> str:
    return _UNSAFE.sub("?", str(text))[:limit]


@dataclass(frozen=True)
class Script:
    text: str
    ok: bool  # False: the node got the unknown/fallback script
    reason: str | None = None


class Renderer:
    def __init__(self, site: Site, secret: bytes):
        self.site = site
        self.secret = secret
        self.env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(str(site.templates)),
            undefined=jinja2.StrictUndefined,
            autoescape=False,
            keep_trailing_newline=True,
            trim_blocks=False,
            auto_reload=True,  # an admin's edit takes effect without a restart
        )
        self.env.filters["ipxe_safe"] = ipxe_safe
        # Hot path of a boot storm: rendered scripts are kept per (node, role, MAC, image version)
        # together with the Template objects they came from; the environment hands out new
        # objects when a file changes (auto_reload), so an edit is seen on the next request.
        self._scripts: dict[tuple, tuple[tuple, Script]] = {}
        self._max_scripts = 4 * sum(len(n.macs) for n in site.nodes.values()) + 64
        self._deps: dict[str, tuple[jinja2.Template, tuple[str, ...] | None]] = {}
        self._image_files = {
            role: [(f, str(site.image_root / f)) for f in image.files()]
            for role, image in site.images.items() if image.name is None
        }
        # Roles that name a built image (images.ROLE.image): version and files come from its
        # published version, looked up per request (one readlink; manifests parsed once).
        self.resolver = Resolver(site.image_root)

    # -- public --------------------------------------------------------------------

    def stage1(self) -> Script:
        return self._render("boot.ipxe.j2", {"boot_url": self.site.boot_url, "retry_s": RETRY_S})

    def unknown(self, reason: str, mac: str | None = None) -> Script:
        ctx = {"reason": ipxe_safe(reason), "mac": ipxe_safe(mac or "", 40) or None,
               "boot_url": self.site.boot_url, "retry_s": RETRY_S}
        script = self._render("unknown.ipxe.j2", ctx)
        return Script(script.text, False, reason if script.ok else script.reason)

    def image_name(self, role: str) -> str | None:
        """The built image a role boots (None: the role names its files in the config)."""
        return self.site.images[role].name

    def resolve(self, role: str, pin: str | None = None) -> tuple[Image | None, Published | None, str | None]:
        """The role's image with concrete files: (image, published version or None, None), or
        (None, None, why not). For a built image: the pinned version if given, else the current."""
        image = self.site.images[role]
        if image.name is None:
            return image, None, None
        version = pin or self.resolver.current(image.name)
        if version is None:
            return None, None, (f"image {image.name} has no published version; "
                                f"run `provisioner image build {image.name}`")
        pub = self.resolver.get(image.name, version)
        if pub is None:
            what = "pinned to" if pin else "published as current:"
            return None, None, f"image {image.name} {what} version {version}, which does not exist under the image root"
        cmdline = " ".join(c for c in (pub.cmdline, image.cmdline) if c)
        return Image(role=role, version=version, kernel=pub.kernel, initrds=pub.initrds, rootfs=pub.rootfs,
                     cmdline=cmdline, template=image.template, name=image.name, overlay=bool(pub.overlay)), pub, None

    def node(self, node: Node, role: str, mac: str | None = None, pin: str | None = None) -> Script:
        """The node's script for `role`; `pin`: the version of the role's built image the node is
        pinned to (the boot endpoint reads it from the store)."""
        image, pub, why = self.resolve(role, pin)
        if image is None:
            return self.unknown(f"node {node.name}: {why}", mac)
        # Checked on every call, not cached: an image removed from disk shows on the next boot.
        files = self._image_files[role] if pub is None else zip(image.files(), pub.paths)
        missing = [f for f, path in files if not _is_file(path)]
        if missing:
            return self.unknown(f"node {node.name}: image {role} version {image.version} is missing "
                                f"{', '.join(missing)} under the image root", mac)
        template = node.template or image.template or f"{role}.ipxe.j2"
        key = (node.name, role, mac or node.macs[0], image.version, template)
        used = self._templates(template)  # before rendering: a change meanwhile is caught next time
        cached = self._scripts.get(key)
        if cached is not None and used is not None and cached[0] == used:
            return cached[1]
        script = self._render(template, self.context(node, role, image, mac))
        if not script.ok:
            return self.unknown(f"node {node.name}: {script.reason}", mac)
        if used is not None:
            if len(self._scripts) >= self._max_scripts:
                self._scripts.clear()
            self._scripts[key] = (used, script)
        return script

    def context(self, node: Node, role: str, image: Image, mac: str | None) -> dict:
        pub = None
        if image.name is not None:
            # A built image: the version and files of its published version (or the caller's,
            # already resolved). Callers outside the boot endpoint (kexec) pass the config's.
            resolved, pub, why = self.resolve(role, None if not image.resolved else image.version)
            if resolved is None:
                raise OperationError(f"node {node.name}: {why}")
            image = resolved
        base = self.site.boot_url
        token = node_token(self.secret, node.name)
        callback = f"{base}/api/v1/nodes/{quote(node.name)}/booted"
        urls = {
            "kernel_url": self.image_url(image.kernel),
            "initrd_urls": [self.image_url(p) for p in image.initrds],
            "rootfs_url": self.image_url(image.rootfs) if image.rootfs else None,
            # The per-node overlay initrd (built images whose definition has one); iPXE-only:
            # its URL carries ${netX/mac}.
            "overlay_url": overlay.url(self.site, self.secret, node, pub) if pub and pub.overlay else None,
            "name": image.name,
        }
        args = [
            image.cmdline,
            f"provisioner.node={node.name}",
            f"provisioner.role={role}",
            f"provisioner.version={image.version}",
            f"provisioner.callback={callback}",
            f"provisioner.token={token}",
        ]
        if urls["rootfs_url"]:
            args.append(f"provisioner.rootfs={urls['rootfs_url']}")
        return {
            "node": node,
            "role": role,
            "image": {"version": image.version, "cmdline": image.cmdline, "role": role, **urls},
            "kernel_args": " ".join(a for a in args if a),
            "callback_url": callback,
            "token": token,
            "boot_url": base,
            "mac": mac or node.macs[0],
            "retry_s": RETRY_S,
        }

    def image_url(self, rel: str) -> str:
        return f"{self.site.boot_url}/images/{quote(rel)}"

    # -- internals -----------------------------------------------------------------

    def _templates(self, name: str) -> tuple | None:
        """The up-to-date Template objects a render of `name` uses (itself and what it extends,
        includes or imports), or None when its output may not be reused: a template name that is
        computed at render time, `random`/`lipsum`, or anything that fails (the render reports it).
        """
        used, todo, seen = [], [name], set()
        try:
            while todo:
                current = todo.pop()
                if current in seen:
                    continue
                seen.add(current)
                template = self.env.get_template(current)  # reloads it if the file changed
                known = self._deps.get(current)
                if known is None or known[0] is not template:
                    known = (template, _references(self.env, current))
                    self._deps[current] = known
                if known[1] is None:
                    return None
                used.append(template)
                todo.extend(known[1])
        except Exception:  # noqa: BLE001 - the render that follows reports the real error
            return None
        return tuple(used)

    def _render(self, name: str, ctx: dict) -> Script:
        try:
            return Script(self.env.get_template(name).render(ctx), True)
        except jinja2.TemplateNotFound as exc:
            reason = f"template {exc.name} not found in {self.site.templates}"
        except jinja2.TemplateError as exc:
            reason = f"template error in {name}: {exc}"
        except OSError as exc:
            reason = f"cannot read template {name}: {exc.strerror}"
        if name == "unknown.ipxe.j2":
            text = FALLBACK.format(reason=ipxe_safe(reason), retry=RETRY_S, boot_url=self.site.boot_url)
            return Script(text, False, reason)
        return Script("", False, reason)


def _is_file(path: str) -> bool:
    """Path.is_file() without pathlib's per-call objects (the boot endpoint calls it per request)."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def _references(env: jinja2.Environment, name: str) -> tuple[str, ...] | None:
    """Templates that `name` pulls in, or None if its output cannot be reused (see _templates)."""
    source = env.loader.get_source(env, name)[0]
    ast = env.parse(source)
    refs = list(jinja2.meta.find_referenced_templates(ast))
    if None in refs:
        return None
    if any(f.name == "random" for f in ast.find_all(jnodes.Filter)) or any(
            n.name == "lipsum" for n in ast.find_all(jnodes.Name)):
        return None
    return tuple(refs)

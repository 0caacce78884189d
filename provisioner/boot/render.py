"""Renders iPXE scripts from the admin's Jinja2 templates (pxe-templates/).

Shared by the boot endpoint and `provisioner render`, so what the CLI prints is exactly what a
node gets. Rendering never raises to the caller: a broken template or a missing image file gives
the `unknown` script with the reason, and if even that template is broken, a built-in one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import quote

import jinja2

from provisioner.config import Image, Node, Site
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

    # -- public --------------------------------------------------------------------

    def stage1(self) -> Script:
        return self._render("boot.ipxe.j2", {"boot_url": self.site.boot_url, "retry_s": RETRY_S})

    def unknown(self, reason: str, mac: str | None = None) -> Script:
        ctx = {"reason": ipxe_safe(reason), "mac": ipxe_safe(mac or "", 40) or None,
               "boot_url": self.site.boot_url, "retry_s": RETRY_S}
        script = self._render("unknown.ipxe.j2", ctx)
        return Script(script.text, False, reason if script.ok else script.reason)

    def node(self, node: Node, role: str, mac: str | None = None) -> Script:
        image = self.site.images[role]
        missing = [f for f in image.files() if not (self.site.image_root / f).is_file()]
        if missing:
            return self.unknown(f"node {node.name}: image {role} version {image.version} is missing "
                                f"{', '.join(missing)} under the image root", mac)
        template = node.template or image.template or f"{role}.ipxe.j2"
        script = self._render(template, self.context(node, role, image, mac))
        if not script.ok:
            return self.unknown(f"node {node.name}: {script.reason}", mac)
        return script

    def context(self, node: Node, role: str, image: Image, mac: str | None) -> dict:
        base = self.site.boot_url
        token = node_token(self.secret, node.name)
        callback = f"{base}/api/v1/nodes/{quote(node.name)}/booted"
        urls = {
            "kernel_url": self.image_url(image.kernel),
            "initrd_urls": [self.image_url(p) for p in image.initrds],
            "rootfs_url": self.image_url(image.rootfs) if image.rootfs else None,
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

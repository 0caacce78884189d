"""Renders iPXE scripts from the admin's Jinja2 templates (the site's `templates` folder; by
default the shipped pxe-templates/: model.DEFAULT_TEMPLATES).

Shared by the boot endpoint and `provisioner render`, so what the CLI prints is exactly what a
node gets. What to boot comes from a boot plan (provisioner/boot/plan.py); this module only
renders it. Rendering never raises to the caller: no plan (missing image files, nothing
published) or a broken template gives the `unknown` script with the reason, and if even that
template is broken, a built-in one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import jinja2
import jinja2.meta
from jinja2 import nodes as jnodes

from provisioner.boot.plan import BootPlan, NoBoot
from provisioner.model import Site

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
    def __init__(self, site: Site):
        self.site = site
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

    # -- public --------------------------------------------------------------------

    def stage1(self) -> Script:
        return self._render("boot.ipxe.j2", {"boot_url": self.site.boot_url, "retry_s": RETRY_S})

    def unknown(self, reason: str, mac: str | None = None) -> Script:
        ctx = {"reason": ipxe_safe(reason), "mac": ipxe_safe(mac or "", 40) or None,
               "boot_url": self.site.boot_url, "retry_s": RETRY_S}
        script = self._render("unknown.ipxe.j2", ctx)
        return Script(script.text, False, reason if script.ok else script.reason)

    def node(self, plan: BootPlan | NoBoot, mac: str | None = None) -> Script:
        """The script for a node's boot plan (provisioner.boot.plan): its role template, or the
        unknown script with the reason when it has no plan or the template fails."""
        if not plan.ok:
            return self.unknown(plan.reason, mac)
        node = self.site.nodes[plan.node]
        key = (plan.node, plan.role, mac or node.macs[0], plan.version, plan.template, plan.token)
        used = self._templates(plan.template)  # before rendering: a change meanwhile is caught next time
        cached = self._scripts.get(key)
        if cached is not None and used is not None and cached[0] == used:
            return cached[1]
        script = self._render(plan.template, self.context(plan, mac))
        if not script.ok:
            return self.unknown(f"node {node.name}: {script.reason}", mac)
        if used is not None:
            if len(self._scripts) >= self._max_scripts:
                self._scripts.clear()
            self._scripts[key] = (used, script)
        return script

    def context(self, plan: BootPlan, mac: str | None) -> dict:
        """The role template's variables (pxe-templates/README.md)."""
        node = self.site.nodes[plan.node]
        return {
            "node": node,
            "role": plan.role,
            "image": {"version": plan.version, "cmdline": plan.cmdline, "role": plan.role,
                      "kernel_url": plan.kernel_url, "initrd_urls": list(plan.initrd_urls),
                      "rootfs_url": plan.rootfs_url, "overlay_url": plan.overlay_url, "name": plan.image},
            "kernel_args": plan.args,
            "callback_url": plan.callback_url,
            "token": plan.token,
            "boot_url": self.site.boot_url,
            "mac": mac or node.macs[0],
            "retry_s": RETRY_S,
        }

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

"""What the boot endpoint does, without HTTP: each method takes plain values (the request's
parameters and source address) and returns a named result; app.py maps routes onto them.

Compute nodes are the clients, so no method answers a boot path with an error: an unknown MAC,
missing image files, a broken template or an unreadable store give the waiting script with the
reason. Refusals are recorded as events (at most once a minute per cause); the store decides
(desired role), this only looks things up and renders.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from provisioner import ROLES
from provisioner.boot import overlay
from provisioner.boot.boots import PRIVILEGED_PORTS, Boots
from provisioner.boot.plan import BootPlan, BootPlanner, NoBoot
from provisioner.boot.render import Renderer, Script
from provisioner.model import Site, normalize_mac
from provisioner.errors import ProvisionerError
from provisioner.store import Store, open_store
from provisioner.tokens import load_or_create_secret

log = logging.getLogger("provisioner.boot")

ACTOR = "boot-endpoint"
MAX_MAC_PARAM = 64
EVENT_EVERY_S = 60.0  # the same unknown MAC booting in a loop is recorded once a minute, not 30 times
RETRY_AFTER_S = 5
CALLBACK_EVERY_S = 2.0  # accepted boot callbacks per node and worker: at most one in this long (a real boot takes longer)


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class NodeScript:
    """The answer to `GET /ipxe?mac=`: always a script (HTTP 200)."""

    script: Script
    node: str | None = None  # whose MAC it was (None: unknown or malformed)
    plan: BootPlan | NoBoot | None = None  # None: no plan was made (unknown MAC, store unavailable)
    refused: str | None = None  # why it is the waiting script; None: the node's boot script
    outcome: str = "script"  # for /metrics: script, bad_mac, unknown_mac, store_unavailable, not_bootable


@dataclass(frozen=True)
class Reply:
    """A JSON answer (the callback, refusals of the overlay, health)."""

    status: int
    body: dict[str, Any]
    retry_after: int | None = None  # seconds, with 429: ask again then

    @classmethod
    def error(cls, status: int, message: str) -> Reply:
        return cls(status, {"ok": False, "error": message})


# 429 + Retry-After, not 503: the node's init retries, and no compute node sees a 5xx.
STORE_BUSY = Reply(429, {"ok": False, "error": "state store busy; retry"}, retry_after=RETRY_AFTER_S)


def same_address(source: str | None, ip: str | None) -> bool:
    """The request's source is the node's address. Compared as addresses, not strings: a server
    listening on [::] sees an IPv4 node as ::ffff:a.b.c.d."""
    try:
        a, b = ipaddress.ip_address((source or "").split("%")[0]), ipaddress.ip_address(ip or "")
    except ValueError:
        return False
    a = a.ipv4_mapped or a if a.version == 6 else a
    b = b.ipv4_mapped or b if b.version == 6 else b
    return a == b


@dataclass(frozen=True)
class OverlayArchive:
    """The node's own overlay initrd (gzip-compressed cpio)."""

    data: bytes = field(repr=False)
    image: str
    version: str


# --------------------------------------------------------------------------- the service


class EventThrottle:
    """Keeps a boot loop of an unknown machine from flooding the event log."""

    def __init__(self, every_s: float, max_keys: int = 10_000):
        self.every_s = every_s
        self.max_keys = max_keys
        self.last: dict[tuple, float] = {}
        self.lock = threading.Lock()

    def allow(self, key: tuple) -> bool:
        now = time.monotonic()
        with self.lock:
            if len(self.last) > self.max_keys:
                self.last.clear()
            if now - self.last.get(key, -1e9) < self.every_s:
                return False
            self.last[key] = now
            return True


class BootService:
    def __init__(self, site: Site, store: Store | None = None):
        self.site = site
        self.store = store or open_store(site)
        self.store.seed((n.name, n.default_role) for n in site.nodes.values())
        self.secret = load_or_create_secret(site.secret_file)
        self.renderer = Renderer(site)
        self.boots = Boots(self.secret, self.store, site.boot_window_s)
        self.planner = BootPlanner(site, self.secret, self.store, tokens=self.boots.token)
        self.callbacks = EventThrottle(CALLBACK_EVERY_S)
        self.by_mac = site.node_by_mac()
        self.throttle = EventThrottle(EVENT_EVERY_S)
        self._stage1 = self.renderer.stage1()

    # -- the boot paths: always a script ------------------------------------------------

    def stage1(self) -> Script:
        """`GET /boot.ipxe`: rendered once; rendered again per request while its template fails."""
        return self._stage1 if self._stage1.ok else self.renderer.stage1()

    def node_script(self, raw_mac: str, source: str | None) -> NodeScript:
        """`GET /ipxe?mac=`: the script of the node with that MAC, for its boot plan."""
        raw = raw_mac[:MAX_MAC_PARAM]
        mac = normalize_mac(raw)
        if mac is None:
            reason = "no MAC given" if not raw else "malformed MAC address"
            self.record("boot-refused", None, f"{reason}: {raw!r}", ("bad-mac", source), source, mac=raw)
            return NodeScript(self.renderer.unknown(reason, raw), refused=reason, outcome="bad_mac")
        node = self.by_mac.get(mac)
        if node is None:
            self.record("boot-refused", None, f"unknown MAC {mac}: not in the site config", ("unknown", mac), source,
                        mac=mac)
            return NodeScript(self.renderer.unknown(f"unknown MAC {mac}: add it to the site config", mac),
                              refused=f"unknown MAC {mac}", outcome="unknown_mac")
        try:
            plan = self.planner.plan(node)
        except ProvisionerError as exc:
            # Without the store we cannot know the desired role; guessing could boot the wrong
            # image on a node that is mid-switch, so the node waits and asks again.
            log.error("store unavailable for %s: %s", node.name, exc)
            why = f"node {node.name}: state store unavailable"
            return NodeScript(self.renderer.unknown(why, mac), node.name, refused=why, outcome="store_unavailable")
        script = self.renderer.node(plan, mac)
        if not script.ok:
            why = script.reason or "cannot render"
            self.record("boot-refused", node.name, why, ("render", node.name), source, mac=mac)
            return NodeScript(script, node.name, plan, refused=why, outcome="not_bootable")
        return NodeScript(script, node.name, plan)

    def waiting(self, reason: str) -> Script:
        """The waiting script, for answers the service did not make (bad requests, bugs)."""
        return self.renderer.unknown(reason)

    # -- the node's own requests ---------------------------------------------------------

    def booted(self, name: str, fields: Mapping[str, Any], token: str | None, source: str | None) -> Reply:
        """`POST /api/v1/nodes/NAME/booted`: the booted image calls back (role, version, token)."""
        node = self.site.nodes.get(name)
        if node is None:
            return Reply.error(404, f"unknown node {name}")
        if self.site.check_callback_source and node.ip and not same_address(source, node.ip):
            self.record("callback-refused", name, f"boot callback from {source}, node is {node.ip}",
                        ("cb-src", name, source), source)
            return Reply.error(403, f"callback source {source} is not node {name}")
        role = fields.get("role")
        if role not in ROLES:
            return Reply.error(400, f"role must be one of {', '.join(ROLES)}")
        version = fields.get("version")
        if version is not None and (not isinstance(version, str) or len(version) > 128):
            return Reply.error(400, "version must be a short string")
        try:
            row, good = self.boots.current(name, token)
            if good and not self.callbacks.allow((name,)):
                return Reply(429, {"ok": False, "error": f"node {name} called back less than {CALLBACK_EVERY_S:.0f} s "
                                                         "ago; retry"}, retry_after=int(CALLBACK_EVERY_S))
            if not good or not self.store.record_booted(name, role, version, actor=f"node:{name}", source=source,
                                                        spend=row["nonce"]):
                self.record("callback-refused", name, "boot callback with a wrong or spent token", ("cb-token", name),
                            source)
                return Reply.error(403, "token is not this node's current boot token (each is spent by its callback)")
            desired = self.store.desired_role(name)
        except ProvisionerError as exc:
            log.error("cannot record boot of %s: %s", name, exc)
            return STORE_BUSY
        return Reply(200, {"ok": True, "node": name, "booted_role": role, "desired_role": desired})

    def overlay(self, name: str, *, token: str | None, raw_mac: str, image: str | None, version: str | None,
                source: str | None) -> OverlayArchive | Reply:
        """`GET /overlay/NAME.cpio.gz`: the node's own overlay initrd. Token (purpose "overlay"),
        MAC and source address must all be this node's; a refusal carries nothing of the
        overlay, and nothing secret (the token included) goes into the answer, the log or the
        event."""
        node = self.site.nodes.get(name)
        if node is None:
            return Reply.error(404, f"unknown node {name}")
        mac = normalize_mac(raw_mac[:MAX_MAC_PARAM])
        why = None
        if not overlay.check(self.secret, name, token):
            why = "wrong or no overlay token"
        elif mac is None or mac not in node.macs:
            why = f"MAC {mac or '(missing or malformed)'} is not one of this node's"
        elif self.site.check_callback_source and node.ip and not same_address(source, node.ip):
            why = f"source {source} is not the node's address {node.ip}"
        if why:
            self.record("overlay-refused", name, f"overlay of {name} refused: {why}", ("ov-refused", name, why),
                        source, mac=mac)
            return Reply.error(403, f"overlay of {name} refused: {why}")
        try:
            # The version its script named: a newer one may have been published since.
            plan = self.planner.plan(node, version=version or None, check_files=False)
        except ProvisionerError as exc:
            log.error("store unavailable for %s: %s", name, exc)
            return STORE_BUSY
        if plan.image is None or (image is not None and image != plan.image):
            # Only the overlay of the image the node is to boot now (least privilege).
            return Reply.error(409, f"node {name} now boots role {plan.role}, not image {image or '?'}; "
                                    "ask for its script again")
        if not plan.ok:
            return Reply.error(404, plan.reason)
        pub = plan.published
        if not pub.overlay:
            return Reply.error(404, f"node {name}: image {plan.image} has no overlay")
        try:
            data = overlay.build(self.site, node, plan.role, pub)
        except ProvisionerError as exc:
            # The reason names the template or the site setting, never a secret's value.
            self.record("overlay-failed", name, f"overlay of {name} cannot be built: {exc}", ("ov-failed", name),
                        source)
            return Reply.error(409, f"overlay of {name} cannot be built; see `provisioner history {name}`")
        self.record("overlay-served", name, f"overlay of {name} ({plan.image} {pub.version}) served",
                    ("ov-served", name, pub.version), source, image=plan.image, version=pub.version, mac=mac)
        return OverlayArchive(data, plan.image, pub.version)

    def secrets(self, name: str, *, token: str | None, source: str | None, source_port: int | None,
                version: str | None = None) -> OverlayArchive | Reply:
        """`GET /overlay/NAME/secrets`: the overlay's secret part, to the image's /init only: the
        node's address, a privileged source port (site.secrets_privileged_port), this boot's token,
        a boot window, once (provisioner/boot/boots.py). Refusals say why, never with a secret."""
        node = self.site.nodes.get(name)
        if node is None:
            return Reply.error(404, f"unknown node {name}")
        why = cause = None
        if self.site.check_callback_source and node.ip and not same_address(source, node.ip):
            why, cause = f"source {source} is not the node's address {node.ip}", "address"
        elif self.site.secrets_privileged_port and not (source_port is not None and 0 < source_port < PRIVILEGED_PORTS):
            why, cause = (f"source port {source_port} is not privileged (below {PRIVILEGED_PORTS}): only root on the "
                          "node may ask" if source_port is not None else
                          "source port unknown (behind nginx: its site must come from `provisioner nginx-config`, "
                          "which passes it)"), "port"
        try:
            grant = None
            if why is None:
                grant = self.boots.may_have_secrets(name, token)
                why = cause = None if grant.ok else grant.why
            if why:
                # keyed by the cause, not the text: a loop of requests from changing ports is one event a minute
                self.record("secrets-refused", name, f"secrets of {name} refused: {why}", ("sec-refused", name, cause),
                            source)
                return Reply.error(403, f"secrets of {name} refused: {why}")
            plan = self.planner.plan(node, version=version or None, check_files=False)
        except ProvisionerError as exc:
            log.error("store unavailable for %s: %s", name, exc)
            return STORE_BUSY
        if not plan.ok or plan.published is None:
            return Reply.error(409, f"node {name} boots no built image now; ask for its script again")
        pub = plan.published
        try:
            data = overlay.build(self.site, node, plan.role, pub, secret=True)
        except ProvisionerError as exc:
            self.record("overlay-failed", name, f"secrets of {name} cannot be built: {exc}", ("ov-failed", name), source)
            return Reply.error(409, f"secrets of {name} cannot be built; see `provisioner history {name}`")
        try:
            if not self.boots.served(name, grant):
                return Reply.error(403, f"secrets of {name} refused: served once in this boot already")
        except ProvisionerError as exc:
            log.error("store unavailable for %s: %s", name, exc)
            return STORE_BUSY
        self.record("secrets-served", name, f"secrets of {name} ({plan.image} {pub.version}) served",
                    ("sec-served", name, grant.window), source, image=plan.image, version=pub.version)
        return OverlayArchive(data, plan.image, pub.version)

    # -- the rest --------------------------------------------------------------------

    def health(self) -> Reply:
        """`GET /healthz`: 200 either way (a monitor reads `ok`)."""
        try:
            version = self.store.schema_version()
        except ProvisionerError as exc:
            return Reply(200, {"ok": False, "store": str(exc)})
        return Reply(200, {"ok": True, "site": self.site.name, "nodes": len(self.site.nodes), "schema": version})

    def record(self, kind: str, node: str | None, message: str, key: tuple, source: str | None, **data) -> None:
        """An event, at most once per EVENT_EVERY_S per key. Best effort: a store hiccup must not
        turn a boot answer into an error."""
        if not self.throttle.allow(key):
            return
        try:
            self.store.add_event(node, ACTOR, kind, message, {"source": source, **data})
        except ProvisionerError as exc:
            log.warning("could not record event %s: %s", kind, exc)

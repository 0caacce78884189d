"""The boot endpoint: a Flask app factory.

Compute nodes are its clients, so it never answers them with a 5xx: anything that goes wrong on
the boot paths becomes a `200` iPXE script that says why, waits, and asks again. The app only
looks things up and renders; decisions live in the store (desired role) and the balancer.
"""

from __future__ import annotations

import logging
import threading
import time
from urllib.parse import parse_qsl

from flask import Flask, Response, jsonify, request, send_from_directory
from werkzeug.exceptions import HTTPException

from provisioner import ROLES
from provisioner.boot import overlay
from provisioner.boot.plan import BootPlanner
from provisioner.boot.render import Renderer, Script
from provisioner.config import Site, normalize_mac
from provisioner.errors import ProvisionerError
from provisioner.store import Store
from provisioner.tokens import check_token, load_or_create_secret

log = logging.getLogger("provisioner.boot")

ACTOR = "boot-endpoint"
IPXE_MIMETYPE = "text/plain"
IPXE_CONTENT_TYPE = "text/plain; charset=utf-8"  # what Flask sends for IPXE_MIMETYPE
BOOT_PATHS = ("/boot.ipxe", "/ipxe")
MAX_MAC_PARAM = 64
EVENT_EVERY_S = 60.0  # the same unknown MAC booting in a loop is recorded once a minute, not 30 times


class _EventThrottle:
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


def create_app(site: Site, store: Store | None = None) -> Flask:
    app = Flask("provisioner.boot")
    app.config["MAX_CONTENT_LENGTH"] = 64 * 1024  # callbacks are tiny; refuse floods early
    store = store or Store(site.store)
    store.seed((n.name, n.default_role) for n in site.nodes.values())
    secret = load_or_create_secret(site.secret_file)
    renderer = Renderer(site)
    planner = BootPlanner(site, secret, store)
    by_mac = site.node_by_mac()
    throttle = _EventThrottle(EVENT_EVERY_S)
    stage1 = renderer.stage1()

    def ipxe(script: Script) -> Response:
        resp = Response(script.text, status=200, mimetype=IPXE_MIMETYPE)
        resp.headers["Cache-Control"] = "no-store"  # the answer changes when the role does
        return resp

    def record(kind: str, node: str | None, message: str, key: tuple, **data) -> None:
        """Best effort: a store hiccup must not turn a boot answer into an error."""
        if not throttle.allow(key):
            return
        try:
            store.add_event(node, ACTOR, kind, message, {"source": request.remote_addr, **data})
        except ProvisionerError as exc:
            log.warning("could not record event %s: %s", kind, exc)

    def answer(raw: str, source: str | None) -> tuple[Script, tuple | None]:
        """The /ipxe script for a `mac` parameter, and what to note about it: None when a known
        node gets its script, else (kind, node, message, throttle key, data) for record(), or
        kind "store-error" for the log."""
        if len(raw) > MAX_MAC_PARAM:
            raw = raw[:MAX_MAC_PARAM]
        mac = normalize_mac(raw)
        if mac is None:
            reason = "no MAC given" if not raw else "malformed MAC address"
            return renderer.unknown(reason, raw), ("boot-refused", None, f"{reason}: {raw!r}", ("bad-mac", source),
                                                   {"mac": raw})
        node = by_mac.get(mac)
        if node is None:
            return (renderer.unknown(f"unknown MAC {mac}: add it to the site config", mac),
                    ("boot-refused", None, f"unknown MAC {mac}: not in the site config", ("unknown", mac), {"mac": mac}))
        try:
            plan = planner.plan(node)
        except ProvisionerError as exc:
            # Without the store we cannot know the desired role; guessing could boot the wrong
            # image on a node that is mid-switch, so the node waits and asks again.
            return (renderer.unknown(f"node {node.name}: state store unavailable", mac),
                    ("store-error", node.name, f"store unavailable for {node.name}: {exc}", None, {}))
        script = renderer.node(plan, mac)
        if not script.ok:
            return script, ("boot-refused", node.name, script.reason or "cannot render", ("render", node.name), {"mac": mac})
        return script, None

    @app.get("/boot.ipxe")
    def boot_stage1():
        return ipxe(stage1 if stage1.ok else renderer.stage1())

    @app.get("/ipxe")
    def node_script():
        script, note = answer(request.args.get("mac", ""), request.remote_addr)
        if note is not None:
            kind, node, message, key, data = note
            if kind == "store-error":
                log.error("%s", message)
            else:
                record(kind, node, message, key, **data)
        return ipxe(script)

    @app.post("/api/v1/nodes/<name>/booted")
    def booted(name: str):
        node = site.nodes.get(name)
        if node is None:
            return _error(404, f"unknown node {name}")
        body = request.get_json(silent=True) if request.is_json else None
        fields = body if isinstance(body, dict) else request.form
        token = fields.get("token") or request.args.get("token") or _bearer()
        if not check_token(secret, name, token):
            record("callback-refused", name, "boot callback with a wrong token", ("cb-token", name))
            return _error(403, "token does not match this node")
        if site.check_callback_source and node.ip and request.remote_addr != node.ip:
            record("callback-refused", name, f"boot callback from {request.remote_addr}, node is {node.ip}",
                   ("cb-src", name, request.remote_addr))
            return _error(403, f"callback source {request.remote_addr} is not node {name}")
        role = fields.get("role")
        if role not in ROLES:
            return _error(400, f"role must be one of {', '.join(ROLES)}")
        version = fields.get("version")
        if version is not None and (not isinstance(version, str) or len(version) > 128):
            return _error(400, "version must be a short string")
        try:
            store.record_booted(name, role, version, actor=f"node:{name}", source=request.remote_addr)
            desired = store.desired_role(name)
        except ProvisionerError as exc:
            log.error("cannot record boot of %s: %s", name, exc)
            # 429 + Retry-After, not 503: the node's init retries, and no compute node sees a 5xx.
            resp = _error(429, "state store busy; retry")
            resp.headers["Retry-After"] = "5"
            return resp
        return jsonify({"ok": True, "node": name, "booted_role": role, "desired_role": desired})

    @app.get("/overlay/<name>.cpio.gz")
    def node_overlay(name: str):
        """The node's own overlay initrd. Token (purpose "overlay"), MAC and source address must
        all be this node's; a refusal carries nothing of the overlay, and nothing secret (the
        token included) goes into the answer, the log or the event."""
        node = site.nodes.get(name)
        if node is None:
            return _error(404, f"unknown node {name}")
        mac = normalize_mac(request.args.get("mac", "")[:MAX_MAC_PARAM])
        why = None
        if not overlay.check(secret, name, request.args.get("token")):
            why = "wrong or no overlay token"
        elif mac is None or mac not in node.macs:
            why = f"MAC {mac or '(missing or malformed)'} is not one of this node's"
        elif site.check_callback_source and node.ip and request.remote_addr != node.ip:
            why = f"source {request.remote_addr} is not the node's address {node.ip}"
        if why:
            record("overlay-refused", name, f"overlay of {name} refused: {why}", ("ov-refused", name, why), mac=mac)
            return _error(403, f"overlay of {name} refused: {why}")
        try:
            # The version its script named (a newer one may be published meanwhile).
            plan = planner.plan(node, version=request.args.get("version") or None, check_files=False)
        except ProvisionerError as exc:
            log.error("store unavailable for %s: %s", name, exc)
            resp = _error(429, "state store busy; retry")
            resp.headers["Retry-After"] = "5"
            return resp
        wanted = request.args.get("image")
        if plan.image is None or (wanted is not None and wanted != plan.image):
            # Only the overlay of the image the node is to boot now (least privilege).
            return _error(409, f"node {name} now boots role {plan.role}, not image {wanted or '?'}; "
                               "ask for its script again")
        if not plan.ok:
            return _error(404, plan.reason)
        pub = plan.published
        if not pub.overlay:
            return _error(404, f"node {name}: image {plan.image} has no overlay")
        try:
            data = overlay.build(site, node, plan.role, pub)
        except ProvisionerError as exc:
            # The reason names the template or the site setting, never a secret's value.
            record("overlay-failed", name, f"overlay of {name} cannot be built: {exc}", ("ov-failed", name))
            return _error(409, f"overlay of {name} cannot be built; see `provisioner history {name}`")
        record("overlay-served", name, f"overlay of {name} ({plan.image} {pub.version}) served",
               ("ov-served", name, pub.version), image=plan.image, version=pub.version, mac=mac)
        resp = Response(data, status=200, mimetype="application/gzip")
        resp.headers["Cache-Control"] = "no-store"
        return resp

    @app.route("/images/<path:subpath>", methods=["GET", "HEAD"])
    def images(subpath: str):
        # send_from_directory refuses paths that leave image_root (safe_join) and does
        # Range / If-Modified-Since / ETag itself.
        return send_from_directory(site.image_root, subpath, conditional=True, max_age=0)

    @app.get("/healthz")
    def healthz():
        try:
            version = store.schema_version()
        except ProvisionerError as exc:
            return jsonify({"ok": False, "store": str(exc)}), 200
        return jsonify({"ok": True, "site": site.name, "nodes": len(site.nodes), "schema": version})

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        if request.path in BOOT_PATHS:
            return ipxe(renderer.unknown(f"bad request ({exc.code})"))
        return _error(exc.code or 400, exc.description or exc.name)

    @app.errorhandler(Exception)
    def unexpected(exc: Exception):
        # Last line of defence: log the bug, never hand a node a 5xx.
        log.exception("unexpected error on %s", request.path)
        if request.path in BOOT_PATHS or request.path.startswith("/images/"):
            return ipxe(renderer.unknown("internal error in the boot endpoint"))
        return _error(400, "request could not be handled; see the boot server log")

    flask_wsgi = app.wsgi_app

    def wsgi_app(environ, start_response):
        # Boot-storm hot path: a known node's GET /ipxe (and stage 1) is answered without Flask's
        # request and response objects, which cost a third of the time per request. Anything
        # else, every refusal and any error included, goes through the Flask routes above.
        path = environ.get("PATH_INFO")
        if environ.get("REQUEST_METHOD") == "GET" and path in BOOT_PATHS:
            try:
                if path == "/ipxe":
                    script, note = answer(_mac_param(environ), environ.get("REMOTE_ADDR"))
                else:
                    script, note = stage1, (None if stage1.ok else ())
            except Exception:  # noqa: BLE001 - the Flask route runs it again, logs it and answers
                note = ()
            if note is None:
                body = script.text.encode()
                start_response("200 OK", [("Content-Type", IPXE_CONTENT_TYPE), ("Content-Length", str(len(body))),
                                          ("Cache-Control", "no-store")])
                return [body]
        return flask_wsgi(environ, start_response)

    app.wsgi_app = wsgi_app  # Flask's documented place for WSGI middleware
    return app


def _mac_param(environ) -> str:
    """`request.args.get("mac", "")`, parsed as Werkzeug does, without building the request."""
    query = environ.get("QUERY_STRING", "").encode("latin1").decode()
    for key, value in parse_qsl(query, keep_blank_values=True, errors="werkzeug.url_quote"):
        if key == "mac":
            return value
    return ""


def _bearer() -> str | None:
    auth = request.headers.get("Authorization", "")
    return auth[7:].strip() if auth.startswith("Bearer ") else None


def _error(code: int, message: str) -> Response:
    resp = jsonify({"ok": False, "error": message})
    resp.status_code = code
    return resp



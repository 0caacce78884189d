"""The boot endpoint's HTTP side: a route table over BootService (provisioner/boot/service.py),
which does the work and returns named results; this module only turns requests into its
arguments and its results into responses.

Compute nodes are its clients, so it never answers them with a 5xx: anything that goes wrong on
the boot paths becomes a `200` iPXE script that says why, waits, and asks again.
"""

from __future__ import annotations

import base64
import logging
from urllib.parse import parse_qsl

from flask import Flask, Response, jsonify, request, send_from_directory
from werkzeug.exceptions import HTTPException

from provisioner.boot.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE, BootMetrics
from provisioner.boot.render import Script
from provisioner.boot.service import BootService, OverlayArchive, Reply
from provisioner.model import Site
from provisioner.store import Store

log = logging.getLogger("provisioner.boot")

IPXE_MIMETYPE = "text/plain"
IPXE_CONTENT_TYPE = "text/plain; charset=utf-8"  # what Flask sends for IPXE_MIMETYPE
BOOT_PATHS = ("/boot.ipxe", "/ipxe")


def create_app(site: Site, store: Store | None = None) -> Flask:
    app = Flask("provisioner.boot")
    app.config["MAX_CONTENT_LENGTH"] = 64 * 1024  # callbacks are tiny; refuse floods early
    service = BootService(site, store)
    app.extensions["provisioner.boot"] = service
    metrics = BootMetrics(site, service.store)
    app.extensions["provisioner.metrics"] = metrics

    @app.get("/boot.ipxe")
    def boot_stage1():
        script = service.stage1()
        metrics.boot("stage1")
        return _ipxe(script)

    @app.get("/ipxe")
    def node_script():
        res = service.node_script(request.args.get("mac", ""), request.remote_addr)
        metrics.boot(res.outcome, res.plan.role if res.plan is not None else None)
        return _ipxe(res.script)

    @app.post("/api/v1/nodes/<name>/booted")
    def booted(name: str):
        body = request.get_json(silent=True) if request.is_json else None
        fields = body if isinstance(body, dict) else request.form
        token = fields.get("token") or request.args.get("token") or _bearer()
        reply = service.booted(name, fields, token, request.remote_addr)
        metrics.callback("accepted" if reply.status == 200 else "store_busy" if reply.status == 429 else "refused")
        return _json(reply)

    @app.get("/overlay/<name>.cpio.gz")
    def node_overlay(name: str):
        args = request.args
        res = service.overlay(name, token=args.get("token"), raw_mac=args.get("mac", ""), image=args.get("image"),
                              version=args.get("version"), source=request.remote_addr)
        if isinstance(res, OverlayArchive):
            resp = Response(res.data, status=200, mimetype="application/gzip")
            resp.headers["Cache-Control"] = "no-store"
            return resp
        return _json(res)

    @app.get("/overlay/<name>/secrets")
    def node_secrets(name: str):
        # Answered base64 (text): the image's /init asks with busybox nc from a privileged port
        # and cuts the headers off with sed.
        version = request.args.get("version")
        res = service.secrets(name, token=request.args.get("token") or _bearer(), source=request.remote_addr,
                              source_port=_port(request.environ.get("REMOTE_PORT")),
                              version=version if version and len(version) <= 128 else None)
        if isinstance(res, OverlayArchive):
            resp = Response(base64.b64encode(res.data) + b"\n", status=200, mimetype="text/plain")
            resp.headers["Cache-Control"] = "no-store"
            return resp
        return _json(res)

    @app.route("/images/<path:subpath>", methods=["GET", "HEAD"])
    def images(subpath: str):
        # send_from_directory refuses paths that leave image_root (safe_join) and does
        # Range / If-Modified-Since / ETag itself.
        return send_from_directory(site.image_root, subpath, conditional=True, max_age=0)

    @app.get("/healthz")
    def healthz():
        return _json(service.health())

    @app.get("/metrics")
    def prometheus_metrics():
        return Response(metrics.render(), status=200, content_type=METRICS_CONTENT_TYPE)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        if request.path in BOOT_PATHS:
            metrics.boot("bad_request")
            return _ipxe(service.waiting(f"bad request ({exc.code})"))
        return _json(Reply.error(exc.code or 400, exc.description or exc.name))

    @app.errorhandler(Exception)
    def unexpected(exc: Exception):
        # Last line of defence: log the bug, never hand a node a 5xx.
        log.exception("unexpected error on %s", request.path)
        metrics.unexpected()
        if request.path in BOOT_PATHS:
            metrics.boot("error")
        if request.path in BOOT_PATHS or request.path.startswith("/images/"):
            return _ipxe(service.waiting("internal error in the boot endpoint"))
        return _json(Reply.error(400, "request could not be handled; see the boot server log"))

    app.wsgi_app = _fast_boot_paths(service, metrics, app.wsgi_app)  # Flask's documented place for WSGI middleware
    return app


def _fast_boot_paths(service: BootService, metrics: BootMetrics, flask_wsgi):
    """Boot-storm hot path: GET /ipxe and GET /boot.ipxe are answered without Flask's request and
    response objects, which cost a third of the time per request. An exception goes on to the
    Flask routes above, which run it again, log it and answer the waiting script."""

    def wsgi_app(environ, start_response):
        path = environ.get("PATH_INFO")
        if environ.get("REQUEST_METHOD") == "GET" and path in BOOT_PATHS:
            try:
                if path == "/ipxe":
                    res = service.node_script(_mac_param(environ), environ.get("REMOTE_ADDR"))
                    script = res.script
                    metrics.boot(res.outcome, res.plan.role if res.plan is not None else None)
                else:
                    script = service.stage1()
                    metrics.boot("stage1")
            except Exception:  # noqa: BLE001 - the Flask route runs it again, logs it, counts and answers
                return flask_wsgi(environ, start_response)
            body = script.text.encode()
            start_response("200 OK", [("Content-Type", IPXE_CONTENT_TYPE), ("Content-Length", str(len(body))),
                                      ("Cache-Control", "no-store")])
            return [body]
        return flask_wsgi(environ, start_response)

    return wsgi_app


def _ipxe(script: Script) -> Response:
    resp = Response(script.text, status=200, mimetype=IPXE_MIMETYPE)
    resp.headers["Cache-Control"] = "no-store"  # the answer changes when the role does
    return resp


def _json(reply: Reply) -> Response:
    resp = jsonify(reply.body)
    resp.status_code = reply.status
    if reply.retry_after is not None:
        resp.headers["Retry-After"] = str(reply.retry_after)
    return resp


def _mac_param(environ) -> str:
    """`request.args.get("mac", "")`, parsed as Werkzeug does, without building the request."""
    query = environ.get("QUERY_STRING", "").encode("latin1").decode()
    for key, value in parse_qsl(query, keep_blank_values=True, errors="werkzeug.url_quote"):
        if key == "mac":
            return value
    return ""


def _port(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _bearer() -> str | None:
    auth = request.headers.get("Authorization", "")
    return auth[7:].strip() if auth.startswith("Bearer ") else None

"""`provisioner serve`: the boot endpoint under gunicorn (not Flask's development server).

Threaded workers (gthread) keep HTTP keep-alive working for iPXE and for load balancers, and
several processes use both cores; the store is opened per process and per thread. `/metrics`
counts requests in every worker: prometheus_client's multiprocess mode, in a new private folder
made here before the app is built and removed when the server stops (provisioner/boot/metrics.py).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import re

from gunicorn import glogging
from gunicorn.app.base import BaseApplication

from provisioner.boot import metrics
from provisioner.boot.app import create_app
from provisioner.config import parse_listen
from provisioner.model import Site


class _Gunicorn(BaseApplication):
    def __init__(self, app, options: dict):
        self.application = app
        self.options = options
        super().__init__()

    def load_config(self):
        for key, value in self.options.items():
            self.cfg.set(key, value)

    def load(self):
        return self.application


_QUERY = re.compile(r"\?[^\s'\"]*|token=[^\s'\"]*", re.I)


class _HideQueries(logging.Filter):
    """gunicorn's error log quotes a request line it cannot parse, query string and all: overlay
    and boot URLs carry tokens, so the query goes."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "?" in message or "token" in message.lower():
            record.msg, record.args = _QUERY.sub("?(query hidden)", message), ()
        return True


class QuietLogger(glogging.Logger):
    def setup(self, cfg):
        super().setup(cfg)
        self.error_log.addFilter(_HideQueries())
        self.access_log.addFilter(_HideQueries())


def behind_nginx(wsgi_app):
    """The client as nginx saw it: its address (X-Forwarded-For, werkzeug's ProxyFix) and its
    source port (X-Provisioner-Source-Port, which the generated nginx site always sets; without
    it the port is unknown, never nginx's own)."""
    from werkzeug.middleware.proxy_fix import ProxyFix

    fixed = ProxyFix(wsgi_app, x_for=1, x_proto=0, x_host=0, x_port=0, x_prefix=0)

    def app(environ, start_response):
        environ["REMOTE_PORT"] = environ.pop("HTTP_X_PROVISIONER_SOURCE_PORT", "")
        return fixed(environ, start_response)

    return app


def default_workers() -> int:
    return max(2, multiprocessing.cpu_count())


def serve(site: Site, listen: str | None = None, workers: int | None = None, threads: int = 4,
          access_log: bool = False, behind_proxy: bool = False) -> None:
    host, port = parse_listen(listen or site.listen)
    metrics_dir = metrics.multiprocess_dir()  # before the app makes its counters
    master = os.getpid()
    bind = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        app = create_app(site)  # built before forking: config errors surface once, at start
        if behind_proxy:  # nginx in front (provisioner nginx-config): the node's address is its X-Forwarded-For
            app.wsgi_app = behind_nginx(app.wsgi_app)
    except BaseException:
        metrics.remove_dir(metrics_dir)
        raise
    try:  # the event log read once here, not by every worker at its first scrape
        app.extensions["provisioner.metrics"].store_collector.refresh()
    except Exception:  # noqa: BLE001 - /metrics must never keep the boot endpoint from starting
        pass  # each worker reads it at its first scrape instead
    options = {
        "bind": bind,
        "workers": workers or default_workers(),
        "worker_class": "gthread",
        "threads": threads,
        "keepalive": 30,
        "timeout": 60,
        "graceful_timeout": 10,
        "accesslog": "-" if access_log else None,
        # The path without the query string: /overlay/ and callback URLs carry per-node tokens.
        "access_log_format": '%(h)s "%(m)s %(U)s %(H)s" %(s)s %(b)s %(L)ss "%(a)s"',
        "errorlog": "-",
        "logger_class": QuietLogger,
        "loglevel": "info",
        "proc_name": "provisioner-boot",
        "control_socket_disable": True,  # no stray socket in root's home
        # A URL longer than this is answered 414 by gunicorn before the app sees it.
        "limit_request_line": 4094,
        "child_exit": lambda _arbiter, worker: metrics.worker_exited(metrics_dir, worker.pid),
    }
    try:
        _Gunicorn(app, options).run()
    finally:
        if os.getpid() == master:  # a worker leaves through here too (SystemExit), and must not
            metrics.remove_dir(metrics_dir)

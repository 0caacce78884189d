"""Boot scripts rendered ahead, for nginx to serve as files (`provisioner prerender`).

The boot-storm deployment (what xCAT does, so a whole rack booting at once costs the app almost nothing): nginx answers `GET /ipxe?mac=MAC` from a
folder holding one file per MAC (`aa:bb:cc:dd:ee:ff.ipxe`), serves /images/ itself (sendfile),
and passes everything else to `provisioner serve` behind it (nginx_config() writes that site).

A file exists only for a MAC whose node has a good script now; anything else (unknown or
malformed MAC, a node that cannot boot, a MAC spelled another way, the store unavailable) has
no file and goes to the app, which answers as it always does. Files are written by the same
BootPlanner and Renderer the endpoint uses, so their bytes are the endpoint's bytes, each by
atomic rename (a reader sees the old script or the new one, never half of one).

Kept current by polling: Watcher.sync() takes a cheap fingerprint of everything a script
depends on (the nodes' desired roles and image pins in the store, each built image's `current`
link and version folders, the template folder's files, the boot files the scripts name): when
files changed, every node is rendered again; when only roles or pins changed, those nodes (on
SQLite, `PRAGMA data_version` on its own connection first, so boot callbacks and events cost a
two-query read, not a pass); only files whose text changed are written. A change is
therefore served after at most one poll interval plus one pass (measured: bench/boot_storm.py,
BENCHMARKS.md), not on the very next request as from the app alone. Every FULL_EVERY_S a pass
runs regardless (a change the fingerprint cannot see, e.g. a version folder replaced in place).
"""

from __future__ import annotations

import logging
import os
import re
import sqlite3
import threading
import time
from pathlib import Path

from provisioner.boot.boots import BOOT_COLUMNS, Boots, window
from provisioner.boot.plan import BootPlanner
from provisioner.boot.render import Renderer
from provisioner.errors import OperationError, ProvisionerError
from provisioner.model import Site
from provisioner.store import open_store
from provisioner.tokens import load_or_create_secret

log = logging.getLogger("provisioner.prerender")

SUFFIX = ".ipxe"
INTERVAL_S = 0.2
FULL_EVERY_S = 30.0
MAC_FILE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}\.ipxe$")


class _Snapshot:
    """What BootPlanner reads from the store, read in bulk once per pass (three queries, not
    three per node); `boots`: node -> (phase, phase_since, power_at, boots row) for the tokens."""

    def __init__(self, roles: dict[str, str], pins: dict[tuple[str, str], str], boots: dict | None = None):
        self.roles, self.pins, self.boots = roles, pins, boots or {}

    def desired_role(self, name: str) -> str | None:
        return self.roles.get(name)

    def image_pin(self, node: str, image: str) -> str | None:
        return self.pins.get((node, image))


class Watcher:
    def __init__(self, site: Site, folder: Path, store=None):
        self.site = site
        self.folder = Path(folder)
        self.store = store or open_store(site)
        self.store.seed((n.name, n.default_role) for n in site.nodes.values())
        self.secret = load_or_create_secret(site.secret_file)
        self.boots = Boots(self.secret, self.store, site.boot_window_s)
        self.renderer = Renderer(site)
        self.written: dict[str, str] = {}  # file name -> text on disk
        self.boot_files: set[str] = set()  # absolute paths the current scripts name
        self.last_state: tuple | None = None  # (roles, pins) of the last pass
        self.last_files: tuple | None = None
        self.last_full = 0.0
        self.passes = 0
        self._db: sqlite3.Connection | None = None  # our own read connection (SQLite store)
        self._data_version: int | None = None

    # -- what the scripts depend on; read before a pass, so a change during it is seen next time --

    def store_state(self) -> tuple[dict[str, str], dict[tuple[str, str], str]]:
        """The desired roles and image pins. On SQLite: `PRAGMA data_version` first (no commit by
        anyone since the last poll: nothing to read), then two narrow queries; events and boot
        callbacks change neither. Another store: its public reads."""
        if getattr(self.store, "backend", None) == "sqlite":
            try:
                if self._db is None:
                    self._db = sqlite3.connect(self.store.path, timeout=5, isolation_level=None)
                version = self._db.execute("PRAGMA data_version").fetchone()[0]
                if version == self._data_version and self.last_state is not None:
                    return self.last_state
                nodes = self._db.execute("SELECT name, desired_role, phase, phase_since, power_at FROM nodes").fetchall()
                roles = {n[0]: n[1] for n in nodes}
                pins = {(n, i): v for n, i, v in self._db.execute("SELECT node, image, version FROM image_pins")}
                self._db.row_factory = sqlite3.Row
                rows = {r["node"]: tuple(r) for r in self._db.execute("SELECT * FROM boots")}
                self._db.row_factory = None
                self._data_version = version
                return roles, pins, {n[0]: (*n[2:], rows.get(n[0])) for n in nodes}
            except sqlite3.Error as exc:
                self._db = None
                raise OperationError(f"cannot read the store {self.store.path}: {exc}") from None
        states = self.store.nodes()
        roles = {n: st.desired_role for n, st in states.items()}
        pins = {(p["node"], p["image"]): p["version"] for p in self.store.image_pins()}
        rows = {n: tuple(r.values()) for n, r in self.store.boot_rows().items()}
        return roles, pins, {n: (st.phase, st.phase_since, st.power_at, rows.get(n)) for n, st in states.items()}

    def files_state(self) -> tuple:
        parts = []
        for root, dirs, files in os.walk(self.site.templates):
            dirs.sort()
            for f in sorted(files):
                parts.append(_stat(os.path.join(root, f)))
        root = str(self.site.image_root)
        for name in sorted({i.name for i in self.site.images.values() if i.name}):
            folder = os.path.join(root, name)
            try:
                parts.append(os.readlink(os.path.join(folder, "current")))
            except OSError:
                parts.append(None)
            parts.append(_stat(folder))
        parts.extend(_stat(p) for p in sorted(self.boot_files))
        return tuple(parts)

    # -- a pass ----------------------------------------------------------------------------

    def render(self, state: tuple | None, only: set[str] | None = None) -> dict:
        """Render the scripts of every node (or of the nodes in `only`) for each of its MACs; write
        the changed files, remove those of MACs that have no good script now. state None: the
        store could not be read, so no node has a file."""
        self.folder.mkdir(parents=True, exist_ok=True)
        wanted = dict(self.written) if only is not None else {}
        boot_files = set(self.boot_files) if only is not None else set()
        nodes = [self.site.nodes[n] for n in only if n in self.site.nodes] if only is not None \
            else list(self.site.nodes.values())
        for node in nodes:
            for mac in node.macs:
                wanted.pop(mac + SUFFIX, None)
        if state is not None:
            snapshot = _Snapshot(*state)
            planner = BootPlanner(self.site, self.secret, snapshot, tokens=lambda name: self.token(snapshot, name))
            now = time.time()
            for node in nodes:
                phase, since, power_at, row = snapshot.boots.get(node.name, (None, None, None, None))
                row = dict(zip(BOOT_COLUMNS, row)) if row else None
                if window(phase, since, power_at, (row or {}).get("granted_at"), now, self.site.boot_window_s):
                    continue  # being booted: the app answers, with this boot's own token
                plan = planner.plan(node)
                if not plan.ok:
                    continue
                boot_files.update(path for _, path in plan.files)
                for mac in node.macs:
                    script = self.renderer.node(plan, mac)
                    if script.ok:
                        wanted[mac + SUFFIX] = script.text
        written = removed = 0
        for name, text in wanted.items():
            if self.written.get(name) != text:
                _write(self.folder / name, text)
                written += 1
        stale = set(self.written) - set(wanted)
        if only is None:
            stale |= {n for n in os.listdir(self.folder) if MAC_FILE.match(n)} - set(wanted)
        for name in stale:
            try:
                os.unlink(self.folder / name)
                removed += 1
            except FileNotFoundError:
                pass
        self.written = wanted
        self.boot_files = boot_files
        self.passes += 1
        return {"scripts": len(wanted), "written": written, "removed": removed,
                "nodes": len(nodes), "full": only is None}

    def token(self, snapshot: _Snapshot, name: str) -> str:
        """The token of the node's boot (outside a boot window): the current one, or a new one."""
        row = (snapshot.boots.get(name) or (None,) * 4)[3]
        return self.boots.token(name, dict(zip(BOOT_COLUMNS, row)) if row else None, None, read=False)

    def sync(self, force: bool = False) -> dict | None:
        """One poll. Templates, published images or boot files changed (or FULL_EVERY_S passed):
        every node again; only roles or pins changed: those nodes; nothing: None."""
        now = time.monotonic()
        try:
            state = self.store_state()
        except ProvisionerError as exc:
            log.error("store unavailable: %s; no scripts (the app answers)", exc)
            state = None
        files = self.files_state()
        full = (force or self.passes == 0 or state is None or self.last_state is None or files != self.last_files
                or now - self.last_full >= FULL_EVERY_S)
        if full:
            if self.passes == 0:  # files left by an earlier run are not trusted: rewrite them all
                self.written = {}
            stats = self.render(state)
            self.last_full = now
        elif state != self.last_state:
            (roles, pins, boots), (old_roles, old_pins, old_boots) = state, self.last_state
            changed = {n for n in roles.keys() | old_roles.keys() if roles.get(n) != old_roles.get(n)}
            changed |= {k[0] for k in pins.keys() | old_pins.keys() if pins.get(k) != old_pins.get(k)}
            changed |= {n for n in boots.keys() | old_boots.keys() if boots.get(n) != old_boots.get(n)}
            stats = self.render(state, changed)
        else:
            return None
        # What was read before the pass: a change made during it shows at the next poll. (When
        # a full pass named other boot files, the next files_state includes them and differs:
        # one more pass, once.)
        self.last_state, self.last_files = state, files
        return stats

    def clear(self) -> int:
        """Remove every script file (the watcher stops: nothing may go stale; the app answers)."""
        removed = 0
        for name in [n for n in os.listdir(self.folder) if MAC_FILE.match(n)] if self.folder.is_dir() else []:
            try:
                os.unlink(self.folder / name)
                removed += 1
            except FileNotFoundError:
                pass
        self.written = {}
        return removed

    def watch(self, interval: float = INTERVAL_S, stop: threading.Event | None = None) -> None:
        stop = stop or threading.Event()
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                stats = self.sync()
            except Exception:  # noqa: BLE001 - keep watching; the next poll tries again
                log.exception("prerender pass failed")
                stats = None
            if stats:
                log.info("prerender: %d scripts, %d written, %d removed (%s) in %.3f s", stats["scripts"],
                         stats["written"], stats["removed"], "all nodes" if stats["full"] else f"{stats['nodes']} nodes",
                         time.monotonic() - t0)
            stop.wait(max(0.0, interval - (time.monotonic() - t0)))


def _stat(path: str) -> tuple | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- nginx

NGINX_SITE = """\
# Generated by `provisioner nginx-config` (provisioner/boot/prerender.py): the boot-storm
# deployment. /ipxe?mac=aa:bb:cc:dd:ee:ff is a file written by `provisioner prerender --watch`
# when one exists; every other request to /ipxe (another spelling of the MAC, an unknown or
# malformed one, a node that cannot boot, not a GET) goes to `provisioner serve`. /images/ is
# served from the image root with sendfile; everything else goes to `provisioner serve`.
# Only a GET whose whole query is `mac=` and a MAC as iPXE spells it (`${{netX/mac}}`); nginx's
# $arg_mac would also match `MAC=` or a second `mac=`, which the app reads differently.
map "$request_method $args" $provisioner_ipxe_file {{
    default "";
    "~^GET mac=(?<m>[0-9a-f]{{2}}(:[0-9a-f]{{2}}){{5}})$" $m;
}}

# The access log has the path without the query string: overlay and boot URLs carry tokens.
log_format provisioner_boot '$remote_addr:$remote_port [$time_local] "$request_method $uri $server_protocol" '
                            '$status $body_bytes_sent $request_time';

upstream provisioner_app {{
    server {upstream};
    keepalive 64;
}}

server {{
    listen {listen};
    server_name _;
    access_log {access_log} provisioner_boot;
    log_not_found off;  # its error lines quote the request line, query string (tokens) and all
    sendfile on;
    tcp_nopush on;
    client_max_body_size 64k;
    large_client_header_buffers 4 8k;
    default_type text/plain;

    location = /ipxe {{
        root {scripts};
        default_type "text/plain; charset=utf-8";
        add_header Cache-Control no-store always;
        etag off;
        if_modified_since off;
        try_files /$provisioner_ipxe_file{suffix} @provisioner;
    }}

    location /images/ {{
        alias {image_root};
        default_type application/octet-stream;
        limit_except GET {{ deny all; }}
        disable_symlinks off;
        autoindex off;
        error_page 301 403 404 405 = @provisioner;
    }}

    location / {{
        proxy_pass http://provisioner_app;
{proxy_headers}
    }}

    location @provisioner {{
        proxy_pass http://provisioner_app;
{proxy_headers}
    }}
}}
"""

# What the app behind (`provisioner serve --behind-proxy`) learns of the client: its address and
# its source port (the overlay's secret part asks for a privileged one). Set here, so a header of
# the same name that a client sent never reaches the app.
PROXY_HEADERS = """\
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header Host $http_host;
        proxy_set_header X-Forwarded-For $remote_addr;
        proxy_set_header X-Provisioner-Source-Port $remote_port;"""

DEFAULT_ACCESS_LOG = "/var/log/nginx/provisioner-boot.log"
_LISTEN = re.compile(r"^(\d{1,5}|[A-Za-z0-9.-]+:\d{1,5}|\[[0-9A-Fa-f:.]+\]:\d{1,5}|unix:/[^\s;{}\"'$\\]+)$")
_UNQUOTABLE = re.compile(r"[\x00-\x1f\x7f\"$\\]")


def nginx_quote(value: str, what: str) -> str:
    """A path as an nginx string: quoted; refused when it holds what nginx would read another way
    (a quote, `$` (a variable), a backslash, a control character)."""
    if _UNQUOTABLE.search(value):
        raise ValueError(f"{what} {value!r} holds a quote, $, a backslash or a control character, which "
                         "nginx would not read as written; use another path")
    return f'"{value}"'


def nginx_address(value: str, what: str) -> str:
    """--listen / --upstream: PORT, HOST:PORT, [V6]:PORT or unix:/PATH, nothing else."""
    if not _LISTEN.match(value or "") or (value[-1].isdigit() and not 0 < int(re.split(r"[:\]]", value)[-1]) < 65536):
        raise ValueError(f"{what} must be PORT, HOST:PORT, [IPV6]:PORT or unix:/PATH, got {value!r}")
    return value


def nginx_config(site: Site, scripts: Path, upstream: str, listen: str, access_log: str = DEFAULT_ACCESS_LOG) -> str:
    """The nginx `server` (plus its map, log format and upstream) for the boot-storm deployment;
    goes into nginx's http block (e.g. /etc/nginx/sites-enabled/provisioner). ValueError names
    the argument nginx could not read as written."""
    return NGINX_SITE.format(
        upstream=nginx_address(upstream, "--upstream"), listen=nginx_address(listen, "--listen"),
        scripts=nginx_quote(str(Path(scripts).resolve()), "--scripts"),
        image_root=nginx_quote(str(Path(site.image_root).resolve()) + "/", "site.image_root"),
        access_log="off" if access_log == "off" else nginx_quote(access_log, "--access-log"),
        suffix=SUFFIX, proxy_headers=PROXY_HEADERS)

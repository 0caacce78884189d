"""Site YAML -> a validated provisioner.model.Site.

One file describes the site: the boot server, the images (one per role), the nodes (hostlist
expressions allowed), and the sections the adapters and the balancer read (their shape is in
provisioner/model.py). Every error names the file and the field (`site.yaml: nodes[2].macs[3]:
...`) and nothing is half-loaded: `load()` either returns a whole Site or raises ConfigError.
`Fields` holds the field checks, shared with the image definitions' loader.
"""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import Any

import yaml

from provisioner import POOLS, ROLES
from provisioner.errors import ConfigError, ConfigErrors
from provisioner.model import (
    BMC_BOOT_MODES, BMC_PROTOCOLS, DEFAULT_IMAGE_DEFINITIONS, DEFAULT_TEMPLATES, NAME_RE, POWER_METHODS, REQUEUE_RULES, ROLE_TEMPLATE, SHARE_RULES, Bmc, Image,
    KubernetesSettings, Node, OverlaySettings, Policy, PowerSettings, RunSettings, Site, SlurmSettings, SshPower,
    SshTarget,
    normalize_mac,
)
from provisioner.nodeset import NodeSetError, expand
from provisioner.tokens import secret_problem

ENV_VAR = "PROVISIONER_CONFIG"
# bmc fields beyond address, port, user and the password (see provisioner.model.Bmc)
_REDFISH_FIELDS = {"protocol", "ca_file", "insecure", "system", "http_boot_uri", "boot_mode"}
DEFAULT_PATH = "/etc/provisioner/site.yaml"


def find_config_path(cli_value: str | None) -> Path:
    value = cli_value or os.environ.get(ENV_VAR) or DEFAULT_PATH
    return Path(value)


def load(path: str | os.PathLike, check_files: bool = True) -> Site:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(path, "", f"no such file; pass --config PATH or set {ENV_VAR}") from None
    except OSError as exc:
        raise ConfigError(path, "", f"cannot read: {exc.strerror}") from None
    try:
        if b"\0" in raw:
            raise UnicodeDecodeError("utf-8", raw, raw.index(b"\0"), raw.index(b"\0") + 1, "NUL byte")
        text = raw.decode()
    except UnicodeDecodeError:
        raise ConfigError(path, "", "not a text file (the site config is YAML in UTF-8); "
                                    "pass the right --config PATH") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "yaml"
        raise ConfigError(path, where, f"not valid YAML: {getattr(exc, 'problem', exc)}") from None
    return _SiteLoader(path, check_files).site(data)


class Fields:
    """Field checks for one YAML file: each returns the value (or its default) or raises a
    ConfigError naming the file and the field."""

    def __init__(self, path: Path, check_files: bool = True):
        self.path = path
        self.check_files = check_files

    def err(self, field_: str, msg: str) -> ConfigError:
        return ConfigError(self.path, field_, msg)

    def resolve(self, p: str) -> Path:
        p2 = Path(os.path.expanduser(p))
        return p2 if p2.is_absolute() else (self.path.parent / p2).resolve()

    def mapping(self, value: Any, where: str, allowed: set[str], required=()) -> dict:
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise self.err(where, f"must be a mapping, got {type(value).__name__}")
        hint = ", ".join(sorted(allowed))
        errors = [self.err(f"{where}.{key}" if where else str(key), f"unknown field (known: {hint})")
                  for key in value if key not in allowed]
        errors += [self.err(f"{where}.{key}" if where else key, "is required")
                   for key in required if value.get(key) in (None, "")]
        if errors:
            raise errors[0] if len(errors) == 1 else ConfigErrors(errors)
        return value

    def string(self, value: Any, where: str, default=None, required=False) -> str | None:
        if value is None:
            if required:
                raise self.err(where, "is required")
            return default
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise self.err(where, f"must be a string, got {type(value).__name__}")
        return str(value)

    def integer(self, value: Any, where: str, default: int, minimum: int = 0) -> int:
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.err(where, f"must be a whole number, got {value!r}")
        if value < minimum:
            raise self.err(where, f"must be >= {minimum}, got {value}")
        return value

    def number(self, value: Any, where: str, default: float, minimum: float = 0) -> float:
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.err(where, f"must be a number, got {value!r}")
        if value < minimum:
            raise self.err(where, f"must be >= {minimum}, got {value}")
        return float(value)

    def boolean(self, value: Any, where: str, default: bool) -> bool:
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.err(where, f"must be true or false, got {value!r}")
        return value

    def choice(self, value: Any, where: str, choices, default=None) -> str:
        if value is None and default is not None:
            return default
        if value not in choices:
            raise self.err(where, f"must be one of {', '.join(choices)}, got {value!r}")
        return value

    def spread(self, value: Any, n: int, where: str) -> list:
        """A per-node value for a group of n nodes: a scalar (shared by all), a hostlist
        expression that expands to n items (10.0.0.[1-16]), or a list of n items."""
        if value is None:
            return [None] * n
        if isinstance(value, list):
            if len(value) != n:
                raise self.err(where, f"has {len(value)} entries for {n} node(s); give one per node")
            return value
        if isinstance(value, str) and "[" in value:
            try:
                items = expand(value)
            except NodeSetError as exc:
                raise self.err(where, str(exc)) from None
            if len(items) == 1:
                return items * n
            if len(items) != n:
                raise self.err(where, f"expands to {len(items)} values for {n} node(s)")
            return items
        return [value] * n


class _SiteLoader(Fields):
    """The site file's sections, each into its model object. Every section (and every node
    entry) is checked even when an earlier one is wrong: all the errors come out at once."""

    def collect(self, check, *args):
        """check(*args), or None with its ConfigError kept for the end."""
        try:
            return check(*args)
        except ConfigErrors as exc:
            self.errors.extend(exc.errors)
        except ConfigError as exc:
            self.errors.append(exc)
        return None

    def site(self, data: Any) -> Site:
        self.errors: list[ConfigError] = []
        top = self.mapping(
            data,
            "",
            {"site", "images", "defaults", "nodes", "policy", "slurm", "kubernetes", "power", "overlay", "run"},
        )
        head = self.collect(self.site_section, top)
        sections = {name: self.collect(getattr(self, name), top.get(name))
                    for name in ("policy", "slurm", "kubernetes", "power", "overlay", "run")}
        # A wrong site section still lets the images and nodes be checked, against the defaults.
        image_root = head["image_root"] if head else self.resolve("images")
        templates = head["templates"] if head else Path(DEFAULT_TEMPLATES)
        images = self.collect(self.images, top.get("images"), image_root, templates)
        nodes = self.collect(self.nodes, top.get("nodes"), top.get("defaults"), templates)
        if sections["policy"] is not None and nodes is not None:
            sections["policy"] = self.collect(self.lending, sections["policy"], nodes)
        if self.errors:
            raise ConfigErrors(self.errors)
        site = Site(path=self.path.resolve(), images=images, nodes=nodes, **head, **sections)
        published = {"site.image_root": site.image_root, "site.templates": site.templates}
        self.check_private(published, [(f"overlay.files.{k}", Path(v)) for k, v in site.overlay.files.items()] + [
            (f"nodes.{n.name}.bmc.password_file", Path(n.bmc.password_file)) for n in site.nodes.values()
            if n.bmc is not None and n.bmc.password_file])
        return site

    def site_section(self, top: dict) -> dict:
        s = self.mapping(
            top.get("site"),
            "site",
            {"name", "boot_url", "listen", "store", "image_root", "templates", "secret_file",
             "check_callback_source", "image_definitions", "store_password_file", "state_dir",
             "secrets_privileged_port", "boot_window_s"},
            required=("boot_url",),
        )
        boot_url = self.string(s.get("boot_url"), "site.boot_url", required=True).rstrip("/")
        if not re.match(r"^https?://[^/\s]+", boot_url):
            raise self.err("site.boot_url", f"must be an http(s) URL, got {boot_url!r}")
        listen = self.string(s.get("listen"), "site.listen", "127.0.0.1:8080")
        parse_listen(listen, lambda m: self.err("site.listen", m))
        image_root = self.resolve(self.string(s.get("image_root"), "site.image_root", "images"))
        templates = self.resolve(
            self.string(s.get("templates"), "site.templates", str(DEFAULT_TEMPLATES))
        )
        if self.check_files and not templates.is_dir():
            raise self.err("site.templates", f"folder {templates} does not exist")
        store_url, store_password_file = self.store_url(s)
        if store_url:  # PostgreSQL: this host's own files (secret, locks, host keys) go to site.state_dir
            state_dir = self.resolve(self.string(s.get("state_dir"), "site.state_dir", "/var/lib/provisioner"))
            store = state_dir / "store"
        else:
            store = self.resolve(self.string(s.get("store"), "site.store", "/var/lib/provisioner/state.db"))
            state_dir = None
        secret = self.string(s.get("secret_file"), "site.secret_file", None)
        secret_file = self.resolve(secret) if secret else store.with_name("secret")
        if self.check_files:
            problem = secret_problem(secret_file)
            if problem:
                raise self.err("site.secret_file", problem)
        published = {"site.image_root": image_root, "site.templates": templates}
        self.check_private(published, [("site.secret_file", secret_file),
                                       ("site.state_dir", state_dir) if state_dir else ("site.store", store),
                                       *([("site.store_password_file", store_password_file)]
                                         if store_password_file else [])])

        image_definitions = self.resolve(
            self.string(s.get("image_definitions"), "site.image_definitions", str(DEFAULT_IMAGE_DEFINITIONS))
        )
        return dict(
            name=self.string(s.get("name"), "site.name", "site"),
            boot_url=boot_url,
            listen=listen,
            store=store,
            image_root=image_root,
            templates=templates,
            secret_file=secret_file,
            check_callback_source=self.boolean(
                s.get("check_callback_source"), "site.check_callback_source", True
            ),
            image_definitions=image_definitions,
            store_url=store_url,
            store_password_file=store_password_file,
            secrets_privileged_port=self.boolean(s.get("secrets_privileged_port"), "site.secrets_privileged_port",
                                                 True),
            boot_window_s=self.number(s.get("boot_window_s"), "site.boot_window_s", 3600.0, 1.0),
        )

    def check_private(self, folders: dict[str, Path], private: list[tuple[str, Path]]) -> None:
        """The folders the boot server publishes (site.image_root under /images/, site.templates)
        hold none of its private files (the store, the token secret, a password file, an overlay
        file such as the munge key) and sit in no site.state_dir."""
        for field_, folder in folders.items():
            shown = _real(folder)
            for what, path in private:
                p = _real(path)
                if p == shown or shown in p.parents or (what == "site.state_dir" and p in shown.parents):
                    raise self.err(field_, f"{folder} would publish {path} ({what}): nodes could download it; "
                                           f"keep private files outside {field_}")

    def store_url(self, s: dict) -> tuple[str | None, Path | None]:
        """site.store as a PostgreSQL URL (postgresql://USER@HOST:PORT/DB) and the password file."""
        from provisioner.store import is_url

        value = s.get("store")
        pw = self.string(s.get("store_password_file"), "site.store_password_file", None)
        if not is_url(value):
            if pw:
                raise self.err("site.store_password_file", "is for a PostgreSQL site.store (postgresql://...)")
            return None, None
        import urllib.parse

        parts = urllib.parse.urlsplit(value)
        if parts.password is not None:
            raise self.err("site.store", "put the PostgreSQL password in site.store_password_file (or PGPASSWORD), "
                                         "not in the URL")
        if not parts.hostname and "host=" not in parts.query:
            raise self.err("site.store", f"{value!r}: no host (postgresql://USER@HOST:PORT/DB)")
        return value, (self.resolve(pw) if pw else None)

    def images(self, value: Any, image_root: Path, templates: Path) -> dict[str, Image]:
        m = self.mapping(value, "images", set(ROLES), required=ROLES)
        out = {}
        for role in ROLES:
            where = f"images.{role}"
            if isinstance(m[role], dict) and "image" in m[role]:
                out[role] = self.built_image(role, m[role], templates)
                continue
            d = self.mapping(
                m[role], where, {"version", "kernel", "initrds", "initrd", "rootfs", "cmdline", "template", "image"},
                required=("kernel",),
            )
            initrds = d.get("initrds", d.get("initrd", []))
            if isinstance(initrds, str):
                initrds = [initrds]
            if not isinstance(initrds, list):
                raise self.err(f"{where}.initrds", "must be a list of paths")
            img = Image(
                role=role,
                version=self.string(d.get("version"), f"{where}.version", "0"),
                kernel=self.string(d.get("kernel"), f"{where}.kernel", required=True),
                initrds=tuple(self.string(x, f"{where}.initrds[{i}]", required=True) for i, x in enumerate(initrds)),
                rootfs=self.string(d.get("rootfs"), f"{where}.rootfs"),
                cmdline=self.string(d.get("cmdline"), f"{where}.cmdline", ""),
                template=self.string(d.get("template"), f"{where}.template"),
            )
            for label, rel in [("kernel", img.kernel), *[(f"initrds[{i}]", r) for i, r in enumerate(img.initrds)],
                               *([("rootfs", img.rootfs)] if img.rootfs else [])]:
                if Path(rel).is_absolute() or ".." in Path(rel).parts:
                    raise self.err(f"{where}.{label}", f"must be a path inside site.image_root, got {rel!r}")
                if self.check_files and not (image_root / rel).is_file():
                    raise self.err(f"{where}.{label}", f"file {image_root / rel} does not exist")
            self.check_template(templates, img.template or ROLE_TEMPLATE.format(role=role), f"{where}.template")
            out[role] = img
        return out

    def built_image(self, role: str, value: dict, templates: Path) -> Image:
        """`images.ROLE: {image: NAME}`: the files and the version come from NAME's published
        version under site.image_root/NAME/ (`provisioner image build NAME`)."""
        where = f"images.{role}"
        d = self.mapping(value, where, {"image", "cmdline", "template", "version", "kernel", "initrds",
                                        "initrd", "rootfs"}, required=("image",))
        for key in ("version", "kernel", "initrds", "initrd", "rootfs"):
            if key in d:
                raise self.err(f"{where}.{key}", "not with image: the version and files come from the "
                                                 "image's published version (see `provisioner image list`)")
        name = self.string(d.get("image"), f"{where}.image", required=True)
        if not NAME_RE.match(name):
            raise self.err(f"{where}.image", f"must be an image name (lower case, digits, - and _), got {name!r}")
        img = Image(role=role, version="current", kernel="", name=name,
                    cmdline=self.string(d.get("cmdline"), f"{where}.cmdline", ""),
                    template=self.string(d.get("template"), f"{where}.template"))
        self.check_template(templates, img.template or ROLE_TEMPLATE.format(role=role), f"{where}.template")
        return img

    def overlay(self, value: Any) -> OverlaySettings:
        d = self.mapping(value, "overlay", {"files", "values"})
        out_files: dict[str, str] = {}
        out_values: dict[str, str] = {}
        for section, out in (("files", out_files), ("values", out_values)):
            raw = d.get(section) or {}
            if not isinstance(raw, dict):
                raise self.err(f"overlay.{section}", f"must be a mapping of name: {'path' if section == 'files' else 'value'}")
            for key, item in raw.items():
                where = f"overlay.{section}.{key}"
                if not isinstance(key, str) or not NAME_RE.match(key) or "-" in key:
                    raise self.err(where, "names are lower case letters, digits and _ (templates use them)")
                if key in out_files or key in out_values:
                    raise self.err(where, "given in both overlay.files and overlay.values")
                text = self.string(item, where, required=True)
                if section == "files":
                    path = self.resolve(text)
                    if self.check_files and not path.is_file():
                        raise self.err(where, f"file {path} does not exist")
                    text = str(path)
                out[key] = text
        return OverlaySettings(files=out_files, values=out_values)

    def check_template(self, templates: Path, name: str, where: str) -> None:
        if "/" in name or name.startswith("."):
            raise self.err(where, f"must be a file name inside site.templates, got {name!r}")
        if self.check_files and not (templates / name).is_file():
            raise self.err(where, f"template {templates / name} does not exist")

    def bmc(self, value: Any, where: str, n: int) -> list[dict | None]:
        if value is None:
            return [None] * n
        d = self.mapping(value, where, {"address", "port", "user", "password", "password_file", *_REDFISH_FIELDS})
        spread = {k: self.spread(d.get(k), n, f"{where}.{k}") for k in ("address", "port", "system", "http_boot_uri")}
        return [{**d, **{k: v[i] for k, v in spread.items()}} for i in range(n)]

    def nodes(self, value: Any, defaults: Any, templates: Path) -> dict[str, Node]:
        node_keys = {"name", "pool", "default_role", "mac", "macs", "ip", "bmc", "power_method",
                     "ssh_host", "ssh_port", "template", "home"}
        dflt = self.mapping(defaults, "defaults", node_keys - {"name", "mac", "macs", "ip", "ssh_host"})
        if not isinstance(value, list) or not value:
            raise self.err("nodes", "must be a non-empty list of node entries")
        nodes: dict[str, Node] = {}
        seen_mac: dict[str, str] = {}
        seen_ip: dict[str, str] = {}
        for gi, raw in enumerate(value):
            # Each entry on its own: a wrong one is reported with the others, at once.
            self.collect(self.node_entry, gi, raw, dflt, templates, node_keys, nodes, seen_mac, seen_ip)
        return nodes

    def node_entry(self, gi: int, raw: Any, dflt: dict, templates: Path, node_keys: set[str],
                   nodes: dict[str, Node], seen_mac: dict[str, str], seen_ip: dict[str, str]) -> None:
        where = f"nodes[{gi}]"
        entry = self.mapping(raw, where, node_keys, required=("name",))
        try:
            names = expand(str(entry["name"]))
        except NodeSetError as exc:
            raise self.err(f"{where}.name", str(exc)) from None
        n = len(names)
        merged = {**dflt, **entry}
        if isinstance(dflt.get("bmc"), dict) and isinstance(entry.get("bmc"), dict):
            merged["bmc"] = {**dflt["bmc"], **entry["bmc"]}
        pool = self.choice(merged.get("pool"), f"{where}.pool", POOLS)
        role_default = pool if pool in ROLES else "slurm"
        default_role = self.choice(merged.get("default_role"), f"{where}.default_role", ROLES, role_default)
        if pool in ROLES and default_role != pool:
            raise self.err(f"{where}.default_role", f"a node in pool {pool} can only have role {pool}")
        # Lending: the side a shared node belongs to (default: its default_role, the static split).
        home = self.choice(merged.get("home"), f"{where}.home", ROLES, default_role)
        if pool in ROLES and home != pool:
            raise self.err(f"{where}.home", f"a node in pool {pool} belongs to {pool}")
        if "mac" in entry and "macs" in entry:
            raise self.err(f"{where}.mac", "give either mac or macs, not both")
        if "mac" in entry:
            if n != 1:
                raise self.err(f"{where}.mac", f"one MAC for {n} nodes; use macs: with one entry per node")
            macs_per_node = [[entry["mac"]]]
        elif "macs" in entry:
            macs = entry["macs"]
            if not isinstance(macs, list):
                raise self.err(f"{where}.macs", "must be a list")
            macs_per_node = [macs] if n == 1 else self.spread(macs, n, f"{where}.macs")
        else:
            raise self.err(f"{where}.macs", "is required: the node(s) boot by MAC")
        ips = self.spread(merged.get("ip"), n, f"{where}.ip")
        bmcs = self.bmc(merged.get("bmc"), f"{where}.bmc", n)
        ssh_hosts = self.spread(merged.get("ssh_host"), n, f"{where}.ssh_host")
        method = self.choice(merged.get("power_method"), f"{where}.power_method", POWER_METHODS, "ipmi")
        template = self.string(merged.get("template"), f"{where}.template")
        if template:
            self.check_template(templates, template, f"{where}.template")
        for i, name in enumerate(names):
            nw = where if n == 1 else f"{where} ({name})"
            if name in nodes:
                raise self.err(f"{where}.name", f"duplicate node name {name}")
            node_macs = macs_per_node[i]
            if isinstance(node_macs, str):
                node_macs = [node_macs]
            if not isinstance(node_macs, list) or not node_macs:
                raise self.err(f"{nw}.macs", "needs at least one MAC")
            norm = []
            for mi, mac in enumerate(node_macs):
                m = normalize_mac(mac) if isinstance(mac, str) else None
                if m is None:
                    raise self.err(f"{where}.macs[{i if n > 1 else mi}]", f"not a MAC address: {mac!r}")
                if m in seen_mac:
                    raise self.err(f"{where}.macs[{i if n > 1 else mi}]",
                                   f"duplicate MAC {m}: also used by {seen_mac[m]}")
                seen_mac[m] = name
                norm.append(m)
            ip = ips[i]
            if ip is not None:
                try:
                    ip = str(ipaddress.ip_address(str(ip)))
                except ValueError:
                    raise self.err(f"{where}.ip", f"not an IP address: {ip!r}") from None
                if ip in seen_ip:
                    raise self.err(f"{where}.ip", f"duplicate IP {ip}: also used by {seen_ip[ip]}")
                seen_ip[ip] = name
            bmc = self.make_bmc(bmcs[i], f"{where}.bmc")
            if pool == "shared" and bmc is None:
                raise self.err(f"{where}.bmc", f"shared node {name} needs a BMC (bmc.address) to be switched")
            nodes[name] = Node(
                name=name,
                pool=pool,
                default_role=default_role,
                macs=tuple(norm),
                ip=ip,
                bmc=bmc,
                power_method=method,
                ssh_host=self.string(ssh_hosts[i], f"{where}.ssh_host") or ip,
                ssh_port=self.integer(merged.get("ssh_port"), f"{where}.ssh_port", 22, 1),
                template=template,
                home=home,
            )

    def make_bmc(self, d: dict | None, where: str) -> Bmc | None:
        if d is None:
            return None
        address = self.string(d.get("address"), f"{where}.address")
        if not address:
            raise self.err(f"{where}.address", "is required when bmc is given")
        protocol = self.choice(d.get("protocol"), f"{where}.protocol", BMC_PROTOCOLS, "ipmi")
        redfish = self.redfish_fields(d, where, protocol)
        port = d.get("port")
        if isinstance(port, str) and port.isdigit():
            port = int(port)
        port = self.integer(port, f"{where}.port", 443 if protocol == "redfish" else 623, 1)
        if port > 65535:
            raise self.err(f"{where}.port", f"must be a {'TCP' if protocol == 'redfish' else 'UDP'} port, got {port}")
        password = d.get("password")
        pfile = d.get("password_file")
        if password is not None and pfile is not None:
            raise self.err(f"{where}.password", "give either password or password_file, not both")
        if pfile is not None:
            pfile = str(self.resolve(self.string(pfile, f"{where}.password_file")))
            if self.check_files:
                try:
                    password = Path(pfile).read_text().strip()
                except OSError as exc:
                    raise self.err(f"{where}.password_file", f"cannot read {pfile}: {exc.strerror}") from None
        return Bmc(
            address=address,
            port=port,
            user=self.string(d.get("user"), f"{where}.user", "admin"),
            password=self.string(password, f"{where}.password", ""),
            password_file=pfile,
            protocol=protocol,
            **redfish,
        )

    def redfish_fields(self, d: dict, where: str, protocol: str) -> dict:
        """bmc's Redfish-only fields (TLS, the system, the HTTP boot URI), checked."""
        if protocol != "redfish":
            for key in _REDFISH_FIELDS - {"protocol"}:
                if d.get(key) is not None:
                    raise self.err(f"{where}.{key}", "is for protocol: redfish (this BMC speaks IPMI)")
            return {}
        ca = self.string(d.get("ca_file"), f"{where}.ca_file")
        insecure = self.boolean(d.get("insecure"), f"{where}.insecure", False)
        if ca and insecure:
            raise self.err(f"{where}.insecure", "give either ca_file (verify the BMC's certificate) or insecure: "
                                                "true (do not), not both")
        if ca:
            ca = str(self.resolve(ca))
            if self.check_files and not Path(ca).is_file():
                raise self.err(f"{where}.ca_file", f"file {ca} does not exist")
        uri = self.string(d.get("http_boot_uri"), f"{where}.http_boot_uri")
        if uri and not re.match(r"^https?://[^/\s]+", uri):
            raise self.err(f"{where}.http_boot_uri", f"must be an http(s) URL, got {uri!r}")
        return {"ca_file": ca, "insecure": insecure, "system": self.string(d.get("system"), f"{where}.system"),
                "http_boot_uri": uri,
                "boot_mode": self.choice(d.get("boot_mode"), f"{where}.boot_mode", BMC_BOOT_MODES, "uefi")}

    def policy(self, value: Any) -> Policy:
        d = self.mapping(value, "policy", {"min_nodes", "cooldown_s", "demand_persist_s", "max_in_flight",
                                           "share_rule", "phase_timeout_s", "max_retries", "reclaim_grace_s",
                                           "lending_limit", "reclaim_requeue"})
        mins = self.mapping(d.get("min_nodes"), "policy.min_nodes", set(ROLES))
        grace = self.mapping(d.get("reclaim_grace_s"), "policy.reclaim_grace_s", set(ROLES))
        limits = self.mapping(d.get("lending_limit"), "policy.lending_limit", set(ROLES))
        return Policy(
            reclaim_grace_s={r: self.integer(grace.get(r), f"policy.reclaim_grace_s.{r}", Policy().reclaim_grace_s[r])
                             for r in ROLES},
            lending_limit={r: (None if limits.get(r) is None else self.integer(limits[r], f"policy.lending_limit.{r}", 0))
                           for r in ROLES},
            reclaim_requeue=self.choice(d.get("reclaim_requeue"), "policy.reclaim_requeue", REQUEUE_RULES, "cheaper"),
            min_nodes={r: self.integer(mins.get(r), f"policy.min_nodes.{r}", 0) for r in ROLES},
            cooldown_s=self.integer(d.get("cooldown_s"), "policy.cooldown_s", 600),
            demand_persist_s=self.integer(d.get("demand_persist_s"), "policy.demand_persist_s", 120),
            max_in_flight=self.integer(d.get("max_in_flight"), "policy.max_in_flight", 2, 1),
            share_rule=self.choice(d.get("share_rule"), "policy.share_rule", SHARE_RULES, "proportional"),
            phase_timeout_s=self.integer(d.get("phase_timeout_s"), "policy.phase_timeout_s", 900, 1),
            max_retries=self.integer(d.get("max_retries"), "policy.max_retries", 2),
        )

    def lending(self, policy: Policy, nodes: dict[str, Node]) -> Policy:
        """A side cannot lend more shared nodes than it has (its home nodes)."""
        for side, limit in policy.lending_limit.items():
            pool = sum(1 for n in nodes.values() if n.shared and n.home_side == side)
            if limit is not None and limit > pool:
                raise self.err(f"policy.lending_limit.{side}", f"{limit} is more than the {pool} shared node(s) whose "
                               f"home is {side}; give at most {pool}, or leave it out for no limit")
        return policy

    def ssh_target(self, value: Any, where: str) -> SshTarget | None:
        if value is None:
            return None
        d = self.mapping(value, where, {"host", "port", "user", "key_file", "known_hosts"}, required=("host",))
        return SshTarget(
            host=self.string(d.get("host"), f"{where}.host", required=True),
            port=self.integer(d.get("port"), f"{where}.port", 22, 1),
            user=self.string(d.get("user"), f"{where}.user", "root"),
            key_file=self.opt_path(d.get("key_file"), f"{where}.key_file"),
            known_hosts=self.opt_path(d.get("known_hosts"), f"{where}.known_hosts"),
        )

    def opt_path(self, value: Any, where: str) -> str | None:
        s = self.string(value, where)
        return str(self.resolve(s)) if s else None

    def slurm(self, value: Any) -> SlurmSettings:
        d = self.mapping(value, "slurm", {"mode", "slurm_conf", "bin_dir", "controller", "reason_prefix", "timeout_s",
                                             "power_saving"})
        mode = self.choice(d.get("mode"), "slurm.mode", ("local", "ssh"), "local")
        controller = self.ssh_target(d.get("controller"), "slurm.controller")
        if mode == "ssh" and controller is None:
            raise self.err("slurm.controller", "is required when slurm.mode is ssh")
        prefix = self.string(d.get("reason_prefix"), "slurm.reason_prefix", "provisioner:")
        if not prefix.strip():
            raise self.err("slurm.reason_prefix", "must not be empty: it marks the drains we own")
        return SlurmSettings(
            mode=mode,
            slurm_conf=self.opt_path(d.get("slurm_conf"), "slurm.slurm_conf"),
            bin_dir=self.opt_path(d.get("bin_dir"), "slurm.bin_dir"),
            controller=controller,
            reason_prefix=prefix,
            timeout_s=self.integer(d.get("timeout_s"), "slurm.timeout_s", 30, 1),
            power_saving=self.boolean(d.get("power_saving"), "slurm.power_saving", False),
        )

    def kubernetes(self, value: Any) -> KubernetesSettings:
        d = self.mapping(value, "kubernetes", {"kubeconfig", "in_cluster", "context", "label_key", "timeout_s",
                                               "delete_node", "provisioning_requests", "booking_s",
                                               "kubelet_certificates"})
        return KubernetesSettings(
            kubeconfig=self.opt_path(d.get("kubeconfig"), "kubernetes.kubeconfig"),
            in_cluster=self.boolean(d.get("in_cluster"), "kubernetes.in_cluster", False),
            context=self.string(d.get("context"), "kubernetes.context"),
            label_key=self.string(d.get("label_key"), "kubernetes.label_key", "sched"),
            timeout_s=self.integer(d.get("timeout_s"), "kubernetes.timeout_s", 10, 1),
            delete_node=self.boolean(d.get("delete_node"), "kubernetes.delete_node", False),
            # Serve ProvisioningRequests of provisioner's class (Kueue's all-or-nothing asks, docs/kueue.md).
            provisioning_requests=self.boolean(d.get("provisioning_requests"), "kubernetes.provisioning_requests",
                                               False),
            booking_s=self.integer(d.get("booking_s"), "kubernetes.booking_s", 600, 1),
            kubelet_certificates=self.boolean(d.get("kubelet_certificates"), "kubernetes.kubelet_certificates",
                                              True),
        )

    def power(self, value: Any) -> PowerSettings:
        d = self.mapping(value, "power", {"timeout_s", "retries", "fanout", "ssh", "settle_s"})
        s = self.mapping(d.get("ssh"), "power.ssh", {"user", "port", "key_file", "known_hosts", "reboot_command",
                                                     "timeout_s"})
        return PowerSettings(
            timeout_s=self.number(d.get("timeout_s"), "power.timeout_s", 5.0, 0.1),
            retries=self.integer(d.get("retries"), "power.retries", 2),
            fanout=self.integer(d.get("fanout"), "power.fanout", 32, 1),
            settle_s=self.number(d.get("settle_s"), "power.settle_s", 30.0, 0.1),
            ssh=SshPower(
                user=self.string(s.get("user"), "power.ssh.user", "root"),
                port=self.integer(s.get("port"), "power.ssh.port", 22, 1),
                key_file=self.opt_path(s.get("key_file"), "power.ssh.key_file"),
                known_hosts=self.opt_path(s.get("known_hosts"), "power.ssh.known_hosts"),
                reboot_command=self.string(s.get("reboot_command"), "power.ssh.reboot_command", "systemctl reboot"),
                timeout_s=self.integer(s.get("timeout_s"), "power.ssh.timeout_s", 10, 1),
            ),
        )

    def run(self, value: Any) -> RunSettings:
        d = self.mapping(value, "run", {"interval_s", "ask_poll_s", "busy_interval_s", "watch_kubernetes"})
        interval = self.number(d.get("interval_s"), "run.interval_s", 60.0, 1)
        busy = self.number(d.get("busy_interval_s"), "run.busy_interval_s", min(2.0, interval), 0.5)
        if busy > interval:
            raise self.err("run.busy_interval_s",
                           f"must not be longer than run.interval_s ({interval:g}), got {busy:g}")
        return RunSettings(
            interval_s=interval,
            ask_poll_s=self.number(d.get("ask_poll_s"), "run.ask_poll_s", 0.5, 0.1),
            busy_interval_s=busy,
            watch_kubernetes=self.boolean(d.get("watch_kubernetes"), "run.watch_kubernetes", True),
        )


def _real(path: Path) -> Path:
    return Path(os.path.realpath(path))


def parse_listen(value: str, err=None) -> tuple[str, int]:
    """'HOST:PORT' (or '[v6]:PORT') -> (host, port)."""
    m = re.match(r"^\[?([^\]]*?)\]?:(\d{1,5})$", value or "")
    if not m or not (0 < int(m.group(2)) < 65536):
        msg = f"must be HOST:PORT, got {value!r}"
        if err:
            raise err(msg)
        raise ValueError(msg)
    return m.group(1) or "0.0.0.0", int(m.group(2))


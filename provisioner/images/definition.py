"""DEFINITIONS/NAME/image.yaml -> a validated Definition (errors name the file and the field).

A definition says what an image contains (base distribution, packages, files built outside
Debian (`binaries`: a tools/build.sh component's command, or a file the site brings), container
images for the node (`oci_images`), services, kernel and the drivers its initramfs loads, kernel
arguments) and which per-node overlay files it needs. The
folder next to it holds the overlay templates (overlay/*.j2) and, for images with a root file
system, files copied into it (files/, a tree that mirrors the root). DEFINITIONS/_common holds
what every image shares: the initramfs /init and, for Debian roots, the boot-callback service.
DEFINITIONS is site.image_definitions (default: the shipped images/: model.DEFAULT_IMAGE_DEFINITIONS).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import yaml

from provisioner import ROLES
from provisioner.config import Fields
from provisioner.errors import ConfigError, UsageError
from provisioner.model import NAME_RE

BUILDERS = ("initramfs", "debian")
COMMON = "_common"
_PKG_RE = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")
_MODULE_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_SERVICE_RE = re.compile(r"^[A-Za-z0-9@_.:-]+$")
_COMPONENT_RE = re.compile(r"^[a-z0-9][a-z0-9_-]*$")  # a tools/NAME folder of tools/build.sh
_COMMAND_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_OCI_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
HOST_KEY_KINDS = ("private", "public")  # overlay host_key: provisioner.hostkeys.KINDS


@dataclass(frozen=True)
class OverlayEntry:
    path: str  # absolute path on the node
    template: str | None = None  # a Jinja2 file in overlay/
    copy: str | None = None  # a key of the site's overlay.files, copied byte for byte
    host_key: str | None = None  # "private" / "public": the node's SSH host key (provisioner.hostkeys)
    mode: int = 0o644
    owner: str = "root"
    optional: bool = False  # copy only: skipped when the site names no such file
    # In the overlay's secret part (fetched by /init as root, once per boot)? None: when the file
    # is not readable by others on the node (provisioner.boot.overlay.is_secret).
    secret: bool | None = None
    # template only: the node's kubelet client credentials (provisioner.kubelet_certs), given to the
    # template as kubelet_client.certificate / .key (PEM); the file is written only when provisioner
    # holds a valid certificate for the node, and always goes to the secret part.
    kubelet_client: bool = False

    def as_dict(self) -> dict:
        out = {"path": self.path, "template": self.template, "copy": self.copy, "host_key": self.host_key,
               "mode": f"{self.mode:04o}", "owner": self.owner, "optional": self.optional}
        if self.kubelet_client:
            out["kubelet_client"] = True
        return out if self.secret is None else {**out, "secret": self.secret}


@dataclass(frozen=True)
class Binary:
    """A file the root takes from outside Debian: command `command` of a tools/build.sh component
    (`build`), or a file the site brings (`file`, an absolute path on the build host)."""

    path: str  # absolute path in the root
    build: str | None = None
    command: str | None = None
    file: str | None = None
    mode: int = 0o755

    @property
    def source(self) -> str:
        return f"tools/build.sh {self.build} (bin/{self.command})" if self.build else str(self.file)

    def as_dict(self) -> dict:
        return {"path": self.path, "build": self.build, "command": self.command, "file": self.file,
                "mode": f"{self.mode:04o}"}


@dataclass(frozen=True)
class Repository:
    name: str
    url: str
    suite: str
    components: tuple[str, ...]
    key: str | None
    packages: tuple[str, ...]  # what the image takes from it (named in the early failure)

    def source_line(self, keyring: str | None) -> str:
        opts = f"[signed-by={keyring}] " if keyring else ""
        comps = " ".join(self.components)
        return f"deb {opts}{self.url} {self.suite}{(' ' + comps) if comps and self.suite != '/' else ''}".rstrip()


@dataclass(frozen=True)
class Definition:
    name: str
    folder: Path
    path: Path  # image.yaml
    description: str
    role: str | None
    builder: str
    suite: str
    mirror: str
    components: tuple[str, ...]
    repositories: tuple[Repository, ...]
    packages: tuple[str, ...]
    services: tuple[str, ...]
    kernel_package: str
    modules: tuple[str, ...]
    cmdline: str
    overlay: tuple[OverlayEntry, ...]
    binaries: tuple[Binary, ...] = ()
    oci_images: tuple[str, ...] = ()  # node images (provisioner.images.oci) under /usr/share/provisioner/oci/

    @property
    def common(self) -> Path:
        return self.folder.parent / COMMON

    def sources(self) -> list[Path]:
        """Every file the build reads from the definitions folder (what the hash covers)."""
        files = [p for p in sorted(self.folder.rglob("*")) if p.is_file()]
        common = [self.common / "init.sh", self.common / "udhcpc.sh"]
        if self.builder == "debian":
            common += [p for p in sorted((self.common / "rootfs").rglob("*")) if p.is_file()]
        return files + [p for p in common if p.is_file()]

    def digest(self, identities: dict[str, str] | None = None) -> str:
        """sha256 over the definition's files (names and contents) and the identities of what the
        build takes from outside them (`binaries[i]`: the tools/build.sh build folder, or a file's
        sha256; `oci_images[i]`: the image's digest): what a version was built from. A changed
        pin of a built binary is a new digest although no file here changed."""
        h = hashlib.sha256()
        base = self.folder.parent
        for p in self.sources():
            h.update(str(p.relative_to(base)).encode() + b"\0")
            h.update(hashlib.sha256(p.read_bytes()).digest())
        for k, v in sorted((identities or {}).items()):
            h.update(f"{k}={v}".encode() + b"\0")
        return h.hexdigest()


def names(definitions: Path) -> list[str]:
    """The images defined under the definitions folder (sub-folders with an image.yaml)."""
    if not definitions.is_dir():
        return []
    return sorted(p.parent.name for p in definitions.glob("*/image.yaml") if not p.parent.name.startswith("_"))


def load(definitions: Path, name: str) -> Definition:
    if not NAME_RE.match(name or ""):
        raise UsageError(f"image name {name!r}: lower case letters, digits, - and _")
    path = definitions / name / "image.yaml"
    if not path.is_file():
        known = ", ".join(names(definitions)) or "none"
        raise UsageError(f"no image {name}: {path} does not exist (defined: {known})")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise ConfigError(path, f"line {mark.line + 1}" if mark else "yaml",
                          f"not valid YAML: {getattr(exc, 'problem', exc)}") from None
    return _DefinitionLoader(path).definition(name, data)


class _DefinitionLoader(Fields):
    def names_list(self, value, where: str, pattern: re.Pattern, what: str) -> tuple[str, ...]:
        if value is None:
            return ()
        if not isinstance(value, list):
            raise self.err(where, f"must be a list of {what}")
        out = []
        for i, item in enumerate(value):
            s = self.string(item, f"{where}[{i}]", required=True)
            if not pattern.match(s):
                raise self.err(f"{where}[{i}]", f"not a valid {what}: {s!r}")
            out.append(s)
        return tuple(out)

    def definition(self, name: str, data) -> Definition:
        top = self.mapping(data, "", {"description", "role", "builder", "base", "repositories", "packages",
                                      "binaries", "oci_images", "services", "kernel", "cmdline", "overlay"},
                           required=("builder", "kernel"))
        builder = self.choice(top.get("builder"), "builder", BUILDERS)
        role = top.get("role")
        if role is not None:
            role = self.choice(role, "role", ROLES)
        base = self.mapping(top.get("base"), "base", {"distribution", "suite", "mirror", "components"})
        self.choice(base.get("distribution"), "base.distribution", ("debian",), "debian")
        suite = self.string(base.get("suite"), "base.suite", "bookworm")
        mirror = self.string(base.get("mirror"), "base.mirror", "http://deb.debian.org/debian").rstrip("/")
        if not re.match(r"^https?://\S+$", mirror):
            raise self.err("base.mirror", f"must be an http(s) URL, got {mirror!r}")
        components = self.names_list(base.get("components"), "base.components", _PKG_RE, "component") or ("main",)
        kernel = self.mapping(top.get("kernel"), "kernel", {"package", "modules"}, required=("package",))
        kernel_package = self.string(kernel.get("package"), "kernel.package", required=True)
        if not _PKG_RE.match(kernel_package):
            raise self.err("kernel.package", f"not a Debian package name: {kernel_package!r}")
        packages = self.names_list(top.get("packages"), "packages", _PKG_RE, "Debian package name")
        services = self.names_list(top.get("services"), "services", _SERVICE_RE, "systemd unit name")
        repositories = self.repositories(top.get("repositories"))
        binaries = self.binaries(top.get("binaries"))
        oci_images = self.names_list(top.get("oci_images"), "oci_images", _OCI_RE, "node image name")
        for i, n in enumerate(oci_images):
            if n in oci_images[:i]:
                raise self.err(f"oci_images[{i}]", f"{n} is listed twice")
        if builder == "initramfs":
            for key in ("packages", "services", "repositories", "binaries", "oci_images"):
                if top.get(key):
                    raise self.err(key, "not with builder initramfs (it has no root file system); use builder debian")
        folder = self.path.parent
        overlay = self.overlay(top.get("overlay"), folder / "overlay")
        if builder == "initramfs":
            for i, e in enumerate(overlay):
                if e.owner not in ("root", "0"):
                    raise self.err(f"overlay[{i}].owner", "an initramfs image has only root")
        return Definition(
            name=name, folder=folder, path=self.path,
            description=self.string(top.get("description"), "description", ""),
            role=role, builder=builder, suite=suite, mirror=mirror, components=components,
            repositories=repositories, packages=packages, services=services,
            kernel_package=kernel_package,
            modules=self.names_list(kernel.get("modules"), "kernel.modules", _MODULE_RE, "kernel module name"),
            cmdline=self.string(top.get("cmdline"), "cmdline", ""),
            overlay=overlay, binaries=binaries, oci_images=oci_images,
        )

    def mode(self, value, where: str, default: str) -> int:
        try:
            mode = int(str(default if value is None else value), 8)
        except ValueError:
            mode = -1
        if not 0 <= mode <= 0o7777:
            raise self.err(where, f"must be an octal mode such as \"0600\", got {value!r}")
        return mode

    def root_path(self, value, where: str) -> str:
        path = self.string(value, where, required=True)
        pp = PurePosixPath(path)
        if not pp.is_absolute() or ".." in pp.parts or len(pp.parts) < 2 or path.endswith("/"):
            raise self.err(where, f"must be an absolute file path on the node, got {path!r}")
        return path

    def binaries(self, value) -> tuple[Binary, ...]:
        if value is None:
            return ()
        if not isinstance(value, list):
            raise self.err("binaries", "must be a list of {build, command, path} or {file, path} entries")
        out: list[Binary] = []
        for i, raw in enumerate(value):
            where = f"binaries[{i}]"
            d = self.mapping(raw, where, {"build", "command", "file", "path", "mode"}, required=("path",))
            path = self.root_path(d.get("path"), f"{where}.path")
            if any(b.path == path for b in out):
                raise self.err(f"{where}.path", f"{path} is listed twice")
            build, file = d.get("build"), d.get("file")
            if (build is None) == (file is None):
                raise self.err(where, "give either build (a tools/build.sh component, e.g. k8s) with command "
                                      "(e.g. kubelet), or file (an absolute path on the build host)")
            command = None
            if build is not None:
                build = self.string(build, f"{where}.build")
                if not _COMPONENT_RE.match(build):
                    raise self.err(f"{where}.build", f"must name a tools/build.sh component (a folder tools/NAME "
                                                     f"with a build.conf, e.g. k8s), got {build!r}")
                command = self.string(d.get("command"), f"{where}.command")
                if command is None:
                    raise self.err(f"{where}.command", f"is required with build: the command of tools/build.sh "
                                                       f"{build} to copy (a file in its bin/ folder, e.g. kubelet)")
                if not _COMMAND_RE.match(command):
                    raise self.err(f"{where}.command", f"must be a command name in the build's bin/ folder, "
                                                       f"got {command!r}")
            else:
                if d.get("command") is not None:
                    raise self.err(f"{where}.command", "only with build (a file entry names the file itself)")
                file = self.string(file, f"{where}.file")
                if not PurePosixPath(file).is_absolute() or ".." in PurePosixPath(file).parts:
                    raise self.err(f"{where}.file", f"must be an absolute path on the build host, got {file!r}")
            out.append(Binary(path=path, build=build, command=command, file=file,
                              mode=self.mode(d.get("mode"), f"{where}.mode", "0755")))
        return tuple(out)

    def repositories(self, value) -> tuple[Repository, ...]:
        if value is None:
            return ()
        if not isinstance(value, list):
            raise self.err("repositories", "must be a list of repositories")
        out = []
        for i, raw in enumerate(value):
            where = f"repositories[{i}]"
            d = self.mapping(raw, where, {"name", "url", "suite", "components", "key", "packages"},
                             required=("name", "url", "suite", "packages"))
            url = self.string(d.get("url"), f"{where}.url", required=True)
            if not re.match(r"^https?://\S+$", url):
                raise self.err(f"{where}.url", f"must be an http(s) URL, got {url!r}")
            key = self.string(d.get("key"), f"{where}.key")
            if key is not None and not re.match(r"^https?://\S+$", key):
                raise self.err(f"{where}.key", f"must be an http(s) URL of the repository's signing key, got {key!r}")
            pkgs = self.names_list(d.get("packages"), f"{where}.packages", _PKG_RE, "Debian package name")
            if not pkgs:
                raise self.err(f"{where}.packages", "name the packages the image takes from this repository")
            out.append(Repository(
                name=self.string(d.get("name"), f"{where}.name", required=True),
                url=url.rstrip("/") + "/",
                suite=self.string(d.get("suite"), f"{where}.suite", required=True),
                components=self.names_list(d.get("components"), f"{where}.components", _PKG_RE, "component"),
                key=key, packages=pkgs,
            ))
        return tuple(out)

    def overlay(self, value, templates: Path) -> tuple[OverlayEntry, ...]:
        if value is None:
            return ()
        if not isinstance(value, list):
            raise self.err("overlay", "must be a list of {path, template, copy or host_key} entries")
        out, seen = [], set()
        for i, raw in enumerate(value):
            where = f"overlay[{i}]"
            d = self.mapping(raw, where, {"path", "template", "copy", "host_key", "mode", "owner", "optional", "secret",
                                          "kubelet_client"}, required=("path",))
            path = self.root_path(d.get("path"), f"{where}.path")
            if path in seen:
                raise self.err(f"{where}.path", f"{path} is listed twice")
            seen.add(path)
            template, copy, host_key = d.get("template"), d.get("copy"), d.get("host_key")
            if sum(x is not None for x in (template, copy, host_key)) != 1:
                raise self.err(where, "give exactly one of template (a file in overlay/), copy (a key of the "
                                      "site's overlay.files) or host_key (private or public: the node's SSH "
                                      "host key)")
            if host_key is not None:
                host_key = self.string(host_key, f"{where}.host_key")
                if host_key not in HOST_KEY_KINDS:
                    raise self.err(f"{where}.host_key", f"must be private (the node's SSH host key, mode \"0600\") "
                                                        f"or public (its .pub), got {host_key!r}")
            if template is not None:
                template = self.string(template, f"{where}.template")
                if "/" in template or template.startswith(".") or not (templates / template).is_file():
                    raise self.err(f"{where}.template", f"no template {template!r} in {templates}")
            if copy is not None:
                copy = self.string(copy, f"{where}.copy")
                if not NAME_RE.match(copy) or "-" in copy:
                    raise self.err(f"{where}.copy", f"must be a key of overlay.files (letters, digits, _), got {copy!r}")
            mode = self.mode(d.get("mode"), f"{where}.mode", "0644")
            if host_key == "private" and mode & 0o077:
                raise self.err(f"{where}.mode", f"a private host key must be readable by its owner only "
                                                f"(sshd refuses it otherwise): use \"0600\", not \"{mode:04o}\"")
            owner = self.string(d.get("owner"), f"{where}.owner", "root")
            if not re.match(r"^[a-z_][a-z0-9_-]*$|^[0-9]+$", owner):
                raise self.err(f"{where}.owner", f"must be a user name or a number, got {owner!r}")
            optional = self.boolean(d.get("optional"), f"{where}.optional", False)
            if optional and copy is None:
                raise self.err(f"{where}.optional", "only copy entries can be optional")
            secret = None if d.get("secret") is None else self.boolean(d.get("secret"), f"{where}.secret", False)
            if secret is False and not mode & 0o004:
                raise self.err(f"{where}.secret", f"a file the node's users cannot read (mode {mode:04o}) goes to the "
                                                  "secret part; drop `secret: false` or make it readable by all")
            kubelet_client = self.boolean(d.get("kubelet_client"), f"{where}.kubelet_client", False)
            if kubelet_client and template is None:
                raise self.err(f"{where}.kubelet_client", "only template entries can carry the kubelet's client "
                                                          "credentials (the template places them, e.g. a kubeconfig)")
            if kubelet_client and (mode & 0o077 or secret is False):
                raise self.err(f"{where}.mode", f"a file with the kubelet's client key must be readable by its owner "
                                                f"only and secret: use \"0600\", not \"{mode:04o}\"")
            out.append(OverlayEntry(path=path, template=template, copy=copy, host_key=host_key, mode=mode, owner=owner,
                                    optional=optional, secret=secret, kubelet_client=kubelet_client))
        return tuple(out)

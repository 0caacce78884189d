"""Built image versions under site.image_root: NAME/VERSION/ folders (immutable once renamed into
place), and NAME/current, a symlink to the published one, replaced atomically with rename(2).

A node's iPXE script names files inside a version folder, never through `current`, so a node that
got version V's script fetches V's files even when V+1 is published meanwhile; and a version
folder appears whole (rename of a complete build folder) or not at all.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from provisioner.errors import OperationError, UsageError
from provisioner.model import NAME_RE

CURRENT = "current"
MANIFEST = "manifest.json"
LOCK = ".lock"


@dataclass(frozen=True)
class Version:
    image: str
    version: str
    path: Path
    manifest: dict[str, Any] = field(repr=False)
    current: bool = False

    @property
    def size(self) -> int:
        return sum(f["size"] for f in self.manifest.get("files", {}).values())

    def as_dict(self, pinned: list[str] | None = None) -> dict[str, Any]:
        m = self.manifest
        return {"image": self.image, "version": self.version, "current": self.current, "size": self.size,
                "built_at": m.get("built_at"), "kernel_release": m.get("kernel", {}).get("release"),
                "definition_sha256": m.get("definition_sha256"), "path": str(self.path),
                "files": m.get("files", {}), "pinned_nodes": pinned or []}


def check_name(name: str, what: str = "image") -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise UsageError(f"{what} name {name!r}: lower case letters, digits, - and _")
    return name


def check_version(version: str) -> str:
    if not isinstance(version, str) or not NAME_RE.match(version.lower()) or version in (CURRENT,):
        raise UsageError(f"version {version!r} is not a version name (see `provisioner image list`)")
    return version


def read_manifest(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def current(image_root: Path, name: str) -> str | None:
    try:
        return os.path.basename(os.readlink(os.path.join(image_root, name, CURRENT)))
    except OSError:
        return None


def get(image_root: Path, name: str, version: str) -> Version | None:
    folder = image_root / check_name(name) / check_version(version)
    m = read_manifest(folder)
    if m is None:
        return None
    return Version(name, version, folder, m, current(image_root, name) == version)


def list_versions(image_root: Path, name: str) -> list[Version]:
    """Complete versions of an image (a folder with a manifest), oldest first."""
    folder = image_root / check_name(name)
    cur = current(image_root, name)
    out = []
    if folder.is_dir():
        for p in folder.iterdir():
            if p.name.startswith(".") or p.name == CURRENT or not p.is_dir() or p.is_symlink():
                continue
            m = read_manifest(p)
            if m is not None:
                out.append(Version(name, p.name, p, m, p.name == cur))
    return sorted(out, key=lambda v: (v.manifest.get("built_at_ts", 0), v.version))


def built_images(image_root: Path) -> list[str]:
    if not image_root.is_dir():
        return []
    return sorted(p.name for p in image_root.iterdir()
                  if p.is_dir() and not p.name.startswith(".") and NAME_RE.match(p.name)
                  and (os.path.lexists(p / CURRENT) or any((c / MANIFEST).is_file() for c in p.iterdir() if c.is_dir())))


@contextmanager
def image_lock(image_root: Path, name: str) -> Iterator[None]:
    """Serializes publish and remove of one image (builds run in parallel; their publish steps queue)."""
    folder = image_root / name
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def set_current(image_root: Path, name: str, version: str) -> str | None:
    """Point NAME/current at VERSION with one rename(2). Returns the previous version. Caller
    holds image_lock."""
    folder = image_root / name
    old = current(image_root, name)
    tmp = folder / f".{CURRENT}.{os.getpid()}"
    if os.path.lexists(tmp):
        os.unlink(tmp)
    os.symlink(version, tmp)  # relative: the image root can move
    os.replace(tmp, folder / CURRENT)
    fsync_dir(folder)
    return old


def publish(image_root: Path, name: str, version: str, *, store=None, actor: str = "provisioner",
            reason: str = "published") -> str | None:
    """Make VERSION the current version of NAME. Returns the previous one (None: first)."""
    check_name(name)
    with image_lock(image_root, name):
        v = get(image_root, name, version)
        if v is None:
            raise UsageError(f"image {name} has no complete version {version} under {image_root / name}; "
                             f"see `provisioner image list {name}`")
        try:
            old = set_current(image_root, name, version)
        except OSError as exc:
            raise OperationError(f"cannot publish {name} {version}: {exc.strerror}; check {image_root / name}") from None
    if store is not None and old != version:
        store.add_event(None, actor, "image-publish",
                        f"image {name}: version {version} is current" + (f" (was {old})" if old else "") + f": {reason}",
                        {"image": name, "version": version, "old": old, "reason": reason})
    return old


def remove(image_root: Path, name: str, version: str, *, store=None, actor: str = "provisioner",
           reason: str = "removed by admin") -> None:
    """Delete a version; refused for the current one and for one a node is pinned to."""
    check_name(name)
    with image_lock(image_root, name):
        v = get(image_root, name, version)
        if v is None:
            raise UsageError(f"image {name} has no version {version}; see `provisioner image list {name}`")
        if v.current:
            raise UsageError(f"{name} {version} is the current version: publish another one first "
                             f"(`provisioner image publish {name} VERSION`)")
        if store is not None:
            pinned = [p["node"] for p in store.image_pins(name) if p["version"] == version]
            if pinned:
                from provisioner.nodeset import fold

                raise UsageError(f"{fold(pinned)} pinned to {name} {version}: unpin first "
                                 f"(`provisioner image unpin {fold(pinned)}`)")
        # Renamed away first: the version disappears at once, never half-deleted.
        trash = v.path.with_name(f".removing-{version}-{os.getpid()}")
        try:
            os.rename(v.path, trash)
        except OSError as exc:
            raise OperationError(f"cannot remove {v.path}: {exc.strerror}") from None
    shutil.rmtree(trash, ignore_errors=True)
    if store is not None:
        store.add_event(None, actor, "image-remove", f"image {name}: version {version} removed: {reason}",
                        {"image": name, "version": version, "size": v.size, "reason": reason})


def find_version(image_root: Path, spec: str, image: str | None = None) -> Version:
    """A version by `VERSION`, `NAME/VERSION` or (VERSION, image=NAME)."""
    if "/" in spec:
        image, _, spec = spec.partition("/")
    if image is not None:
        v = get(image_root, check_name(image), check_version(spec))
        if v is None:
            raise UsageError(f"image {image} has no version {spec}; see `provisioner image list {image}`")
        return v
    check_version(spec)
    found = [v for n in built_images(image_root) if (v := get(image_root, n, spec)) is not None]
    if not found:
        raise UsageError(f"no image has a version {spec}; see `provisioner image list`")
    if len(found) > 1:
        raise UsageError(f"version {spec} exists in {', '.join(v.image for v in found)}: give NAME/{spec}")
    return found[0]


# --------------------------------------------------------------------------- listing


@dataclass(frozen=True)
class Listing:
    """`provisioner image list`: every version of the images asked for, with the nodes pinned to
    it and the roles that boot its image."""

    rows: tuple[dict[str, Any], ...]  # Version.as_dict(pinned) + "roles"; per image, oldest first
    unbuilt: tuple[str, ...]  # images asked for that have no version yet


def listing(image_root: Path, definitions: Path, pins: Iterable[Mapping[str, str]], roles: Mapping[str, str | None],
            name: str | None = None) -> Listing:
    """Versions x pins x roles, for image `name` or every image defined or built.

    pins: the store's image_pins() (node, image, version); roles: role -> the built image it
    boots (images.ROLE.image in the site config; None: the role names its files)."""
    from provisioner.images.definition import names as definition_names

    if name:
        names = [name]
        if not list_versions(image_root, name) and name not in definition_names(definitions):
            raise UsageError(f"no image {name}: not defined in {definitions} and never built")
    else:
        names = sorted(set(built_images(image_root)) | set(definition_names(definitions)))
    pinned: dict[tuple[str, str], list[str]] = {}
    for p in pins:
        pinned.setdefault((p["image"], p["version"]), []).append(p["node"])
    rows = tuple(v.as_dict(pinned.get((v.image, v.version))) | {"roles": [r for r, i in roles.items() if i == v.image]}
                 for n in names for v in list_versions(image_root, n))
    return Listing(rows, tuple(n for n in names if not any(r["image"] == n for r in rows)))


# --------------------------------------------------------------------------- the boot endpoint's view


@dataclass(frozen=True)
class Published:
    """What the renderer needs of one version, read once (versions never change)."""

    image: str
    version: str
    kernel: str  # relative to the image root: NAME/VERSION/vmlinuz
    initrds: tuple[str, ...]
    rootfs: str | None
    cmdline: str
    overlay: tuple[dict, ...]
    folder: str
    paths: tuple[str, ...]  # absolute paths of the boot files, checked per request


class Resolver:
    """Per request: one readlink(2) for the current version; a version's manifest is parsed on
    first sight only (folders are immutable). So a publish shows on the very next request."""

    MAX = 256

    def __init__(self, image_root: Path):
        self.root = str(image_root)
        self._seen: dict[tuple[str, str], Published] = {}

    def current(self, name: str) -> str | None:
        try:
            return os.path.basename(os.readlink(os.path.join(self.root, name, CURRENT)))
        except OSError:
            return None

    def get(self, name: str, version: str) -> Published | None:
        key = (name, version)
        hit = self._seen.get(key)
        if hit is not None:
            return hit
        if "/" in version or version.startswith(".") or version == CURRENT:
            return None
        folder = os.path.join(self.root, name, version)
        m = read_manifest(Path(folder))
        if m is None:
            return None  # not cached: it may appear later
        boot = m.get("boot", {})
        rel = f"{name}/{version}/"
        files = [boot["kernel"], *boot.get("initrds", []), *([boot["rootfs"]] if boot.get("rootfs") else [])]
        pub = Published(
            image=name, version=version, kernel=rel + boot["kernel"],
            initrds=tuple(rel + f for f in boot.get("initrds", [])),
            rootfs=rel + boot["rootfs"] if boot.get("rootfs") else None,
            cmdline=m.get("cmdline", ""), overlay=tuple(m.get("overlay", [])), folder=folder,
            paths=tuple(os.path.join(folder, f) for f in files),
        )
        if len(self._seen) >= self.MAX:
            self._seen.clear()
        self._seen[key] = pub
        return pub

"""Finished `debian` image builds, kept outside any checkout and keyed by what went into them:

    ~/.cache/provisioner/image-builds/NAME-KEY/     ($PROVISIONER_CACHE/image-builds/ when set)
        vmlinuz  initramfs.img  rootfs.squashfs     the build products
        build.json                                  key inputs, the builder's record, file hashes

KEY hashes (key_inputs): the definition's build-relevant content as parsed (so a comment or the
description in image.yaml does not count; the overlay templates do not either, they are copied
into each version afresh), the bytes and modes of the files copied into the root (NAME/files/,
_common/), the exact package set apt resolves against the image's sources now (every name and
version), the identity of each binary (tools/build.sh's build folder, whose name carries the pin,
or a file's sha256), each node image's digest, the busybox version of the initramfs, and RECIPE.

A build whose key is here becomes a new version in seconds: its files are hard-linked (copied
across file systems) into the version folder, and their sha256 checked against build.json.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from provisioner.images.definition import Definition

# The version of the Debian builder's recipe (its mmdebstrap options, what it adds to the root,
# the initramfs and squashfs steps): bump it when a change there changes the products for the
# same inputs, so the next build is cold.
RECIPE = 2  # 2: the root carries no SSH host keys (the node's come in its overlay)
RECORD = "build.json"


def default_root() -> Path:
    return Path(os.environ.get("PROVISIONER_CACHE") or Path.home() / ".cache" / "provisioner") / "image-builds"


def _file_id(p: Path) -> str:
    if p.is_symlink():
        return f"-> {os.readlink(p)}"
    return f"{p.stat().st_mode & 0o7777:04o} {hashlib.sha256(p.read_bytes()).hexdigest()}"


def _tree(folder: Path, base: Path) -> dict[str, str]:
    """relative path -> mode and sha256 (or symlink target) of every file under folder."""
    if not folder.is_dir():
        return {}
    return {str(p.relative_to(base)): _file_id(p) for p in sorted(folder.rglob("*"))
            if p.is_symlink() or p.is_file()}


def key_inputs(d: Definition, packages: list[str], binaries: dict[str, str], oci: dict[str, str],
               tools: dict[str, str]) -> dict[str, Any]:
    """Everything a debian build's products depend on (see the module doc), as plain data.
    packages: "name version" lines; binaries: path -> identity; oci: name -> digest."""
    base = d.folder.parent
    files = _tree(d.folder / "files", base)
    files.update(_tree(d.common / "rootfs", base))
    for p in (d.common / "init.sh", d.common / "udhcpc.sh"):
        if p.is_file():
            files[str(p.relative_to(base))] = _file_id(p)
    return {
        "recipe": RECIPE,
        "definition": {
            "builder": d.builder, "suite": d.suite, "mirror": d.mirror, "components": list(d.components),
            "repositories": [{"url": r.url, "suite": r.suite, "components": list(r.components), "key": r.key,
                              "packages": sorted(r.packages)} for r in d.repositories],
            "packages": sorted(d.packages), "services": sorted(d.services),
            "kernel": {"package": d.kernel_package, "modules": list(d.modules)},  # module order is load order
            "binaries": sorted((b.as_dict() for b in d.binaries), key=lambda b: b["path"]),
            "oci_images": sorted(d.oci_images),
        },
        "files": files,
        "packages": sorted(packages),
        "binaries": dict(sorted(binaries.items())),
        "oci_images": dict(sorted(oci.items())),
        "tools": dict(sorted(tools.items())),
    }


def key(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def changes(old: dict[str, Any], new: dict[str, Any], limit: int = 4) -> list[str]:
    """What differs between two key_inputs, in words (why a build is cold)."""
    out = []
    for section in sorted(set(old) | set(new)):
        a, b = old.get(section), new.get(section)
        if a == b:
            continue
        if section == "packages":
            va = dict(x.split(" ", 1) for x in a or [])
            vb = dict(x.split(" ", 1) for x in b or [])
            diff = [f"{n} {va.get(n, '-')} -> {vb.get(n, '-')}" for n in sorted(set(va) | set(vb))
                    if va.get(n) != vb.get(n)]
            more = f" and {len(diff) - limit} more" if len(diff) > limit else ""
            out.append(f"packages: {', '.join(diff[:limit])}{more}")
        elif isinstance(a, dict) and isinstance(b, dict):
            keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            out.append(f"{section}: {', '.join(keys[:limit])}{' ...' if len(keys) > limit else ''}")
        else:
            out.append(f"{section}: {a} -> {b}")
    return out


@dataclass(frozen=True)
class Entry:
    name: str
    key: str
    path: Path
    record: dict[str, Any]

    @property
    def files(self) -> dict[str, dict[str, Any]]:
        return self.record["files"]


class BuildCache:
    def __init__(self, root: Path | None = None):
        self.root = root or default_root()

    def path(self, name: str, key_: str) -> Path:
        return self.root / f"{name}-{key_}"

    def get(self, name: str, key_: str) -> Entry | None:
        folder = self.path(name, key_)
        try:
            record = json.loads((folder / RECORD).read_text())
        except (OSError, ValueError):
            return None
        if record.get("key") != key_ or not all((folder / f).is_file() for f in record.get("files", {})):
            return None
        return Entry(name, key_, folder, record)

    def entries(self, name: str) -> list[Entry]:
        """The cached builds of image `name`, newest first."""
        out = []
        if self.root.is_dir():
            for p in self.root.glob(f"{name}-*"):
                k = p.name[len(name) + 1:]
                if p.is_dir() and len(k) == 16 and "-" not in k and (e := self.get(name, k)) is not None:
                    out.append(e)
        return sorted(out, key=lambda e: e.record.get("built_at_ts", 0), reverse=True)

    def drop(self, name: str, key_: str) -> None:
        folder = self.path(name, key_)
        if folder.exists():
            trash = folder.with_name(f".drop-{folder.name}-{os.getpid()}")
            os.rename(folder, trash)
            shutil.rmtree(trash, ignore_errors=True)

    @contextmanager
    def lock(self, name: str, key_: str) -> Iterator[None]:
        """One cold build per key at a time: a second build of the same inputs waits, then hits."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / f".{name}-{key_}.lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def put(self, name: str, key_: str, src: Path, files: dict[str, dict[str, Any]], record: dict[str, Any]) -> Path:
        """Store the products `files` (names in `src`, with size and sha256) under the key."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".put-{name}-", dir=self.root))
        try:
            for rel in files:
                link_or_copy(src / rel, tmp / rel)
            (tmp / RECORD).write_text(json.dumps({**record, "key": key_, "files": files}, indent=2, sort_keys=True)
                                      + "\n")
            os.chmod(tmp, 0o755)
            self.drop(name, key_)  # a --rebuild replaces the entry
            os.rename(tmp, self.path(name, key_))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return self.path(name, key_)

    def cold_seconds(self, name: str) -> float | None:
        """How long the last cold build of `name` took on this machine."""
        for e in self.entries(name):
            s = e.record.get("build_seconds")
            if s:
                return float(s)
        return None


def link_or_copy(src: Path, dst: Path) -> str:
    """Hard link (same file system), else copy. Returns which."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
        return "linked"
    except OSError:
        shutil.copyfile(src, dst)
        os.chmod(dst, src.stat().st_mode & 0o7777)
        return "copied"


def now_iso(ts: float | None = None) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() if ts is None else ts))

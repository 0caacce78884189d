"""Debian packages for image builds: resolve, download (apt-get download) and unpack
(dpkg-deb -x) into a cache, never installed on the build host.

The cache makes repeated builds offline and fast: a package version is downloaded once and
unpacked once. On a fresh machine whose apt lists are missing or stale, `apt-get update` runs
once and the step is retried.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from provisioner.errors import OperationError

log = logging.getLogger("provisioner.images")
APT_TIMEOUT_S = 600


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    deb: Path
    tree: Path  # the unpacked contents (dpkg-deb -x)

    @property
    def label(self) -> str:
        return f"{self.name} {self.version}"


def _run(argv: list[str], cwd: Path | None = None, timeout: float = APT_TIMEOUT_S) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise OperationError(f"{argv[0]} not found: image builds need Debian's apt and dpkg tools") from None
    except subprocess.TimeoutExpired:
        raise OperationError(f"{' '.join(argv[:3])} took more than {timeout:.0f} s; check the network and retry") from None


def _tail(res: subprocess.CompletedProcess) -> str:
    return " ".join((res.stderr or res.stdout).strip().splitlines()[-2:])[:300]


def apt_update() -> None:
    log.info("apt-get update (package lists missing or stale)")
    res = _run(["apt-get", "update", "-qq"])
    if res.returncode != 0:
        raise OperationError(f"apt-get update failed: {_tail(res)}; check the network and /etc/apt/sources.list")


def show(name: str) -> dict[str, str]:
    """apt-cache show's fields for the candidate version of `name` ({} when apt knows none)."""
    res = _run(["apt-cache", "show", "--no-all-versions", name], timeout=60)
    if res.returncode != 0 or not res.stdout.strip():
        return {}
    fields: dict[str, str] = {}
    key = None
    for line in res.stdout.splitlines():
        if not line.strip():
            break
        if line[0] in " \t" and key:
            fields[key] += "\n" + line.strip()
        elif ":" in line:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields


def candidate(name: str) -> tuple[str, str]:
    """(name, version) to download. A kernel metapackage (linux-image-amd64) is followed to the
    versioned package it depends on (linux-image-6.1.0-NN-amd64), the one holding the files."""
    fields = show(name)
    if not fields:
        apt_update()
        fields = show(name)
    if not fields:
        raise OperationError(f"Debian package {name} is not known to apt here; check its name and "
                             "/etc/apt/sources.list (apt-get update ran)")
    depends = fields.get("Depends", "")
    m = re.match(r"^(linux-image-[0-9][^ ,|()]*)\s*\(=\s*([^)]+)\)$", depends.strip())
    if name.startswith("linux-image-") and m:
        return m.group(1), m.group(2)
    return name, fields["Version"]


def _deb_name(name: str, version: str) -> str:
    # apt-get download names files name_version_arch.deb with the epoch's ':' as %3a
    return f"{name}_{version.replace(':', '%3a')}_"


def fetch(name: str, cache: Path) -> Package:
    """Download (once) and unpack (once) the current version of a Debian package."""
    debs = cache / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    try:
        real, version = candidate(name)
    except OperationError:
        # Offline with an empty apt cache: the newest package already downloaded still builds.
        found = sorted(debs.glob(f"{name}_*.deb"), key=lambda p: p.stat().st_mtime)
        if not found:
            raise
        real, version = name, found[-1].name.split("_")[1].replace("%3a", ":")
        log.warning("apt does not answer for %s; using the cached %s", name, found[-1].name)
    prefix = _deb_name(real, version)
    deb = next(iter(sorted(debs.glob(prefix + "*.deb"))), None)
    if deb is None:
        with tempfile.TemporaryDirectory(dir=debs, prefix=".download-") as tmp:
            log.info("downloading %s %s", real, version)
            res = _run(["apt-get", "download", "-qq", f"{real}={version}"], cwd=Path(tmp))
            if res.returncode != 0:
                apt_update()  # stale lists point at a version the mirror no longer has
                real, version = candidate(name)
                prefix = _deb_name(real, version)
                res = _run(["apt-get", "download", "-qq", f"{real}={version}"], cwd=Path(tmp))
            got = sorted(Path(tmp).glob(prefix + "*.deb"))
            if res.returncode != 0 or not got:
                raise OperationError(f"cannot download Debian package {real} {version}: {_tail(res)}; "
                                     "check the network and the Debian mirror")
            deb = debs / got[0].name
            os.replace(got[0], deb)  # whole files only: a crash mid-download leaves no .deb
    tree = cache / "unpacked" / deb.name[: -len(".deb")]
    if not tree.is_dir():
        tree.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=tree.parent, prefix=".unpack-"))
        try:
            res = _run(["dpkg-deb", "-x", str(deb), str(tmp)])
            if res.returncode != 0:
                raise OperationError(f"cannot unpack {deb.name}: {_tail(res)}; delete it from {debs} and retry")
            try:
                os.rename(tmp, tree)
            except OSError:  # another build unpacked it meanwhile
                if not tree.is_dir():
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return Package(real, version, deb, tree)

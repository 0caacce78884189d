"""The exact Debian package set a `debian` image build will install, resolved before building.

mmdebstrap --variant=minbase installs the Essential:yes packages, the Priority:required ones,
apt, and the definition's packages, with their dependencies and without recommends. The same
selection is asked of apt here, against the same sources (the definition's mirror, suite and
components, and its extra repositories), in a private apt state folder under the download cache
(CACHE/apt/SOURCES-KEY/): `apt-get update` (after the first time only the InRelease files are
fetched again, about a second), then `apt-get install --print-uris` with an empty dpkg status.
That prints every .deb the install would download: name, version and size, downloading nothing.

Why apt and not mmdebstrap --simulate: --simulate does not print the package set, and it
fetches the indexes anew on every run. Why not the host's apt lists (debs.py): they hold the
host's sources (bookworm-updates, -security, other repositories), not the image's.

The result is part of an image's build key: a new version of any package that would be
installed is a new key (and a cold build); an unchanged mirror is the same key.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import re
import subprocess
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from provisioner.errors import OperationError
from provisioner.images.definition import Definition

log = logging.getLogger("provisioner.images")

APT_TIMEOUT_S = 600
KEY_TIMEOUT_S = 15
DEBIAN_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
# mmdebstrap's minbase selection, as apt patterns (its manual: "the essential set plus all
# packages with Priority:required and apt").
MINBASE = ("?essential", "?priority(required)", "apt")
_URI_RE = re.compile(r"^'(?P<url>[^']+)' (?P<file>\S+) (?P<size>\d+) ")


@dataclass(frozen=True)
class PackageSet:
    packages: tuple[tuple[str, str], ...]  # (name, version), sorted by name
    download_bytes: int

    def versions(self) -> dict[str, str]:
        return dict(self.packages)

    def lines(self) -> list[str]:
        return [f"{n} {v}" for n, v in self.packages]


def native_arch() -> str:
    try:
        out = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        raise OperationError("dpkg not found: image builds need Debian's apt and dpkg tools") from None
    return out.stdout.strip() or "amd64"


def fetch_key(url: str, dest: Path) -> Path:
    """A repository's signing key, downloaded once into dest (apt reads armoured keys named *.asc)."""
    if not dest.is_file():
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            with urllib.request.urlopen(url, timeout=KEY_TIMEOUT_S) as r:
                data = r.read()
        except (OSError, ValueError) as exc:
            raise OperationError(f"cannot download the signing key {url} ({getattr(exc, 'reason', exc)}); "
                                 "check the network and repositories[].key") from None
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, dest)
    return dest


def source_lines(d: Definition, keys: Path, base_keyring: Path | None = None) -> list[str]:
    """The image's apt sources: its mirror, then its extra repositories (their keys fetched
    into `keys`). base_keyring: signed-by for the mirror (None: apt's trusted keys)."""
    opts = f"[signed-by={base_keyring}] " if base_keyring else ""
    lines = [f"deb {opts}{d.mirror} {d.suite} {' '.join(d.components)}"]
    for repo in d.repositories:
        keyring = fetch_key(repo.key, keys / f"{repo.name}.asc") if repo.key else None
        lines.append(repo.source_line(str(keyring) if keyring else None))
    return lines


def selection(d: Definition) -> list[str]:
    """What mmdebstrap is asked to --include (the builder uses the same list)."""
    return list(dict.fromkeys([*d.packages, d.kernel_package, *[p for r in d.repositories for p in r.packages]]))


def _deb_version(filename: str) -> tuple[str, str]:
    # name_version_arch.deb; apt writes an epoch's ':' as %3a
    stem = filename[: -len(".deb")] if filename.endswith(".deb") else filename
    parts = stem.split("_")
    if len(parts) != 3:
        raise ValueError(filename)
    return parts[0], urllib.parse.unquote(parts[1])


def parse_print_uris(text: str) -> PackageSet:
    """`apt-get install --print-uris -qq` output -> PackageSet."""
    found: dict[str, str] = {}
    size = 0
    for line in text.splitlines():
        m = _URI_RE.match(line)
        if not m:
            continue
        name, version = _deb_version(m.group("file"))
        found[name] = version
        size += int(m.group("size"))
    return PackageSet(tuple(sorted(found.items())), size)


class _Apt:
    """apt-get on a private state folder (never the host's lists, status or archives)."""

    def __init__(self, state: Path, arch: str):
        self.state = state
        empty = state / "empty"
        self.opts = [
            f"-oDir::Etc::SourceList={state / 'sources.list'}", f"-oDir::Etc::SourceParts={empty}",
            f"-oDir::Etc::Preferences={empty / 'preferences'}", f"-oDir::Etc::PreferencesParts={empty}",
            f"-oDir::State::Lists={state / 'lists'}", f"-oDir::State::status={state / 'status'}",
            f"-oDir::State::extended_states={state / 'extended_states'}", f"-oDir::Cache={state / 'cache'}",
            "-oDir::Cache::pkgcache=", "-oDir::Cache::srcpkgcache=",
            f"-oAPT::Architecture={arch}", f"-oAPT::Architectures={arch}",
            "-oAPT::Install-Recommends=false", "-oAcquire::Languages=none",
            "-oAcquire::IndexTargets::deb::DEP-11::DefaultEnabled=false",
            "-oAcquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled=false",
            "-oAcquire::IndexTargets::deb::DEP-11-icons-small::DefaultEnabled=false",
        ]
        for sub in ("empty", "lists/partial", "cache/archives/partial"):
            (state / sub).mkdir(parents=True, exist_ok=True)
        for f in ("status", "extended_states"):
            (state / f).touch()

    def run(self, *args: str) -> subprocess.CompletedProcess:
        try:
            return subprocess.run(["apt-get", *self.opts, *args], capture_output=True, text=True,
                                  timeout=APT_TIMEOUT_S, env={**os.environ, "LC_ALL": "C"})
        except FileNotFoundError:
            raise OperationError("apt-get not found: image builds need Debian's apt and dpkg tools") from None
        except subprocess.TimeoutExpired:
            raise OperationError(f"apt-get {args[0]} took more than {APT_TIMEOUT_S} s; check the network "
                                 "and the mirror") from None


def _tail(res: subprocess.CompletedProcess, n: int = 3) -> str:
    lines = [ln for ln in (res.stderr or res.stdout).strip().splitlines() if not ln.startswith("W: ")]
    return " ".join(lines[-n:])[:400]


def resolve(d: Definition, cache: Path) -> PackageSet:
    """The packages (name, version) a build of `d` installs, resolved against its own sources
    now. Offline with lists from an earlier run: those lists, with a warning."""
    arch = native_arch()
    keyring = DEBIAN_KEYRING if DEBIAN_KEYRING.is_file() else None
    probe = [f"{arch} {keyring}", f"deb {d.mirror} {d.suite} {' '.join(d.components)}",
             *[f"{r.url} {r.suite} {' '.join(r.components)} {r.key}" for r in d.repositories]]
    state = cache / "apt" / hashlib.sha256("\n".join(probe).encode()).hexdigest()[:16]
    state.mkdir(parents=True, exist_ok=True)
    with open(state / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one apt at a time on this state folder
        lines = source_lines(d, state / "keys", keyring)
        (state / "sources.list").write_text("\n".join(lines) + "\n")
        apt = _Apt(state, arch)
        res = apt.run("update", "-q")
        if res.returncode != 0:
            have = any(p.name.endswith(("Packages", "Packages.lz4", "Packages.gz", "Packages.xz"))
                       for p in (state / "lists").iterdir())
            if not have:
                raise OperationError(f"image {d.name}: cannot read the package lists of {d.mirror} {d.suite} "
                                     f"({_tail(res)}); check the network and base.mirror in {d.path}")
            log.warning("image %s: apt-get update failed (%s); resolving against the package lists of an "
                        "earlier run", d.name, _tail(res, 1))
        res = apt.run("install", "--print-uris", "-qq", *MINBASE, *selection(d))
    if res.returncode != 0:
        unknown = re.findall(r"Unable to locate package (\S+)", res.stderr)
        if unknown:
            raise OperationError(f"image {d.name}: {d.mirror} {d.suite} has no package {', '.join(unknown)}; "
                                 f"fix packages in {d.path}")
        raise OperationError(f"image {d.name}: apt cannot resolve the package set ({_tail(res)}); "
                             f"check packages in {d.path}")
    found = parse_print_uris(res.stdout)
    if not found.packages:
        raise OperationError(f"image {d.name}: apt resolved no packages for {d.mirror} {d.suite}; "
                             f"see {state} and check base in {d.path}")
    return found

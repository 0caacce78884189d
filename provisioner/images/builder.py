"""`provisioner image build NAME`: build an image into a new version folder, then publish it.

Steps: check everything that can fail early (the definition, package repositories and the
packages they must provide, build tools) before downloading anything; build into a hidden
folder under site.image_root/NAME/; write the manifest (files, sizes, sha256, the definition's
hash, build time); rename the folder to its version (the commit point); publish (NAME/current).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from provisioner.errors import OperationError
from provisioner.images import debs, initramfs, kmod, versions
from provisioner.images.definition import Definition, load

log = logging.getLogger("provisioner.images")

PROBE_TIMEOUT_S = 15
BUSYBOX_PACKAGE = "busybox-static"
KERNEL = "vmlinuz"
INITRAMFS = "initramfs.img"
ROOTFS = "rootfs.squashfs"


@dataclass(frozen=True)
class BuildResult:
    image: str
    version: str
    path: Path
    manifest: dict[str, Any]
    published: bool
    previous: str | None  # the version that was current before (None: first, or not published)
    seconds: float


def default_cache() -> Path:
    """Downloaded packages for image builds: $PROVISIONER_CACHE/images, else
    ~/.cache/provisioner/images; outside any checkout, so a fresh clone reuses them."""
    return Path(os.environ.get("PROVISIONER_CACHE") or Path.home() / ".cache" / "provisioner") / "images"


def reserve_version(folder: Path, now: float) -> str:
    """A new version name, reserved by creating its (empty) folder: parallel builds never share
    one. Lists and the boot endpoint ignore a folder without a manifest."""
    base = time.strftime("%Y%m%d-%H%M%S", time.gmtime(now))
    n = 1
    while True:
        v = base if n == 1 else f"{base}-{n}"
        try:
            os.mkdir(folder / v)
            return v
        except FileExistsError:
            n += 1


# --------------------------------------------------------------------------- early checks


def preflight(d: Definition) -> None:
    """Fail before downloading anything: unreachable repositories (naming the packages the image
    needs from them), missing packages, missing build tools."""
    for repo in d.repositories:
        probe = repo.url + ("InRelease" if repo.suite == "/" else f"dists/{repo.suite}/InRelease")
        try:
            with urllib.request.urlopen(probe, timeout=PROBE_TIMEOUT_S) as r:
                r.read(1)
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise OperationError(
                f"image {d.name}: cannot fetch {', '.join(repo.packages)} from the {repo.name} package "
                f"repository {repo.url} ({reason}); this machine cannot reach it: build the image where it "
                f"can, or mirror the repository and set repositories[].url in {d.path}") from None
    if d.builder == "debian":
        missing_tools = [t for t in ("mmdebstrap", "mksquashfs") if shutil.which(t) is None]
        if missing_tools:
            raise OperationError(f"image {d.name}: {' and '.join(missing_tools)} not found; install the Debian "
                                 "packages mmdebstrap and squashfs-tools (apt-get install mmdebstrap squashfs-tools)")
        if _host_suite() == d.suite and not d.repositories:
            unknown = [p for p in d.packages if not debs.show(p)]
            if unknown:
                debs.apt_update()
                unknown = [p for p in unknown if not debs.show(p)]
            if unknown:
                raise OperationError(f"image {d.name}: Debian {d.suite} has no package {', '.join(unknown)}; "
                                     f"fix packages in {d.path}")


def _host_suite() -> str | None:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("VERSION_CODENAME="):
                return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return None


# --------------------------------------------------------------------------- builders


def _build_initramfs(d: Definition, out: Path, cache: Path, version: str) -> dict[str, Any]:
    kpkg = debs.fetch(d.kernel_package, cache)
    kernel = kmod.find_kernel(kpkg.tree)
    busybox = debs.fetch(BUSYBOX_PACKAGE, cache)
    modules = kmod.resolve(kernel, d.modules)
    shutil.copyfile(kernel.vmlinuz, out / KERNEL)
    entries = initramfs.build(
        out / INITRAMFS, busybox=busybox.tree / "bin" / "busybox", modules=modules,
        init=(d.common / "init.sh").read_bytes(), udhcpc=(d.common / "udhcpc.sh").read_bytes(),
        info={"image": d.name, "version": version, "kernel": kernel.release},
    )
    return {
        "boot": {"kernel": KERNEL, "initrds": [INITRAMFS], "rootfs": None},
        "kernel": {"release": kernel.release, "package": kpkg.label, "modules": [n for n, _ in modules]},
        "packages": [kpkg.label, busybox.label],
        "initramfs_entries": len(entries),
        "ids": {"root": [0, 0]},
    }


def _build_debian(d: Definition, out: Path, cache: Path, version: str) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix=f".{d.name}-rootfs-", dir=out.parent))
    try:
        rootfs = work / "root"
        keys = work / "keys"
        keys.mkdir()
        sources = [f"deb {d.mirror} {d.suite} {' '.join(d.components)}"]
        for repo in d.repositories:
            keyring = None
            if repo.key:
                keyring = keys / f"{repo.name}.asc"  # apt reads ASCII-armoured keys named *.asc
                with urllib.request.urlopen(repo.key, timeout=PROBE_TIMEOUT_S) as r:
                    keyring.write_bytes(r.read())
            sources.append(repo.source_line(str(keyring) if keyring else None))
        include = [*d.packages, d.kernel_package, *[p for r in d.repositories for p in r.packages]]
        argv = ["mmdebstrap", "--variant=minbase", "--mode=root", "--format=directory",
                f"--include={','.join(dict.fromkeys(include))}",
                # documentation is dead weight in a root that every boot copies into RAM
                *[f"--dpkgopt=path-exclude=/usr/share/{d}/*" for d in ("man", "doc", "info", "locale")],
                "--dpkgopt=path-include=/usr/share/doc/*/copyright",
                # the boot-callback service, DHCP on every NIC, then the image's own files/
                f"--customize-hook=sync-in {d.common / 'rootfs'} /"]
        if (d.folder / "files").is_dir():
            argv.append(f"--customize-hook=sync-in {d.folder / 'files'} /")
        if d.services:
            argv.append(f"--customize-hook=chroot \"$1\" systemctl enable {' '.join(d.services)}")
        argv += ['--customize-hook=: > "$1/etc/machine-id"; echo localhost > "$1/etc/hostname"',
                 "--customize-hook=chroot \"$1\" dpkg-query -W -f '${Package} ${Version}\\n' > \"$1/.packages\"",
                 d.suite, str(rootfs), *sources]
        log.info("mmdebstrap %s into %s", d.suite, rootfs)
        res = subprocess.run(argv, capture_output=True, text=True)
        if res.returncode != 0:
            tail = " ".join(res.stderr.strip().splitlines()[-3:])[:400]
            raise OperationError(f"image {d.name}: mmdebstrap failed: {tail}")
        packages = (rootfs / ".packages").read_text().splitlines()
        (rootfs / ".packages").unlink()
        ids = _ids(rootfs)
        kernel = kmod.find_kernel(rootfs)
        modules = kmod.resolve(kernel, d.modules)
        busybox = debs.fetch(BUSYBOX_PACKAGE, cache)
        shutil.copyfile(kernel.vmlinuz, out / KERNEL)
        for p in (rootfs / "boot").iterdir():  # the kernel is served beside the root, not inside it
            if p.is_file() or p.is_symlink():
                p.unlink()
        initramfs.build(out / INITRAMFS, busybox=busybox.tree / "bin" / "busybox", modules=modules,
                        init=(d.common / "init.sh").read_bytes(), udhcpc=(d.common / "udhcpc.sh").read_bytes(),
                        info={"image": d.name, "version": version, "kernel": kernel.release})
        # zstd: a little larger than xz, much faster to build and to unpack on the node
        res = subprocess.run(["mksquashfs", str(rootfs), str(out / ROOTFS), "-comp", "zstd", "-noappend",
                              "-no-progress", "-quiet"], capture_output=True, text=True)
        if res.returncode != 0:
            raise OperationError(f"image {d.name}: mksquashfs failed: {res.stderr.strip()[-300:]}")
        return {
            "boot": {"kernel": KERNEL, "initrds": [INITRAMFS], "rootfs": ROOTFS},
            "kernel": {"release": kernel.release, "package": d.kernel_package, "modules": [n for n, _ in modules]},
            "packages": packages,
            "ids": ids,
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _ids(rootfs: Path) -> dict[str, list[int]]:
    """user name -> [uid, gid] in the built root (overlay owners are resolved against it)."""
    ids = {}
    for line in (rootfs / "etc/passwd").read_text().splitlines():
        parts = line.split(":")
        if len(parts) >= 4 and parts[2].isdigit() and parts[3].isdigit():
            ids[parts[0]] = [int(parts[2]), int(parts[3])]
    return ids


BUILDERS: dict[str, Callable[[Definition, Path, Path, str], dict[str, Any]]] = {
    "initramfs": _build_initramfs,
    "debian": _build_debian,
}


# --------------------------------------------------------------------------- the build


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _overlay_manifest(d: Definition, ids: dict[str, list[int]]) -> list[dict]:
    out = []
    for i, e in enumerate(d.overlay):
        if e.owner.isdigit():
            uid = gid = int(e.owner)
        elif e.owner in ids:
            uid, gid = ids[e.owner]
        else:
            raise OperationError(f"image {d.name}: overlay[{i}].owner {e.owner} is not a user in the built image; "
                                 f"fix {d.path} (or add the package that creates it)")
        out.append({**e.as_dict(), "uid": uid, "gid": gid})
    return out


def build(definitions: Path, image_root: Path, name: str, *, cache: Path | None = None, publish: bool = True,
          store=None, actor: str = "provisioner") -> BuildResult:
    """Build image NAME from definitions/NAME/image.yaml into image_root/NAME/VERSION/ and (by
    default) publish it. Raises OperationError (one line, says what to do) on any failure,
    leaving nothing behind but the versions that were there."""
    started = time.time()
    d = load(definitions, name)
    preflight(d)
    cache = cache or default_cache()
    folder = image_root / name
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=folder))
    version = None
    try:
        version = reserve_version(folder, started)
        info = BUILDERS[d.builder](d, tmp, cache, version)
        overlay = _overlay_manifest(d, info.pop("ids", {}))
        if d.overlay:
            shutil.copytree(d.folder / "overlay", tmp / "overlay")
        shutil.copyfile(d.path, tmp / "image.yaml")
        files = {}
        for p in sorted(tmp.rglob("*")):
            if p.is_file():
                files[str(p.relative_to(tmp))] = {"size": p.stat().st_size, "sha256": _sha256(p)}
        manifest = {
            "image": name, "version": version, "description": d.description, "role": d.role, "builder": d.builder,
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)), "built_at_ts": started,
            "build_seconds": round(time.time() - started, 2),
            "definition_sha256": d.digest(), "cmdline": d.cmdline,
            "base": {"distribution": "debian", "suite": d.suite},
            "services": list(d.services), "overlay": overlay, "files": files, **info,
        }
        with open(tmp / versions.MANIFEST, "w") as f:
            json.dump(manifest, f, indent=2, sort_keys=True)
            f.write("\n")
        for p in tmp.rglob("*"):
            if p.is_file():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
        os.chmod(tmp, 0o755)  # mkdtemp made it 0700; the server may run as another user
        # The commit point: rename(2) onto the empty reserved folder; the version appears
        # complete, or not at all.
        os.rename(tmp, folder / version)
        versions.fsync_dir(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if version is not None:
            try:
                os.rmdir(folder / version)  # the reservation, still empty
            except OSError:
                pass
        raise
    path = folder / version
    log.info("built %s %s in %.1f s", name, version, time.time() - started)
    if store is not None:
        store.add_event(None, actor, "image-build",
                        f"image {name}: built version {version} ({sum(f['size'] for f in files.values())} bytes)",
                        {"image": name, "version": version, "definition_sha256": manifest["definition_sha256"],
                         "files": {k: v["sha256"] for k, v in files.items()}})
    previous = versions.publish(image_root, name, version, store=store, actor=actor,
                                reason="new build") if publish else None
    return BuildResult(name, version, path, manifest, publish, previous, round(time.time() - started, 2))

"""`provisioner image build NAME`: build an image into a new version folder, then publish it.

Steps: check everything that can fail early (the definition, package repositories and the
packages they must provide, build tools) before downloading anything; for a `debian` image,
work out its build key (buildcache.py: the definition's content, the package set apt resolves
now, the binaries' and node images' identities) and take the products from the build cache
when the key is there, else build them cold (mmdebstrap, binaries, node images, initramfs,
squashfs) and store them there; build into a hidden folder under site.image_root/NAME/; write
the manifest (files, sizes, sha256, the definition's hash, build time); rename the folder to its
version (the commit point); publish (NAME/current).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable

from provisioner.errors import ConfigError, OperationError
from provisioner.images import binaries, buildcache, debs, initramfs, kmod, packageset, versions
from provisioner.images.definition import Definition, load
from provisioner.images.digest import sha256_file

log = logging.getLogger("provisioner.images")

PROBE_TIMEOUT_S = 15
BUSYBOX_PACKAGE = "busybox-static"
KERNEL = "vmlinuz"
INITRAMFS = "initramfs.img"
ROOTFS = "rootfs.squashfs"
OCI_DIR = "/usr/share/provisioner/oci"  # node images in the root: oci.NODE_IMAGES_DIR, read by the k8s image's import unit
OCI_REGISTRY = "provisioner.local/"
# What a cold debian build takes on 2 cores with the Go binaries already built (a
# later cold build of the same image on this machine quotes its own last time instead).
COLD_ESTIMATE = "about 2-3 min"  # measured: slurm 120 s, k8s 138 s
PROGRESS_S = 10  # how often a cold build says how far the package installation is


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
    needs from them), missing build tools. (Packages the mirror lacks: plan_debian, which
    resolves the package set against the image's own sources.)"""
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


@dataclass
class DebianPlan:
    """What a debian build will put in the root, resolved before building: its build key."""

    packages: packageset.PackageSet
    binaries: list[binaries.Resolved]
    oci: list[tuple[str, Any]]  # (name, NodeImage) in the definition's order
    inputs: dict[str, Any]
    key: str
    work: Path  # scratch (the node images' archives); removed after the build
    identities: dict[str, str] = field(default_factory=dict)  # for Definition.digest


def _node_images(d: Definition, out: Path, cache: Path) -> list[tuple[str, Any]]:
    """The node images the definition names, built by provisioner.images.oci."""
    if not d.oci_images:
        return []
    try:
        from provisioner.images import oci
    except ImportError as exc:
        raise OperationError(f"image {d.name}: oci_images needs provisioner.images.oci, which this installation "
                             f"cannot import ({exc}); update provisioner, or drop oci_images from {d.path}") from None
    # their archives are cached by oci.py itself (~/.cache/provisioner/oci); busybox-static comes
    # through this build's download cache
    made = oci.build_node_images(out, packages=cache)
    by_name = {}
    for img in made:
        ref = str(img.ref)
        short = ref[len(OCI_REGISTRY):] if ref.startswith(OCI_REGISTRY) else ref.rsplit("/", 1)[-1]
        by_name[short.split(":", 1)[0]] = img
    out_list = []
    for i, n in enumerate(d.oci_images):
        if n not in by_name:
            raise ConfigError(d.path, f"oci_images[{i}]", f"no node image {n!r}; provisioner.images.oci makes: "
                                                         f"{', '.join(sorted(by_name)) or 'none'}")
        out_list.append((n, by_name[n]))
    return out_list


def plan_debian(d: Definition, cache: Path) -> DebianPlan:
    """Resolve everything the build key covers (builds nothing but the node images, which are
    small and cached by their module)."""
    bins = binaries.resolve(d)
    log.info("image %s: resolving its package set against %s %s (apt, a few seconds)", d.name, d.mirror, d.suite)
    pkgs = packageset.resolve(d, cache)
    work = Path(tempfile.mkdtemp(prefix=f"provisioner-{d.name}-"))
    try:
        oci = _node_images(d, work / "oci", cache)
        busybox = debs.candidate(BUSYBOX_PACKAGE)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    bin_ids = {b.binary.path: b.identity for b in bins}
    oci_ids = {n: str(img.digest) for n, img in oci}
    inputs = buildcache.key_inputs(d, pkgs.lines(), bin_ids, oci_ids, {"busybox": " ".join(busybox)})
    identities = {**{f"{b.field} {b.binary.path}": b.identity for b in bins},
                  **{f"oci_images {n}": f"{img.ref} {img.digest}" for n, img in oci}}
    return DebianPlan(pkgs, bins, oci, inputs, buildcache.key(inputs), work, identities)


def inside(root: Path, path: str) -> Path:
    """`path` (absolute, on the node) under `root`, following the root's own directory symlinks
    (/bin -> usr/bin, absolute or relative) without ever leaving it."""
    parts = PurePosixPath(path).parts[1:]
    cur = root
    for part in parts[:-1]:
        nxt = cur / part
        for _ in range(40):
            if not nxt.is_symlink():
                break
            target = os.readlink(nxt)
            nxt = root / target.lstrip("/") if target.startswith("/") else nxt.parent / target
            nxt = Path(os.path.normpath(nxt))
        else:
            raise OperationError(f"{path}: too many symlinks in the root")
        if not nxt.is_relative_to(root):
            raise OperationError(f"{path}: leaves the root through a symlink")
        cur = nxt
    return cur / parts[-1]


HOST_KEYS_GLOB = "ssh_host_*"  # in /etc/ssh of the root


def remove_host_keys(rootfs: Path) -> list[str]:
    """Delete the SSH host keys openssh-server's postinst generated in the root: an image is
    shared by every node that boots it, so its keys would be every node's private key, and each
    image would show a node a different one. A node's own key comes in its overlay
    (provisioner.hostkeys); without one its sshd does not start. Returns the names removed."""
    folder = rootfs / "etc" / "ssh"
    removed = []
    for p in sorted(folder.glob(HOST_KEYS_GLOB)) if folder.is_dir() else []:
        if p.is_file() or p.is_symlink():
            p.unlink()
            removed.append(p.name)
    return removed


def _install(src: Path, dst: Path, mode: int) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    if dst.is_symlink() or dst.exists():
        dst.unlink()
    shutil.copyfile(src, dst)
    os.chmod(dst, mode)


def _mmdebstrap(d: Definition, argv: list[str], logfile: Path, started: float, total: int) -> None:
    """Run mmdebstrap --verbose, showing its steps (its I: lines) and, every PROGRESS_S, how
    many of the `total` packages apt has downloaded and dpkg unpacked and set up; the whole
    output goes to logfile."""
    counts = {"downloaded": 0, "unpacked": 0, "set up": 0}
    shown, last = dict(counts), time.time()
    with open(logfile, "w") as logf:
        logf.write("$ " + " ".join(argv) + "\n")
        logf.flush()
        proc = subprocess.Popen(argv, stdout=logf, stderr=subprocess.PIPE, text=True, bufsize=1,
                                errors="replace")
        tail: list[str] = []
        assert proc.stderr is not None
        for line in proc.stderr:
            logf.write(line)
            line = line.rstrip()
            if line.startswith("Get:") and "[" in line:
                counts["downloaded"] += 1
            elif line.startswith("Unpacking "):
                counts["unpacked"] += 1
            elif line.startswith("Setting up "):
                counts["set up"] += 1
            elif line.startswith(("E: ", "W: ", "dpkg: ", "Errors were")) or "error" in line.lower():
                tail = (tail + [line])[-4:]
            if line.startswith("I: ") and not line.startswith(("I: chroot architecture", "I: automatically chosen",
                                                               "I: finding correct")):
                text = line[3:] if len(line) < 103 else line[3:103] + "..."
                log.info("image %s: [%4.0f s] mmdebstrap: %s", d.name, time.time() - started, text)
            if counts != shown and time.time() - last >= PROGRESS_S:
                log.info("image %s: [%4.0f s]   %s of %d packages", d.name, time.time() - started,
                         ", ".join(f"{v} {k}" for k, v in counts.items()), total)
                shown, last = dict(counts), time.time()
        rc = proc.wait()
    if rc != 0:
        raise OperationError(f"image {d.name}: mmdebstrap failed: {' '.join(tail[-3:])[:400] or 'see its log'}; "
                             f"the whole output is in {logfile}")


def _build_debian(d: Definition, out: Path, cache: Path, plan: DebianPlan, logfile: Path) -> dict[str, Any]:
    started = time.time()
    steps = 4
    if plan.binaries:
        log.info("image %s: [1/%d] the binaries: %s", d.name, steps,
                 ", ".join(f"{b.binary.path} from {b.binary.source}" for b in plan.binaries))
    bin_files = [(r, binaries.materialize(d, r)) for r in plan.binaries]
    work = Path(tempfile.mkdtemp(prefix=f".{d.name}-rootfs-", dir=out.parent))
    try:
        rootfs = work / "root"
        keys = work / "keys"
        sources = packageset.source_lines(d, keys)
        argv = ["mmdebstrap", "--verbose", "--variant=minbase", "--mode=root", "--format=directory",
                f"--include={','.join(packageset.selection(d))}",
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
        log.info("image %s: [2/%d] mmdebstrap: %d packages from %s %s into a new root (log: %s)", d.name, steps,
                 len(plan.packages.packages), d.mirror, d.suite, logfile)
        _mmdebstrap(d, argv, logfile, started, len(plan.packages.packages))
        packages = (rootfs / ".packages").read_text().splitlines()
        (rootfs / ".packages").unlink()
        removed = remove_host_keys(rootfs)
        if removed:
            log.info("image %s: removed the SSH host keys openssh-server made at build (%s): every node gets "
                     "its own in its overlay", d.name, ", ".join(removed))
        if bin_files or plan.oci:
            log.info("image %s: [3/%d] adding %s", d.name, steps,
                     ", ".join([r.binary.path for r, _ in bin_files] + [f"{OCI_DIR}/{Path(i.archive).name}"
                                                                       for _, i in plan.oci]))
        bin_info = []
        for r, src in bin_files:
            _install(src, inside(rootfs, r.binary.path), r.binary.mode)
            bin_info.append({"path": r.binary.path, "source": r.binary.source, "identity": r.identity,
                             "size": src.stat().st_size, "sha256": sha256_file(src)})
        oci_info = []
        for n, img in plan.oci:
            archive = Path(img.archive)
            dest = f"{OCI_DIR}/{archive.name}"
            _install(archive, inside(rootfs, dest), 0o644)
            oci_info.append({"name": n, "ref": str(img.ref), "digest": str(img.digest), "path": dest,
                             "size": archive.stat().st_size})
        ids = _ids(rootfs)
        kernel = kmod.find_kernel(rootfs)
        modules = kmod.resolve(kernel, d.modules)
        busybox = debs.fetch(BUSYBOX_PACKAGE, cache)
        shutil.copyfile(kernel.vmlinuz, out / KERNEL)
        for p in (rootfs / "boot").iterdir():  # the kernel is served beside the root, not inside it
            if p.is_file() or p.is_symlink():
                p.unlink()
        # the same initramfs serves every version built from this key: it names the key, not a version
        initramfs.build(out / INITRAMFS, busybox=busybox.tree / "bin" / "busybox", modules=modules,
                        init=(d.common / "init.sh").read_bytes(), udhcpc=(d.common / "udhcpc.sh").read_bytes(),
                        info={"image": d.name, "build": plan.key, "kernel": kernel.release})
        log.info("image %s: [4/%d] [%4.0f s] initramfs done; mksquashfs (zstd) of the root", d.name, steps,
                 time.time() - started)
        # zstd: a little larger than xz, much faster to build and to unpack on the node
        res = subprocess.run(["mksquashfs", str(rootfs), str(out / ROOTFS), "-comp", "zstd", "-noappend",
                              "-no-progress", "-quiet"], capture_output=True, text=True)
        if res.returncode != 0:
            raise OperationError(f"image {d.name}: mksquashfs failed: {res.stderr.strip()[-300:]}")
        log.info("image %s: [%4.0f s] root file system %s: %.0f MB", d.name, time.time() - started, ROOTFS,
                 (out / ROOTFS).stat().st_size / 1e6)
        return {
            "boot": {"kernel": KERNEL, "initrds": [INITRAMFS], "rootfs": ROOTFS},
            "kernel": {"release": kernel.release, "package": d.kernel_package, "modules": [n for n, _ in modules]},
            "packages": packages,
            "binaries": bin_info,
            "oci_images": oci_info,
            "ids": ids,
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def _debian(d: Definition, out: Path, cache: Path, plan: DebianPlan, bcache: buildcache.BuildCache,
            rebuild: bool) -> dict[str, Any]:
    """The products of a debian build in `out`: from the build cache when its key is there,
    else built cold (and then stored there)."""
    started = time.time()
    with bcache.lock(d.name, plan.key):
        entry = None if rebuild else bcache.get(d.name, plan.key)
        if entry is not None:
            how = set()
            for rel in entry.files:
                how.add(buildcache.link_or_copy(entry.path / rel, out / rel))
            bad = [rel for rel, f in entry.files.items() if sha256_file(out / rel) != f["sha256"]]
            if not bad:
                log.info("image %s: build key %s is in the build cache (built %s, cold build %s): %s its files "
                         "in %.1f s", d.name, plan.key, entry.record.get("built_at"),
                         _minutes(entry.record.get("build_seconds", 0)), " and ".join(sorted(how)),
                         time.time() - started)
                return {**entry.record["info"], "build": {"key": plan.key, "cache": "hit", "entry": str(entry.path),
                                                          "cold_seconds": entry.record.get("build_seconds")}}
            log.warning("image %s: the cached build %s is damaged (%s differ from build.json); dropping it and "
                        "building cold", d.name, entry.path, ", ".join(bad))
            for rel in entry.files:
                (out / rel).unlink(missing_ok=True)
            bcache.drop(d.name, plan.key)
        previous = bcache.entries(d.name)
        why = ("--rebuild" if rebuild else
               "; ".join(buildcache.changes(previous[0].record.get("inputs", {}), plan.inputs)) if previous
               else f"no build of {d.name} in the build cache yet")
        last = bcache.cold_seconds(d.name)
        estimate = f"about {_minutes(last)} (the last cold build of {d.name} here)" if last else \
            f"{COLD_ESTIMATE} on 2 cores"
        extras = [f"{b.binary.path} from {b.binary.source}" for b in plan.binaries]
        if plan.oci:
            extras.append(f"node images {', '.join(n for n, _ in plan.oci)} in {OCI_DIR}")
        log.info("image %s: cold build, key %s (%s). It installs %d Debian packages (%.0f MB to download from "
                 "%s) into a new root with mmdebstrap%s, makes the busybox initramfs and a zstd squashfs of the "
                 "root: %s. The result is kept in %s, so a build with the same inputs takes seconds.",
                 d.name, plan.key, why, len(plan.packages.packages), plan.packages.download_bytes / 1e6, d.mirror,
                 f", adds {', '.join(extras)}" if extras else "", estimate, bcache.path(d.name, plan.key))
        if os.geteuid() != 0:
            raise OperationError(f"image {d.name}: a cold build needs root (mmdebstrap --mode=root makes a root "
                                 f"whose files belong to several users); run `provisioner image build {d.name}` as "
                                 "root (a build whose key is in the build cache does not)")
        bcache.root.mkdir(parents=True, exist_ok=True)
        logfile = bcache.root / f"{d.name}-{plan.key}.log"
        info = _build_debian(d, out, cache, plan, logfile)
        seconds = round(time.time() - started, 1)
        got = sorted(info["packages"])
        want = plan.packages.lines()
        build = {"key": plan.key, "cache": "rebuild" if rebuild else "miss", "cold_seconds": seconds}
        if got != want:
            diff = buildcache.changes({"packages": want}, {"packages": got})
            log.warning("image %s: the root holds other packages than apt resolved (%s: the mirror changed during "
                        "the build?); not stored in the build cache", d.name, "; ".join(diff))
            return {**info, "build": {**build, "entry": None}}
        files = {rel: {"size": (out / rel).stat().st_size, "sha256": sha256_file(out / rel)}
                 for rel in (KERNEL, INITRAMFS, ROOTFS)}
        entry_path = bcache.put(d.name, plan.key, out, files, {
            "image": d.name, "built_at": buildcache.now_iso(started), "built_at_ts": started,
            "build_seconds": seconds, "inputs": plan.inputs, "info": info})
        log.info("image %s: cold build done in %s; stored in the build cache: %s", d.name, _minutes(seconds),
                 entry_path)
        others = [e.path for e in bcache.entries(d.name) if e.key != plan.key]
        if others:
            size = sum(p.stat().st_size for o in others for p in o.iterdir() if p.is_file())
            log.info("image %s: %d older builds in the build cache (%.0f MB; versions made from them keep their "
                     "own links): rm -rf %s", d.name, len(others), size / 1e6, " ".join(map(str, others)))
        return {**info, "build": {**build, "entry": str(entry_path)}}


def _ids(rootfs: Path) -> dict[str, list[int]]:
    """user name -> [uid, gid] in the built root (overlay owners are resolved against it)."""
    ids = {}
    for line in (rootfs / "etc/passwd").read_text().splitlines():
        parts = line.split(":")
        if len(parts) >= 4 and parts[2].isdigit() and parts[3].isdigit():
            ids[parts[0]] = [int(parts[2]), int(parts[3])]
    return ids


BUILDERS: dict[str, Callable[[Definition, Path, Path, str], dict[str, Any]]] = {
    "initramfs": _build_initramfs,  # a couple of seconds: never cached
}


# --------------------------------------------------------------------------- the build



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
          store=None, actor: str = "provisioner", build_cache: Path | None = None,
          rebuild: bool = False) -> BuildResult:
    """Build image NAME from definitions/NAME/image.yaml into image_root/NAME/VERSION/ and (by
    default) publish it. Raises OperationError (one line, says what to do) on any failure,
    leaving nothing behind but the versions that were there.

    cache: downloads (default_cache()); build_cache: finished debian builds by key
    (buildcache.default_root()); rebuild: build cold even when the key is cached (and replace
    the cached build)."""
    started = time.time()
    d = load(definitions, name)
    preflight(d)
    cache = cache or default_cache()
    plan = plan_debian(d, cache) if d.builder == "debian" else None
    try:
        return _build(d, image_root, cache, plan, buildcache.BuildCache(build_cache), rebuild, started,
                      publish=publish, store=store, actor=actor)
    finally:
        if plan is not None:
            shutil.rmtree(plan.work, ignore_errors=True)


def _build(d: Definition, image_root: Path, cache: Path, plan: DebianPlan | None, bcache: buildcache.BuildCache,
           rebuild: bool, started: float, *, publish: bool, store, actor: str) -> BuildResult:
    name = d.name
    folder = image_root / name
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=folder))
    version = None
    try:
        version = reserve_version(folder, started)
        if plan is None:
            info = BUILDERS[d.builder](d, tmp, cache, version)
        else:
            info = _debian(d, tmp, cache, plan, bcache, rebuild)
        overlay = _overlay_manifest(d, info.pop("ids", {}))
        if d.overlay:
            shutil.copytree(d.folder / "overlay", tmp / "overlay")
        shutil.copyfile(d.path, tmp / "image.yaml")
        files = {}
        for p in sorted(tmp.rglob("*")):
            if p.is_file():
                files[str(p.relative_to(tmp))] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
        manifest = {
            "image": name, "version": version, "description": d.description, "role": d.role, "builder": d.builder,
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)), "built_at_ts": started,
            "build_seconds": round(time.time() - started, 2),
            "definition_sha256": d.digest(plan.identities if plan else None), "cmdline": d.cmdline,
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

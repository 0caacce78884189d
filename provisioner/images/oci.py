"""The container images a Kubernetes node needs, built locally: no registry is reachable from a
node (nor, often, from the machine that builds its image), so the k8s image carries them as OCI
image archives that `ctr -n k8s.io images import` loads at every boot
(provisioner-import-images.service in images/k8s/files/).

    build_node_images(out_dir, cache=None, *, packages=None) -> [NodeImage]
        out_dir: the image's root + NODE_IMAGES_DIR (/usr/share/provisioner/oci)

- PAUSE_REF, provisioner.local/pause:1: the pod sandbox ("pause") image, containerd's
  sandbox_image. Its one file is provisioner's own static program (provisioner/images/pause.c,
  compiled here with Debian's gcc and libc6-dev), run as 65535:65535.
- BUSYBOX_REF, provisioner.local/busybox:1: a workload image for test pods: Debian's
  busybox-static as /bin/busybox with a symlink per applet, Cmd ["sh"].

Each archive is an OCI image layout in a tar (oci-layout, index.json, blobs/sha256/...) with a
docker-style manifest.json beside it (so `docker load` and podman take it too). containerd 1.6
names an image imported from an OCI layout by the index entry's annotation
io.containerd.image.name (the full reference, used as it is); org.opencontainers.image.ref.name
holds the tag alone, as OCI tools expect (ctr 1.6 would name an image with only that
import-YYYY-MM-DD:1, or BASE:1 with --base-name BASE).

Everything is deterministic (fixed mtimes, owners and order, JSON with sorted keys), so the same
inputs give the same digests. The one layer is an uncompressed tar: the archives end up inside the
node's squashfs, which compresses them anyway, and containerd then does not gunzip at every boot.

The archives are cached under CACHE/KEY/ (CACHE: $PROVISIONER_CACHE/oci, else
~/.cache/provisioner/oci), KEY a hash of everything they are made from: this file's RECIPE,
pause.c, the compiler and static libc that build it, and the busybox-static version.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from provisioner.errors import OperationError
from provisioner.images import debs
from provisioner.images.digest import sha256_file

log = logging.getLogger("provisioner.images")

PAUSE_REF = "provisioner.local/pause:1"
BUSYBOX_REF = "provisioner.local/busybox:1"
# Bump when anything below changes what goes into an archive: cached archives are keyed by it.
RECIPE = 1
PAUSE_SOURCE = Path(__file__).resolve().parent / "pause.c"
BUSYBOX_PACKAGE = "busybox-static"
PAUSE_USER = "65535:65535"  # nobody needs to own anything in a sandbox
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
META = "images.json"
# Where the node image holds the archives: provisioner-import-images.service imports every *.tar here.
NODE_IMAGES_DIR = PurePosixPath("/usr/share/provisioner/oci")

MT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_LAYER = "application/vnd.oci.image.layer.v1.tar"
ANNOTATION_CONTAINERD_NAME = "io.containerd.image.name"
ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"


@dataclass(frozen=True)
class NodeImage:
    ref: str  # provisioner.local/NAME:TAG, the name containerd gives it on import
    archive: Path  # the OCI archive in out_dir
    digest: str  # sha256:... of the image manifest (what `ctr images ls` shows as DIGEST)


def default_cache() -> Path:
    """$PROVISIONER_CACHE/oci, else ~/.cache/provisioner/oci: outside any checkout."""
    return _cache_root() / "oci"


def _cache_root() -> Path:
    return Path(os.environ.get("PROVISIONER_CACHE") or Path.home() / ".cache" / "provisioner")


# --------------------------------------------------------------------------- tar, deterministic


def tar_dir(name: str, mode: int = 0o755) -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.type, info.mode = tarfile.DIRTYPE, mode
    return info, None


def tar_file(name: str, data: bytes, mode: int = 0o644) -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), mode
    return info, data


def tar_symlink(name: str, target: str) -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = tarfile.SYMTYPE, target, 0o777
    return info, None


def tar_bytes(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    """A ustar archive of `members`, sorted by name (a directory before what it holds), every
    entry owned by 0:0 with mtime 0: the same members give the same bytes."""
    seen: dict[str, tuple[tarfile.TarInfo, bytes | None]] = {}
    for info, data in members:
        name = info.name.strip("/")
        if not name or ".." in name.split("/") or name in seen:
            raise ValueError(f"tar: bad or duplicate entry {info.name!r}")
        info.name = name
        seen[name] = (info, data)
    # parents that were not listed
    for name in list(seen):
        parts = name.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            seen.setdefault("/".join(parts[:i]), tar_dir("/".join(parts[:i])))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name in sorted(seen, key=lambda n: n.split("/")):
            info, data = seen[name]
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _json(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------- one image


def image_archive(ref: str, layer: bytes, config: dict) -> tuple[bytes, str]:
    """An OCI image layout archive of one image with one (uncompressed) layer.
    `config` is the image config's "config" part (Entrypoint, Cmd, Env, User).
    Returns (the archive's bytes, the manifest's digest)."""
    repo, _, tag = ref.rpartition(":")
    if not repo or "/" in tag:
        raise ValueError(f"image reference {ref!r} needs a tag (NAME:TAG)")
    layer_digest = _digest(layer)
    config_blob = _json({
        "architecture": "amd64", "os": "linux", "config": config,
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},  # uncompressed: diff_id = digest
        "history": [{"created_by": f"provisioner.images.oci recipe {RECIPE}"}],
    })
    manifest = _json({
        "schemaVersion": 2, "mediaType": MT_MANIFEST,
        "config": {"mediaType": MT_CONFIG, "digest": _digest(config_blob), "size": len(config_blob)},
        "layers": [{"mediaType": MT_LAYER, "digest": layer_digest, "size": len(layer)}],
    })
    manifest_digest = _digest(manifest)
    index = _json({
        "schemaVersion": 2, "mediaType": MT_INDEX,
        "manifests": [{
            "mediaType": MT_MANIFEST, "digest": manifest_digest, "size": len(manifest),
            "platform": {"architecture": "amd64", "os": "linux"},
            "annotations": {ANNOTATION_CONTAINERD_NAME: ref, ANNOTATION_REF_NAME: tag},
        }],
    })

    def blob(d: str) -> str:
        return "blobs/sha256/" + d.split(":", 1)[1]

    docker = _json([{"Config": blob(_digest(config_blob)), "RepoTags": [ref], "Layers": [blob(layer_digest)]}])
    members = [
        tar_file("oci-layout", _json({"imageLayoutVersion": "1.0.0"})),
        tar_file("index.json", index),
        tar_file("manifest.json", docker),
        *[tar_file(blob(_digest(b)), b) for b in (layer, config_blob, manifest)],
    ]
    return tar_bytes(members), manifest_digest


# --------------------------------------------------------------------------- the two images


def _run(argv: list[str], what: str, timeout: float = 120) -> subprocess.CompletedProcess:
    try:
        res = subprocess.run(argv, capture_output=True, timeout=timeout)
    except FileNotFoundError:
        raise OperationError(f"{what}: {argv[0]} not found; install Debian's gcc and libc6-dev "
                             "(apt-get install gcc libc6-dev)") from None
    except subprocess.TimeoutExpired:
        raise OperationError(f"{what}: {' '.join(argv[:2])} took more than {timeout:.0f} s") from None
    if res.returncode != 0:
        tail = " ".join(res.stderr.decode(errors="replace").strip().splitlines()[-3:])[:400]
        raise OperationError(f"{what}: {' '.join(argv[:3])} failed ({tail}); install Debian's gcc and libc6-dev "
                             "(apt-get install gcc libc6-dev) and retry")
    return res


def compiler_identity(cc: str = "gcc") -> str:
    """What the pause binary depends on besides its source: the compiler's version and target,
    and the static C library it links (its sha256)."""
    what = "building the pause image"
    version = _run([cc, "-dumpfullversion"], what).stdout.decode().strip()
    machine = _run([cc, "-dumpmachine"], what).stdout.decode().strip()
    libc = Path(_run([cc, "-print-file-name=libc.a"], what).stdout.decode().strip())
    if not libc.is_absolute() or not libc.is_file():
        raise OperationError(f"{what}: {cc} finds no static C library (libc.a); install Debian's libc6-dev "
                             "(apt-get install libc6-dev)")
    return f"{cc} {version} {machine} libc.a sha256:{hashlib.sha256(libc.read_bytes()).hexdigest()}"


def compile_pause(source: Path, cc: str = "gcc") -> bytes:
    """The static, stripped pause binary."""
    with tempfile.TemporaryDirectory(prefix="provisioner-pause-") as tmp:
        out = Path(tmp) / "pause"
        # -s: no symbol table (it would name the temporary folder); build ids hash the contents
        _run([cc, "-static", "-Os", "-s", "-Wall", "-Wextra", "-o", str(out), str(source)],
             "building the pause image")
        return out.read_bytes()


def pause_layer(binary: bytes) -> bytes:
    return tar_bytes([tar_file("pause", binary, 0o755)])


def busybox_applets(busybox: Path) -> list[str]:
    """Where busybox installs its applets (bin/sh, usr/bin/wc, ...), from `busybox --list-full`."""
    try:
        res = subprocess.run([str(busybox), "--list-full"], capture_output=True, text=True, timeout=30)
    except OSError as exc:
        raise OperationError(f"building the busybox image: cannot run {busybox} ({exc}); the node images are "
                             "amd64 and must be built on an amd64 machine") from None
    names = sorted({n.strip().strip("/") for n in res.stdout.splitlines() if n.strip()})
    if res.returncode != 0 or "bin/sh" not in names:
        raise OperationError(f"building the busybox image: `{busybox} --list-full` gave no applet list; "
                             f"delete {busybox.parent.parent} from the package cache and retry")
    return [n for n in names if n != "bin/busybox"]


def busybox_layer(binary: bytes, applets: list[str]) -> bytes:
    members = [
        tar_file("bin/busybox", binary, 0o755),
        *[tar_symlink(name, "/bin/busybox") for name in applets],
        tar_dir("etc"), tar_dir("root", 0o700), tar_dir("tmp", 0o1777),
        tar_dir("sbin"), tar_dir("usr"), tar_dir("usr/bin"), tar_dir("usr/sbin"),
        tar_file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"),
        tar_file("etc/group", b"root:x:0:\nnogroup:x:65534:\n"),
    ]
    return tar_bytes(members)


# --------------------------------------------------------------------------- cache and entry point



def content_key(pause_source: bytes, compiler: str, busybox_version: str) -> str:
    inputs = {"recipe": RECIPE, "pause.c": hashlib.sha256(pause_source).hexdigest(), "compiler": compiler,
              BUSYBOX_PACKAGE: busybox_version, "refs": [PAUSE_REF, BUSYBOX_REF]}
    return hashlib.sha256(_json(inputs)).hexdigest()[:16]


def _cached(folder: Path) -> list[dict] | None:
    """The cached entries of folder/images.json, when every archive is there whole."""
    try:
        entries = json.loads((folder / META).read_text())
        for e in entries:
            if sha256_file(folder / e["file"]) != e["sha256"]:
                raise ValueError(f"{e['file']} changed")
        return entries
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("node container images in %s are damaged (%s); building them again", folder, exc)
        return None


def _build_into(folder: Path, pause_source: bytes, busybox: Path) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="provisioner-pause-src-") as tmp:
        src = Path(tmp) / "pause.c"
        src.write_bytes(pause_source)
        pause = compile_pause(src)
    images = [
        ("pause.tar", PAUSE_REF, pause_layer(pause), {"Entrypoint": ["/pause"], "User": PAUSE_USER}),
        ("busybox.tar", BUSYBOX_REF, busybox_layer(busybox.read_bytes(), busybox_applets(busybox)),
         {"Cmd": ["sh"], "Env": [PATH_ENV]}),
    ]
    entries = []
    for file, ref, layer, config in images:
        data, digest = image_archive(ref, layer, config)
        (folder / file).write_bytes(data)
        entries.append({"file": file, "ref": ref, "digest": digest, "size": len(data),
                        "sha256": hashlib.sha256(data).hexdigest()})
    (folder / META).write_text(json.dumps(entries, indent=2, sort_keys=True) + "\n")
    return entries


def _place(src: Path, dest: Path) -> None:
    """dest becomes src's contents: a hard link when it can be (same file system), else a copy;
    replaced in one rename, never half-written."""
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EACCES):
            raise
        shutil.copyfile(src, tmp)
    os.replace(tmp, dest)


def build_node_images(out_dir: Path, cache: Path | None = None, *, packages: Path | None = None) -> list[NodeImage]:
    """The pause and busybox image archives in out_dir (pause.tar, busybox.tar), built once per
    content key into cache/KEY/ and hard-linked (or copied) from there.

    cache: where the archives are kept (default $PROVISIONER_CACHE/oci, else ~/.cache/provisioner/oci).
    packages: the Debian package cache busybox-static is fetched into (default: the image builds'
    own, $PROVISIONER_CACHE/images or ~/.cache/provisioner/images; `provisioner image build
    --cache DIR` names it). Needs gcc and libc6-dev; raises OperationError saying what to install."""
    started = time.monotonic()
    cache = Path(cache) if cache is not None else default_cache()
    packages = Path(packages) if packages is not None else _cache_root() / "images"
    out_dir = Path(out_dir)
    try:
        pause_source = PAUSE_SOURCE.read_bytes()
    except OSError as exc:
        raise OperationError(f"building the pause image: cannot read {PAUSE_SOURCE} ({exc.strerror}); "
                             "reinstall provisioner") from None
    busybox = debs.fetch(BUSYBOX_PACKAGE, packages)
    key = content_key(pause_source, compiler_identity(), busybox.version)
    folder = cache / key
    entries = _cached(folder)
    if entries is None:
        cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=cache))
        try:
            entries = _build_into(tmp, pause_source, busybox.tree / "bin" / "busybox")
            os.chmod(tmp, 0o755)
            theirs = _cached(folder) if folder.exists() else None
            if theirs is not None:  # another build finished first: the same key, the same bytes
                entries = theirs
            else:
                shutil.rmtree(folder, ignore_errors=True)  # a damaged one
                try:
                    os.rename(tmp, folder)
                except OSError:
                    entries = _cached(folder)  # another build renamed its folder just now
                    if entries is None:
                        raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("built the node container images %s in %.1f s (cache %s)",
                 ", ".join(e["ref"] for e in entries), time.monotonic() - started, folder)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = []
    for e in entries:
        _place(folder / e["file"], out_dir / e["file"])
        result.append(NodeImage(e["ref"], out_dir / e["file"], e["digest"]))
    return result

"""The node's container images (provisioner/images/oci.py): archive structure and determinism,
the pause program's signals, the k8s image's containerd/CNI/systemd files; then, against a real
containerd 1.6 (Debian's, with runc) of the test's own, the import the node runs at boot and
containers from both images: busybox runs a shell command, pause exits 0 on SIGTERM and reaps
the orphans re-parented to it."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import signal
import subprocess
import tarfile
import tempfile
import time
import tomllib
from configparser import ConfigParser
from pathlib import Path

import pytest

from provisioner.errors import OperationError
from provisioner.images import oci
from provisioner.model import DEFAULT_IMAGE_DEFINITIONS
from testbed.parts import PartMissing
from testbed.process import Daemon
from testbed.wait import wait_for
from tests.support import missing, require_binary

K8S_FILES = DEFAULT_IMAGE_DEFINITIONS / "k8s" / "files"

# --------------------------------------------------------------------------- helpers


def _members(data: bytes) -> dict[str, tuple[tarfile.TarInfo, bytes | None]]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {m.name: (m, tar.extractfile(m).read() if m.isfile() else None) for m in tar.getmembers()}


def read_archive(archive: Path) -> dict:
    """An OCI archive's parts: index, manifest, config, and the layer's members."""
    files = _members(archive.read_bytes())
    blob = lambda d: files["blobs/sha256/" + d.split(":", 1)[1]][1]  # noqa: E731
    index = json.loads(files["index.json"][1])
    manifest = json.loads(blob(index["manifests"][0]["digest"]))
    config = json.loads(blob(manifest["config"]["digest"]))
    layer = blob(manifest["layers"][0]["digest"])
    return {"files": files, "index": index, "manifest": manifest, "config": config, "layer": _members(layer),
            "docker": json.loads(files["manifest.json"][1])}


def build(out: Path, cache: Path) -> list[oci.NodeImage]:
    """build_node_images with its real tools (gcc, libc6-dev, apt for busybox-static)."""
    require_binary("gcc")
    require_binary("apt-get")
    require_binary("dpkg-deb")
    try:
        return oci.build_node_images(out, cache)
    except OperationError as exc:
        if "gcc" in str(exc) or "libc6-dev" in str(exc) or "download" in str(exc):
            raise PartMissing(f"what the node images are built with ({exc})") from None
        raise


@pytest.fixture(scope="module")
def node_images(tmp_path_factory) -> list[oci.NodeImage]:
    """Built with the real cache (~/.cache/provisioner/oci), as an image build does."""
    return build(tmp_path_factory.mktemp("node-images"), oci.default_cache())


# --------------------------------------------------------------------------- unit: archives


def test_tar_is_deterministic_sorted_and_owned_by_root():
    a = oci.tar_bytes([oci.tar_file("b/c", b"x", 0o755), oci.tar_symlink("a", "/b/c"), oci.tar_dir("tmp", 0o1777)])
    b = oci.tar_bytes([oci.tar_dir("tmp", 0o1777), oci.tar_symlink("a", "/b/c"), oci.tar_file("b/c", b"x", 0o755)])
    assert a == b
    members = _members(a)
    assert list(members) == ["a", "b", "b/c", "tmp"]  # the parent b was added, before what it holds
    assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 for m, _ in members.values())
    assert members["tmp"][0].mode == 0o1777 and members["b/c"][0].mode == 0o755 and members["b/c"][1] == b"x"
    assert members["a"][0].issym() and members["a"][0].linkname == "/b/c"
    with pytest.raises(ValueError):
        oci.tar_bytes([oci.tar_file("../x", b"")])


def test_image_archive_structure_is_what_containerd_names_and_checks(tmp_path):
    layer = oci.tar_bytes([oci.tar_file("hello", b"hi\n")])
    data, digest = oci.image_archive("provisioner.local/test:7", layer, {"Cmd": ["/hello"]})
    assert oci.image_archive("provisioner.local/test:7", layer, {"Cmd": ["/hello"]}) == (data, digest)
    (tmp_path / "t.tar").write_bytes(data)
    a = read_archive(tmp_path / "t.tar")
    assert json.loads(a["files"]["oci-layout"][1]) == {"imageLayoutVersion": "1.0.0"}
    # every blob is named by its content's sha256
    for name, (_, body) in a["files"].items():
        if name.startswith("blobs/sha256/") and body is not None:
            assert name.rsplit("/", 1)[1] == hashlib.sha256(body).hexdigest()
    entry = a["index"]["manifests"][0]
    assert entry["digest"] == digest and entry["mediaType"] == oci.MT_MANIFEST
    # containerd 1.6 takes the full name from its own annotation; ref.name is the tag alone
    assert entry["annotations"] == {"io.containerd.image.name": "provisioner.local/test:7",
                                    "org.opencontainers.image.ref.name": "7"}
    assert entry["platform"] == {"architecture": "amd64", "os": "linux"}
    assert a["manifest"]["layers"][0]["mediaType"] == "application/vnd.oci.image.layer.v1.tar"
    assert a["config"]["rootfs"] == {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(layer).hexdigest()]}
    assert (a["config"]["architecture"], a["config"]["os"], a["config"]["config"]) == ("amd64", "linux",
                                                                                       {"Cmd": ["/hello"]})
    assert a["layer"]["hello"][1] == b"hi\n"
    # docker-style manifest.json for docker/podman load: the same blobs, the full name
    (docker,) = a["docker"]
    assert docker["RepoTags"] == ["provisioner.local/test:7"]
    assert docker["Config"] in a["files"] and docker["Layers"][0] in a["files"]
    with pytest.raises(ValueError):
        oci.image_archive("provisioner.local/untagged", layer, {})


# --------------------------------------------------------------------------- unit: the two images


def test_node_images_are_deterministic_cached_and_linked(tmp_path, monkeypatch):
    first = build(tmp_path / "out1", tmp_path / "cache1")
    assert [i.ref for i in first] == [oci.PAUSE_REF, oci.BUSYBOX_REF]
    # a fresh cache (compiled again, packed again): the same bytes, the same digests
    second = build(tmp_path / "out2", tmp_path / "cache2")
    assert [i.digest for i in first] == [i.digest for i in second]
    for a, b in zip(first, second):
        assert a.archive.read_bytes() == b.archive.read_bytes()
    (key,) = [p.name for p in (tmp_path / "cache1").iterdir()]
    assert re.fullmatch(r"[0-9a-f]{16}", key)
    cached = tmp_path / "cache1" / key
    # out_dir holds hard links to the cache (same file system)
    assert all(i.archive.stat().st_ino == (cached / i.archive.name).stat().st_ino for i in first)

    def no_compiler(*a, **k):
        raise AssertionError("compiled again although the cache holds this key")

    monkeypatch.setattr(oci, "compile_pause", no_compiler)
    again = build(tmp_path / "out3", tmp_path / "cache1")
    assert [(i.ref, i.digest) for i in again] == [(i.ref, i.digest) for i in first]
    # a damaged archive in the cache (through a hard link, say) is noticed and built again
    monkeypatch.undo()
    good = first[1].archive.read_bytes()
    with open(cached / "busybox.tar", "r+b") as f:
        f.truncate(1000)
    fixed = build(tmp_path / "out4", tmp_path / "cache1")
    assert fixed[1].archive.read_bytes() == good


def test_pause_and_busybox_contents(node_images):
    pause, busybox = node_images
    p = read_archive(pause.archive)
    assert list(p["layer"]) == ["pause"] and p["layer"]["pause"][0].mode == 0o755
    assert p["config"]["config"] == {"Entrypoint": ["/pause"], "User": "65535:65535"}
    assert p["layer"]["pause"][1][:4] == b"\x7fELF"
    b = read_archive(busybox.archive)
    layer = b["layer"]
    assert layer["bin/busybox"][0].mode == 0o755 and layer["bin/busybox"][1][:4] == b"\x7fELF"
    assert layer["bin/sh"][0].issym() and layer["bin/sh"][0].linkname == "/bin/busybox"
    assert layer["usr/bin/wc"][0].linkname == "/bin/busybox"
    assert layer["tmp"][0].mode == 0o1777 and layer["root"][0].mode == 0o700
    assert b["config"]["config"]["Cmd"] == ["sh"]
    print(f"pause.tar {pause.archive.stat().st_size} bytes, busybox.tar {busybox.archive.stat().st_size} bytes, "
          f"{sum(1 for m, _ in layer.values() if m.issym())} applet links")


def _pause_binary(node_images, folder: Path) -> Path:
    path = folder / "pause"
    path.write_bytes(read_archive(node_images[0].archive)["layer"]["pause"][1])
    path.chmod(0o755)
    return path


def _waiting(pid: int) -> bool:
    """pause is asleep in sigwaitinfo(), its only blocking call, with its signals blocked (while
    it waits, /proc shows them unblocked: the kernel lifts the block for the wait itself)."""
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return Path(exe).name == "pause" and re.search(r"^State:\s+S", status, re.M) is not None


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_pause_exits_0_on_sigterm_and_sigint(node_images, tmp_path, sig):
    pause = _pause_binary(node_images, tmp_path)
    assert subprocess.run([pause, "-v"], capture_output=True, text=True, timeout=10).stdout == "provisioner-pause 1\n"
    proc = subprocess.Popen([pause])
    try:
        wait_for(lambda: _waiting(proc.pid), 10, "pause to wait for signals")  # blocked in the kernel
        proc.send_signal(sig)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --------------------------------------------------------------------------- unit: the k8s image's files


def test_containerd_config_uses_our_sandbox_image_and_debians_cni_plugins():
    cfg = tomllib.loads((K8S_FILES / "etc/containerd/config.toml").read_text())
    assert cfg["version"] == 2
    cri = cfg["plugins"]["io.containerd.grpc.v1.cri"]
    assert cri["sandbox_image"] == oci.PAUSE_REF
    assert cri["containerd"]["runtimes"]["runc"]["options"]["SystemdCgroup"] is True
    assert cri["cni"] == {"bin_dir": "/usr/lib/cni", "conf_dir": "/etc/cni/net.d"}
    net = json.loads((K8S_FILES / "etc/cni/net.d/10-provisioner-bridge.conflist").read_text())
    assert net["cniVersion"] == "1.0.0"
    assert [p["type"] for p in net["plugins"]] == ["bridge", "portmap"]
    assert net["plugins"][0]["ipam"]["type"] == "host-local"


def _unit(path: Path) -> ConfigParser:
    p = ConfigParser(strict=False, interpolation=None)
    p.optionxform = str
    p.read_string(path.read_text())
    return p


def test_import_unit_runs_before_kubelet_after_containerd():
    unit = _unit(K8S_FILES / "etc/systemd/system/provisioner-import-images.service")
    assert unit["Unit"]["Requires"] == "containerd.service" and unit["Unit"]["After"] == "containerd.service"
    assert unit["Unit"]["Before"] == "kubelet.service"
    assert (unit["Service"]["Type"], unit["Service"]["RemainAfterExit"]) == ("oneshot", "yes")
    script, folder = unit["Service"]["ExecStart"].split()
    assert folder == str(oci.NODE_IMAGES_DIR)
    assert os.access(K8S_FILES / script.lstrip("/"), os.X_OK)
    dropin = _unit(K8S_FILES / "etc/systemd/system/kubelet.service.d/20-provisioner-images.conf")
    assert dropin["Unit"]["Wants"] == dropin["Unit"]["After"] == "provisioner-import-images.service"
    # containerd's store on its own tmpfs (overlayfs snapshots cannot sit on the overlay root)
    mount = _unit(K8S_FILES / "etc/systemd/system/var-lib-containerd.mount")
    assert (mount["Mount"]["Where"], mount["Mount"]["Type"]) == ("/var/lib/containerd", "tmpfs")
    ctd = _unit(K8S_FILES / "etc/systemd/system/containerd.service.d/10-provisioner.conf")
    assert ctd["Unit"]["RequiresMountsFor"] == "/var/lib/containerd"


# --------------------------------------------------------------------------- a real containerd

IMPORT_SCRIPT = K8S_FILES / "usr/local/sbin/provisioner-import-images"

CONFIG = """version = 2
root = "{dir}/root"
state = "{dir}/state"
# the test needs images and runc containers only: no CRI, no /opt/containerd
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.internal.v1.opt"]
[grpc]
  address = "{dir}/containerd.sock"
"""

# What containerd and runc create outside --root/--state, removed again when the test made them.
OUTSIDE = ["/run/containerd/s", "/run/containerd/fifo", "/run/containerd/runc/k8s.io", "/run/containerd/runc", "/run/containerd",
           *[f"/sys/fs/cgroup/{c}/k8s.io" for c in ("cpu", "cpuacct", "cpuset", "memory", "devices", "freezer",
                                                    "blkio", "pids", "systemd", "unified", "net_cls", "net_prio",
                                                    "perf_event", "hugetlb", "rdma", "misc")]]


class Containerd:
    def __init__(self, folder: Path):
        self.dir = folder
        self.address = str(folder / "containerd.sock")
        self.ctr_bin = require_binary("ctr")
        self.daemon: Daemon | None = None

    def ctr(self, *args: str, check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        res = subprocess.run([self.ctr_bin, "--address", self.address, "--namespace", "k8s.io", *args],
                             capture_output=True, text=True, timeout=timeout, **kw)
        if check and res.returncode != 0:
            raise AssertionError(f"ctr {' '.join(args)} exited {res.returncode}: {res.stderr.strip()}")
        return res

    def ready(self) -> bool:
        return Path(self.address).exists() and subprocess.run(
            [self.ctr_bin, "--address", self.address, "version"], capture_output=True, timeout=10).returncode == 0

    def start(self) -> None:
        config = self.dir / "config.toml"
        config.write_text(CONFIG.format(dir=self.dir))
        self.daemon = Daemon([require_binary("containerd"), "--config", str(config)], 0, self.dir / "containerd.log")
        self.daemon.start(self.ready, timeout=30)

    def stop(self) -> None:
        if self.daemon and self.daemon.running():
            for task in self.ctr("tasks", "ls", "-q", check=False).stdout.split():
                self.ctr("tasks", "kill", "-s", "SIGKILL", task, check=False)
                self.ctr("tasks", "rm", "-f", task, check=False)
            for c in self.ctr("containers", "ls", "-q", check=False).stdout.split():
                self.ctr("containers", "rm", c, check=False)
            self.daemon.stop()
        # shims run in their own process groups: any still up (a failed test) are ours, by pid
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if self.address.encode() in cmdline and b"containerd-shim" in cmdline[0]:
                try:
                    os.kill(int(proc.name), signal.SIGKILL)
                except ProcessLookupError:
                    pass
        # snapshots or rootfs still mounted under our folder (a failed test), deepest first
        mounts = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
        for m in sorted((m for m in mounts if m.startswith(str(self.dir) + "/")), key=len, reverse=True):
            subprocess.run(["umount", "-l", m], capture_output=True)


@pytest.fixture(scope="module")
def containerd(node_images):
    if os.geteuid() != 0:
        missing("root (containerd and runc run as root)")
    require_binary("runc")
    require_binary("containerd-shim-runc-v2")
    before = {p for p in OUTSIDE if os.path.exists(p)}
    # short: unix socket paths are limited to 108 bytes
    folder = Path(tempfile.mkdtemp(prefix="prov-ctrd-", dir="/tmp"))
    c = Containerd(folder)
    try:
        c.start()
        yield c
    finally:
        c.stop()
        subprocess.run(["rm", "-rf", "--one-file-system", str(folder)], capture_output=True)
        for p in OUTSIDE:  # children before parents
            if p not in before:
                try:
                    os.rmdir(p)
                except OSError:
                    pass
        left = sorted(p for p in OUTSIDE if os.path.exists(p) and p not in before)
        assert not left and not folder.exists(), f"left behind: {left or folder}"


@pytest.fixture(scope="module")
def imported(containerd, node_images):
    """What the node does at boot: the shipped script imports every archive of the folder."""
    folder = node_images[0].archive.parent
    started = time.monotonic()
    res = subprocess.run([str(IMPORT_SCRIPT), str(folder)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "CONTAINERD_ADDRESS": containerd.address,
                              "PATH": f"{Path(containerd.ctr_bin).parent}:{os.environ.get('PATH', '')}"})
    assert res.returncode == 0, f"provisioner-import-images failed: {res.stdout}{res.stderr}"
    print(f"imported {len(node_images)} archives in {time.monotonic() - started:.2f} s: {res.stdout.strip()}")
    return node_images


@pytest.mark.integration
def test_containerd_reads_the_shipped_config(tmp_path):
    """containerd 1.6 itself parses the k8s image's config.toml: our sandbox image, /usr/lib/cni."""
    res = subprocess.run([require_binary("containerd"), "--config", str(K8S_FILES / "etc/containerd/config.toml"),
                          "config", "dump"], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    assert f'sandbox_image = "{oci.PAUSE_REF}"' in res.stdout
    assert 'bin_dir = "/usr/lib/cni"' in res.stdout and "SystemdCgroup = true" in res.stdout


@pytest.mark.integration
def test_import_names_both_images_and_unpacks_them(containerd, imported):
    listed = containerd.ctr("images", "ls").stdout
    rows = {line.split()[0]: line.split() for line in listed.splitlines()[1:] if line.strip()}
    for image in imported:
        assert image.ref in rows, f"{image.ref} not in:\n{listed}"
        assert image.digest in rows[image.ref], f"{image.ref}: digest {image.digest} not in {rows[image.ref]}"
    assert len(rows) == 2, f"the import named other images too:\n{listed}"
    # unpacked by the import (for the default snapshotter, overlayfs): the CRI plugin finds a
    # committed snapshot per image; with one layer its chain id is the layer's diff id
    snapshots = containerd.ctr("snapshots", "ls").stdout
    for image in imported:
        diff_id = read_archive(image.archive)["config"]["rootfs"]["diff_ids"][0]
        assert diff_id in snapshots, f"{image.ref} not unpacked:\n{snapshots}"
    # importing again (every boot imports into a fresh store, but a restart of the unit must work too)
    res = subprocess.run([str(IMPORT_SCRIPT), str(imported[0].archive.parent)], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "CONTAINERD_ADDRESS": containerd.address})
    assert res.returncode == 0, res.stderr


@pytest.mark.integration
def test_busybox_runs_a_shell_command(containerd, imported):
    started = time.monotonic()
    res = containerd.ctr("run", "--rm", oci.BUSYBOX_REF, "prov-busybox",
                         "sh", "-c", "echo hello-from-provisioner; id -u; ls /bin | wc -l", timeout=60)
    lines = res.stdout.split()
    assert lines[0] == "hello-from-provisioner", res.stdout
    assert lines[1] == "0" and int(lines[2]) > 50, res.stdout
    print(f"ctr run busybox: {time.monotonic() - started:.2f} s")


@pytest.mark.integration
def test_pause_exits_0_on_sigterm_and_reaps_orphans(containerd, imported):
    name = "prov-pause"
    run = subprocess.Popen([containerd.ctr_bin, "--address", containerd.address, "--namespace", "k8s.io",
                            "run", "--rm", oci.PAUSE_REF, name], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    try:
        def running_pid() -> int | None:
            for line in containerd.ctr("tasks", "ls", check=False).stdout.splitlines()[1:]:
                parts = line.split()
                if parts and parts[0] == name and parts[-1] == "RUNNING":
                    return int(parts[1])
            return None

        pid = wait_for(running_pid, 30, "the pause container to run")
        status = Path(f"/proc/{pid}/status").read_text()
        assert re.search(r"^Uid:\s+65535\s", status, re.M), "pause does not run as 65535"
        wait_for(lambda: _waiting(pid), 10, "pause to wait for signals")

        # An orphan in the sandbox's PID namespace is re-parented to pause (its PID 1), which
        # must reap it when it ends: a shell in that namespace starts `sleep` and exits at once.
        subprocess.run(["nsenter", "--target", str(pid), "--pid", "--", "sh", "-c", "sleep 1.5 & exit 0"],
                       check=True, timeout=30)

        def children() -> dict[int, str]:
            found = {}
            for proc in Path("/proc").glob("[0-9]*"):
                try:
                    st = (proc / "status").read_text()
                except OSError:
                    continue
                if re.search(rf"^PPid:\s+{pid}$", st, re.M):
                    found[int(proc.name)] = re.search(r"^State:\s+(\S)", st, re.M).group(1)
            return found

        orphan = wait_for(children, 5, "the orphaned sleep to be re-parented to pause")
        assert len(orphan) == 1
        wait_for(lambda: not children(), 10, f"pause to reap its child (left: {children()})", interval=0.1)

        started = time.monotonic()
        containerd.ctr("tasks", "kill", "-s", "SIGTERM", name)
        code = run.wait(15)
        assert code == 0, f"ctr run exited {code} after SIGTERM: {run.stderr.read()}"
        print(f"pause: SIGTERM to exit {time.monotonic() - started:.2f} s")
    finally:
        if run.poll() is None:
            containerd.ctr("tasks", "kill", "-s", "SIGKILL", name, check=False)
            run.wait(15)

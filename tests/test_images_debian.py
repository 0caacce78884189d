"""The slurm and k8s images, built for real through the CLI (`provisioner image build NAME`) into
a private image root, twice: the second build is a hit of the build cache
(~/.cache/provisioner/image-builds/NAME-KEY/, shared by every run on this machine), so the suite
builds each image once per machine and after that only links it (seconds). The first run on a
machine builds cold (about 2 min each on 2 cores, plus kubelet's one-time Go build when
`make kube-bins` has not run); a changed definition, pin or Debian point release does too.

What the k8s image must hold, read from its squashfs with Debian's unsquashfs: kubelet (the
copied binary, run here, says Kubernetes v1.34.3), containerd, runc, the CNI plugins in
/usr/lib/cni, the kubelet unit enabled, and the OCI archives of the node images."""

from __future__ import annotations

import json
import os
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from testbed.boot_server import PROVISIONER
from testbed.process import ROOT
from testbed.site import write_site
from tests.support import missing, require_binary

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(2400)]

KUBE_VERSION = "v1.34.3"  # tools/k8s/go.mod: the control plane's release
CNI = ("bridge", "host-local", "loopback", "portmap")


def _build(config: Path, name: str) -> tuple[float, dict]:
    started = time.monotonic()
    r = subprocess.run([*PROVISIONER, "--config", str(config), "image", "build", name, "--json"],
                       capture_output=True, text=True, cwd=ROOT, timeout=2200)
    seconds = time.monotonic() - started
    assert r.returncode == 0, f"image build {name} failed:\n{r.stderr[-3000:]}"
    out = json.loads(r.stdout)
    assert out["published"] and out["image"] == name
    return seconds, out


def _listing(squashfs: Path) -> set[str]:
    res = subprocess.run([require_binary("unsquashfs"), "-l", "-d", "", str(squashfs)], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return {line.strip() for line in res.stdout.splitlines() if line.startswith("/")}


def _extract(squashfs: Path, dest: Path, *paths: str) -> Path:
    res = subprocess.run([require_binary("unsquashfs"), "-q", "-n", "-d", str(dest), str(squashfs),
                          *[p.lstrip("/") for p in paths]], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return dest


@pytest.mark.parametrize("name", ["k8s", "slurm"])
def test_debian_image_builds_once_then_comes_from_the_build_cache(name, tmp_path, capsys):
    if os.geteuid() != 0:
        missing("root (mmdebstrap --mode=root builds the Debian images)")
    for tool in ("mmdebstrap", "mksquashfs", "unsquashfs"):
        require_binary(tool)
    if name == "k8s":
        require_binary("go", ("/usr/local/go/bin/go",))  # tools/build.sh k8s, when kubelet is not built yet
    config = write_site(tmp_path / "site", site={"image_root": str(tmp_path / "root")},
                        images={"slurm": {"image": "slurm"}, "k8s": {"image": "k8s"}})

    first_s, first = _build(config, name)
    second_s, second = _build(config, name)
    with capsys.disabled():
        print(f"\n  image {name}: first build {first_s:.1f} s (build cache {first['manifest']['build']['cache']}), "
              f"second {second_s:.1f} s (build cache {second['manifest']['build']['cache']})")

    m1, m2 = first["manifest"], second["manifest"]
    assert m1["build"]["key"] == m2["build"]["key"] and m2["build"]["cache"] == "hit"
    assert m2["version"] != m1["version"] and second["previous"] == m1["version"]
    entry = Path(m2["build"]["entry"])
    for f in ("vmlinuz", "initramfs.img", "rootfs.squashfs"):
        assert m2["files"][f]["sha256"] == m1["files"][f]["sha256"], f
        assert (Path(second["path"]) / f).stat().st_ino == (entry / f).stat().st_ino, f"{f}: not hard-linked"
    assert m2["boot"] == {"kernel": "vmlinuz", "initrds": ["initramfs.img"], "rootfs": "rootfs.squashfs"}

    squashfs = Path(second["path"]) / "rootfs.squashfs"
    files = _listing(squashfs)
    packages = {p.split()[0]: p.split()[1] for p in m2["packages"]}
    assert {"systemd-sysv", "openssh-server", "kexec-tools", "linux-image-amd64"} <= set(packages)
    assert "/etc/systemd/system/multi-user.target.wants/provisioner-callback.service" in files
    # no SSH host key in the root (it would be every node's): each node's comes in its overlay
    assert not [f for f in files if f.startswith("/etc/ssh/ssh_host_")], sorted(f for f in files if "/etc/ssh/" in f)
    assert "/etc/ssh/sshd_config.d/provisioner-host-key.conf" in files
    assert {(e["path"], e["host_key"], e["mode"]) for e in m2["overlay"] if e.get("host_key")} == {
        ("/etc/ssh/ssh_host_ed25519_key", "private", "0600"), ("/etc/ssh/ssh_host_ed25519_key.pub", "public", "0644")}
    if name == "slurm":
        assert {"slurmd", "munge"} <= set(packages)
        assert {"/usr/sbin/slurmd", "/usr/sbin/munged"} <= files
        return

    assert {"containerd", "runc", "containernetworking-plugins", "conntrack", "iptables"} <= set(packages)
    assert {"/usr/bin/containerd", "/usr/bin/ctr", "/usr/sbin/runc", "/usr/bin/kubelet"} <= files
    assert {f"/usr/lib/cni/{p}" for p in CNI} <= files
    assert {"/etc/systemd/system/kubelet.service", "/etc/systemd/system/kubelet.service.d/10-provisioner.conf",
            "/etc/systemd/system/multi-user.target.wants/kubelet.service",
            "/etc/systemd/system/multi-user.target.wants/containerd.service"} <= files

    [kubelet] = m2["binaries"]
    assert kubelet["path"] == "/usr/bin/kubelet" and kubelet["identity"].startswith(f"build k8s-{KUBE_VERSION}-")
    unpacked = _extract(squashfs, tmp_path / "unpacked", "/usr/bin/kubelet", "/usr/share/provisioner/oci")
    binary = unpacked / "usr/bin/kubelet"
    assert os.access(binary, os.X_OK)
    out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == f"Kubernetes {KUBE_VERSION}", out

    refs = {}
    for img in m2["oci_images"]:
        assert img["path"] in files
        with tarfile.open(unpacked / img["path"].lstrip("/")) as tar:
            index = json.load(tar.extractfile("index.json"))
        [desc] = index["manifests"]
        assert desc["digest"] == img["digest"]
        refs[img["name"]] = desc["annotations"]["io.containerd.image.name"]
    assert refs == {"pause": "provisioner.local/pause:1", "busybox": "provisioner.local/busybox:1"}

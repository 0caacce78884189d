"""What a Debian image is built from besides its packages, and the build cache's key: the
definition's `binaries` and `oci_images` (validation names the file and the field), where
tools/build.sh is found, the identities that go into the definition hash and the key, the key's
reaction to a package version, a binary, a file, a comment; apt's --print-uris read; the cache's
entries; paths inside a root with usr-merge symlinks."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from provisioner.errors import ConfigError, OperationError
from provisioner.images import binaries, buildcache, packageset
from provisioner.images.builder import inside
from provisioner.images.definition import load as load_definition
from testbed.tinyimage import DEFINITIONS
from tests.support import require_binary

ROOT = Path(__file__).resolve().parent.parent
HEAD = "builder: debian\nkernel: {package: linux-image-amd64}\n"


def _defs(tmp_path: Path, text: str, files: dict[str, str] | None = None) -> Path:
    defs = tmp_path / "defs"
    (defs / "img" / "overlay").mkdir(parents=True)
    shutil.copytree(DEFINITIONS / "_common", defs / "_common")
    (defs / "img" / "image.yaml").write_text(text)
    for rel, body in (files or {}).items():
        (defs / "img" / "files" / rel).parent.mkdir(parents=True, exist_ok=True)
        (defs / "img" / "files" / rel).write_text(body)
    return defs


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("text, field, words", [
    (HEAD + "binaries: kubelet\n", "binaries", "must be a list"),
    (HEAD + "binaries:\n  - {build: k8s, command: kubelet}\n", "binaries[0].path", "is required"),
    (HEAD + "binaries:\n  - {build: k8s, command: kubelet, path: usr/bin/kubelet}\n", "binaries[0].path",
     "absolute file path"),
    (HEAD + "binaries:\n  - {path: /usr/bin/kubelet}\n", "binaries[0]", "either build"),
    (HEAD + "binaries:\n  - {build: k8s, command: kubelet, file: /opt/kubelet, path: /usr/bin/kubelet}\n",
     "binaries[0]", "either build"),
    (HEAD + "binaries:\n  - {build: k8s, path: /usr/bin/kubelet}\n", "binaries[0].command", "is required with build"),
    (HEAD + "binaries:\n  - {build: ../k8s, command: kubelet, path: /usr/bin/kubelet}\n", "binaries[0].build",
     "tools/build.sh component"),
    (HEAD + "binaries:\n  - {build: k8s, command: bin/kubelet, path: /usr/bin/kubelet}\n", "binaries[0].command",
     "command name"),
    (HEAD + "binaries:\n  - {file: /opt/kubelet, command: kubelet, path: /usr/bin/kubelet}\n",
     "binaries[0].command", "only with build"),
    (HEAD + "binaries:\n  - {file: opt/kubelet, path: /usr/bin/kubelet}\n", "binaries[0].file", "absolute path"),
    (HEAD + "binaries:\n  - {file: /opt/kubelet, path: /usr/bin/kubelet, mode: rwx}\n", "binaries[0].mode",
     "octal mode"),
    (HEAD + "binaries:\n  - {file: /opt/a, path: /usr/bin/x}\n  - {file: /opt/b, path: /usr/bin/x}\n",
     "binaries[1].path", "listed twice"),
    (HEAD + "binaries:\n  - {file: /opt/a, path: /usr/bin/x, owner: root}\n", "binaries[0].owner", "unknown field"),
    (HEAD + "oci_images: pause\n", "oci_images", "must be a list"),
    (HEAD + "oci_images: [Pause]\n", "oci_images[0]", "not a valid node image name"),
    (HEAD + "oci_images: [pause, pause]\n", "oci_images[1]", "listed twice"),
    ("builder: initramfs\nkernel: {package: linux-image-amd64}\nbinaries:\n  - {file: /opt/a, path: /usr/bin/a}\n",
     "binaries", "not with builder initramfs"),
    ("builder: initramfs\nkernel: {package: linux-image-amd64}\noci_images: [pause]\n", "oci_images",
     "not with builder initramfs"),
])
def test_binaries_and_oci_images_errors_name_the_file_and_the_field(tmp_path, text, field, words):
    defs = _defs(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_definition(defs, "img")
    assert err.value.field == field and words in err.value.message, str(err.value)
    assert str(defs / "img" / "image.yaml") in str(err.value)


def test_binaries_and_oci_images_load(tmp_path):
    defs = _defs(tmp_path, HEAD + """binaries:
  - {build: k8s, command: kubelet, path: /usr/bin/kubelet}
  - {file: /opt/site/crictl, path: /usr/local/bin/crictl, mode: "0750"}
oci_images: [pause, busybox]
""")
    d = load_definition(defs, "img")
    assert [b.as_dict() for b in d.binaries] == [
        {"path": "/usr/bin/kubelet", "build": "k8s", "command": "kubelet", "file": None, "mode": "0755"},
        {"path": "/usr/local/bin/crictl", "build": None, "command": None, "file": "/opt/site/crictl", "mode": "0750"}]
    assert d.binaries[0].source == "tools/build.sh k8s (bin/kubelet)" and d.oci_images == ("pause", "busybox")


# --------------------------------------------------------------------------- identities, tools/build.sh


def test_a_file_binary_is_identified_by_its_contents(tmp_path):
    kubelet = tmp_path / "kubelet"
    defs = _defs(tmp_path, HEAD + f"binaries:\n  - {{file: {kubelet}, path: /usr/bin/kubelet}}\n")
    d = load_definition(defs, "img")
    with pytest.raises(ConfigError) as err:
        binaries.resolve(d)
    assert err.value.field == "binaries[0].file" and f"{kubelet} does not exist" in err.value.message
    kubelet.write_bytes(b"one")
    first = binaries.resolve(d)[0].identity
    kubelet.write_bytes(b"two")
    second = binaries.resolve(d)[0].identity
    assert first.startswith("file ") and first != second
    assert binaries.materialize(d, binaries.resolve(d)[0]) == kubelet
    assert d.digest({"binaries[0]": first}) != d.digest({"binaries[0]": second}) != d.digest()
    assert d.digest() == d.digest({})


@pytest.mark.parametrize("how", ["installed", "PROVISIONER_TOOLS"])
def test_without_tools_build_sh_the_error_says_to_give_a_file(tmp_path, how):
    """An installed package has no checkout: the error names the file and the field and says
    what to do (PROVISIONER_TOOLS, or `file:`); config errors exit 2."""
    defs = _defs(tmp_path, HEAD + "binaries:\n  - {build: k8s, command: kubelet, path: /usr/bin/kubelet}\n")
    d = load_definition(defs, "img")
    env = {k: v for k, v in os.environ.items() if k != "PROVISIONER_TOOLS"}
    if how == "PROVISIONER_TOOLS":
        env["PROVISIONER_TOOLS"] = str(tmp_path / "no-tools")
    with pytest.raises(ConfigError) as err:
        binaries.resolve(d, env=env, checkout=tmp_path / "site-packages")
    assert err.value.field == "binaries[0].build" and str(defs / "img" / "image.yaml") in str(err.value)
    assert "PROVISIONER_TOOLS" in err.value.message and "`file: /absolute/path`" in err.value.message
    if how == "installed":
        assert "installed without its source checkout" in err.value.message


def test_a_built_binary_is_identified_by_its_build_folder(tmp_path):
    """tools/build.sh k8s --print-dir (the real script; it builds nothing): the folder's name
    carries the pinned version and the key of the pins."""
    go = require_binary("go", ("/usr/local/go/bin/go",))
    env = {**os.environ, "PATH": f"{os.environ.get('PATH', '')}:{Path(go).parent}"}
    defs = _defs(tmp_path, HEAD + "binaries:\n  - {build: k8s, command: kubelet, path: /usr/bin/kubelet}\n"
                                  "  - {build: nosuch, command: x, path: /usr/bin/x}\n")
    d = load_definition(defs, "img")
    with pytest.raises(ConfigError) as err:
        binaries.resolve(d, env=env)
    assert err.value.field == "binaries[1].build" and "no component 'nosuch' (known: etcd, k8s, kueue)" in err.value.message
    (defs / "img" / "image.yaml").write_text(
        HEAD + "binaries:\n  - {build: k8s, command: kubelet, path: /usr/bin/kubelet}\n")
    r = binaries.resolve(load_definition(defs, "img"), env=env)[0]
    assert r.identity.startswith("build k8s-v1.34.3-") and r.identity.endswith(" bin/kubelet")
    assert r.build_dir == r.identity.split()[1]
    # a second checkout would find the same build: the folder is keyed by the pins, not the path
    assert binaries.find_build_sh(env={}, checkout=ROOT)[0] == ROOT / "tools" / "build.sh"


# --------------------------------------------------------------------------- the build key


PKGS = ["base-files 12.4+deb12u5", "containerd 1.6.20~ds1-1+deb12u3", "runc 1.1.5+ds1-1+deb12u1"]
BINS = {"/usr/bin/kubelet": "build k8s-v1.34.3-a4adaa9204d0 bin/kubelet"}
OCI = {"pause": "sha256:aa", "busybox": "sha256:bb"}
TOOLS = {"busybox": "busybox-static 1:1.35.0-4+deb12u1+b1"}
K8S_LIKE = HEAD + """# a comment
description: one
packages: [containerd, runc]
binaries:
  - {build: k8s, command: kubelet, path: /usr/bin/kubelet}
oci_images: [pause, busybox]
services: [containerd]
"""


def _key(defs: Path, packages=PKGS, bins=BINS, oci=OCI, tools=TOOLS) -> str:
    return buildcache.key(buildcache.key_inputs(load_definition(defs, "img"), packages, bins, oci, tools))


def test_the_build_key_follows_what_goes_into_the_root(tmp_path):
    defs = _defs(tmp_path, K8S_LIKE, {"etc/x.conf": "x = 1\n"})
    yaml_file, conf = defs / "img" / "image.yaml", defs / "img" / "files" / "etc" / "x.conf"
    base = _key(defs)
    assert len(base) == 16 and base == _key(defs)
    assert _key(defs, packages=list(reversed(PKGS))) == base  # order of the resolved list: no matter

    # not in the key: comments, the description, the overlay templates (copied afresh per version)
    yaml_file.write_text(K8S_LIKE.replace("# a comment", "# another comment\n# and one more")
                         .replace("description: one", "description: two"))
    (defs / "img" / "overlay" / "hostname.j2").write_text("{{ node.name }}\n")
    assert _key(defs) == base

    # in the key: a package's version, a binary's build, a node image, busybox, the files/ tree
    newer = [p.replace("1.6.20~ds1-1+deb12u3", "1.6.20~ds1-1+deb12u4") for p in PKGS]
    assert _key(defs, packages=newer) != base
    assert _key(defs, packages=PKGS + ["jq 1.6-2.1"]) != base
    assert _key(defs, bins={"/usr/bin/kubelet": "build k8s-v1.34.4-0123456789ab bin/kubelet"}) != base
    assert _key(defs, oci={**OCI, "pause": "sha256:cc"}) != base
    assert _key(defs, tools={"busybox": "busybox-static 1:1.36"}) != base
    conf.write_text("x = 2\n")
    changed_file = _key(defs)
    assert changed_file != base
    conf.chmod(0o755)
    assert _key(defs) != changed_file  # modes are copied into the root too
    conf.chmod(0o644)
    assert _key(defs) == changed_file

    # ... and the definition's fields
    for edit in (("packages: [containerd, runc]", "packages: [containerd, runc, jq]"),
                 ("/usr/bin/kubelet}", "/usr/local/bin/kubelet}"),
                 ("services: [containerd]", "services: [containerd, ssh]"),
                 ("oci_images: [pause, busybox]", "oci_images: [pause]")):
        yaml_file.write_text(K8S_LIKE.replace(*edit))
        assert _key(defs) != changed_file, edit
    yaml_file.write_text(K8S_LIKE)
    assert _key(defs) == changed_file

    # the shared files every Debian root gets
    (defs / "_common" / "rootfs" / "etc" / "default" / "kexec").write_text("LOAD_KEXEC=true\n")
    assert _key(defs) != changed_file


def test_why_a_build_is_cold_is_said_in_words(tmp_path):
    defs = _defs(tmp_path, K8S_LIKE)
    d = load_definition(defs, "img")
    old = buildcache.key_inputs(d, PKGS, BINS, OCI, TOOLS)
    new = buildcache.key_inputs(d, [p.replace("deb12u3", "deb12u4") for p in PKGS] + ["jq 1.6-2.1"],
                                {"/usr/bin/kubelet": "build k8s-v1.34.4-x bin/kubelet"}, OCI, TOOLS)
    assert buildcache.changes(old, new) == [
        "binaries: /usr/bin/kubelet",
        "packages: containerd 1.6.20~ds1-1+deb12u3 -> 1.6.20~ds1-1+deb12u4, jq - -> 1.6-2.1"]


def test_print_uris_gives_names_versions_and_sizes():
    out = ("'http://deb.debian.org/debian/pool/main/g/gcc-12/gcc-12-base_12.2.0-14%2bdeb12u1_amd64.deb' "
           "gcc-12-base_12.2.0-14+deb12u1_amd64.deb 37596 MD5Sum:8e7e741807b1e1939df8f58323affdcb\n"
           "'http://deb.debian.org/debian/pool/main/u/util-linux/bsdutils_2.38.1-5%2bdeb12u3_amd64.deb' "
           "bsdutils_1%3a2.38.1-5+deb12u3_amd64.deb 100 SHA256:00\n"
           "Reading package lists...\n")
    got = packageset.parse_print_uris(out)
    assert got.packages == (("bsdutils", "1:2.38.1-5+deb12u3"), ("gcc-12-base", "12.2.0-14+deb12u1"))
    assert got.download_bytes == 37696 and got.lines()[0] == "bsdutils 1:2.38.1-5+deb12u3"


# --------------------------------------------------------------------------- the cache's entries


def test_build_cache_entries(tmp_path):
    cache = buildcache.BuildCache(tmp_path / "builds")
    src = tmp_path / "src"
    src.mkdir()
    (src / "vmlinuz").write_bytes(b"k")
    (src / "rootfs.squashfs").write_bytes(b"r" * 100)
    files = {"vmlinuz": {"size": 1, "sha256": "x"}, "rootfs.squashfs": {"size": 100, "sha256": "y"}}
    assert cache.get("k8s", "0123456789abcdef") is None and cache.cold_seconds("k8s") is None
    with cache.lock("k8s", "0123456789abcdef"):
        path = cache.put("k8s", "0123456789abcdef", src, files,
                         {"built_at_ts": 1.0, "build_seconds": 200.0, "info": {"packages": []}})
    assert path == tmp_path / "builds" / "k8s-0123456789abcdef"
    assert (path / "vmlinuz").stat().st_ino == (src / "vmlinuz").stat().st_ino  # hard-linked, not copied
    e = cache.get("k8s", "0123456789abcdef")
    assert e is not None and e.files == files and e.record["info"] == {"packages": []}
    cache.put("k8s", "fedcba9876543210", src, files, {"built_at_ts": 2.0, "build_seconds": 180.0, "info": {}})
    assert [x.key for x in cache.entries("k8s")] == ["fedcba9876543210", "0123456789abcdef"]
    assert cache.cold_seconds("k8s") == 180.0 and cache.entries("slurm") == []
    (path / "rootfs.squashfs").unlink()  # an entry missing a file is no entry
    assert cache.get("k8s", "0123456789abcdef") is None
    cache.drop("k8s", "fedcba9876543210")
    assert cache.entries("k8s") == []
    assert buildcache.link_or_copy(src / "vmlinuz", tmp_path / "a" / "b") == "linked"


def test_paths_inside_a_root_follow_its_own_symlinks(tmp_path):
    root = tmp_path / "root"
    (root / "usr" / "bin").mkdir(parents=True)
    (root / "usr" / "lib").mkdir()
    (root / "bin").symlink_to("usr/bin")  # Debian 12's merged /usr
    (root / "lib").symlink_to("/usr/lib")  # an absolute link means the root's own /usr/lib
    (root / "usr" / "evil").symlink_to("../../..")
    assert inside(root, "/bin/kubelet") == root / "usr" / "bin" / "kubelet"
    assert inside(root, "/lib/cni/bridge") == root / "usr" / "lib" / "cni" / "bridge"
    assert inside(root, "/usr/share/provisioner/oci/pause.tar") == root / "usr/share/provisioner/oci/pause.tar"
    with pytest.raises(OperationError, match="leaves the root"):
        inside(root, "/usr/evil/etc/passwd")

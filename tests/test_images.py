"""Image definitions, real builds of the tiny image, versions (list/publish/remove/pin) through
the CLI, the k8s image's early failure, and atomic publishing under a reading boot server."""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import shutil
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from provisioner import images
from provisioner.errors import ConfigError, OperationError, UsageError
from provisioner.images import kmod
from provisioner.images.definition import load as load_definition
from testbed.boot_server import BootServer, cli
from testbed.site import mac
from tests.support import free_port, require_binary
from testbed.tinyimage import CACHE, DEFINITIONS, clone_root, tiny_site

# --------------------------------------------------------------------------- definitions (no build)


def test_the_three_definitions_load():
    assert images.definition_names(DEFINITIONS) == ["k8s", "slurm", "tiny"]
    slurm = load_definition(DEFINITIONS, "slurm")
    assert slurm.builder == "debian" and slurm.role == "slurm" and slurm.suite == "bookworm"
    assert {"slurmd", "munge"} <= set(slurm.packages) and {"munge", "slurmd"} <= set(slurm.services)
    assert {e.path for e in slurm.overlay} >= {"/etc/hostname", "/etc/slurm/slurm.conf", "/etc/munge/munge.key"}
    key = next(e for e in slurm.overlay if e.path == "/etc/munge/munge.key")
    assert (key.copy, key.mode, key.owner) == ("munge_key", 0o400, "munge")
    k8s = load_definition(DEFINITIONS, "k8s")
    assert k8s.role == "k8s" and "kubelet" in k8s.services
    assert {"containerd", "runc", "containernetworking-plugins"} <= set(k8s.packages)
    # nothing from pkgs.k8s.io (that repository is a commented alternative): kubelet is built locally
    assert not k8s.repositories and "# repositories:" in k8s.path.read_text()
    assert [(b.build, b.command, b.path) for b in k8s.binaries] == [("k8s", "kubelet", "/usr/bin/kubelet")]
    assert k8s.oci_images == ("pause", "busybox")
    assert (k8s.folder / "files/etc/systemd/system/kubelet.service").is_file()
    assert "/etc/kubernetes/bootstrap-kubelet.conf" in {e.path for e in k8s.overlay}
    tiny = load_definition(DEFINITIONS, "tiny")
    assert tiny.builder == "initramfs" and "virtio_net" in tiny.modules and not tiny.packages
    # the hash covers the shared /init too, and is stable
    assert tiny.digest() == load_definition(DEFINITIONS, "tiny").digest()
    assert DEFINITIONS / "_common" / "init.sh" in tiny.sources()


def _definitions(tmp_path: Path, text: str, overlay: dict[str, str] | None = None) -> Path:
    defs = tmp_path / "defs"
    (defs / "img" / "overlay").mkdir(parents=True)
    shutil.copytree(DEFINITIONS / "_common", defs / "_common")
    (defs / "img" / "image.yaml").write_text(text)
    for name, body in (overlay or {}).items():
        (defs / "img" / "overlay" / name).write_text(body)
    return defs


@pytest.mark.parametrize("text, field, words", [
    ("builder: docker\nkernel: {package: linux-image-amd64}\n", "builder", "must be one of initramfs, debian"),
    ("builder: initramfs\n", "kernel", "is required"),
    ("builder: initramfs\nkernel: {package: linux-image-amd64}\npackages: [slurmd]\n", "packages",
     "not with builder initramfs"),
    ("builder: initramfs\nkernel: {package: linux-image-amd64}\nkernel_args: x\n", "kernel_args", "unknown field"),
    ("builder: debian\nkernel: {package: linux-image-amd64}\npackages: [Not_A_Package]\n", "packages[0]",
     "not a valid Debian package name"),
    ("builder: debian\nkernel: {package: linux-image-amd64}\noverlay:\n  - {path: /etc/x, template: a.j2, copy: k}\n",
     "overlay[0]", "exactly one of template"),
    ("builder: debian\nkernel: {package: linux-image-amd64}\noverlay:\n  - {path: etc/x, copy: k}\n",
     "overlay[0].path", "absolute file path"),
    ("builder: debian\nkernel: {package: linux-image-amd64}\noverlay:\n  - {path: /etc/x, template: nope.j2}\n",
     "overlay[0].template", "no template 'nope.j2'"),
    ("builder: debian\nkernel: {package: linux-image-amd64}\noverlay:\n  - {path: /etc/x, copy: k, mode: rw}\n",
     "overlay[0].mode", "octal mode"),
    ("builder: initramfs\nkernel: {package: linux-image-amd64}\noverlay:\n  - {path: /etc/x, copy: k, owner: munge}\n",
     "overlay[0].owner", "only root"),
    ("builder: debian\nkernel: {package: linux-image-amd64}\nrepositories:\n  - {name: r, url: ftp://x, suite: /, packages: [a]}\n",
     "repositories[0].url", "http(s) URL"),
])
def test_definition_errors_name_the_file_and_the_field(tmp_path, text, field, words):
    defs = _definitions(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_definition(defs, "img")
    assert err.value.field == field and words in err.value.message
    assert str(defs / "img" / "image.yaml") in str(err.value)


def test_unknown_image_names_the_defined_ones():
    with pytest.raises(UsageError, match=r"no image nosuch: .* \(defined: k8s, slurm, tiny\)"):
        load_definition(DEFINITIONS, "nosuch")
    with pytest.raises(UsageError):
        load_definition(DEFINITIONS, "../etc")


# --------------------------------------------------------------------------- an unreachable repository fails early


def test_unreachable_repository_fails_early_for_any_definition(tmp_path):
    port = free_port()  # nothing listens there
    defs = _definitions(tmp_path, f"""builder: debian
kernel: {{package: linux-image-amd64}}
repositories:
  - {{name: local, url: "http://127.0.0.1:{port}/deb/", suite: /, packages: [kubelet, cri-tools]}}
""")
    with pytest.raises(OperationError, match=rf"cannot fetch kubelet, cri-tools from the local package repository "
                                             rf"http://127.0.0.1:{port}/deb/ \(.*refused.*\)"):
        images.build(defs, tmp_path / "root", "img", cache=tmp_path / "cache")
    assert not (tmp_path / "root").exists() and not (tmp_path / "cache").exists()


# --------------------------------------------------------------------------- the tiny image, built for real


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.integration  # builds (and, the first time, downloads) the tiny image
def test_tiny_manifest_matches_the_files(tiny_image):
    m = tiny_image.manifest
    assert m["image"] == "tiny" and m["version"] == tiny_image.version and m["builder"] == "initramfs"
    assert m["boot"] == {"kernel": "vmlinuz", "initrds": ["initramfs.img"], "rootfs": None}
    assert m["definition_sha256"] == load_definition(DEFINITIONS, "tiny").digest()
    assert re.match(r"^6\.1\.0-\d+-amd64$", m["kernel"]["release"])
    assert m["kernel"]["package"].startswith("linux-image-6.1.") and m["built_at"].endswith("Z")
    on_disk = {str(p.relative_to(tiny_image.path)) for p in tiny_image.path.rglob("*") if p.is_file()}
    assert on_disk == set(m["files"]) | {"manifest.json"}
    for rel, f in m["files"].items():
        p = tiny_image.path / rel
        assert p.stat().st_size == f["size"] and _sha256(p) == f["sha256"], rel
    assert tiny_image.kernel.read_bytes()[0x202:0x206] == b"HdrS"  # a bzImage
    assert images.current(tiny_image.image_root, "tiny") == tiny_image.version


def _cpio(args: list[str], data: bytes, cwd: Path | None = None) -> str:
    res = subprocess.run([require_binary("cpio"), *args], input=data, capture_output=True, cwd=cwd, timeout=60)
    assert res.returncode == 0, res.stderr
    return res.stdout.decode()


@pytest.mark.integration  # builds (and, the first time, downloads) the tiny image
def test_tiny_initramfs_contents(tiny_image, tmp_path):
    """Listed and unpacked by Debian's cpio, an independent reader of the newc format."""
    data = gzip.decompress(tiny_image.initramfs.read_bytes())
    names = set(_cpio(["-t", "--quiet"], data).split())
    assert {"init", "bin/busybox", "bin/sh", "dev/console", "dev/null", "proc", "sys", "tmp",
            "etc/provisioner/udhcpc.sh", "etc/provisioner/modules", "etc/provisioner/build"} <= names
    modules = [n.split("/")[-1][:-3] for n in names if n.startswith("lib/modules/provisioner/")]
    assert set(modules) == {"failover", "net_failover", "virtio_ring", "virtio", "virtio_pci_legacy_dev",
                            "virtio_pci_modern_dev", "virtio_pci", "virtio_net", "e1000"}
    long = _cpio(["-tv", "--quiet"], data)
    console = next(line for line in long.splitlines() if line.endswith(" dev/console"))
    assert console.startswith("crw-------") and re.search(r"\b5,\s*1\b", console)
    assert re.search(r"^-rwxr-xr-x .* init$", long, re.M)
    assert re.search(r"^lrwxrwxrwx .* bin/sh -> busybox$", long, re.M)

    _cpio(["-idm", "--quiet", "--no-absolute-filenames", "init", "bin/busybox", "etc/provisioner/*",
           "lib/modules/provisioner/*"], data, cwd=tmp_path)
    assert (tmp_path / "init").read_bytes() == (DEFINITIONS / "_common" / "init.sh").read_bytes()
    assert (tmp_path / "etc/provisioner/udhcpc.sh").read_bytes() == (DEFINITIONS / "_common" / "udhcpc.sh").read_bytes()
    busybox = (tmp_path / "bin/busybox").read_bytes()
    assert busybox[:4] == b"\x7fELF" and b"ld-linux" not in busybox[:8192]  # static: no interpreter
    build = dict(line.split("=", 1) for line in (tmp_path / "etc/provisioner/build").read_text().split())
    assert build == {"image": "tiny", "version": tiny_image.version, "kernel": tiny_image.manifest["kernel"]["release"]}

    # /init loads the modules in this order: every module's dependencies come before it
    order = (tmp_path / "etc/provisioner/modules").read_text().split()
    assert order == tiny_image.manifest["kernel"]["modules"]
    for i, name in enumerate(order):
        info = kmod.modinfo((tmp_path / f"lib/modules/provisioner/{name}.ko").read_bytes())
        for dep in filter(None, info.get("depends", [""])[0].split(",")):
            assert dep in order[:i], f"{name} needs {dep} first"
    assert order.index("virtio_ring") < order.index("virtio") < min(order.index("virtio_pci"), order.index("virtio_net"))


def test_tiny_init_script():
    """What the VM tests rely on: parameters from /proc/cmdline, DHCP through a script, the
    console line, the callback with busybox wget, staying up."""
    init = (DEFINITIONS / "_common" / "init.sh").read_text()
    assert init.startswith("#!/bin/sh\n")
    for param in ("provisioner.node", "provisioner.role", "provisioner.version", "provisioner.callback",
                  "provisioner.token", "provisioner.rootfs"):
        assert f"$(arg {param})" in init
    assert "$(cat /proc/cmdline)" in init
    assert 'insmod "/lib/modules/provisioner/$m.ko"' in init
    assert 'udhcpc -i "$n" -s /etc/provisioner/udhcpc.sh' in init
    assert 'echo "PROVISIONER-BOOTED node=$NODE role=$ROLE version=$VERSION overlay=$OVERLAY' in init
    assert 'wget -q -O /tmp/callback.out --post-data "role=$ROLE&version=$VERSION&token=$TOKEN" "$CALLBACK"' in init
    assert init.rstrip().endswith("while :; do sleep 3600; done")
    assert "cp -p \"/provisioner/overlay/$f\"" in init and "rm -rf /provisioner/overlay" in init
    # the shell accepts it (busybox's own sh, as in the initramfs)
    busybox = require_binary("busybox")
    res = subprocess.run([busybox, "sh", "-n", str(DEFINITIONS / "_common" / "init.sh")], capture_output=True)
    assert res.returncode == 0, res.stderr


def test_init_reads_the_kernel_command_line(tmp_path):
    """The `arg` function of /init, run by busybox sh against a sample command line."""
    busybox = require_binary("busybox")
    init = (DEFINITIONS / "_common" / "init.sh").read_text()
    fn = init[init.index("arg() {"):init.index("NODE=$(arg")]
    cmdline = tmp_path / "cmdline"
    cmdline.write_text("console=ttyS0 provisioner.node=sn01 provisioner.role=slurm provisioner.version=20260101-000000 "
                       "provisioner.callback=http://10.0.2.2:8080/api/v1/nodes/sn01/booted provisioner.token=abc\n")
    script = fn.replace("/proc/cmdline", str(cmdline)) + (
        'for k in node role version callback token rootfs; do echo "$k=$(arg provisioner.$k)"; done\n')
    out = subprocess.run([busybox, "sh", "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.split("\n")[:6] == ["node=sn01", "role=slurm", "version=20260101-000000",
                                   "callback=http://10.0.2.2:8080/api/v1/nodes/sn01/booted", "token=abc", "rootfs="]


# --------------------------------------------------------------------------- versions through the CLI


def _script_version(config: Path, node: str) -> str:
    cli(config, "init", check=True)  # render only reads: the store and the secret come from init
    text = cli(config, "render", node, check=True).stdout
    return re.search(r"provisioner\.version=(\S+)", text).group(1)


@pytest.mark.integration  # builds (and, the first time, downloads) the tiny image
def test_versions_list_publish_pin_remove(tiny_image, tmp_path):
    root = clone_root(tiny_image, tmp_path)
    config = tiny_site(tmp_path / "site", root)
    v1 = tiny_image.version
    debs_before = sorted((p.name, p.stat().st_mtime) for p in (CACHE / "debs").glob("*.deb"))

    r = cli(config, "image", "build", "tiny", "--no-publish", "--cache", str(CACHE))
    assert r.returncode == 0, r.stderr
    v2 = re.search(r"^tiny (\S+): built", r.stdout, re.M).group(1)
    assert v2 != v1 and "not published" in r.stdout
    # the cache made the second build offline: no package downloaded again
    assert sorted((p.name, p.stat().st_mtime) for p in (CACHE / "debs").glob("*.deb")) == debs_before

    listed = json.loads(cli(config, "image", "list", "--json", check=True).stdout)
    assert [(v["image"], v["version"], v["current"]) for v in listed] == [("tiny", v1, True), ("tiny", v2, False)]
    assert listed[0]["size"] > 5_000_000 and listed[0]["roles"] == ["slurm", "k8s"]
    table = cli(config, "image", "list", check=True).stdout
    assert re.search(rf"^tiny\s+{v1}\s+\*\s+\d", table, re.M) and "not built yet: k8s, slurm" in table
    assert _script_version(config, "sn01") == v1  # built, not published: nodes still boot v1

    assert cli(config, "image", "publish", "tiny", v2, "--reason", "new kernel").returncode == 0
    assert _script_version(config, "sn01") == v2 and _script_version(config, "sn02") == v2

    # per-node rollback
    r = cli(config, "image", "pin", "sn01", v1, "--reason", "regression on sn01")
    assert r.returncode == 0 and f"sn01: pinned to tiny {v1}" in r.stdout
    assert _script_version(config, "sn01") == v1 and _script_version(config, "sn02") == v2
    assert json.loads(cli(config, "image", "list", "--json").stdout)[0]["pinned_nodes"] == ["sn01"]

    # neither the current version nor a pinned one can be removed
    r = cli(config, "image", "remove", "tiny", v2)
    assert r.returncode == 2 and "is the current version" in r.stderr and len(r.stderr.splitlines()) == 1
    r = cli(config, "image", "remove", "tiny", v1)
    assert r.returncode == 2 and "sn01 pinned to tiny" in r.stderr and "unpin" in r.stderr
    assert cli(config, "image", "pin", "sn02", "nosuch").returncode == 2
    assert cli(config, "image", "publish", "tiny", "nosuch").returncode == 2

    assert cli(config, "image", "unpin", "sn01").returncode == 0
    assert _script_version(config, "sn01") == v2
    # site-wide rollback: publish the old version again, then drop the new one
    assert cli(config, "image", "publish", "tiny", f"{v1}").returncode == 0
    assert cli(config, "image", "remove", "tiny", v2).returncode == 0
    assert not (root / "tiny" / v2).exists()
    assert [v["version"] for v in json.loads(cli(config, "image", "list", "tiny", "--json").stdout)] == [v1]

    events = json.loads(cli(config, "history", "--limit", "0", "--json", check=True).stdout)
    kinds = [(e["kind"], e["node"]) for e in events if e["kind"].startswith("image-")]
    assert kinds == [("image-build", None), ("image-publish", None), ("image-pin", "sn01"),
                     ("image-unpin", "sn01"), ("image-publish", None), ("image-remove", None)]
    publish = [e for e in events if e["kind"] == "image-publish"]
    assert publish[0]["data"] == {"image": "tiny", "version": v2, "old": v1, "reason": "new kernel"}
    assert "regression on sn01" in next(e["message"] for e in events if e["kind"] == "image-pin")


@pytest.mark.integration  # builds (and, the first time, downloads) the tiny image
def test_unreachable_repository_through_the_cli(tiny_image, tmp_path):
    """The k8s image's documented alternative (kubelet from a package repository) on a machine
    that cannot reach the repository: one line naming the packages and the URL, nothing built."""
    port = free_port()  # nothing listens there
    defs = tmp_path / "defs"
    shutil.copytree(DEFINITIONS, defs)
    text = (defs / "k8s" / "image.yaml").read_text()
    start, end = text.index("binaries:\n"), text.index("oci_images:")
    (defs / "k8s" / "image.yaml").write_text(text[:start] + f"""repositories:
  - name: kubernetes
    url: http://127.0.0.1:{port}/core:/stable:/v1.34/deb/
    suite: /
    packages: [kubelet, cri-tools]
""" + text[end:])
    config = tiny_site(tmp_path / "site", clone_root(tiny_image, tmp_path), site={"image_definitions": str(defs)})
    r = cli(config, "image", "build", "k8s")
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("provisioner: failed: image k8s: cannot fetch kubelet, cri-tools from the kubernetes "
                           f"package repository http://127.0.0.1:{port}/core:/stable:/v1.34/deb/"), last
    assert not any(e["kind"] == "image-build" for e in json.loads(cli(config, "history", "--json").stdout))


def test_built_image_without_a_published_version_gets_the_waiting_script(tmp_path):
    config = tiny_site(tmp_path / "site", tmp_path / "empty-root")
    cli(config, "init", check=True)
    r = cli(config, "render", "sn01")
    assert r.returncode == 1 and "image tiny has no published version" in r.stdout
    assert "run `provisioner image build tiny`" in r.stderr


# --------------------------------------------------------------------------- atomic publishing, real server


def _fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.read()


@pytest.mark.integration
def test_publishing_while_nodes_boot_is_atomic(tiny_image, tmp_path):
    """A reader loops like a booting node (script, then the files it names) against the real
    `provisioner serve` while new versions are built and published: every file it gets is
    complete and matches its version's manifest, and the script turns to each new version on
    the next request. A node holding an older script still gets that version's files."""
    root = clone_root(tiny_image, tmp_path)
    port = free_port()
    config = tiny_site(tmp_path / "site", root, site={"boot_url": f"http://127.0.0.1:{port}",
                                                      "listen": f"127.0.0.1:{port}"})
    server = BootServer(config, port, tmp_path / "serve.log").start()
    stop = threading.Event()
    seen: list[str] = []
    errors: list[str] = []
    fetched = [0]

    def reader():
        while not stop.is_set():
            try:
                text = _fetch(f"{server.url}/ipxe?mac={mac(1, 3)}").decode()
                version = re.search(r"provisioner\.version=(\S+)", text).group(1)
                urls = re.findall(r"^kernel --name kernel (\S+)", text, re.M) + \
                    re.findall(r"^initrd (http\S+)", text, re.M)
                assert len(urls) == 2, text
                manifest = json.loads(_fetch(f"{server.url}/images/tiny/{version}/manifest.json"))
                for url in urls:
                    assert f"/images/tiny/{version}/" in url, url  # by version, never through `current`
                    data = _fetch(url)
                    f = manifest["files"][url.rsplit("/", 1)[1]]
                    if len(data) != f["size"] or hashlib.sha256(data).hexdigest() != f["sha256"]:
                        errors.append(f"{url}: {len(data)} bytes, not the manifest's {f['size']}")
                    fetched[0] += 1
                if not seen or seen[-1] != version:
                    seen.append(version)
                time.sleep(0.05)
            except Exception as exc:  # noqa: BLE001 - collected and asserted below
                errors.append(repr(exc))

    t = threading.Thread(target=reader, daemon=True)
    try:
        t.start()
        old_script = _fetch(f"{server.url}/ipxe?mac={mac(2, 3)}").decode()
        built = []
        for _ in range(2):
            r = cli(config, "image", "build", "tiny", "--cache", str(CACHE))
            assert r.returncode == 0, r.stderr
            built.append(re.search(r"^tiny (\S+): published", r.stdout, re.M).group(1))
            # the very next request gets the new version (the renderer's caches follow `current`)
            assert f"provisioner.version={built[-1]}" in _fetch(f"{server.url}/ipxe?mac={mac(3, 3)}").decode()
        deadline = time.monotonic() + 30
        while seen[-1:] != built[-1:] and time.monotonic() < deadline and not errors:
            time.sleep(0.1)
        stop.set()
        t.join(60)
        # a script handed out before the builds still names complete files of its version
        for url in re.findall(r"^(?:kernel --name kernel|initrd) (http\S+)", old_script, re.M):
            data = _fetch(url)
            assert hashlib.sha256(data).hexdigest() == tiny_image.manifest["files"][url.rsplit("/", 1)[1]]["sha256"]
    finally:
        stop.set()
        t.join(60)
        server.stop()
    assert not errors, errors[:5]
    assert fetched[0] >= 4 and seen[0] == tiny_image.version and seen[-1] == built[-1]
    assert set(seen) <= {tiny_image.version, *built}
    assert not list((root / "tiny").glob(".build-*"))  # no build left debris

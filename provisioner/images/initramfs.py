"""The busybox initramfs every image boots first: busybox-static, the NIC (and, for images with
a root file system, squashfs/loop/overlay) modules in dependency order, and the definitions'
_common/init and udhcpc script. Written as a newc cpio archive, gzip-compressed."""

from __future__ import annotations

from pathlib import Path

from provisioner.images import cpio
from provisioner.images.kmod import read_module

DIRS = ["bin", "dev", "etc", "etc/provisioner", "lib", "lib/modules", "lib/modules/provisioner", "newroot",
        "proc", "root", "run", "sbin", "sys", "usr", "usr/bin", "usr/sbin", "var"]


def build(out: Path, *, busybox: Path, modules: list[tuple[str, Path]], init: bytes, udhcpc: bytes,
          info: dict[str, str], mtime: int = 0) -> list[str]:
    """Write the initramfs to `out`. Returns the archive's entry names (for the manifest)."""
    names: list[str] = []

    def fill(w: cpio.Writer) -> None:
        for d in DIRS:
            w.dir(d)
        w.dir("tmp", 0o1777)
        # The kernel opens /dev/console for /init before anything is mounted.
        w.chardev("dev/console", 5, 1, 0o600)
        w.chardev("dev/null", 1, 3, 0o666)
        w.file("bin/busybox", busybox.read_bytes(), 0o755)
        w.symlink("bin/sh", "busybox")
        w.file("init", init, 0o755)
        w.file("etc/provisioner/udhcpc.sh", udhcpc, 0o755)
        w.file("etc/provisioner/modules", "".join(f"{n}\n" for n, _ in modules).encode())
        w.file("etc/provisioner/build", "".join(f"{k}={v}\n" for k, v in info.items()).encode())
        for name, path in modules:
            w.file(f"lib/modules/provisioner/{name}.ko", read_module(path))
        names.extend(sorted(w.names))

    out.write_bytes(cpio.gzip_archive(fill, mtime=mtime))
    return names

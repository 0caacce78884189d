"""The newc ("070701") cpio format the Linux kernel unpacks as an initramfs, written directly.

Used for the busybox initramfs of every image and for the per-node overlay initrd. Written here
rather than by piping to cpio(1): entries come from memory (rendered overlay files that must
never touch the disk), ownership and modes are set per entry without root tricks, and the output
is reproducible (fixed inode numbers and mtimes).
"""

from __future__ import annotations

import gzip
import io
import stat
from typing import BinaryIO

MAGIC = b"070701"
TRAILER = "TRAILER!!!"


class Writer:
    """Appends entries to a binary stream; close() writes the trailer (the stream stays open)."""

    def __init__(self, out: BinaryIO, mtime: int = 0):
        self.out = out
        self.mtime = int(mtime)
        self.ino = 0
        self.offset = 0
        self.names: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"", uid: int = 0, gid: int = 0,
               rdev: tuple[int, int] = (0, 0), nlink: int = 1) -> None:
        name = name.strip("/") or "."
        if name != TRAILER:
            if name in self.names:
                raise ValueError(f"cpio: duplicate entry {name}")
            if ".." in name.split("/"):
                raise ValueError(f"cpio: entry {name} leaves the archive root")
            self.names.add(name)
        self.ino += 1
        encoded = name.encode() + b"\0"
        fields = (self.ino if name != TRAILER else 0, mode, uid, gid, nlink, self.mtime, len(data),
                  0, 0, rdev[0], rdev[1], len(encoded), 0)
        header = MAGIC + b"".join(b"%08X" % f for f in fields)
        self._write(header + encoded)
        self._pad()
        if data:
            self._write(data)
            self._pad()

    def _write(self, b: bytes) -> None:
        self.out.write(b)
        self.offset += len(b)

    def _pad(self) -> None:
        if self.offset % 4:
            self._write(b"\0" * (4 - self.offset % 4))

    def dir(self, name: str, mode: int = 0o755, uid: int = 0, gid: int = 0) -> None:
        self._entry(name, stat.S_IFDIR | mode, uid=uid, gid=gid, nlink=2)

    def file(self, name: str, data: bytes, mode: int = 0o644, uid: int = 0, gid: int = 0) -> None:
        self._entry(name, stat.S_IFREG | mode, data, uid, gid)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._entry(name, stat.S_IFCHR | mode, rdev=(major, minor))

    def parents(self, name: str, mode: int = 0o755) -> None:
        """Directory entries for every parent of `name` not written yet."""
        parts = name.strip("/").split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d not in self.names:
                self.dir(d, mode)

    def close(self) -> None:
        self._entry(TRAILER, 0)


def gzip_archive(fill, mtime: int = 0, level: int = 6) -> bytes:
    """Build an archive in memory: fill(writer) adds the entries. Returns gzip-compressed bytes."""
    raw = io.BytesIO()
    w = Writer(raw, mtime)
    fill(w)
    w.close()
    return gzip.compress(raw.getvalue(), compresslevel=level, mtime=0)

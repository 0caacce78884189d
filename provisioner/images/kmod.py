"""Kernel modules for an initramfs: find them in an unpacked kernel and order them by dependency.

Debian's kernel package ships no modules.dep (depmod runs at install time), so each module's own
`depends=` (its ELF .modinfo section) gives the order. Modules the kernel has built in
(modules.builtin) need no file.
"""

from __future__ import annotations

import lzma
import struct
from dataclasses import dataclass
from pathlib import Path

from provisioner.errors import OperationError


@dataclass(frozen=True)
class Kernel:
    release: str  # 6.1.0-56-amd64
    vmlinuz: Path
    modules_dir: Path  # lib/modules/RELEASE


def find_kernel(tree: Path) -> Kernel:
    """The kernel in an unpacked linux-image package (or in a root file system)."""
    for base in (tree / "boot",):
        found = sorted(base.glob("vmlinuz-*"))
        if found:
            release = found[-1].name[len("vmlinuz-"):]
            mods = next((d for d in (tree / "lib/modules" / release, tree / "usr/lib/modules" / release) if d.is_dir()),
                        tree / "lib/modules" / release)
            return Kernel(release, found[-1], mods)
    raise OperationError(f"no boot/vmlinuz-* in {tree}; is it a linux-image package?")


def _norm(name: str) -> str:
    return name.replace("-", "_")


def _module_name(path: Path) -> str:
    name = path.name
    for suffix in (".ko.xz", ".ko"):
        if name.endswith(suffix):
            return _norm(name[: -len(suffix)])
    return _norm(name)


def read_module(path: Path) -> bytes:
    data = path.read_bytes()
    return lzma.decompress(data) if path.name.endswith(".xz") else data


def modinfo(data: bytes) -> dict[str, list[str]]:
    """The key=value strings of an ELF64 module's .modinfo section."""
    if data[:4] != b"\x7fELF" or data[4] != 2:
        raise ValueError("not an ELF64 kernel module")
    endian = "<" if data[5] == 1 else ">"
    shoff = struct.unpack_from(endian + "Q", data, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from(endian + "HHH", data, 0x3A)

    def section(i: int) -> tuple[int, int, int]:
        name, _type, _flags, _addr, offset, size = struct.unpack_from(endian + "IIQQQQ", data, shoff + i * shentsize)
        return name, offset, size

    _, str_off, _ = section(shstrndx)
    for i in range(shnum):
        name_off, offset, size = section(i)
        end = data.index(b"\0", str_off + name_off)
        if data[str_off + name_off:end] == b".modinfo":
            info: dict[str, list[str]] = {}
            for item in data[offset:offset + size].split(b"\0"):
                if b"=" in item:
                    k, _, v = item.decode(errors="replace").partition("=")
                    info.setdefault(k, []).append(v)
            return info
    return {}


def resolve(kernel: Kernel, wanted: list[str] | tuple[str, ...]) -> list[tuple[str, Path]]:
    """(name, file) of the wanted modules and everything they depend on, dependencies first.
    Built-in modules are left out; a module the kernel has neither way is an error."""
    index: dict[str, Path] = {}
    for p in kernel.modules_dir.rglob("*.ko*"):
        if p.name.endswith((".ko", ".ko.xz")):
            index.setdefault(_module_name(p), p)
    builtin = set()
    bfile = kernel.modules_dir / "modules.builtin"
    if bfile.is_file():
        builtin = {_module_name(Path(line.strip())) for line in bfile.read_text().splitlines() if line.strip()}
    order: list[tuple[str, Path]] = []
    state: dict[str, str] = {}

    def visit(name: str, chain: tuple[str, ...]) -> None:
        name = _norm(name)
        if state.get(name) == "done":
            return
        if state.get(name) == "active":
            raise OperationError(f"kernel {kernel.release}: module dependency loop {' -> '.join(chain + (name,))}")
        path = index.get(name)
        if path is None:
            if name in builtin:
                state[name] = "done"
                return
            raise OperationError(f"kernel {kernel.release} has no module {name}"
                                 + (f" (needed by {chain[-1]})" if chain else "")
                                 + "; check kernel.modules in the image definition")
        state[name] = "active"
        for dep in modinfo(read_module(path)).get("depends", [""])[0].split(","):
            if dep:
                visit(dep, chain + (name,))
        state[name] = "done"
        order.append((name, path))

    for w in wanted:
        visit(w, ())
    return order

"""Helpers for tests that need real parts: skip locally, FAIL under CI=true."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def missing(what: str) -> None:
    """A real part is not available: skip locally, fail in CI (where `make test` installed it)."""
    msg = f"{what} is not available; run `make test` (it installs the Debian packages)"
    if IN_CI:
        pytest.fail(msg, pytrace=False)
    pytest.skip(msg)


def awaits_fix(failure: str):
    """A fault test today's code fails (`failure`: what it did). Deselected unless pytest runs with
    --awaiting (tests/conftest.py), so the default run stays green and counts only what holds; the
    fix (the table-driven state machine, for most) turns it on by dropping this mark."""
    return pytest.mark.awaits_fix(failure)


def require_module(name: str):
    """A Python package of the [test] extra: imported, or skipped locally and failed in CI."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError:
        missing(f"the Python package {name} (pip install -e '.[test]')")


def require_binary(name: str, extra_paths: tuple[str, ...] = ()) -> str:
    for candidate in extra_paths:
        if Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/sbin/{name}") if os.access(p, os.X_OK)), None
    )
    if not found:
        missing(name)
    return found


from testbed.process import Daemon, free_port  # noqa: E402,F401  (their home is the test world)


def fake_built_image(root: Path, name: str, versions: list[str], current: str) -> None:
    """What `provisioner image build NAME` leaves under the image root, as far as the boot
    endpoint reads it, without building: version folders with boot files, a manifest and an
    overlay template (/etc/hostname), and NAME/current. For fast tests of plans and overlays."""
    import json

    for v in versions:
        folder = root / name / v
        (folder / "overlay").mkdir(parents=True)
        (folder / "vmlinuz").write_text(f"kernel {v}\n")
        (folder / "initramfs.img").write_text(f"initramfs {v}\n")
        (folder / "overlay" / "hostname.j2").write_text("{{ node.name }} {{ role }} {{ image.version }}\n")
        (folder / "manifest.json").write_text(json.dumps({
            "image": name, "version": v, "cmdline": "panic=10",
            "boot": {"kernel": "vmlinuz", "initrds": ["initramfs.img"], "rootfs": None},
            "overlay": [{"path": "/etc/hostname", "template": "hostname.j2", "mode": "0644"}], "files": {}}))
    os.symlink(current, root / name / "current")

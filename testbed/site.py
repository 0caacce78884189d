"""Builds site configs for the test world: a folder with images and site.yaml (the packaged templates)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml



def mac(i: int, group: int = 3) -> str:
    return f"52:54:00:{group:02x}:{(i >> 8) & 0xff:02x}:{i & 0xff:02x}"


def write_site(folder: Path, nodes: list[dict] | None = None, **sections: Any) -> Path:
    """Write folder/site.yaml (+ placeholder images, a BMC password file). Returns its path.

    `sections` override or extend top-level sections (site=..., policy=..., slurm=..., ...);
    dict sections are merged one level deep into the defaults below.
    """
    folder.mkdir(parents=True, exist_ok=True)
    for role in ("slurm", "k8s"):
        (folder / "images" / role).mkdir(parents=True, exist_ok=True)
        (folder / "images" / role / "vmlinuz").write_text(f"{role} kernel\n")
        (folder / "images" / role / "initrd.img").write_text(f"{role} initrd\n")
    (folder / "bmc-password").write_text("s3cret-bmc-pw\n")
    data: dict[str, Any] = {
        "site": {
            "name": "test",
            "boot_url": "http://127.0.0.1:8080",
            "listen": "127.0.0.1:8080",
            "store": str(folder / "state.db"),
            "secret_file": str(folder / "secret"),
            "image_root": str(folder / "images"),
        },
        "images": {
            role: {"version": "1", "kernel": f"{role}/vmlinuz", "initrds": [f"{role}/initrd.img"],
                   "cmdline": "console=ttyS0"}
            for role in ("slurm", "k8s")
        },
        "defaults": {"bmc": {"user": "admin", "password_file": str(folder / "bmc-password")}},
        "nodes": nodes if nodes is not None else [
            {"name": "cn[01-02]", "pool": "slurm", "macs": [mac(1, 1), mac(2, 1)], "bmc": {"address": "127.0.0.1"}},
            {"name": "sn[01-04]", "pool": "shared", "default_role": "slurm",
             "macs": [mac(i, 3) for i in range(1, 5)], "ip": "10.0.3.[1-4]", "bmc": {"address": "127.0.0.1"}},
        ],
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    path = folder / "site.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path

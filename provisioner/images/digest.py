"""The sha256 of a file, read in chunks (kernels, squashfs roots and binaries are large): one
function for the manifests, the build cache and the binaries' identity."""

from __future__ import annotations

import hashlib
from pathlib import Path


def sha256_file(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()

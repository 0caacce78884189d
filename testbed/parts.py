"""Finding the real parts the test world runs (Debian's daemons, tools): a missing one raises
PartMissing with what to install; tests turn that into a skip (locally) or a failure (CI)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


class PartMissing(RuntimeError):
    pass


def require_binary(name: str, extra_paths: tuple[str, ...] = ()) -> str:
    for candidate in extra_paths:
        if Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/sbin/{name}") if os.access(p, os.X_OK)), None
    )
    if not found:
        raise PartMissing(f"{name} is not available; run `make system-deps` (or `make test`, which does)")
    return found

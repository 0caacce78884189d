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

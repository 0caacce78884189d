"""Go on a fresh Debian 12: with no `go` on PATH and no GOROOT, tools/go.sh gets the pinned
toolchain (tools/go.version) through the Go module proxy into the cache, and says so; a second
run only checks it. Slow: about 75 MB from the proxy into a fresh cache."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from testbed.process import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(900)]

PIN = (ROOT / "tools" / "go.version").read_text().strip()


def go_sh(tmp_path: Path) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(tmp_path / "home"),
           "PROVISIONER_CACHE": str(tmp_path / "cache")}  # no GOROOT, no go on PATH
    return subprocess.run([str(ROOT / "tools" / "go.sh")], env=env, capture_output=True, text=True, timeout=800)


def test_go_setup_without_go_on_path_ends_with_the_pinned_version(tmp_path):
    first = go_sh(tmp_path)
    assert first.returncode == 0, first.stderr
    assert first.stderr.startswith(f"Getting Go {PIN} ")  # said up front
    assert f"fetching {PIN} from the Go module proxy" in first.stderr
    gobin = Path(first.stdout.strip())
    assert gobin.is_relative_to(tmp_path / "cache")  # outside the checkout
    version = subprocess.run([str(gobin / "go"), "env", "GOVERSION"], capture_output=True, text=True,
                             env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path / "home")})
    assert version.stdout.strip() == PIN

    second = go_sh(tmp_path)
    assert second.returncode == 0 and second.stdout == first.stdout
    assert second.stderr == ""  # only checked: nothing fetched, nothing said

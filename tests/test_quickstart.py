"""The quick start as written: its shell blocks are taken from docs/quickstart.md (not copied
here) and run in a copy of the checkout, with a fresh HOME: the wheel is built, installed into a
fresh venv, and the example site is checked, initialised, rendered and listed. Slow: the venv
installs every dependency (from pip's cache when warm, else from PyPI)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from testbed.process import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

DOC = ROOT / "docs" / "quickstart.md"


def block(marker: str) -> str:
    """The ```sh block right after the HTML comment `<!-- MARKER: ...`."""
    text = DOC.read_text()
    m = re.search(rf"<!-- {marker}:[^>]*-->\s*```sh\n(.*?)```", text, re.S)
    assert m, f"{DOC}: no block after <!-- {marker}: ... -->"
    return m.group(1)


def test_the_quick_start_try_runs_as_written(tmp_path):
    src = tmp_path / "checkout"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for name in ("provisioner", "images", "pxe-templates", "examples"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
    home = tmp_path / "home"
    home.mkdir()
    script = "set -euo pipefail\n" + block("quickstart-wheel").replace("/tmp/", f"{tmp_path}/") + \
        block("quickstart-try")
    env = {"HOME": str(home), "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
           "LANG": "C.UTF-8", **{k: v for k, v in os.environ.items() if k.startswith(("PIP_", "XDG_CACHE"))}}
    pip_cache = Path(os.environ.get("HOME", "/root")) / ".cache" / "pip"
    if pip_cache.is_dir():  # the machine's warm pip cache, not the fresh HOME's empty one
        env.setdefault("PIP_CACHE_DIR", str(pip_cache))
    r = subprocess.run(["bash", "-c", script], cwd=src, env=env, capture_output=True, text=True, timeout=1400)
    assert r.returncode == 0, f"stdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-3000:]}"
    out = r.stdout
    assert re.search(r"examples/site.yaml: ok: 10 nodes \(4 shared\)", out), out
    assert "#!ipxe" in out and "provisioner.node=sn01" in out  # the script rendered
    listing = [line.split() for line in out.splitlines() if re.match(r"^(NODE|sn0\d|cn0\d|kn0\d)\s", line)]
    assert listing[0][:3] == ["NODE", "POOL", "DESIRED"] and ["sn01", "shared", "slurm"] == listing[7][:3]
    assert re.search(r"^sn02\s+shared\s+slurm\s+-\s+k8s\s+requested\s+\d+s\s+yes\s+trying it$", out, re.M), out
    assert (home / "provisioner-try" / "bin" / "provisioner").exists()
    assert (src / "var" / "provisioner.db").exists()  # init made it, in the checkout's var/

"""The package works installed: its wheel carries the default iPXE templates and image definitions
(the checkout's top-level pxe-templates/ and images/, as provisioner/data/ inside the package),
a non-editable install into a fresh venv finds them there, and a site that names no template
folder checks and renders with them. Slow: the venv installs every dependency (from pip's cache
when warm, else from PyPI)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from provisioner.cli import main
from provisioner.model import DEFAULT_TEMPLATES
from testbed.process import ROOT
from testbed.site import write_site

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

# A line of the packaged _linux.ipxe.j2 that every node's script carries.
PACKAGED_LINE = "Edit the templates (site.templates), not this output."

PROBE = """
import json, os, provisioner
from provisioner import images
from provisioner.images.oci import PAUSE_SOURCE
from provisioner.model import DEFAULT_IMAGE_DEFINITIONS as defs, DEFAULT_TEMPLATES as tpl
callback = defs / "_common/rootfs/usr/local/sbin/provisioner-callback"
print(json.dumps({
    "package": provisioner.__file__, "templates": str(tpl), "definitions": str(defs),
    "images": [images.load_definition(defs, n).name for n in images.definition_names(defs)],
    "callback_executable": os.access(callback, os.X_OK), "pause_source": str(PAUSE_SOURCE),
}))
"""


def run(argv, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PROVISIONER_CONFIG", "VIRTUAL_ENV")}
    return subprocess.run([str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_installed_package_checks_and_renders_with_its_packaged_templates(tmp_path, capsys):
    assert PACKAGED_LINE in (DEFAULT_TEMPLATES / "_linux.ipxe.j2").read_text()

    # Build from a copy of what the package is made of: an in-tree build would leave build/ and
    # *.egg-info in the checkout, and anything the build needs beyond these files is a bug.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for name in ("provisioner", "images", "pxe-templates"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))

    venv = tmp_path / "venv"
    made = run([sys.executable, "-m", "venv", venv], tmp_path)
    assert made.returncode == 0, made.stderr
    pip = [venv / "bin" / "python", "-m", "pip", "--disable-pip-version-check"]
    wheels = tmp_path / "wheels"
    built = run([*pip, "wheel", "--quiet", "--no-deps", "-w", wheels, src], tmp_path, timeout=600)
    assert built.returncode == 0, f"pip wheel failed:\n{built.stdout}\n{built.stderr}"
    [wheel] = wheels.glob("provisioner-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    for name in ("images", "pxe-templates"):  # every file of the folder, in the package
        want = {f"provisioner/data/{name}/{p.relative_to(ROOT / name)}"
                for p in (ROOT / name).rglob("*") if p.is_file()}
        assert want and want <= names, sorted(want - names)
    assert "provisioner/images/pause.c" in names
    installed = run([*pip, "install", "--quiet", wheel], tmp_path, timeout=1000)
    assert installed.returncode == 0, f"pip install failed:\n{installed.stdout}\n{installed.stderr}"

    probe = run([venv / "bin" / "python", "-c", PROBE], tmp_path)
    assert probe.returncode == 0, probe.stderr
    found = json.loads(probe.stdout)
    installed = venv.resolve()
    for key in ("package", "templates", "definitions", "pause_source"):
        assert Path(found[key]).resolve().is_relative_to(installed), (key, found[key])  # not the checkout
    assert set(found["images"]) >= {"slurm", "k8s", "tiny"} and Path(found["pause_source"]).is_file()
    assert found["callback_executable"]  # the Debian builder copies _common/rootfs with its modes

    site = write_site(tmp_path / "site")
    assert "templates" not in yaml.safe_load(site.read_text())["site"]
    provisioner = venv / "bin" / "provisioner"

    check = run([provisioner, "--config", site, "check"], tmp_path)
    assert check.returncode == 0, check.stderr
    assert "ok: 6 nodes (4 shared)" in check.stdout

    init = run([provisioner, "--config", site, "init"], tmp_path)
    assert init.returncode == 0, init.stderr
    render = run([provisioner, "--config", site, "render", "sn01"], tmp_path)
    assert render.returncode == 0, render.stderr
    assert PACKAGED_LINE in render.stdout
    assert "kernel --name kernel http://127.0.0.1:8080/images/slurm/vmlinuz" in render.stdout

    # The same script as the checkout renders (same site, same secret): the installed data is this tree's.
    assert main(["--config", str(site), "render", "sn01"]) == 0
    assert capsys.readouterr().out == render.stdout

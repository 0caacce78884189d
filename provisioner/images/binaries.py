"""Files an image takes from outside Debian (a definition's `binaries`): a command built by the
checkout's tools/build.sh (`build: k8s`, `command: kubelet`), or a file the site brings (`file:`).

tools/build.sh builds a pinned Go component into ~/.cache/provisioner/NAME-VERSION-KEY/bin/ (KEY
hashes the pins); `tools/build.sh NAME --print-dir` names that folder without building, which
is the binary's identity in an image's build key and definition hash: a changed pin is a new
image. Only a cold image build runs `tools/build.sh NAME` (building the component if missing).

Where tools/build.sh is: $PROVISIONER_TOOLS (a checkout's tools/ folder) if set, else the
checkout this package runs from (an editable install or a source tree). A package installed
from a wheel has no tools/: such a site sets PROVISIONER_TOOLS, or builds the binary elsewhere
and gives `file: /absolute/path` instead of build/command.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from provisioner.errors import ConfigError, OperationError
from provisioner.images.definition import Binary, Definition
from provisioner.images.digest import sha256_file

CHECKOUT = Path(__file__).resolve().parent.parent.parent  # provisioner/images/ -> the checkout, if any
PRINT_DIR_TIMEOUT_S = 120


@dataclass(frozen=True)
class Resolved:
    binary: Binary
    field: str  # binaries[i]
    identity: str  # what the build key and the definition hash take: the build folder's name, or a sha256

    @property
    def build_dir(self) -> str | None:
        return self.identity.split()[1] if self.binary.build else None


def find_build_sh(env: dict[str, str] | None = None, checkout: Path = CHECKOUT) -> tuple[Path | None, str]:
    """(path of tools/build.sh or None, why it is not there)."""
    env = os.environ if env is None else env
    if env.get("PROVISIONER_TOOLS"):
        p = Path(env["PROVISIONER_TOOLS"]) / "build.sh"
        return (p if p.is_file() else None), f"PROVISIONER_TOOLS={env['PROVISIONER_TOOLS']} holds no build.sh"
    p = checkout / "tools" / "build.sh"
    return (p if p.is_file() else None), (f"there is none in {checkout}/tools: this provisioner is installed "
                                          "without its source checkout")


def _no_build_sh(d: Definition, field: str, b: Binary, why: str) -> ConfigError:
    return ConfigError(d.path, f"{field}.build",
                       f"needs tools/build.sh (to build {b.command} of component {b.build}), and {why}. Set "
                       f"PROVISIONER_TOOLS to a checkout's tools/ folder, or build the binary elsewhere and give "
                       f"`file: /absolute/path` instead of build and command")



def _check_file(d: Definition, field: str, b: Binary) -> Path:
    p = Path(b.file or "")
    if not p.is_file():
        raise ConfigError(d.path, f"{field}.file", f"{p} does not exist (or is not a file); build it, or fix the path")
    return p


def resolve(d: Definition, env: dict[str, str] | None = None, checkout: Path = CHECKOUT) -> list[Resolved]:
    """Each binary's identity, without building anything (`tools/build.sh NAME --print-dir`)."""
    out = []
    for i, b in enumerate(d.binaries):
        field = f"binaries[{i}]"
        if b.file:
            out.append(Resolved(b, field, f"file {sha256_file(_check_file(d, field, b))}"))
            continue
        script, where = find_build_sh(env, checkout)
        if script is None:
            raise _no_build_sh(d, field, b, where)
        res = _run([str(script), str(b.build), "--print-dir"], env, capture_stderr=True,
                   timeout=PRINT_DIR_TIMEOUT_S)
        if res.returncode == 2:  # no such component
            known = sorted(p.parent.name for p in script.parent.glob("*/build.conf"))
            raise ConfigError(d.path, f"{field}.build", f"tools/build.sh has no component {b.build!r} "
                                                        f"(known: {', '.join(known) or 'none'})")
        folder = res.stdout.strip().splitlines()[-1] if res.stdout.strip() else ""
        if res.returncode != 0 or not folder:
            raise OperationError(f"image {d.name}: {script} {b.build} --print-dir failed: "
                                 f"{' '.join((res.stderr or '').strip().splitlines()[-2:])[:300]}; fix that, or "
                                 f"give `file: /absolute/path` for {field} in {d.path}")
        out.append(Resolved(b, field, f"build {Path(folder).name} bin/{b.command}"))
    return out


def materialize(d: Definition, r: Resolved, env: dict[str, str] | None = None, checkout: Path = CHECKOUT) -> Path:
    """The host path of the binary: the site's file, or the component built by tools/build.sh
    (which builds it first when missing, showing its own progress on stderr)."""
    b = r.binary
    if b.file:
        p = _check_file(d, r.field, b)
        if f"file {sha256_file(p)}" != r.identity:
            raise OperationError(f"image {d.name}: {p} changed during the build; build again")
        return p
    script, where = find_build_sh(env, checkout)
    if script is None:
        raise _no_build_sh(d, r.field, b, where)
    res = _run([str(script), str(b.build)], env, capture_stderr=False, timeout=None)
    folder = Path(res.stdout.strip().splitlines()[-1]) if res.stdout.strip() else None
    if res.returncode != 0 or folder is None:
        raise OperationError(f"image {d.name}: tools/build.sh {b.build} failed (its message is above); retry "
                             f"`{script} {b.build}`, or give `file: /absolute/path` for {r.field} in {d.path}")
    if folder.name != r.build_dir:
        raise OperationError(f"image {d.name}: tools/build.sh {b.build} built {folder.name}, not {r.build_dir} "
                             f"(did its pins change during the build?); build again")
    p = folder / "bin" / str(b.command)
    if not (p.is_file() and os.access(p, os.X_OK)):
        raise ConfigError(d.path, f"{r.field}.command",
                          f"tools/build.sh {b.build} built no {b.command} (in {folder / 'bin'}: "
                          f"{', '.join(sorted(x.name for x in (folder / 'bin').iterdir())) or 'nothing'})")
    return p


def _run(argv: list[str], env, capture_stderr: bool, timeout: float | None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE if capture_stderr else None,
                              text=True, timeout=timeout, env=None if env is None else dict(env))
    except subprocess.TimeoutExpired:
        raise OperationError(f"{' '.join(argv)} took more than {timeout:.0f} s") from None

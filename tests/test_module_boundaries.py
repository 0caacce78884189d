"""Module boundaries, checked on the source (ast): no module uses another module's private
(underscore) names, and the pure policy depends only on the site model and the vocabulary."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TREES = ("provisioner", "testbed", "bench", "scripts", "tests")
FILES = sorted(p for tree in TREES for p in (ROOT / tree).rglob("*.py"))


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p) for p in FILES}


def private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def imported_from(path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    me = module_name(path).split(".")
    package = me if path.name == "__init__.py" else me[:-1]
    base = package[: len(package) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def violations(path: Path, source: str | None = None) -> list[str]:
    me = module_name(path)
    tree = ast.parse(path.read_text() if source is None else source, filename=str(path))
    out = []
    modules: dict[str, str] = {}  # local name -> the project module it is bound to
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            source = imported_from(path, node)
            for alias in node.names:
                if private(alias.name) and source != me:
                    out.append(f"{node.lineno}: from {source} import {alias.name}")
                if f"{source}.{alias.name}" in MODULES:
                    modules[alias.asname or alias.name] = f"{source}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if any(private(part) for part in alias.name.split(".")):
                    out.append(f"{node.lineno}: import {alias.name}")
                bound = alias.name if alias.asname else alias.name.split(".")[0]
                if bound in MODULES or alias.name in MODULES:
                    modules[alias.asname or bound] = bound
    # module._name on a project module (os._exit and the like are the standard library's API).
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and private(node.attr) and isinstance(node.value, ast.Name)
                and node.value.id in modules and modules[node.value.id] != me):
            out.append(f"{node.lineno}: {node.value.id}.{node.attr} ({modules[node.value.id]})")
    return out


def test_the_scan_covers_the_repository():
    assert len(FILES) > 50 and "provisioner.config" in MODULES and "testbed.site" in MODULES


def test_no_module_uses_another_modules_private_names():
    """One rule, one test: every file of the repository is scanned, every offence listed."""
    found = [f"{path.relative_to(ROOT)}:{v}" for path in FILES for v in violations(path)]
    assert found == [], "modules use private names of other modules (make them public where they are " \
                        "shared, or move them):\n" + "\n".join(found)


def test_the_detector_sees_each_form():
    probe = ROOT / "tests" / "probe.py"  # never written: the name only places the source in tests/
    source = ("from provisioner.config import _SiteLoader\nfrom . import _x\nimport provisioner._y\n"
              "from provisioner import store\nstore._private()\nimport os\nos._exit\n")
    assert [v.split(":")[0] for v in violations(probe, source)] == ["1", "2", "3", "5"]


def test_the_policy_imports_only_the_model_and_the_vocabulary():
    tree = ast.parse((ROOT / "provisioner" / "policy.py").read_text())
    project = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("provisioner"):
            project.add(node.module)
        elif isinstance(node, ast.Import):
            project |= {a.name for a in node.names if a.name.startswith("provisioner")}
    # provisioner.taints: the scheduler's toleration rule, pure and importing nothing of the project.
    assert project <= {"provisioner.model", "provisioner.nodeset", "provisioner.states", "provisioner.taints"}, project

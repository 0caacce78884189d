"""Which module may import which, checked on the source (ast): power control neither reads the
store nor works out boot plans (its callers hand it what a kexec boots and record the results),
and the policy's own imports are checked in test_module_boundaries."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "provisioner"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    return imports_in(path.read_text(), module_name(path), path.name == "__init__.py")


def imports_in(source: str, module: str, is_package: bool = False) -> set[str]:
    """Modules `source` (of `module`) imports, anywhere in it (TYPE_CHECKING blocks and functions
    included); `from provisioner import x` counts as provisioner.x when x is a module."""
    here = module.split(".") if is_package else module.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*here[:len(here) - node.level + 1], *([base] if base else [])])
            found.add(base)
            for a in node.names:
                sub = PACKAGE.parent / f"{base}.{a.name}".replace(".", "/")
                if sub.with_suffix(".py").is_file() or (sub / "__init__.py").is_file():
                    found.add(f"{base}.{a.name}")
    return found


def ours(names: set[str]) -> set[str]:
    return {n for n in names if n == "provisioner" or n.startswith("provisioner.")}


def within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def test_power_imports_neither_boot_nor_store():
    modules = sorted((PACKAGE / "power").glob("*.py"))
    assert modules, "no modules found under provisioner/power"
    bad = {module_name(p): sorted(n for n in ours(imports(p)) if within(n, "provisioner.boot")
                                  or within(n, "provisioner.store"))
           for p in modules}
    assert {m: b for m, b in bad.items() if b} == {}


def test_power_does_not_reach_boot_or_store_through_other_modules():
    """The same, through whatever power's imports import in turn."""
    graph = {module_name(p): ours(imports(p)) for p in PACKAGE.rglob("*.py")}
    for start in (m for m in graph if within(m, "provisioner.power")):
        seen, todo = set(), [start]
        while todo:
            m = todo.pop()
            if m in seen or m not in graph:
                continue
            seen.add(m)
            todo.extend(graph[m])
        reached = sorted(m for m in seen if within(m, "provisioner.boot") or within(m, "provisioner.store"))
        assert reached == [], f"{start} reaches {reached}"


def test_the_import_parser_sees_every_form():
    """The checks above are only as good as imports(): it must see each way of importing."""
    assert {"provisioner.model", "provisioner.errors", "provisioner.power.bmc", "provisioner.power.ssh"} <= \
        imports(PACKAGE / "power" / "dispatch.py")
    source = ("import provisioner.store\nfrom provisioner import boot\nif True:\n"
              "    def f():\n        from ..boot.plan import BootPlan\n")
    assert {"provisioner.store", "provisioner.boot", "provisioner.boot.plan"} <= \
        imports_in(source, "provisioner.power.probe")


def test_the_store_package_has_no_import_cycle():
    """Each backend of the store (sqlite, postgres) is importable alone: the modules of
    provisioner/store import one another without a cycle, function-level imports included."""
    graph = {module_name(p): {n for n in ours(imports(p)) if within(n, "provisioner.store")}
             for p in (PACKAGE / "store").glob("*.py")}
    assert {"provisioner.store.base", "provisioner.store.sqlite", "provisioner.store.postgres"} <= set(graph)

    def reaches(start: str) -> set[str]:
        seen, todo = set(), list(graph[start])
        while todo:
            m = todo.pop()
            if m not in seen and m in graph:
                seen.add(m)
                todo.extend(graph[m])
        return seen

    assert [m for m in graph if m in reaches(m)] == []

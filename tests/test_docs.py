"""The documentation stays true: the generated references are current and every config field has
a meaning (tools/gendocs.py --check), every link points at something, and the example site is
complete (every field the loader knows is in it, set or commented) and loads."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from provisioner import config
from testbed.process import ROOT

sys.path.insert(0, str(ROOT / "tools"))
import gendocs  # noqa: E402

# Pages other branches write; linked from here already. Drop a name once its page is in main.

LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")


def pages() -> list[Path]:
    return [ROOT / "README.md", ROOT / "CONTRIBUTING.md", ROOT / "CHANGELOG.md", ROOT / "examples" / "README.md",
            *sorted((ROOT / "docs").rglob("*.md"))]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", text))


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", text, re.M)}


def test_generated_references_are_current_and_every_config_field_has_a_meaning():
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "gendocs.py"), "--check"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_every_link_points_at_something():
    broken = []
    for page in pages():
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for m in LINK.finditer(text):
            target = m.group(1) or m.group(2)
            if re.match(r"^[a-z]+:", target):  # http(s), mailto: not followed here
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
                continue
            if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert broken == []


def test_the_example_site_loads_and_names_every_field():
    site = config.load(ROOT / "examples" / "site.yaml")
    assert {n.pool for n in site.nodes.values()} == {"slurm", "k8s", "shared"}
    text = (ROOT / "examples" / "site.yaml").read_text()
    fields, _ = gendocs.config_fields()
    missing = [f for f in fields if not re.search(rf"(^|[\s{{,]){re.escape(f.split('.')[-1].split('[')[0])}:",
                                                    text, re.M)]
    assert missing == [], "not in examples/site.yaml (set, or commented out with its default)"


def test_the_readme_is_a_front_page():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) < 60 and "docs/index.md" in text and "CONTRIBUTING.md" in text


@pytest.mark.parametrize("page", ["quickstart.md", "concepts.md", "configuration.md", "runbook.md",
                                  "scale-out.md", "metrics.md", "simulation.md", "reference/cli.md",
                                  "reference/config.md"])
def test_the_index_links_every_page(page):
    assert f"]({page})" in (ROOT / "docs" / "index.md").read_text()

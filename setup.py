"""The wheel carries the folders a site edits, kept at the checkout's top level (images/,
pxe-templates/), inside the package as provisioner/data/NAME; provisioner.model.shipped()
finds them in either place. The rest of the build is in pyproject.toml."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
SHIPPED = ("images", "pxe-templates")


class BuildPy(build_py):
    def run(self) -> None:
        super().run()
        if self.editable_mode:  # an editable install reads them where they are
            return
        for name in SHIPPED:
            target = Path(self.build_lib) / "provisioner" / "data" / name
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(HERE / name, target)


setup(cmdclass={"build_py": BuildPy})

"""The tiny test image (images/tiny): built for real once per test session, for the image and
overlay tests and for the end-to-end VM tests.

    tiny_image                      session fixture (tests/fixtures/tinyimage.py): built once
    build_tiny(image_root, ...)     build (another version of) it anywhere; kernel package cached
    clone_root(tiny, folder)        a private image root holding tiny's version, published there
    tiny_site(folder, root, ...)    a site.yaml whose roles both boot the tiny image

The kernel package (about 70 MB) is downloaded with apt-get once and cached under
~/.cache/provisioner/images/ (shared by every session and by `provisioner image build`), so
repeated builds take a couple of seconds and need no network.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from provisioner import images
from provisioner.errors import OperationError
from provisioner.images.builder import default_cache
from provisioner.model import DEFAULT_IMAGE_DEFINITIONS
from testbed.parts import PartMissing, require_binary
from testbed.site import write_site

DEFINITIONS = DEFAULT_IMAGE_DEFINITIONS  # the packaged definitions
CACHE = default_cache()  # ~/.cache/provisioner/images: outside the checkout, kept between runs


@dataclass(frozen=True)
class TinyImage:
    image_root: Path
    version: str
    path: Path  # image_root/tiny/VERSION
    manifest: dict

    @property
    def kernel(self) -> Path:
        return self.path / self.manifest["boot"]["kernel"]

    @property
    def initramfs(self) -> Path:
        return self.path / self.manifest["boot"]["initrds"][0]


def build_tiny(image_root: Path, *, name: str = "tiny", definitions: Path = DEFINITIONS, publish: bool = True,
               store=None) -> images.BuildResult:
    """A real build of the tiny image (or of another initramfs-builder definition)."""
    require_binary("apt-get")
    require_binary("dpkg-deb")
    try:
        return images.build(definitions, image_root, name, cache=CACHE, publish=publish, store=store,
                            actor="test")
    except OperationError as exc:
        if "download" in str(exc) or "apt" in str(exc):
            raise PartMissing(f"the Debian kernel package for the tiny image ({exc})") from None
        raise


def clone_root(tiny: TinyImage, folder: Path) -> Path:
    """A private image root with tiny's version in it, published: tests that publish, remove or
    rebuild never disturb the session's image."""
    root = folder / "image-root"
    (root / "tiny").mkdir(parents=True, exist_ok=True)
    shutil.copytree(tiny.path, root / "tiny" / tiny.version)
    os.symlink(tiny.version, root / "tiny" / "current")
    return root


def tiny_site(folder: Path, image_root: Path, nodes: list[dict] | None = None, **sections) -> Path:
    """write_site() with both roles booting the built tiny image from `image_root`."""
    site = {"image_root": str(image_root), **sections.pop("site", {})}
    imgs = sections.pop("images", {"slurm": {"image": "tiny"}, "k8s": {"image": "tiny"}})
    return write_site(folder, nodes=nodes, site=site, images=imgs, **sections)

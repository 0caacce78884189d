"""Diskless images: definitions (site.image_definitions/NAME/image.yaml), builds into versioned
folders under site.image_root, atomic publishing, rollback (publish an old version, or pin nodes to one).

The public API, for the CLI, the tests and the balancer:

    build(definitions, image_root, name, cache=None, publish=True, store=None, actor=...) -> BuildResult
    list_versions(image_root, name) -> [Version]        current(image_root, name) -> str | None
    listing(image_root, definitions, pins, roles, name=None) -> Listing   (`provisioner image list`)
    publish(image_root, name, version, store=..., actor=...)
    remove(image_root, name, version, store=..., actor=...)
    find_version(image_root, "VERSION" | "NAME/VERSION") -> Version
    Resolver(image_root): the boot endpoint's cheap per-request view of the published versions
"""

from provisioner.images.builder import BuildResult, build, default_cache, preflight
from provisioner.images.definition import Definition, load as load_definition, names as definition_names
from provisioner.images.versions import (
    Listing, Published, Resolver, Version, built_images, current, find_version, get, list_versions, listing, publish,
    remove,
)

__all__ = [
    "BuildResult", "Definition", "Listing", "Published", "Resolver", "Version", "build", "built_images", "current",
    "default_cache", "definition_names", "find_version", "get", "list_versions", "listing", "load_definition",
    "preflight", "publish", "remove",
]

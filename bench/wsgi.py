"""The boot endpoint as a WSGI factory for other servers the benchmark compares with gunicorn.

`granian --interface wsgi --factory bench.wsgi:create` with PROVISIONER_CONFIG set. Not how
provisioner is deployed (that is `provisioner serve`); only for `--storm-candidates`.
"""

from __future__ import annotations

from provisioner import config
from provisioner.boot.app import create_app


def create():
    return create_app(config.load(config.find_config_path(None)))

"""Shared test set-up.

Integration tests talk to real daemons (slurmctld/slurmd/munged, sshd, the BMC simulator, qemu).
When one is missing they skip locally, but under CI=true a missing daemon is a FAILURE: use
`require_binary()` / `missing()` from tests/support.py rather than pytest.skip directly.
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Fixture plugins, one module per area (each owns its daemons and cleans up after itself).
pytest_plugins = [
    "tests.fixtures.site",
    "tests.fixtures.kube",
    "tests.fixtures.boot_server",
    "tests.fixtures.sshd",
    "tests.fixtures.bmc",
    "tests.fixtures.slurm_cluster",
    "tests.fixtures.balance",
    "tests.tinyimage",
    "tests.fixtures.vms",
]

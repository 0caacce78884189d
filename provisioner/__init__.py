"""provisioner: diskless image-switching provisioning for nodes shared by SLURM and Kubernetes."""

__version__ = "0.1.0"

from provisioner.states import POOLS, ROLES  # noqa: E402,F401  (their home: provisioner/states.py)

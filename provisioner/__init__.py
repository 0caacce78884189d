"""provisioner: diskless image-switching provisioning for nodes shared by SLURM and Kubernetes."""

__version__ = "0.1.0"

ROLES = ("slurm", "k8s")
POOLS = ("slurm", "k8s", "shared")

"""Cluster adapters: what provisioner reads from and does to SLURM and Kubernetes (I/O only)."""

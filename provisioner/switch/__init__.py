"""A node's switch between SLURM and Kubernetes, as a machine: the table is provisioner/states.py,
the phase handlers are handlers.py, the one writer and the timeouts machine.py, the balancer's
locks locks.py. The pass around it (observe, decide, asks) is provisioner/reconcile.py."""

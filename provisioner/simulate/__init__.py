"""`provisioner simulate`: replay a SLURM job trace (SWF) and a pod load against the static split,
the paper's cron rule, provisioner's own policy (`provisioner.policy.decide`, unchanged) and a
bound, in simulated time. swf: SLURM traces; pods: pod traces and the generator; engine: the
discrete-event simulation; report: table, JSON and plots; command: the CLI's options and run."""

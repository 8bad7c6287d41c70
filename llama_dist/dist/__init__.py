"""Processes and their groups: launch environments (torchrun, SLURM, local), rendezvous, process-group start-up,
rank-0 helpers, and the shared-memory all-reduce of ranks on one machine."""

"""Starting pretraining: in this process, in N local processes, or as a SLURM job through submitit."""

"""Launchers: start `ettin-jax train` on every host of a TPU slice (`tpu`) or a SLURM allocation
and bring the job back after preemption, against the same run directory. `command` holds what
the launchers share: the train command line the hosts run."""

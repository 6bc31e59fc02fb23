"""Multi-host start-up through JAX's own runtime.

`initialize(config.distributed)` calls `jax.distributed.initialize`:
  * with `coordinator_address`, `num_processes`, `process_id` from the config (set by a launcher,
    e.g. scripts/launch_local.py, or by hand: `--config.distributed.coordinator_address=host:port`);
  * else on a Cloud TPU pod slice or under SLURM with more than one task, with no arguments: JAX
    detects the cluster from the environment;
  * else not at all (one process).
Afterwards only process 0 writes metrics, plots and samples; the others log warnings only.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax
from absl import logging


def cluster_environment() -> str | None:
    """'tpu' or 'slurm' when the environment describes a multi-process job JAX can join by itself."""
    if os.environ.get("TPU_WORKER_HOSTNAMES") and len(os.environ["TPU_WORKER_HOSTNAMES"].split(",")) > 1:
        return "tpu"
    if os.environ.get("SLURM_JOB_ID") and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return "slurm"
    return None


def initialize(dist: Mapping[str, Any]) -> None:
    if jax.distributed.is_initialized():
        return
    address = dist.get("coordinator_address")
    if address:
        if dist.get("num_processes") is None or dist.get("process_id") is None:
            raise ValueError("distributed.coordinator_address needs distributed.num_processes and "
                             "distributed.process_id")
        jax.distributed.initialize(address, int(dist["num_processes"]), int(dist["process_id"]))
    elif (env := cluster_environment()) is not None:
        logging.info("multi-process %s job detected; initializing jax.distributed from the environment", env)
        jax.distributed.initialize()
    else:
        return
    if jax.process_index() != 0:
        logging.set_verbosity(logging.WARNING)  # one process reports progress
    logging.info("process %d of %d, %d local of %d devices", jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.device_count())

"""Multi-controller startup: one process per host, all running the same program.

`initialize` starts JAX's distributed runtime when asked (`--distributed`), or automatically when
the environment says this is one task of a cluster job: SLURM (`srun` sets SLURM_NTASKS > 1),
Kubernetes and Cloud TPU (JAX's own cluster detection), or explicit coordinator flags. On CPU it
selects the gloo collectives, so several processes on one machine can rehearse a pod.
"""

from __future__ import annotations

import dataclasses
import os
import sys

import jax
from absl import logging

from trainer.errors import ConfigError

# Environment variables whose presence means "this process is one task of a cluster job".
# (Kubernetes jobs pass explicit flags: see scripts/k8s/train-jobset.yaml.)
_CLUSTER_MARKERS = {
  "SLURM": ("SLURM_JOB_ID", "SLURM_NTASKS"),
  "Cloud TPU": ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS"),
}


@dataclasses.dataclass(frozen=True)
class DistributedOptions:
  # None: decide from the environment; True/False: force.
  enabled: bool | None = None
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  # A process whose peers stop sending heartbeats for this long fails instead of hanging.
  heartbeat_timeout_seconds: int = 100
  initialization_timeout_seconds: int = 300


def detected_cluster(environ=os.environ) -> str | None:
  """The cluster this process runs under, from its environment, or None."""
  if "SLURM_JOB_ID" in environ and int(environ.get("SLURM_NTASKS", "1")) > 1:
    return "SLURM"
  for name, markers in _CLUSTER_MARKERS.items():
    if name != "SLURM" and any(m in environ for m in markers):
      return name
  return None


def slurm_local_device_ids(environ=os.environ) -> list[int] | None:
  """All of the node's GPUs when SLURM runs one task per node, else None (JAX's default).

  JAX's SLURM detection gives each task the single device numbered by its SLURM_LOCALID (one
  task per GPU); a task that drives a whole node must ask for every GPU explicitly.
  """
  tasks_per_node = environ.get("SLURM_NTASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE", "")
  gpus = environ.get("SLURM_GPUS_ON_NODE")
  if tasks_per_node.split("(")[0] != "1" or not gpus:
    return None
  return list(range(int(gpus)))


def single_task_cluster(environ=os.environ) -> str | None:
  """ "SLURM" when this is a SLURM job (or step) of one task, which needs no jax.distributed."""
  if "SLURM_JOB_ID" in environ and detected_cluster(environ) is None:
    return "SLURM"
  return None


def should_initialize(options: DistributedOptions, environ=os.environ) -> bool:
  if options.enabled is not None:
    return options.enabled
  explicit = (options.coordinator_address, options.num_processes, options.process_id)
  return any(v is not None for v in explicit) or detected_cluster(environ) is not None


def initialize(options: DistributedOptions, environ=os.environ) -> bool:
  """Starts `jax.distributed` if `should_initialize`; returns whether it did.

  Must run before anything touches a JAX device. Raises ConfigError for half-given flags.
  """
  if not should_initialize(options, environ):
    seen = single_task_cluster(environ)
    if seen:
      logging.info(
        "%s job %s with one task (SLURM_NTASKS=%s): one process, jax.distributed not started",
        seen,
        environ.get("SLURM_JOB_ID"),
        environ.get("SLURM_NTASKS", "unset"),
      )
    log_resolved(seen or "none", coordinator=None)
    return False
  explicit = {
    "--coordinator_address": options.coordinator_address,
    "--num_processes": options.num_processes,
    "--process_id": options.process_id,
  }
  given = [name for name, value in explicit.items() if value is not None]
  cluster = detected_cluster(environ)
  if given and len(given) < 3 and cluster is None:
    missing = sorted(set(explicit) - set(given))
    raise ConfigError(
      f"{', '.join(given)} given without {', '.join(missing)}: outside a detected cluster "
      "(SLURM, Kubernetes, Cloud TPU) all three are needed"
    )
  # CPU devices exchange data across processes through gloo (accelerators use their own).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  # Without all three flags, JAX's own cluster detection fills in what they leave out.
  kind = "explicit flags" if len(given) == 3 else cluster or "JAX cluster auto-detection"
  logging.info(
    "Initializing jax.distributed (%s): flags coordinator=%s num_processes=%s process_id=%s",
    kind,
    options.coordinator_address,
    options.num_processes,
    options.process_id,
  )
  jax.distributed.initialize(
    coordinator_address=options.coordinator_address,
    num_processes=options.num_processes,
    process_id=options.process_id,
    local_device_ids=slurm_local_device_ids(environ) if cluster == "SLURM" else None,
    initialization_timeout=options.initialization_timeout_seconds,
    heartbeat_timeout_seconds=options.heartbeat_timeout_seconds,
  )
  log_resolved(kind, coordinator=_coordinator_in_use() or options.coordinator_address)
  return True


def _coordinator_in_use() -> str | None:
  """The coordinator address jax.distributed resolved (from the flags or the cluster's
  variables, e.g. SLURM's first node and a port from the job id); JAX keeps it only in its
  private global state."""
  from jax._src import distributed as jax_distributed

  return getattr(jax_distributed.global_state, "coordinator_address", None)


def log_resolved(kind: str, *, coordinator: str | None) -> None:
  """One line saying what the cluster detection resolved. Starts JAX's backend."""
  logging.info(
    "Cluster: %s | process %d of %d | coordinator %s | %d local / %d global devices (%s)",
    kind,
    jax.process_index(),
    jax.process_count(),
    coordinator or "none",
    jax.local_device_count(),
    jax.device_count(),
    jax.devices()[0].device_kind,
  )


# Exit status of a process whose cross-process collective failed (a peer exited or vanished).
PEER_FAILURE_EXIT_CODE = 4


def exit_failed_process(error: BaseException) -> None:
  """Ends this process of a multi-process job at once, after logging why; never returns.

  A normal interpreter exit runs jax.distributed's shutdown barrier, which waits for every
  peer: a peer that died never arrives, so this process would sit out the heartbeat timeout and
  then abort (SIGABRT), and a peer still blocked in a collective with this process would wait
  just as long. `os._exit` closes this process's sockets now, so every peer's collective fails
  within seconds and the scheduler restarts the job from its last checkpoint.

  A failed collective (a peer exited first) is one log line and PEER_FAILURE_EXIT_CODE; any
  other exception is a bug, logged with its traceback, and exits 1.
  """
  where = f"process {jax.process_index()}/{jax.process_count()}"
  if isinstance(error, jax.errors.JaxRuntimeError):
    logging.error(
      "%s: a cross-process computation failed, most likely because a peer process exited or "
      "lost its connection (see the peers' logs for the first failure): %s. Exiting with "
      "status %d without the shutdown barrier; restart the job to resume from its last "
      "checkpoint.",
      where,
      " ".join(str(error).split())[:500],
      PEER_FAILURE_EXIT_CODE,
    )
    code = PEER_FAILURE_EXIT_CODE
  else:
    logging.exception("%s failed; exiting without the shutdown barrier.", where, exc_info=error)
    code = 1
  logging.flush()
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)

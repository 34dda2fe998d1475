"""`--num_workers=N`: N server processes sharing the ports, so requests are not bound by one
Python interpreter's GIL.

The process started by the user is a supervisor: it starts N copies of itself as workers (the
same flags, `SERVING_WORKER_INDEX` set), each loading the models, polling versions, batching
its own queue and binding the gRPC and REST ports with SO_REUSEPORT (the kernel spreads new
connections over them). Prometheus metrics are written to a shared directory and every
worker's `/monitoring/prometheus/metrics` reports the sum over all workers. SIGTERM (or
SIGINT) to the supervisor is passed to every worker, each drains as a single server would, and
the supervisor exits 0 once all did; a worker that dies makes the supervisor stop the others
and exit 1.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading

from absl import logging

WORKER_INDEX_ENV = "SERVING_WORKER_INDEX"
METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client's multiprocess mode.


def worker_index() -> int | None:
  """This process's worker index, None when it is not a worker of a supervisor."""
  value = os.environ.get(WORKER_INDEX_ENV)
  return None if value is None else int(value)


def supervise(num_workers: int, argv: list[str]) -> int:
  """Runs `num_workers` workers of `python -m serving.server argv[1:]` until they exit (after a
  SIGTERM or SIGINT, passed on to each); returns the exit status: 0 when all exited 0."""
  metrics_dir = tempfile.mkdtemp(prefix="serving-metrics-")
  stop = threading.Event()
  try:
    procs = [_start_worker(i, argv, metrics_dir) for i in range(num_workers)]
    for signum in (signal.SIGTERM, signal.SIGINT):
      signal.signal(signum, lambda *_: stop.set())
    logging.info("Supervising %d workers: pids %s", num_workers, [p.pid for p in procs])
    while not stop.wait(0.5):
      failed = [(i, p.returncode) for i, p in enumerate(procs) if p.poll() is not None]
      if failed:
        logging.error("Worker %d exited with status %s; stopping the others", *failed[0])
        break
    for proc in procs:
      if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    codes = [proc.wait() for proc in procs]
    logging.info("Workers exited: %s", codes)
    return 0 if stop.is_set() and all(code == 0 for code in codes) else 1
  finally:
    shutil.rmtree(metrics_dir, ignore_errors=True)


def _start_worker(index: int, argv: list[str], metrics_dir: str) -> subprocess.Popen:
  env = {**os.environ, WORKER_INDEX_ENV: str(index), METRICS_DIR_ENV: metrics_dir}
  # Workers share the supervisor's stdout/stderr; their lines carry their own pid.
  return subprocess.Popen([sys.executable, "-m", "serving.server", *argv[1:]], env=env)

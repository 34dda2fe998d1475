r"""A model server that speaks TF Serving's gRPC and REST APIs, for this project's exports.

  python -m serving.server --port=8500 --rest_api_port=8501 --model_name=digits \
      --model_base_path=/models/digits [--file_system_poll_wait_seconds=1] [--host=0.0.0.0]

Flags are named as `tensorflow_model_server`'s. The newest version under the base path is loaded
and warmed up before the ports open; newer versions dropped in later are swapped in without a
failed request. SIGTERM (or SIGINT) turns health NOT_SERVING, stops accepting, finishes requests
in flight and exits 0.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import NoReturn

from absl import app, flags, logging

from serving.server import front_flags, server_flags

flags.adopt_module_key_flags(server_flags)
flags.adopt_module_key_flags(front_flags)


def _usage_error(message: str) -> NoReturn:
  """One `error:` line on stderr, exit 1 (absl's UsageError would print the module's docstring
  first)."""
  print(f"error: {message}", file=sys.stderr)
  sys.exit(1)


def _set_tensorflow_threads() -> None:
  """Applies --tensorflow_{intra,inter}_op_parallelism (checked in `main`) before any model
  loads."""
  import tensorflow as tf

  for flag, set_threads in (
    (server_flags.INTRA_OP_THREADS, tf.config.threading.set_intra_op_parallelism_threads),
    (server_flags.INTER_OP_THREADS, tf.config.threading.set_inter_op_parallelism_threads),
  ):
    if flag.value:
      set_threads(flag.value)
  threading_config = tf.config.threading
  logging.info(
    "TensorFlow op threads: intra-op %d, inter-op %d (0: TensorFlow's default)",
    threading_config.get_intra_op_parallelism_threads(),
    threading_config.get_inter_op_parallelism_threads(),
  )


def _model_configs():
  from serving.server import model_config

  if server_flags.MODEL_CONFIG_FILE.value and server_flags.MODEL_BASE_PATH.value:
    _usage_error("give --model_config_file or --model_base_path, not both")
  if not server_flags.MODEL_CONFIG_FILE.value and not server_flags.MODEL_BASE_PATH.value:
    _usage_error("--model_base_path (or --model_config_file) is required")
  try:
    if server_flags.MODEL_CONFIG_FILE.value:
      if server_flags.VERSION_LABELS.value:
        raise ValueError("with --model_config_file, version labels go in the file")
      return model_config.read(server_flags.MODEL_CONFIG_FILE.value)
    return [
      model_config.ModelConfig(
        server_flags.MODEL_NAME.value,
        server_flags.MODEL_BASE_PATH.value,
        version_labels=model_config.parse_labels(server_flags.VERSION_LABELS.value),
      )
    ]
  except ValueError as e:
    _usage_error(str(e))


def _batch_scheduler(server_metrics):
  from serving.server import batching

  if not (server_flags.ENABLE_BATCHING.value or server_flags.BATCHING_PARAMETERS_FILE.value):
    return None
  try:
    options = batching.read_batching_parameters(server_flags.BATCHING_PARAMETERS_FILE.value)
  except ValueError as e:
    _usage_error(str(e))
  logging.info("Batching: %s", options)
  return batching.BatchScheduler(options, server_metrics.observe_batch)


def _grpc_threads(batch_scheduler) -> int:
  if server_flags.GRPC_MAX_THREADS.value is not None:
    return server_flags.GRPC_MAX_THREADS.value
  threads = 4 * (os.cpu_count() or 1)
  if batch_scheduler is not None:
    threads = max(threads, min(2 * batch_scheduler.options.max_batch_size, 256))
  return threads


def _traffic_policy(configs, models, server_metrics):
  """The traffic policy of --traffic_config_file (None without one), checked against the
  configured models' labels before any loads. A bad file: one `error:` line and exit 1."""
  from serving.server import traffic

  path = front_flags.TRAFFIC_CONFIG_FILE.value
  if not path:
    return None
  policy = traffic.TrafficPolicy(models, server_metrics)
  try:
    with open(path) as f:
      text = f.read()
    policy.apply(
      text, f"--traffic_config_file={path}", {c.name: set(c.version_labels) for c in configs}
    )
  except OSError as e:
    _usage_error(f"cannot read --traffic_config_file={path}: {e.strerror}")
  except traffic.TrafficConfigError as e:
    _usage_error(str(e))
  return policy


def _watch_config_files(models, policy, stop: threading.Event) -> None:
  """Starts a thread per config file the server re-reads (--model_config_file and
  --traffic_config_file, each with its poll interval > 0), until `stop`."""
  from serving.server import model_config, traffic

  watched = [
    (
      model_config.watch,
      models,
      server_flags.MODEL_CONFIG_FILE,
      server_flags.MODEL_CONFIG_FILE_POLL_WAIT,
    ),
    (
      traffic.watch,
      policy,
      front_flags.TRAFFIC_CONFIG_FILE,
      front_flags.TRAFFIC_CONFIG_POLL_WAIT,
    ),
  ]
  for watch, target, path, every_seconds in watched:
    if path.value and target is not None and every_seconds.value > 0:
      threading.Thread(
        target=watch,
        args=(target, path.value, every_seconds.value, stop),
        name=f"{path.name}-watcher",
        daemon=True,
      ).start()


def _base_path_roots(configs) -> list[str]:
  if server_flags.MODEL_BASE_PATH_ROOTS.value is not None:
    return list(server_flags.MODEL_BASE_PATH_ROOTS.value)
  return sorted({os.path.dirname(os.path.abspath(c.base_path)) for c in configs})


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    _usage_error(f"unexpected arguments: {argv[1:]}")
  from serving.server import workers

  worker = workers.worker_index()
  if server_flags.NUM_WORKERS.value < 1:
    _usage_error(f"--num_workers={server_flags.NUM_WORKERS.value} must be at least 1")
  # Checked before workers start or TensorFlow loads.
  for flag in (server_flags.INTRA_OP_THREADS, server_flags.INTER_OP_THREADS):
    if flag.value < 0:
      _usage_error(f"--{flag.name}={flag.value} must be 0 (the default) or more")
  warmup = server_flags.WARMUP_ITERATIONS
  if warmup.value < 1:
    _usage_error(f"--{warmup.name}={warmup.value} must be at least 1")
  try:
    metrics_paths = front_flags.check()
  except ValueError as e:
    _usage_error(str(e))
  if server_flags.NUM_WORKERS.value > 1 and worker is None:
    if server_flags.PORT.value == 0:
      _usage_error("--num_workers > 1 needs a fixed --port (workers share it)")
    sys.exit(workers.supervise(server_flags.NUM_WORKERS.value, sys.argv))  # Before TF's import.
  _serve(worker, metrics_paths)


def _serve(worker: int | None, metrics_paths: frozenset[str]) -> None:
  """Runs one server (or one worker of --num_workers) until SIGTERM; REST answers the
  Prometheus metrics at `metrics_paths`."""
  from serving.server import metrics

  configs = _model_configs()
  _set_tensorflow_threads()
  server_metrics = metrics.Metrics()
  batch_scheduler = _batch_scheduler(server_metrics)
  models, policy = _load_models(configs, server_metrics, batch_scheduler)
  stop = threading.Event()
  _watch_config_files(models, policy, stop)
  request_path, logger, shadows = _request_path(configs, models, server_metrics, policy, worker)
  grpc, health, httpd = _open_ports(request_path, models, batch_scheduler, worker, metrics_paths)

  for signum in (signal.SIGTERM, signal.SIGINT):
    signal.signal(signum, lambda *_: stop.set())
  parent = os.getppid()
  while not stop.wait(0.5):  # A timed wait lets the signal handler run promptly.
    if worker is not None and os.getppid() != parent:
      logging.error("Worker %d: the supervisor is gone; shutting down", worker)
      break
  _shut_down(health, httpd, grpc, batch_scheduler, models)
  if shadows is not None:
    shadows.stop()
  logger.close()  # After the shadows: their records go to the log too.
  logging.info("Stopped")


def _load_models(configs, server_metrics, batch_scheduler):
  """(ServedModels with the initial versions loaded and polling started, the traffic policy or
  None). The traffic file is checked before any load; a model that cannot be served exits 1."""
  from serving.server import model_versions, served_models
  from serving.server.errors import ServingError

  models = served_models.ServedModels(
    poll_wait_seconds=server_flags.POLL_WAIT.value,
    batch_scheduler=batch_scheduler,
    load_retry=model_versions.LoadRetry(
      server_flags.MAX_NUM_LOAD_RETRIES.value, server_flags.LOAD_RETRY_INTERVAL_MICROS.value / 1e6
    ),
    warmup=model_versions.Warmup(
      server_flags.ENABLE_MODEL_WARMUP.value, server_flags.WARMUP_ITERATIONS.value
    ),
  )
  models.on_models_changed.append(server_metrics.set_model_names)
  policy = _traffic_policy(configs, models, server_metrics)
  try:
    models.reload(configs)  # The ports open once the initial versions are loaded (or failed).
  except ServingError as e:
    logging.error("Cannot serve the configured models: %s", e.message)
    sys.exit(1)
  models.start()
  return models, policy


def _request_path(configs, models, server_metrics, policy, worker: int | None):
  """(the one RequestPath every API serves through, its prediction logger, the shadow runner
  or None without a traffic policy)."""
  from serving.server import handlers, prediction_logger, shadow

  roots = _base_path_roots(configs)
  logging.info("Reload requests may serve base paths under %s", roots)
  logger = prediction_logger.PredictionLogger(
    server_metrics,
    max_file_bytes=front_flags.LOG_MAX_FILE_BYTES.value,
    queue_size=front_flags.LOG_QUEUE_SIZE.value,
  )
  shadows = None
  if policy is not None:
    shadows = shadow.ShadowRunner(
      models,
      server_metrics,
      logger,
      workers=front_flags.SHADOW_WORKERS.value,
      queue_size=front_flags.SHADOW_QUEUE_SIZE.value,
    )
  request_path = handlers.RequestPath(
    handlers.RequestHandlers(models, roots, reloads_allowed=worker is None),
    server_metrics,
    logger=logger,
    traffic=policy,
    shadows=shadows,
  )
  return request_path, logger, shadows


def _open_ports(request_path, models, batch_scheduler, worker: int | None, metrics_paths):
  """Starts gRPC (and REST when --rest_api_port is set): (grpc server, its health servicer,
  the REST server or None). A gRPC port that cannot be bound exits 1."""
  from serving.server import grpc_api

  grpc, grpc_port, health = grpc_api.build(
    request_path,
    f"{front_flags.HOST.value}:{server_flags.PORT.value}",
    max_request_size_bytes=front_flags.MAX_REQUEST_SIZE.value,
    max_threads=_grpc_threads(batch_scheduler),
    reuse_port=worker is not None,
    channel_arguments=front_flags.grpc_options(),
  )
  if not grpc_port:
    logging.error(
      "Cannot listen on %s:%d for gRPC", front_flags.HOST.value, server_flags.PORT.value
    )
    sys.exit(1)
  httpd = None
  if front_flags.REST_API_PORT.value:
    httpd = front_flags.build_rest(request_path, metrics_paths, reuse_port=worker is not None)
    threading.Thread(target=httpd.serve_forever, name="rest", daemon=True).start()
  logging.info(
    "%sServing %s: gRPC on %s:%d, REST on %s%s",
    "" if worker is None else f"Worker {worker}: ",
    ", ".join(f"{m.name} from {m.base_path}" for m in models.models.values()),
    front_flags.HOST.value,
    grpc_port,
    f"{front_flags.HOST.value}:{httpd.server_address[1]}" if httpd else "(disabled)",
    ", batching" if batch_scheduler else "",
  )
  return grpc, health, httpd


def _shut_down(health, httpd, grpc, batch_scheduler, models) -> None:
  logging.info("Shutting down: finishing requests in flight")
  health.enter_graceful_shutdown()  # Health checks answer NOT_SERVING from here on.
  if httpd:
    # REST stops accepting and finishes its requests (each bounded by the read timeout) while
    # gRPC still answers, so health probes see NOT_SERVING rather than a refused connection.
    httpd.shutdown()
    httpd.server_close()
  grpc.stop(grace=front_flags.SHUTDOWN_GRACE.value).wait()
  if batch_scheduler:
    batch_scheduler.stop()
  models.stop()


if __name__ == "__main__":
  app.run(main)

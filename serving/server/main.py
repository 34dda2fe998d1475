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

_PORT = flags.DEFINE_integer("port", 8500, "gRPC port.")
_REST_API_PORT = flags.DEFINE_integer("rest_api_port", 0, "REST port; 0 disables REST.")
_HOST = flags.DEFINE_string(
  "host", "127.0.0.1", "Address both APIs listen on; 0.0.0.0 (all interfaces) must be asked for."
)
_MODEL_NAME = flags.DEFINE_string("model_name", "default", "Name the model is served under.")
_MODEL_BASE_PATH = flags.DEFINE_string(
  "model_base_path", None, "Directory of numeric version directories (an export base)."
)
_MODEL_CONFIG_FILE = flags.DEFINE_string(
  "model_config_file",
  None,
  "A text ModelServerConfig (model_config_list: name, base_path, model_version_policy, "
  "version_labels) serving several models; replaces --model_name and --model_base_path.",
)
_MODEL_CONFIG_FILE_POLL_WAIT = flags.DEFINE_integer(
  "model_config_file_poll_wait_seconds",
  0,
  "Seconds between reads of --model_config_file; a changed file is applied as a "
  "HandleReloadConfigRequest would be. 0: read once at start.",
)
_ENABLE_BATCHING = flags.DEFINE_bool(
  "enable_batching", False, "Merge concurrent requests to a signature into batches."
)
_BATCHING_PARAMETERS_FILE = flags.DEFINE_string(
  "batching_parameters_file",
  None,
  "A text BatchingParameters (max_batch_size, batch_timeout_micros, max_enqueued_batches, "
  "num_batch_threads, allowed_batch_sizes); implies --enable_batching.",
)
_POLL_WAIT = flags.DEFINE_float(
  "file_system_poll_wait_seconds", 1.0, "Seconds between polls of the base path for versions."
)
_MAX_NUM_LOAD_RETRIES = flags.DEFINE_integer(
  "max_num_load_retries", 5, "Times a version whose load failed is tried again."
)
_LOAD_RETRY_INTERVAL_MICROS = flags.DEFINE_integer(
  "load_retry_interval_micros", 60_000_000, "Microseconds between tries of a failed load."
)
_MAX_REQUEST_SIZE = flags.DEFINE_integer(
  "max_request_size_bytes", 64 << 20, "Largest gRPC message or REST body accepted."
)
_GRPC_MAX_THREADS = flags.DEFINE_integer(
  "grpc_max_threads",
  None,
  "Threads answering gRPC requests. Default: 4 per CPU; with batching at least twice "
  "max_batch_size (up to 256), since every request waiting for its batch holds a thread.",
)
_VERSION_LABELS = flags.DEFINE_list(
  "version_labels",
  [],
  "label=version pairs (e.g. stable=1,canary=2) for model_spec.version_label, with "
  "--model_base_path (TF Serving takes labels only from --model_config_file, as does this "
  "server when one is given).",
)
_MODEL_BASE_PATH_ROOTS = flags.DEFINE_list(
  "model_base_path_roots",
  None,
  "Directories that base paths in a HandleReloadConfigRequest must lie under (after resolving "
  "'..' and symlinks). Default: the parent directories of the models configured at start.",
)
_REST_MAX_CONNECTIONS = flags.DEFINE_integer(
  "rest_max_connections",
  512,
  "REST connections served at once (one thread each); more get HTTP 503 and are closed.",
)
_REST_READ_TIMEOUT = flags.DEFINE_float(
  "rest_read_timeout_seconds",
  30.0,
  "Seconds a REST client may take to send a request's line, headers and body, from its first "
  "byte; slower connections are closed. Idle connections close after 10 s.",
)
_NUM_WORKERS = flags.DEFINE_integer(
  "num_workers",
  1,
  "Server processes sharing the ports (SO_REUSEPORT), each with its own models, polling and "
  "batching; metrics are summed over them. With more than 1, --port and --rest_api_port must "
  "be fixed and config changes go through --model_config_file (HandleReloadConfigRequest "
  "would reach one worker only, so it is refused).",
)
_LOG_MAX_FILE_BYTES = flags.DEFINE_integer(
  "prediction_log_max_file_bytes",
  64 << 20,
  "Prediction log files (a model config's logging_config) rotate once they reach this size.",
)
_LOG_QUEUE_SIZE = flags.DEFINE_integer(
  "prediction_log_queue_size",
  10_000,
  "Records waiting for the prediction log writer at most; more are dropped and counted.",
)
_TRAFFIC_CONFIG_FILE = flags.DEFINE_string(
  "traffic_config_file",
  None,
  "A JSON traffic policy: per model a sticky split over version labels and a mirrored "
  "(shadow) label (serving/server/traffic.py). Re-read when it changes; a bad file is refused "
  "and the previous policy stays.",
)
_TRAFFIC_CONFIG_POLL_WAIT = flags.DEFINE_float(
  "traffic_config_file_poll_wait_seconds", 1.0, "Seconds between reads of --traffic_config_file."
)
_SHADOW_WORKERS = flags.DEFINE_integer(
  "shadow_workers", 2, "Threads running mirrored (shadow) requests."
)
_SHADOW_QUEUE_SIZE = flags.DEFINE_integer(
  "shadow_queue_size", 64, "Shadow requests waiting for a worker at most; more are dropped."
)
# TF Serving's flags of the same names; 0 lets TensorFlow choose (one thread per core). For
# small models under concurrent requests, 1 often serves faster: the requests are the
# parallelism, and idle pool threads spin (docs/benchmarks.md).
_INTRA_OP_THREADS = flags.DEFINE_integer(
  "tensorflow_intra_op_parallelism", 0, "Threads one op may use; 0: TensorFlow's default."
)
_INTER_OP_THREADS = flags.DEFINE_integer(
  "tensorflow_inter_op_parallelism", 0, "Threads running ops side by side; 0: the default."
)
_SHUTDOWN_GRACE = flags.DEFINE_float(
  "shutdown_grace_seconds", 30.0, "On SIGTERM, how long requests in flight may still run."
)


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
    (_INTRA_OP_THREADS, tf.config.threading.set_intra_op_parallelism_threads),
    (_INTER_OP_THREADS, tf.config.threading.set_inter_op_parallelism_threads),
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

  if _MODEL_CONFIG_FILE.value and _MODEL_BASE_PATH.value:
    _usage_error("give --model_config_file or --model_base_path, not both")
  if not _MODEL_CONFIG_FILE.value and not _MODEL_BASE_PATH.value:
    _usage_error("--model_base_path (or --model_config_file) is required")
  try:
    if _MODEL_CONFIG_FILE.value:
      if _VERSION_LABELS.value:
        raise ValueError("with --model_config_file, version labels go in the file")
      return model_config.read(_MODEL_CONFIG_FILE.value)
    return [
      model_config.ModelConfig(
        _MODEL_NAME.value,
        _MODEL_BASE_PATH.value,
        version_labels=model_config.parse_labels(_VERSION_LABELS.value),
      )
    ]
  except ValueError as e:
    _usage_error(str(e))


def _batch_scheduler(server_metrics):
  from serving.server import batching

  if not (_ENABLE_BATCHING.value or _BATCHING_PARAMETERS_FILE.value):
    return None
  try:
    options = batching.read_batching_parameters(_BATCHING_PARAMETERS_FILE.value)
  except ValueError as e:
    _usage_error(str(e))
  logging.info("Batching: %s", options)
  return batching.BatchScheduler(options, server_metrics.observe_batch)


def _grpc_threads(batch_scheduler) -> int:
  if _GRPC_MAX_THREADS.value is not None:
    return _GRPC_MAX_THREADS.value
  threads = 4 * (os.cpu_count() or 1)
  if batch_scheduler is not None:
    threads = max(threads, min(2 * batch_scheduler.options.max_batch_size, 256))
  return threads


def _watch_model_config_file(models, path: str, every_seconds: int, stop: threading.Event):
  """Applies `path` whenever its text changes; retries a text that failed to apply (a label
  may name a version still being exported), logging each distinct error once."""
  from serving.server import model_config
  from serving.server.errors import ServingError

  applied, error = None, None
  while not stop.wait(every_seconds):
    try:
      with open(path) as f:
        text = f.read()
      if text == applied and error is None:
        continue
      applied = text
      models.reload(model_config.parse(text, f"--model_config_file={path}"))
      if error is not None:
        logging.info("Applied --model_config_file=%s", path)
      error = None
    except (OSError, ValueError, ServingError) as e:
      message = e.message if isinstance(e, ServingError) else str(e)
      if message != error:
        logging.error("Not applying --model_config_file=%s: %s", path, message)
      error = message


def _traffic_policy(configs, models, server_metrics):
  """The traffic policy of --traffic_config_file (None without one), checked against the
  configured models' labels before any loads. A bad file: one `error:` line and exit 1."""
  from serving.server import traffic

  path = _TRAFFIC_CONFIG_FILE.value
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


def _watch_traffic_config_file(policy, stop: threading.Event) -> None:
  from serving.server import traffic

  if policy is not None and _TRAFFIC_CONFIG_POLL_WAIT.value > 0:
    threading.Thread(
      target=traffic.watch,
      args=(policy, _TRAFFIC_CONFIG_FILE.value, _TRAFFIC_CONFIG_POLL_WAIT.value, stop),
      name="traffic-config-watcher",
      daemon=True,
    ).start()


def _base_path_roots(configs) -> list[str]:
  if _MODEL_BASE_PATH_ROOTS.value is not None:
    return list(_MODEL_BASE_PATH_ROOTS.value)
  return sorted({os.path.dirname(os.path.abspath(c.base_path)) for c in configs})


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    _usage_error(f"unexpected arguments: {argv[1:]}")
  from serving.server import workers

  worker = workers.worker_index()
  if _NUM_WORKERS.value < 1:
    _usage_error(f"--num_workers={_NUM_WORKERS.value} must be at least 1")
  for flag in (_INTRA_OP_THREADS, _INTER_OP_THREADS):  # Before workers start or TF loads.
    if flag.value < 0:
      _usage_error(f"--{flag.name}={flag.value} must be 0 (the default) or more")
  if _NUM_WORKERS.value > 1 and worker is None:
    if _PORT.value == 0:
      _usage_error("--num_workers > 1 needs a fixed --port (workers share it)")
    sys.exit(workers.supervise(_NUM_WORKERS.value, sys.argv))  # Before TensorFlow is imported.
  _serve(worker)


def _serve(worker: int | None) -> None:
  """Runs one server (or one worker of --num_workers) until SIGTERM."""
  from serving.server import (
    grpc_api,
    handlers,
    metrics,
    model_versions,
    prediction_logger,
    rest_api,
    served_models,
    shadow,
  )
  from serving.server.errors import ServingError

  configs = _model_configs()
  _set_tensorflow_threads()
  server_metrics = metrics.Metrics()
  batch_scheduler = _batch_scheduler(server_metrics)
  models = served_models.ServedModels(
    poll_wait_seconds=_POLL_WAIT.value,
    batch_scheduler=batch_scheduler,
    load_retry=model_versions.LoadRetry(
      _MAX_NUM_LOAD_RETRIES.value, _LOAD_RETRY_INTERVAL_MICROS.value / 1e6
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
  roots = _base_path_roots(configs)
  logging.info("Reload requests may serve base paths under %s", roots)
  stop = threading.Event()
  _watch_traffic_config_file(policy, stop)
  logger = prediction_logger.PredictionLogger(
    server_metrics, max_file_bytes=_LOG_MAX_FILE_BYTES.value, queue_size=_LOG_QUEUE_SIZE.value
  )
  shadows = None
  if policy is not None:
    shadows = shadow.ShadowRunner(
      models,
      server_metrics,
      logger,
      workers=_SHADOW_WORKERS.value,
      queue_size=_SHADOW_QUEUE_SIZE.value,
    )
  request_path = handlers.RequestPath(
    handlers.RequestHandlers(models, roots, reloads_allowed=worker is None),
    server_metrics,
    logger=logger,
    traffic=policy,
    shadows=shadows,
  )
  if _MODEL_CONFIG_FILE.value and _MODEL_CONFIG_FILE_POLL_WAIT.value > 0:
    threading.Thread(
      target=_watch_model_config_file,
      args=(models, _MODEL_CONFIG_FILE.value, _MODEL_CONFIG_FILE_POLL_WAIT.value, stop),
      name="model-config-watcher",
      daemon=True,
    ).start()
  grpc, grpc_port, health = grpc_api.build(
    request_path,
    f"{_HOST.value}:{_PORT.value}",
    max_request_size_bytes=_MAX_REQUEST_SIZE.value,
    max_threads=_grpc_threads(batch_scheduler),
    reuse_port=worker is not None,
  )
  if not grpc_port:
    logging.error("Cannot listen on %s:%d for gRPC", _HOST.value, _PORT.value)
    sys.exit(1)
  httpd = None
  if _REST_API_PORT.value:
    httpd = rest_api.build(
      request_path,
      _HOST.value,
      _REST_API_PORT.value,
      max_request_size_bytes=_MAX_REQUEST_SIZE.value,
      max_connections=_REST_MAX_CONNECTIONS.value,
      read_timeout_seconds=_REST_READ_TIMEOUT.value,
      reuse_port=worker is not None,
    )
    threading.Thread(target=httpd.serve_forever, name="rest", daemon=True).start()
  logging.info(
    "%sServing %s: gRPC on %s:%d, REST on %s%s",
    "" if worker is None else f"Worker {worker}: ",
    ", ".join(f"{m.name} from {m.base_path}" for m in models.models.values()),
    _HOST.value,
    grpc_port,
    f"{_HOST.value}:{httpd.server_address[1]}" if httpd else "(disabled)",
    ", batching" if batch_scheduler else "",
  )

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


def _shut_down(health, httpd, grpc, batch_scheduler, models) -> None:
  logging.info("Shutting down: finishing requests in flight")
  health.enter_graceful_shutdown()  # Health checks answer NOT_SERVING from here on.
  if httpd:
    # REST stops accepting and finishes its requests (each bounded by the read timeout) while
    # gRPC still answers, so health probes see NOT_SERVING rather than a refused connection.
    httpd.shutdown()
    httpd.server_close()
  grpc.stop(grace=_SHUTDOWN_GRACE.value).wait()
  if batch_scheduler:
    batch_scheduler.stop()
  models.stop()


if __name__ == "__main__":
  app.run(main)

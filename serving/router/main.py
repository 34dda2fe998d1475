r"""Router mode: TF Serving's gRPC and REST APIs in front of a TF-Serving-compatible backend
(stock `tensorflow_model_server` included), with the model server's traffic policy
(sticky split, mirror), prediction log and request ids.

  python -m serving.router --port=8600 --rest_api_port=8601 --backend=127.0.0.1:8500 \
      [--traffic_config_file=traffic.json] [--model_config_file=models.config]

Version labels and logging_config come from --model_config_file (the backend's own file; base
paths are not read); without it a traffic config's labels are taken as the backend's and
nothing is logged. The backend is reached over gRPC only. The ports and the request path take
the model server's flags (serving/server/front_flags.py: --rest_api_num_threads,
--rest_api_timeout_in_ms, which also bounds the forwarded call, --rest_api_enable_cors_support,
--grpc_channel_arguments, --monitoring_config_file, ...), so the router can stand where
`tensorflow_model_server` stood in a manifest. SIGTERM (or SIGINT) finishes requests in flight
and exits 0.
"""

from __future__ import annotations

import re
import signal
import sys
import threading

from absl import flags, logging

from serving.server import front_flags

flags.adopt_module_key_flags(front_flags)

_PORT = flags.DEFINE_integer("port", 8600, "gRPC port.")
_BACKEND = flags.DEFINE_string(
  "backend", None, "HOST:PORT of the backend's gRPC API (a TF-Serving-compatible server)."
)
_BACKEND_TIMEOUT = flags.DEFINE_float(
  "backend_timeout_seconds", 30.0, "Deadline of each forwarded call; past it: DEADLINE_EXCEEDED."
)
_MODEL_CONFIG_FILE = flags.DEFINE_string(
  "model_config_file",
  None,
  "The backend's text ModelServerConfig: the router reads model names, version_labels (which "
  "a traffic config is checked against) and logging_config (its prediction log).",
)
_MODEL_CONFIG_FILE_POLL_WAIT = flags.DEFINE_integer(
  "model_config_file_poll_wait_seconds", 0, "Seconds between reads of --model_config_file; 0: once."
)
_GRPC_MAX_THREADS = flags.DEFINE_integer("grpc_max_threads", 64, "Threads answering gRPC.")

_ADDRESS = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.\-]+):\d{1,5}$")


def _fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(1)


def _model_configs() -> dict:
  from serving.server import model_config

  if not _MODEL_CONFIG_FILE.value:
    return {}
  try:
    return {c.name: c for c in model_config.read(_MODEL_CONFIG_FILE.value)}
  except ValueError as e:
    _fail(str(e))


def _watch_model_config(models, router_metrics, stop: threading.Event) -> None:
  """Re-reads --model_config_file (labels a rollout moved); a bad text keeps the last one."""
  from serving.server import model_config

  path, error = _MODEL_CONFIG_FILE.value, None
  while not stop.wait(_MODEL_CONFIG_FILE_POLL_WAIT.value):
    try:
      models.configs = {c.name: c for c in model_config.read(path)}
      router_metrics.set_model_names(sorted(models.configs))
      error = None
    except ValueError as e:
      if str(e) != error:
        logging.error("Not applying --model_config_file=%s: %s", path, e)
      error = str(e)


def _traffic_policy(models, router_metrics):
  from serving.router import backend
  from serving.server import traffic

  path = front_flags.TRAFFIC_CONFIG_FILE.value
  if not path:
    return None
  policy = backend.RouterTrafficPolicy(models, router_metrics)
  try:
    with open(path) as f:
      policy.apply(f.read(), f"--traffic_config_file={path}")
  except OSError as e:
    _fail(f"cannot read --traffic_config_file={path}: {e.strerror}")
  except traffic.TrafficConfigError as e:
    _fail(str(e))
  return policy


def _start_thread(target, *args, name: str) -> None:
  threading.Thread(target=target, args=args, name=name, daemon=True).start()


def _open_ports(path, metrics_paths: frozenset[str]):
  """Starts gRPC, and REST when --rest_api_port is set: (grpc server, its health servicer, the
  REST server or None). A port that cannot be bound: one `error:` line, exit 1."""
  from serving.server import grpc_api

  host = front_flags.HOST.value
  server, port, health = grpc_api.build(
    path,
    f"{host}:{_PORT.value}",
    max_request_size_bytes=front_flags.MAX_REQUEST_SIZE.value,
    max_threads=_GRPC_MAX_THREADS.value,
    channel_arguments=front_flags.grpc_options(),
  )
  if not port:
    _fail(f"cannot listen on {host}:{_PORT.value} for gRPC; choose a free --port")
  httpd = None
  if front_flags.REST_API_PORT.value:
    try:
      httpd = front_flags.build_rest(path, metrics_paths)
    except OSError as e:
      _fail(f"cannot listen on {host}:{front_flags.REST_API_PORT.value} for REST: {e.strerror}")
    _start_thread(httpd.serve_forever, name="rest")
  logging.info(
    "Routing to %s: gRPC on %s:%d, REST on %s", _BACKEND.value, host, port,
    f"{host}:{httpd.server_address[1]}" if httpd else "(disabled)",
  )  # fmt: skip
  return server, health, httpd


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    _fail(f"unexpected arguments {argv[1:]}; every setting is a --flag")
  if not _BACKEND.value or not _ADDRESS.match(_BACKEND.value):
    _fail(f"--backend={_BACKEND.value} must be HOST:PORT of the backend's gRPC API")
  try:
    metrics_paths = front_flags.check()
  except ValueError as e:
    _fail(str(e))
  from serving.router import backend
  from serving.server import handlers, metrics, prediction_logger, traffic

  models = backend.RouterModels(_model_configs())
  router_metrics = metrics.Metrics()
  policy = _traffic_policy(models, router_metrics)
  named = set(models.configs) | set(policy.policies if policy is not None else ())
  router_metrics.set_model_names(sorted(named))
  target = backend.Backend(_BACKEND.value, _BACKEND_TIMEOUT.value)
  logger = prediction_logger.PredictionLogger(
    router_metrics,
    max_file_bytes=front_flags.LOG_MAX_FILE_BYTES.value,
    queue_size=front_flags.LOG_QUEUE_SIZE.value,
  )
  shadows = None
  if policy is not None:
    shadows = backend.BackendShadowRunner(
      target,
      router_metrics,
      logger,
      workers=front_flags.SHADOW_WORKERS.value,
      queue_size=front_flags.SHADOW_QUEUE_SIZE.value,
    )
  path = handlers.RequestPath(
    backend.RouterHandlers(target, models),
    router_metrics,
    logger=logger,
    traffic=policy,
    shadows=shadows,
  )
  stop = threading.Event()
  if policy is not None and front_flags.TRAFFIC_CONFIG_POLL_WAIT.value > 0:
    traffic_file, every = (
      front_flags.TRAFFIC_CONFIG_FILE.value,
      front_flags.TRAFFIC_CONFIG_POLL_WAIT.value,
    )
    _start_thread(traffic.watch, policy, traffic_file, every, stop, name="traffic")
  if _MODEL_CONFIG_FILE.value and _MODEL_CONFIG_FILE_POLL_WAIT.value > 0:
    _start_thread(_watch_model_config, models, router_metrics, stop, name="model-config")
  server, health, httpd = _open_ports(path, metrics_paths)
  for signum in (signal.SIGTERM, signal.SIGINT):
    signal.signal(signum, lambda *_: stop.set())
  while not stop.wait(0.5):  # A timed wait lets the signal handler run promptly.
    pass
  health.enter_graceful_shutdown()
  if httpd:
    httpd.shutdown()
    httpd.server_close()
  server.stop(grace=front_flags.SHUTDOWN_GRACE.value).wait()
  if shadows is not None:
    shadows.stop()
  logger.close()  # After the shadows: their records go to the log too.
  target.close()
  logging.info("Stopped")

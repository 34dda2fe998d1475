"""The flags of the client-facing ports and the request path, defined once for the two programs
that serve them: the model server (serving.server) and the router (serving.router). Named as
`tensorflow_model_server`'s where TF Serving has the same one, so a manifest written for it
starts either program unchanged.

`check()` validates them before anything starts; `grpc_options()` and `build_rest()` turn them
into the gRPC server's options and the REST server.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from absl import flags

if TYPE_CHECKING:
  import http.server

  from serving.server.handlers import RequestPath

REST_API_PORT = flags.DEFINE_integer("rest_api_port", 0, "REST port; 0 disables REST.")
HOST = flags.DEFINE_string(
  "host", "127.0.0.1", "Address both APIs listen on; 0.0.0.0 (all interfaces) must be asked for."
)
MAX_REQUEST_SIZE = flags.DEFINE_integer(
  "max_request_size_bytes", 64 << 20, "Largest gRPC message or REST body accepted."
)
GRPC_CHANNEL_ARGUMENTS = flags.DEFINE_string(
  "grpc_channel_arguments",
  "",
  "gRPC server arguments as key=value pairs separated by commas (integers are passed as "
  "integers), e.g. grpc.max_connection_age_ms=60000; they override the server's own.",
)
REST_MAX_CONNECTIONS = flags.DEFINE_integer(
  "rest_max_connections",
  512,
  "REST connections served at once (one thread each); more get HTTP 503 and are closed.",
)
REST_API_NUM_THREADS = flags.DEFINE_integer(
  "rest_api_num_threads",
  None,
  "REST requests processed at once (TF Serving's REST thread pool); the others wait for a "
  "slot within their --rest_api_timeout_in_ms. Default: 4 per CPU.",
)
REST_API_TIMEOUT_MS = flags.DEFINE_integer(
  "rest_api_timeout_in_ms",
  30_000,
  "A REST request's deadline, from when its body has arrived: waiting for a thread or in a "
  "batching queue counts; a request past it gets HTTP 504 (DEADLINE_EXCEEDED) and its model "
  "does not run. gRPC requests keep their client's deadline the same way.",
)
REST_API_ENABLE_CORS = flags.DEFINE_bool(
  "rest_api_enable_cors_support",
  False,
  "CORS headers on REST responses (any origin) and answers to browsers' OPTIONS preflights, "
  "so a web page on another origin can call the REST API.",
)
REST_READ_TIMEOUT = flags.DEFINE_float(
  "rest_read_timeout_seconds",
  30.0,
  "Seconds a REST client may take to send a request's line, headers and body, from its first "
  "byte; slower connections are closed. Idle connections close after 10 s.",
)
MONITORING_CONFIG_FILE = flags.DEFINE_string(
  "monitoring_config_file",
  None,
  "A text MonitoringConfig, as TF Serving's (prometheus_config { enable: true path: "
  '"/metrics" }): REST also serves the Prometheus metrics at its path (they are always at '
  "/monitoring/prometheus/metrics).",
)
LOG_MAX_FILE_BYTES = flags.DEFINE_integer(
  "prediction_log_max_file_bytes",
  64 << 20,
  "Prediction log files (a model config's logging_config) rotate once they reach this size.",
)
LOG_QUEUE_SIZE = flags.DEFINE_integer(
  "prediction_log_queue_size",
  10_000,
  "Records waiting for the prediction log writer at most; more are dropped and counted.",
)
TRAFFIC_CONFIG_FILE = flags.DEFINE_string(
  "traffic_config_file",
  None,
  "A JSON traffic policy: per model a sticky split over version labels and a mirrored "
  "(shadow) label (serving/server/traffic.py). Re-read when it changes; a bad file is refused "
  "and the previous policy stays.",
)
TRAFFIC_CONFIG_POLL_WAIT = flags.DEFINE_float(
  "traffic_config_file_poll_wait_seconds", 1.0, "Seconds between reads of --traffic_config_file."
)
SHADOW_WORKERS = flags.DEFINE_integer(
  "shadow_workers", 2, "Threads running (the router: forwarding) mirrored (shadow) requests."
)
SHADOW_QUEUE_SIZE = flags.DEFINE_integer(
  "shadow_queue_size", 64, "Shadow requests waiting for a worker at most; more are dropped."
)
SHUTDOWN_GRACE = flags.DEFINE_float(
  "shutdown_grace_seconds", 30.0, "On SIGTERM, how long requests in flight may still run."
)


def check() -> frozenset[str]:
  """Validates the flags above before any model loads or port opens, and returns the paths
  where REST answers the Prometheus metrics. Raises ValueError, whose message is the `error:`
  line to print, for a bad value."""
  from serving.server import monitoring_config

  for flag in (REST_API_NUM_THREADS, REST_API_TIMEOUT_MS, REST_MAX_CONNECTIONS):
    if flag.value is not None and flag.value < 1:
      raise ValueError(f"--{flag.name}={flag.value} must be at least 1")
  if not REST_READ_TIMEOUT.value > 0:
    raise ValueError(f"--rest_read_timeout_seconds={REST_READ_TIMEOUT.value} must be above 0")
  grpc_options()
  paths = monitoring_config.metrics_paths(MONITORING_CONFIG_FILE.value)
  if len(paths) > 1 and not REST_API_PORT.value:
    raise ValueError(
      f"--monitoring_config_file={MONITORING_CONFIG_FILE.value} enables Prometheus metrics, "
      "which REST serves; set --rest_api_port"
    )
  return paths


def grpc_options() -> list[tuple[str, int | str]]:
  """--grpc_channel_arguments as gRPC server options. Raises ValueError for a malformed one."""
  options = []
  for entry in filter(None, GRPC_CHANNEL_ARGUMENTS.value.split(",")):
    key, equals, value = entry.partition("=")
    if not equals or not key.strip():
      raise ValueError(
        f"--grpc_channel_arguments entry {entry!r} is not key=value; write e.g. "
        "--grpc_channel_arguments=grpc.max_connection_age_ms=60000,grpc.keepalive_time_ms=10000"
      )
    value = value.strip()
    options.append((key.strip(), int(value) if value.lstrip("-").isdigit() else value))
  return options


def build_rest(
  path: RequestPath, metrics_paths: frozenset[str], *, reuse_port: bool = False
) -> http.server.ThreadingHTTPServer:
  """The REST server (bound, not yet serving) on --host:--rest_api_port for `path` (a
  handlers.RequestPath), as the flags above set it. Raises OSError when the port is taken."""
  from serving.server import rest_api

  return rest_api.build(
    path,
    HOST.value,
    REST_API_PORT.value,
    max_request_size_bytes=MAX_REQUEST_SIZE.value,
    max_connections=REST_MAX_CONNECTIONS.value,
    read_timeout_seconds=REST_READ_TIMEOUT.value,
    reuse_port=reuse_port,
    metrics_paths=metrics_paths,
    num_threads=REST_API_NUM_THREADS.value,
    timeout_seconds=REST_API_TIMEOUT_MS.value / 1000,
    cors=REST_API_ENABLE_CORS.value,
  )

"""The model server's flags, named as `tensorflow_model_server`'s where TF Serving has the same
one (serving/server/main.py reads them and adopts them as its key flags, so `--help` lists them).
"""

from absl import flags

PORT = flags.DEFINE_integer("port", 8500, "gRPC port.")
REST_API_PORT = flags.DEFINE_integer("rest_api_port", 0, "REST port; 0 disables REST.")
HOST = flags.DEFINE_string(
  "host", "127.0.0.1", "Address both APIs listen on; 0.0.0.0 (all interfaces) must be asked for."
)
MODEL_NAME = flags.DEFINE_string("model_name", "default", "Name the model is served under.")
MODEL_BASE_PATH = flags.DEFINE_string(
  "model_base_path", None, "Directory of numeric version directories (an export base)."
)
MODEL_CONFIG_FILE = flags.DEFINE_string(
  "model_config_file",
  None,
  "A text ModelServerConfig (model_config_list: name, base_path, model_version_policy, "
  "version_labels) serving several models; replaces --model_name and --model_base_path.",
)
MODEL_CONFIG_FILE_POLL_WAIT = flags.DEFINE_integer(
  "model_config_file_poll_wait_seconds",
  0,
  "Seconds between reads of --model_config_file; a changed file is applied as a "
  "HandleReloadConfigRequest would be. 0: read once at start.",
)
ENABLE_BATCHING = flags.DEFINE_bool(
  "enable_batching", False, "Merge concurrent requests to a signature into batches."
)
BATCHING_PARAMETERS_FILE = flags.DEFINE_string(
  "batching_parameters_file",
  None,
  "A text BatchingParameters (max_batch_size, batch_timeout_micros, max_enqueued_batches, "
  "num_batch_threads, allowed_batch_sizes); implies --enable_batching.",
)
POLL_WAIT = flags.DEFINE_float(
  "file_system_poll_wait_seconds", 1.0, "Seconds between polls of the base path for versions."
)
MAX_NUM_LOAD_RETRIES = flags.DEFINE_integer(
  "max_num_load_retries", 5, "Times a version whose load failed is tried again."
)
LOAD_RETRY_INTERVAL_MICROS = flags.DEFINE_integer(
  "load_retry_interval_micros", 60_000_000, "Microseconds between tries of a failed load."
)
ENABLE_MODEL_WARMUP = flags.DEFINE_bool(
  "enable_model_warmup",
  True,
  "Replay a version's assets.extra/tf_serving_warmup_requests before serving it, so its first "
  "requests do not pay for tracing and compiles.",
)
WARMUP_ITERATIONS = flags.DEFINE_integer(
  "num_request_iterations_for_warmup", 1, "Times each warmup record is replayed."
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
GRPC_MAX_THREADS = flags.DEFINE_integer(
  "grpc_max_threads",
  None,
  "Threads answering gRPC requests. Default: 4 per CPU; with batching at least twice "
  "max_batch_size (up to 256), since every request waiting for its batch holds a thread.",
)
VERSION_LABELS = flags.DEFINE_list(
  "version_labels",
  [],
  "label=version pairs (e.g. stable=1,canary=2) for model_spec.version_label, with "
  "--model_base_path (TF Serving takes labels only from --model_config_file, as does this "
  "server when one is given).",
)
MODEL_BASE_PATH_ROOTS = flags.DEFINE_list(
  "model_base_path_roots",
  None,
  "Directories that base paths in a HandleReloadConfigRequest must lie under (after resolving "
  "'..' and symlinks). Default: the parent directories of the models configured at start.",
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
NUM_WORKERS = flags.DEFINE_integer(
  "num_workers",
  1,
  "Server processes sharing the ports (SO_REUSEPORT), each with its own models, polling and "
  "batching; metrics are summed over them. With more than 1, --port and --rest_api_port must "
  "be fixed and config changes go through --model_config_file (HandleReloadConfigRequest "
  "would reach one worker only, so it is refused).",
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
  "shadow_workers", 2, "Threads running mirrored (shadow) requests."
)
SHADOW_QUEUE_SIZE = flags.DEFINE_integer(
  "shadow_queue_size", 64, "Shadow requests waiting for a worker at most; more are dropped."
)
# TF Serving's flags of the same names; 0 lets TensorFlow choose (one thread per core). For
# small models under concurrent requests, 1 often serves faster: the requests are the
# parallelism, and idle pool threads spin (docs/benchmarks.md).
INTRA_OP_THREADS = flags.DEFINE_integer(
  "tensorflow_intra_op_parallelism", 0, "Threads one op may use; 0: TensorFlow's default."
)
INTER_OP_THREADS = flags.DEFINE_integer(
  "tensorflow_inter_op_parallelism", 0, "Threads running ops side by side; 0: the default."
)
MONITORING_CONFIG_FILE = flags.DEFINE_string(
  "monitoring_config_file",
  None,
  "A text MonitoringConfig, as TF Serving's (prometheus_config { enable: true path: "
  '"/metrics" }): REST also serves the Prometheus metrics at its path (they are always at '
  "/monitoring/prometheus/metrics).",
)
SHUTDOWN_GRACE = flags.DEFINE_float(
  "shutdown_grace_seconds", 30.0, "On SIGTERM, how long requests in flight may still run."
)

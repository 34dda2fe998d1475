"""The model server's own flags, named as `tensorflow_model_server`'s where TF Serving has the
same one (serving/server/main.py reads them and adopts them as its key flags, so `--help` lists
them). Those of the ports and the request path, which the router takes too, are in
serving/server/front_flags.py.
"""

from absl import flags

PORT = flags.DEFINE_integer("port", 8500, "gRPC port.")
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
NUM_WORKERS = flags.DEFINE_integer(
  "num_workers",
  1,
  "Server processes sharing the ports (SO_REUSEPORT), each with its own models, polling and "
  "batching; metrics are summed over them. With more than 1, --port and --rest_api_port must "
  "be fixed and config changes go through --model_config_file (HandleReloadConfigRequest "
  "would reach one worker only, so it is refused).",
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

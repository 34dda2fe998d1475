r"""A model server that speaks TF Serving's gRPC and REST APIs, for this project's exports.

  python -m serving.server --port=8500 --rest_api_port=8501 --model_name=digits \
      --model_base_path=/models/digits [--file_system_poll_wait_seconds=1] [--host=0.0.0.0]

Flags are named as `tensorflow_model_server`'s. The newest version under the base path is loaded
and warmed up before the ports open; newer versions dropped in later are swapped in without a
failed request. SIGTERM (or SIGINT) stops accepting, finishes requests in flight and exits 0.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

from absl import app, flags, logging

_PORT = flags.DEFINE_integer("port", 8500, "gRPC port.")
_REST_API_PORT = flags.DEFINE_integer("rest_api_port", 0, "REST port; 0 disables REST.")
_HOST = flags.DEFINE_string("host", "0.0.0.0", "Address both APIs listen on.")
_MODEL_NAME = flags.DEFINE_string("model_name", "default", "Name the model is served under.")
_MODEL_BASE_PATH = flags.DEFINE_string(
  "model_base_path", None, "Directory of numeric version directories (an export base)."
)
_MODEL_CONFIG_FILE = flags.DEFINE_string(
  "model_config_file",
  None,
  "A text ModelServerConfig (model_config_list: name, base_path, model_version_policy, "
  "version_labels) serving several models; replaces --model_name and --model_base_path. Read "
  "once at start.",
)
_POLL_WAIT = flags.DEFINE_float(
  "file_system_poll_wait_seconds", 1.0, "Seconds between polls of the base path for versions."
)
_MAX_REQUEST_SIZE = flags.DEFINE_integer(
  "max_request_size_bytes", 64 << 20, "Largest gRPC message or REST body accepted."
)
_GRPC_MAX_THREADS = flags.DEFINE_integer(
  "grpc_max_threads", 4 * (os.cpu_count() or 1), "Threads answering gRPC requests."
)
_VERSION_LABELS = flags.DEFINE_list(
  "version_labels",
  [],
  "label=version pairs (e.g. stable=1,canary=2) for model_spec.version_label; TF Serving takes "
  "these from --model_config_file, which this server does not read yet.",
)
_SHUTDOWN_GRACE = flags.DEFINE_float(
  "shutdown_grace_seconds", 30.0, "On SIGTERM, how long requests in flight may still run."
)


def _parse_labels(pairs: list[str]) -> dict[str, int]:
  labels = {}
  for pair in pairs:
    label, _, version = pair.partition("=")
    if not label or not version.isdigit():
      raise app.UsageError(f"--version_labels entry {pair!r} is not label=version (e.g. stable=1)")
    labels[label] = int(version)
  return labels


def _model_registry():
  from serving import model_config, model_manager

  if _MODEL_CONFIG_FILE.value and _MODEL_BASE_PATH.value:
    raise app.UsageError("give --model_config_file or --model_base_path, not both")
  if not _MODEL_CONFIG_FILE.value and not _MODEL_BASE_PATH.value:
    raise app.UsageError("--model_base_path (or --model_config_file) is required")
  try:
    if _MODEL_CONFIG_FILE.value:
      if _VERSION_LABELS.value:
        raise ValueError("with --model_config_file, version labels go in the file")
      managers = model_config.read(_MODEL_CONFIG_FILE.value, poll_wait_seconds=_POLL_WAIT.value)
    else:
      managers = [
        model_manager.ModelManager(
          _MODEL_NAME.value,
          _MODEL_BASE_PATH.value,
          poll_wait_seconds=_POLL_WAIT.value,
          version_labels=_parse_labels(_VERSION_LABELS.value),
        )
      ]
    return model_manager.ModelRegistry(managers)
  except ValueError as e:
    raise app.UsageError(str(e)) from e


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from serving import grpc_server, metrics, rest

  registry = _model_registry()
  server_metrics = metrics.Metrics(list(registry.managers))
  registry.poll()  # The ports open once the initial versions are loaded (or failed).
  registry.start()
  grpc, grpc_port = grpc_server.build(
    registry,
    server_metrics,
    f"{_HOST.value}:{_PORT.value}",
    max_request_size_bytes=_MAX_REQUEST_SIZE.value,
    max_threads=_GRPC_MAX_THREADS.value,
  )
  if not grpc_port:
    logging.error("Cannot listen on %s:%d for gRPC", _HOST.value, _PORT.value)
    sys.exit(1)
  httpd = None
  if _REST_API_PORT.value:
    httpd = rest.build(
      registry,
      server_metrics,
      _HOST.value,
      _REST_API_PORT.value,
      max_request_size_bytes=_MAX_REQUEST_SIZE.value,
    )
    threading.Thread(target=httpd.serve_forever, name="rest", daemon=True).start()
  logging.info(
    "Serving %s: gRPC on %s:%d, REST on %s",
    ", ".join(f"{m.name} from {m.base_path}" for m in registry.managers.values()),
    _HOST.value,
    grpc_port,
    f"{_HOST.value}:{httpd.server_address[1]}" if httpd else "(disabled)",
  )

  stop = threading.Event()
  for signum in (signal.SIGTERM, signal.SIGINT):
    signal.signal(signum, lambda *_: stop.set())
  while not stop.wait(0.5):  # A timed wait lets the signal handler run promptly.
    pass
  logging.info("Shutting down: finishing requests in flight")
  if httpd:
    httpd.shutdown()  # Stops accepting; server_close() joins the handler threads.
  grpc.stop(grace=_SHUTDOWN_GRACE.value).wait()
  if httpd:
    httpd.server_close()
  registry.stop()
  logging.info("Stopped")


if __name__ == "__main__":
  app.run(main)

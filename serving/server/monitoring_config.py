"""TF Serving's `--monitoring_config_file`: a text MonitoringConfig whose `prometheus_config`
(`enable`, `path`) says where REST serves the Prometheus metrics.

  prometheus_config { enable: true path: "/metrics" }

This server always serves them at `/monitoring/prometheus/metrics` (TF Serving's default path);
a config that enables Prometheus adds its own path, so the manifests, scrape configs and flags
written for `tensorflow_model_server` work unchanged. The tensorflow-serving-api package ships no
monitoring_config_pb2, so the two messages (tensorflow_serving/config/monitoring_config.proto)
are declared here, in a pool of their own, and the file is parsed by protobuf's text format.
"""

from __future__ import annotations

import functools

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format

DEFAULT_PATH = "/monitoring/prometheus/metrics"


@functools.cache
def _monitoring_config_class():
  file = descriptor_pb2.FileDescriptorProto(
    name="tensorflow_serving/config/monitoring_config.proto",
    package="tensorflow.serving",
    syntax="proto3",
  )
  field = descriptor_pb2.FieldDescriptorProto
  prometheus = file.message_type.add(name="PrometheusConfig")
  prometheus.field.add(name="enable", number=1, type=field.TYPE_BOOL, label=field.LABEL_OPTIONAL)
  prometheus.field.add(name="path", number=2, type=field.TYPE_STRING, label=field.LABEL_OPTIONAL)
  config = file.message_type.add(name="MonitoringConfig")
  config.field.add(
    name="prometheus_config",
    number=1,
    type=field.TYPE_MESSAGE,
    label=field.LABEL_OPTIONAL,
    type_name=".tensorflow.serving.PrometheusConfig",
  )
  pool = descriptor_pool.DescriptorPool()
  pool.Add(file)
  descriptor = pool.FindMessageTypeByName("tensorflow.serving.MonitoringConfig")
  return message_factory.GetMessageClass(descriptor)


def metrics_paths(path: str | None) -> frozenset[str]:
  """The REST paths that answer the Prometheus metrics: the default, plus the enabled path of
  the MonitoringConfig in file `path` (None: no file). Raises ValueError naming the file and the
  fix for an unreadable file, a text that does not parse, or a path not starting with `/`."""
  paths = {DEFAULT_PATH}
  if path is None:
    return frozenset(paths)
  where = f"--monitoring_config_file={path}"
  try:
    with open(path) as f:
      text = f.read()
  except OSError as e:
    raise ValueError(f"cannot read {where}: {e.strerror}") from e
  config = _monitoring_config_class()()
  try:
    text_format.Parse(text, config)
  except text_format.ParseError as e:
    raise ValueError(
      f"{where} is not a text MonitoringConfig ({e}); write e.g. "
      'prometheus_config { enable: true path: "/monitoring/prometheus/metrics" }'
    ) from e
  prometheus = config.prometheus_config
  if prometheus.enable:
    metrics_path = prometheus.path or DEFAULT_PATH
    if not metrics_path.startswith("/"):
      raise ValueError(f"{where}: prometheus_config.path {metrics_path!r} must start with /")
    paths.add(metrics_path)
  return frozenset(paths)

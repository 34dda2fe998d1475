"""The model server's conversions and config parsing as unit tests (no server process)."""

import grpc
import numpy as np
import pytest

tf = pytest.importorskip("tensorflow", reason="the serving side needs TensorFlow (make install)")

from serving.server import model_config  # noqa: E402
from serving.server import rest_actions as rest  # noqa: E402
from serving.server.errors import ServingError  # noqa: E402
from serving.server.loaded_version import TensorSpec  # noqa: E402


@pytest.mark.parametrize("name", ["../digits", "/etc", "", ".hidden", "a/b", "x" * 129])
def test_model_names_that_could_leave_the_base_path_are_rejected(name, tmp_path):
  with pytest.raises(ValueError, match="is not a valid model name"):
    model_config.ModelConfig(name, str(tmp_path))


def test_rest_dtype_checks():
  float_spec = TensorSpec(dtype=tf.float32.as_datatype_enum, shape=(-1,))
  int_spec = TensorSpec(dtype=tf.int32.as_datatype_enum, shape=(-1,))
  assert rest._to_array("x", [1, 2], float_spec).dtype == np.float32
  for value, spec, given in (([1.5], int_spec, "float64"), ([True], float_spec, "bool")):
    with pytest.raises(ServingError, match=f"holds {given} values but the signature expects"):
      rest._to_array("x", value, spec)
  with pytest.raises(ServingError) as error:
    rest._to_array("x", ["a"], float_spec)
  assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
  assert "input 'x' holds str32 values but the signature expects float32" in error.value.message


def test_b64_values_become_bytes():
  spec = TensorSpec(dtype=tf.string.as_datatype_enum, shape=(-1,))
  array = rest._to_array("text", [{"b64": "aGk="}, {"b64": "eW8="}], spec)
  assert array.tolist() == [b"hi", b"yo"]
  assert rest._to_json("out_bytes", np.array([b"hi"], object)) == [{"b64": "aGk="}]


@pytest.mark.parametrize(
  "kind, num_versions, versions, on_disk, aspired",
  [
    ("latest", 1, (), {1, 2, 3}, {3}),
    ("latest", 2, (), {1, 2, 3}, {2, 3}),
    ("all", 1, (), {1, 5}, {1, 5}),
    ("specific", 1, (1, 4), {1, 2, 3}, {1}),
  ],
)
def test_version_policies(kind, num_versions, versions, on_disk, aspired):
  policy = model_config.VersionPolicy(kind, num_versions=num_versions, versions=versions)
  assert policy.aspired(on_disk) == aspired


@pytest.mark.parametrize(
  "text, message",
  [
    ("model_config_list {}", "has no model_config_list"),
    ("model_config_list { config { name: 'a' } }", "model 'a': base_path is required"),
    ("model_config_list { config { name: '../a' base_path: '/x' } }", "not a valid model name"),
    (
      "model_config_list { config { name: 'a' base_path: '/x' model_platform: 'onnx' } }",
      "model_platform 'onnx' is not 'tensorflow'",
    ),
    ("model_config_list { config { nme: 'a' } }", "is not a text ModelServerConfig"),
  ],
)
def test_bad_model_config_files(text, message, tmp_path):
  (tmp_path / "models.config").write_text(text)
  with pytest.raises(ValueError, match=message):
    model_config.read(str(tmp_path / "models.config"))


@pytest.mark.parametrize(
  "value",
  [
    *(np.arange(6, dtype=d).reshape(2, 3) for d in (np.float32, np.float64, np.int8, np.int16)),
    *(np.arange(6, dtype=d).reshape(3, 2) for d in (np.int32, np.int64, np.uint8, np.uint16)),
    *(np.arange(4, dtype=d) for d in (np.uint32, np.uint64, np.float16)),
    np.zeros((0, 3), np.float32),
    np.float32(2.5).reshape(()),
    np.array([True, False]),
    np.array([b"a", b"\xff\x00"], dtype=object),
  ],
  ids=lambda v: f"{v.dtype}{list(v.shape)}",
)
def test_tensor_protos_round_trip_as_tensorflow_makes_them(value):
  from tensorflow.core.framework import tensor_pb2

  from serving.server import tensors

  proto = tensor_pb2.TensorProto()
  tensors.fill_tensor_proto(proto, value)
  for decoded in (tf.make_ndarray(proto), tensors.to_ndarray(proto)):
    assert decoded.dtype == value.dtype and decoded.shape == value.shape
    np.testing.assert_array_equal(decoded, value)
  decoded = tensors.to_ndarray(tf.make_tensor_proto(value))  # What clients send.
  assert decoded.dtype == value.dtype and decoded.shape == value.shape
  np.testing.assert_array_equal(decoded, value)


def test_monitoring_config_adds_its_enabled_path(tmp_path):
  from serving.server import monitoring_config

  default = monitoring_config.DEFAULT_PATH
  assert monitoring_config.metrics_paths(None) == {default}
  config = tmp_path / "monitoring.config"
  for text, paths in [
    ('prometheus_config { enable: true path: "/metrics" }', {default, "/metrics"}),
    ("prometheus_config { enable: true }", {default}),  # TF Serving's default path.
    ('prometheus_config { enable: false path: "/metrics" }', {default}),  # Not enabled.
    ("", {default}),
  ]:
    config.write_text(text)
    assert monitoring_config.metrics_paths(str(config)) == paths, text

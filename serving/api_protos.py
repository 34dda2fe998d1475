"""TF Serving's request messages and gRPC stubs, without starting TensorFlow's runtime.

The generated `tensorflow_serving.apis.*_pb2` modules import `tensorflow.core.*_pb2` modules,
which are plain protobuf code; but importing anything under `tensorflow` first runs
`tensorflow/__init__.py`, which loads the whole runtime (seconds, and its native start-up
lines). So while this module imports them, `tensorflow` is a bare package object whose path is
the installed TensorFlow's, which lets Python find the `_pb2` files without running the
package's `__init__`. The bare package is removed afterwards, so a later `import tensorflow`
in the same process is the real one (and finds these `_pb2` modules already loaded). Where
TensorFlow was imported already, its own modules are used.

Used by `serving.client` and by the `mlops` commands that only speak TF Serving's protocol
(the registry's label moves, the log readers), which then start in a second or two; needs `tensorflow-serving-api` and TensorFlow's files on disk (the
serving lock installs both), not an initialised TensorFlow.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import types
from collections.abc import Iterator


@contextlib.contextmanager
def _tensorflow_protos_only() -> Iterator[None]:
  if "tensorflow" in sys.modules:
    yield
    return
  spec = importlib.util.find_spec("tensorflow")  # Locates the package; runs none of it.
  if spec is None or not spec.submodule_search_locations:
    raise ImportError("TensorFlow's proto files are missing: install requirements-serving.lock")
  bare = types.ModuleType("tensorflow", "TensorFlow's generated protobuf modules only.")
  bare.__path__ = list(spec.submodule_search_locations)
  bare.__spec__ = spec
  sys.modules["tensorflow"] = bare
  try:
    yield
  finally:
    if sys.modules.get("tensorflow") is bare:
      del sys.modules["tensorflow"]


with _tensorflow_protos_only():
  from tensorflow.core.example import example_pb2
  from tensorflow.core.framework import tensor_pb2, types_pb2
  from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_management_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_log_pb2,
    prediction_service_pb2_grpc,
  )
  from tensorflow_serving.config import model_server_config_pb2

__all__ = [
  "example_pb2",
  "get_model_metadata_pb2",
  "get_model_status_pb2",
  "model_management_pb2",
  "model_server_config_pb2",
  "model_service_pb2_grpc",
  "predict_pb2",
  "prediction_log_pb2",
  "prediction_service_pb2_grpc",
  "tensor_pb2",
  "types_pb2",
]

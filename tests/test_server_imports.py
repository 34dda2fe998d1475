"""The model server imports neither JAX, Flax nor the trainer; the contract imports nothing heavy.

Each check runs in a fresh interpreter (this test process has long imported JAX). TensorFlow
itself imports JAX when it is installed (tensorflow.lite's flatbuffer utilities), and tolerates
its absence, so the server modules are imported with those packages made unimportable, as on a
machine that has only the serving requirements: any import of them by our code fails the test.
"""

import os
import subprocess
import sys

import pytest

from tests.helpers.model_server import REPO, SERVER_ENV

pytest.importorskip("tensorflow", reason="the server needs TensorFlow (make install)")

_FORBIDDEN = ("jax", "jaxlib", "flax", "trainer")
_BLOCK = f"""
import importlib.abc, sys
class _Block(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path, target=None):
    if name.split(".")[0] in {_FORBIDDEN!r}:
      raise ModuleNotFoundError(f"{{name}} is not installed here", name=name)
sys.meta_path.insert(0, _Block())
"""


def _imported_roots(code: str) -> set[str]:
  """Top-level packages in sys.modules after running `code` in a fresh interpreter that
  cannot import JAX, Flax or trainer."""
  report = "\nimport sys; print(sorted({m.split('.')[0] for m in sys.modules}))"
  proc = subprocess.run(
    [sys.executable, "-c", _BLOCK + code + report],
    cwd=REPO,
    env=SERVER_ENV,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return set(eval(proc.stdout.strip().splitlines()[-1]))  # A list literal of names.


def _package_modules(package: str) -> list[str]:
  names = sorted(
    f[:-3] for f in os.listdir(os.path.join(REPO, *package.split("."))) if f.endswith(".py")
  )
  return [f"{package}.{name}" for name in names if name != "__main__"]


# The router (router mode) runs the server's request path; each package in its own interpreter
# (both define --port).
@pytest.mark.parametrize(
  "package, expected",
  [
    (
      "serving.server",
      {"serving.server.main", "serving.server.grpc_api", "serving.server.rest_api"},
    ),
    ("serving.router", {"serving.router.main", "serving.router.backend"}),
  ],
)
def test_the_server_package_imports_no_jax_flax_or_trainer(package, expected):
  modules = _package_modules(package)
  assert expected <= set(modules)
  code = "import importlib\n" + "".join(f"importlib.import_module({m!r})\n" for m in modules)
  roots = _imported_roots(code)
  assert {"tensorflow", "tensorflow_serving", "grpc"} <= roots  # The imports really ran.
  assert roots.isdisjoint(_FORBIDDEN), sorted(roots & set(_FORBIDDEN))


def test_the_blocker_would_catch_an_import_of_jax():
  with pytest.raises(AssertionError, match="jax is not installed here"):
    _imported_roots("import jax")


def test_the_contract_imports_neither_jax_nor_tensorflow():
  roots = _imported_roots("import serving.contract")
  assert "serving" in roots
  assert roots.isdisjoint({"tensorflow", "tensorflow_serving", "numpy", "grpc"}), roots


def test_label_moves_and_log_reads_do_not_start_tensorflow(tmp_path):
  """The log readers (monitor, A/B, shadow and canary reports) and the registry's model-config
  edits speak TF Serving's protocol through serving.api_protos, without the ~7 s of CPU that
  starting TensorFlow's runtime costs."""
  log_dir = tmp_path / "logs"
  log_dir.mkdir()
  (log_dir / "log-0").write_bytes(b"")  # An empty log file: read, nothing in it.
  code = f"""
from mlops import prediction_log, registry_serving
text = registry_serving.with_label(None, "x.config", "digits", "/models/digits", "canary", 3)
assert registry_serving.labels(text, "x.config", "digits") == {{"canary": 3}}
assert len(prediction_log.read_logs({str(log_dir)!r})) == 0
assert not hasattr(sys.modules.get("tensorflow"), "__version__"), "TensorFlow's runtime started"
"""
  roots = _imported_roots(code)
  assert "tensorflow_serving" in roots  # The protos were really used.

"""Serving-side commands are quiet by default on a machine without a GPU: TensorFlow's and
CUDA's native start-up notices are dropped, real warnings and errors are not, `-v 1` brings
everything back."""

import importlib.util
import os
import subprocess
import sys

import pytest

from serving import native_logs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Lines TensorFlow 2.21 printed here on every serving command before this filter.
ABSL_PREINIT = (
  "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
)
CUDART = (
  "I0000 00:00:1796116129.051241   17429 cudart_stub.cc:31] Could not find cuda drivers on your "
  "machine, GPU will not be used."
)
CPU_GUARD = (
  "I0000 00:00:1796116164.100045   18392 cpu_feature_guard.cc:227] This TensorFlow binary is "
  "optimized to use available CPU instructions in performance-critical operations."
)
CPU_GUARD_2 = (
  "To enable the following instructions: AVX2 FMA, in other operations, rebuild TensorFlow with "
  "the appropriate compiler flags."
)
CUINIT = (
  "E0000 00:00:1796116133.930967   17429 cuda_platform.cc:52] failed call to cuInit: INTERNAL: "
  "CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)"
)
REAL_ERROR = "E0000 00:00:1796116133.930967   17429 saved_model.cc:12] Could not load the model"


@pytest.mark.parametrize("line", [ABSL_PREINIT, CUDART, CPU_GUARD, CPU_GUARD_2, CUINIT])
def test_start_up_notices_are_dropped_without_a_gpu(line):
  assert native_logs.is_notice(line, gpu_present=False)


def test_errors_are_kept_and_a_gpu_that_fails_to_start_is_an_error():
  assert not native_logs.is_notice(REAL_ERROR, gpu_present=False)
  assert not native_logs.is_notice("Traceback (most recent call last):", gpu_present=False)
  assert not native_logs.is_notice("W0000 00:00:1.5  3 x.cc:1] a warning", gpu_present=False)
  assert not native_logs.is_notice(CUINIT, gpu_present=True)


@pytest.mark.parametrize(
  "argv, verbose",
  [
    ([], False),
    (["--port=1"], False),
    (["-v", "1"], True),
    (["-v=2"], True),
    (["--verbosity=1"], True),
    (["--verbosity", "debug"], True),
    (["--verbosity=0"], False),
    (["--verbosity=-1"], False),
    (["--version=1"], False),
  ],
)
def test_verbosity_one_or_more_asks_for_everything(argv, verbose):
  assert native_logs.verbosity_requested(["prog", *argv]) == verbose


def _python(code: str, *args: str):
  env = {**os.environ, "PYTHONPATH": REPO}
  env.pop("TF_CPP_MIN_LOG_LEVEL", None)
  return subprocess.run(
    [sys.executable, "-c", code, *args],
    capture_output=True,
    text=True,
    timeout=120,
    cwd=REPO,
    env=env,
  )


def test_what_the_block_prints_comes_back_less_the_notices():
  lines = [ABSL_PREINIT, CUDART, REAL_ERROR, CPU_GUARD, CPU_GUARD_2, "a Python warning"]
  code = (
    "import os, sys\nfrom serving import native_logs\nwith native_logs.filtered_stderr():\n"
    "  os.write(2, sys.argv[1].encode())\n  print('via sys.stderr', file=sys.stderr)\n"
  )
  proc = _python(code, "\n".join(lines) + "\n")
  assert proc.returncode == 0
  assert proc.stderr.splitlines() == [REAL_ERROR, "a Python warning", "via sys.stderr"]


def _export(*args: str):
  env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
  env.pop("TF_CPP_MIN_LOG_LEVEL", None)
  return subprocess.run(
    [sys.executable, "-m", "serving.export", *args],
    capture_output=True,
    text=True,
    timeout=300,
    cwd=REPO,
    env=env,
  )


@pytest.mark.skipif(native_logs.has_nvidia_device(), reason="checks the no-GPU start-up lines")
@pytest.mark.skipif(not importlib.util.find_spec("tensorflow"), reason="needs TensorFlow")
def test_a_serving_command_prints_its_answer_only_and_v_1_shows_the_rest(tmp_path):
  """`serving.export --check_tf_serving` reads a SavedModel's protos (importing TensorFlow) and
  answers on stdout: stderr stays empty; with -v 1 TensorFlow's start-up lines are back."""
  (tmp_path / "saved_model.pb").write_bytes(b"")  # An empty SavedModel: no XlaCallModule ops.
  args = ("--check_tf_serving=2.19", f"--saved_model={tmp_path}")
  quiet = _export(*args)
  assert quiet.returncode == 0 and "any TF Serving runs it" in quiet.stdout
  assert quiet.stderr == ""
  verbose = _export(*args, "-v", "1")
  assert verbose.returncode == 0 and verbose.stdout == quiet.stdout
  assert ABSL_PREINIT in verbose.stderr and "cudart_stub.cc" in verbose.stderr

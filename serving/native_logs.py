"""Quiets the native start-up lines TensorFlow and CUDA print on a machine without a GPU.

Importing TensorFlow 2.21 writes ~5 lines to stderr that no Python setting reaches: absl's
"All log messages before absl::InitializeLog() is called ..." and cudart_stub's "Could not find
cuda drivers" (both printed while the shared libraries load, before TF_CPP_MIN_LOG_LEVEL is
read), cpu_feature_guard's and oneDNN's INFO notices, and an `E...] failed call to cuInit` when
the first device list finds no GPU. `quiet_native_logs` hides those lines and only those:

- TF_CPP_MIN_LOG_LEVEL defaults to 1 (INFO off; WARNING and ERROR still print);
- TensorFlow is imported and its devices listed once, with file descriptor 2 pointed at a
  temporary file; afterwards every captured line that is not one of the known notices above is
  written to stderr, so a real warning or error printed during start-up still shows;
- TensorFlow's Python logger shows WARNING and above;
- the cuInit error is dropped only when the machine has no NVIDIA device (`/dev/nvidia0` or
  `/proc/driver/nvidia`): where a GPU exists, failing to initialise it is a real error.

`--verbosity=1` (`-v 1`) or higher on the command line turns all of this off. Set-up is
synchronous and finished before the command runs, so nothing printed later is held back.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
from collections.abc import Iterator, Sequence
from typing import IO

_NOTICES = (
  # absl, before TensorFlow initialises its log sink.
  re.compile(r"^WARNING: All log messages before absl::InitializeLog\(\) is called"),
  # Any C++ INFO line (I<mmdd> ...): cudart_stub, cpu_feature_guard, oneDNN.
  re.compile(r"^I\d{4} [\d:.]+ +\d+ \S+:\d+\] "),
  # cpu_feature_guard's second line.
  re.compile(r"^To enable the following instructions: .* rebuild TensorFlow"),
)
_NO_GPU_ERRORS = (
  re.compile(r"^E\d{4} [\d:.]+ +\d+ cuda_platform\.cc:\d+\] failed call to cuInit"),
)
_HELP_FLAGS = ("--help", "-help", "-h", "--helpshort", "--helpfull", "--helpxml", "-?")


def has_nvidia_device() -> bool:
  """Whether the NVIDIA driver exposes a device on this machine."""
  return os.path.exists("/dev/nvidia0") or os.path.exists("/proc/driver/nvidia")


def verbosity_requested(argv: Sequence[str]) -> bool:
  """Whether `argv` sets absl's --verbosity (-v) to 1 (DEBUG) or more, or to a value that is not
  a number (shown, when in doubt)."""
  for i, arg in enumerate(argv):
    name, sep, value = arg.partition("=")
    if name not in ("-v", "--v", "-verbosity", "--verbosity"):
      continue
    if not sep:
      value = argv[i + 1] if i + 1 < len(argv) else ""
    try:
      return int(value) >= 1
    except ValueError:
      return True
  return False


def is_notice(line: str, *, gpu_present: bool) -> bool:
  """Whether a captured stderr line is one of the start-up notices that quiet mode drops."""
  patterns = _NOTICES if gpu_present else _NOTICES + _NO_GPU_ERRORS
  return any(pattern.search(line) for pattern in patterns)


@contextlib.contextmanager
def filtered_stderr() -> Iterator[IO[bytes]]:
  """Points file descriptor 2 (where C++ code writes) at a temporary file for the block, then
  writes what the block printed to stderr, less the start-up notices (`is_notice`)."""
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile(mode="w+b") as captured:
    os.dup2(captured.fileno(), 2)
    try:
      yield captured
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      captured.seek(0)
      _replay(captured.read().decode(errors="replace"))


def _replay(text: str) -> None:
  gpu_present = has_nvidia_device()
  kept = [line for line in text.splitlines() if not is_notice(line, gpu_present=gpu_present)]
  if kept:
    sys.stderr.write("\n".join(kept) + "\n")
    sys.stderr.flush()


def quiet_native_logs(argv: Sequence[str], *, import_tensorflow: bool = True) -> None:
  """Called first by serving entrypoints (before anything imports TensorFlow) with sys.argv.

  Sets TF_CPP_MIN_LOG_LEVEL=1 unless the environment sets it, then (with `import_tensorflow`,
  and unless a help flag asks for nothing but help) imports TensorFlow with the notices above
  filtered out. Does nothing when `argv` asks for --verbosity=1 or more. Never raises for a
  missing TensorFlow: the command that needs it reports that itself.
  """
  if verbosity_requested(argv):
    return
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
  if not import_tensorflow or any(arg.partition("=")[0] in _HELP_FLAGS for arg in argv):
    return
  with filtered_stderr():
    try:
      import tensorflow as tf
    except ImportError:
      return
    tf.config.list_physical_devices()  # Initialises the platforms: the cuInit attempt.
    # TensorFlow's Python logger has a handler of its own ("INFO:tensorflow:Assets written").
    tf.get_logger().setLevel(logging.WARNING)

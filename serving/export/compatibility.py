"""Which TF Serving releases can run an export: XlaCallModule calling convention versions.

jax2tf native serialization puts each function in an `XlaCallModule` op tagged with a calling
convention version; a TensorFlow (Serving) binary runs only the versions its XlaCallModule
kernel knows. Dates from JAX's export documentation ("Calling convention versions"): version 9 is
supported by XlaCallModule since 2023-10-27 and version 10 since 2025-05-20. Matched against TF
release branch dates, the first releases that carry them are 2.16 (March 2024) and 2.20
(August 2025). TF Serving 2.x ships the TensorFlow 2.x runtime. TF 2.21 running version 10 is
verified by every export's parity gate in this project's environment; the older rows follow
from the dates and were not run here.
"""

from __future__ import annotations

import dataclasses
import os
import platform
from importlib import metadata

import jax

# calling convention version -> first TF / TF Serving (major, minor) release that runs it.
FIRST_RELEASE_RUNNING = {9: (2, 16), 10: (2, 20)}


@dataclasses.dataclass(frozen=True)
class Verdict:
  compatible: bool
  message: str


def _version(package: str) -> str | None:
  try:
    return metadata.version(package)
  except metadata.PackageNotFoundError:
    return None


def xla_call_module_versions(saved_model_dir: str) -> list[int]:
  """Calling convention versions of every XlaCallModule op in a SavedModel."""
  from tensorflow.core.protobuf import saved_model_pb2

  proto = saved_model_pb2.SavedModel()
  with open(os.path.join(saved_model_dir, "saved_model.pb"), "rb") as f:
    proto.ParseFromString(f.read())
  versions = set()
  for meta_graph in proto.meta_graphs:
    nodes = list(meta_graph.graph_def.node)
    for function in meta_graph.graph_def.library.function:
      nodes.extend(function.node_def)
    versions.update(n.attr["version"].i for n in nodes if n.op == "XlaCallModule")
  return sorted(versions)


def export_info(platforms: tuple[str, ...]) -> dict:
  return {
    "platforms": list(platforms),
    "calling_convention_version": jax.config.jax_export_calling_convention_version,
    "jax": jax.__version__,
    "jaxlib": _version("jaxlib"),
    "tensorflow": _version("tensorflow"),
    "orbax-export": _version("orbax-export"),
    "python": platform.python_version(),
  }


def parse_release(release: str) -> tuple[int, int]:
  parts = release.strip().split(".")
  try:
    return int(parts[0]), int(parts[1])
  except (IndexError, ValueError):
    raise ValueError(f"--check_tf_serving={release!r}: give a release like 2.19") from None


def check_saved_model(saved_model_dir: str, release: str) -> Verdict:
  """Can TF Serving `release` run every XlaCallModule op of the export in `saved_model_dir`?"""
  wanted = parse_release(release)
  versions = xla_call_module_versions(saved_model_dir)
  if not versions:
    return Verdict(True, f"{saved_model_dir} has no XlaCallModule ops; any TF Serving runs it")
  too_new = [v for v in versions if FIRST_RELEASE_RUNNING.get(v, (99, 0)) > wanted]
  if too_new:
    needed = max(FIRST_RELEASE_RUNNING.get(v, (99, 0)) for v in too_new)
    needed_text = f"{needed[0]}.{needed[1]}" if needed[0] != 99 else "a release newer than known"
    return Verdict(
      False,
      f"NO: TF Serving {release} cannot run {saved_model_dir}: it uses XlaCallModule calling "
      f"convention version(s) {too_new}, first run by TF Serving {needed_text}. Re-export with "
      "--calling_convention_version=9 (runs on 2.16 and later), or serve with a newer release.",
    )
  return Verdict(
    True,
    f"YES: TF Serving {release} runs XlaCallModule calling convention version(s) {versions} "
    f"used by {saved_model_dir}. On CPU start it with --xla_cpu_compilation_enabled=true.",
  )

"""The run manifest: what produced a workdir, so any result can be traced and reproduced."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from importlib import metadata

import jax
import ml_collections
from jax.sharding import Mesh

# Packages whose versions decide numerics or checkpoint formats.
_PACKAGES = (
  "jax",
  "jaxlib",
  "flax",
  "optax",
  "orbax-checkpoint",
  "grain",
  "numpy",
  "ml-collections",
)


def git_state(repo_dir: str) -> dict[str, object]:
  """The commit and dirty flag of the code that runs, or None outside a git checkout."""

  def git(*args: str) -> str | None:
    try:
      out = subprocess.run(
        ["git", *args], cwd=repo_dir, capture_output=True, text=True, timeout=10, check=True
      )
    except (OSError, subprocess.SubprocessError):
      return None
    return out.stdout.strip()

  commit = git("rev-parse", "HEAD")
  status = git("status", "--porcelain", "--untracked-files=no")
  return {"commit": commit, "dirty": None if status is None else bool(status)}


def package_versions() -> dict[str, str | None]:
  versions = {}
  for package in _PACKAGES:
    try:
      versions[package] = metadata.version(package)
    except metadata.PackageNotFoundError:
      versions[package] = None
  return versions


def build_manifest(
  config: ml_collections.ConfigDict, mesh: Mesh, data_fingerprint: str, start_step: int
) -> dict:
  repo_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  return {
    "created": datetime.datetime.now(datetime.UTC).isoformat(),
    "start_step": start_step,
    "config": json.loads(config.to_json_best_effort()),
    "git": git_state(repo_dir),
    "python": sys.version.split()[0],
    "platform": platform.platform(),
    "packages": package_versions(),
    "devices": {
      "platform": jax.devices()[0].platform,
      "kind": jax.devices()[0].device_kind,
      "count": jax.device_count(),
      "process_count": jax.process_count(),
    },
    "mesh": dict(mesh.shape),
    "data_fingerprint": data_fingerprint,
  }


def write_manifest(workdir: str, manifest: dict) -> str:
  """Writes `manifest.json` (latest start) and appends to `manifests.jsonl` (every start).

  Call on process 0 only.
  """
  path = os.path.join(workdir, "manifest.json")
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(manifest, f, indent=2, sort_keys=True)
  os.replace(tmp, path)
  with open(os.path.join(workdir, "manifests.jsonl"), "a") as f:
    f.write(json.dumps(manifest, sort_keys=True) + "\n")
  return path

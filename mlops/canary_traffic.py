"""The canary's writes to the model server's traffic config (`--traffic_config_file`, format in
serving/server/traffic.py): the split of one model between the stable and the canary label.

Only that model's `split` changes; other models' entries, the model's `mirror`, and the split's
`key` and `seed` are kept. The file is replaced whole (temp file + rename), so the server, which
re-reads it when its text changes, sees the old policy or the new one, never half a file.
Weight 0 is written as the stable label alone at 100: once the canary label is removed from the
model config, a file still naming it would be refused by a server (re)starting on it.
"""

from __future__ import annotations

import json

from mlops import registry_serving


class TrafficFileError(ValueError):
  """A traffic config file that cannot be read or updated; the message names it and the fix."""


def read(path: str) -> dict:
  """The file's JSON ({"models": {}} when it does not exist). Raises TrafficFileError."""
  try:
    with open(path) as f:
      text = f.read()
  except FileNotFoundError:
    return {"models": {}}
  except OSError as e:
    raise TrafficFileError(f"cannot read --traffic_config_file={path}: {e.strerror}") from e
  try:
    config = json.loads(text)
  except json.JSONDecodeError as e:
    raise TrafficFileError(
      f"--traffic_config_file={path} is not JSON ({e}); fix it or remove it"
    ) from e
  if not isinstance(config, dict) or not isinstance(config.get("models", {}), dict):
    raise TrafficFileError(f'--traffic_config_file={path}: needs {{"models": {{...}}}}')
  config.setdefault("models", {})
  return config


def check_free(config: dict, path: str, name: str, stable: str, canary: str) -> None:
  """Raises TrafficFileError when `name`'s split has arms other than `stable` and `canary` (an
  A/B test the canary would silently end)."""
  arms = config["models"].get(name, {}).get("split", {}).get("arms", [])
  others = sorted({a.get("label") for a in arms if isinstance(a, dict)} - {stable, canary})
  if others:
    raise TrafficFileError(
      f"--traffic_config_file={path} splits {name} over {others} too; end that split (an A/B "
      f"test?) before a canary, which routes only {stable} and {canary}"
    )


def with_weight(config: dict, name: str, stable: str, canary: str, weight: int, key: str) -> dict:
  """A copy of `config` where model `name` splits `100 - weight` to `stable` and `weight` to
  `canary` (listed last, so raising its weight moves only keys from stable to canary)."""
  models = dict(config.get("models", {}))
  entry = dict(models.get(name, {}))
  split = dict(entry.get("split", {}))
  split.setdefault("key", key)
  if weight > 0:
    split["arms"] = [
      {"label": stable, "weight": 100 - weight},
      {"label": canary, "weight": weight},
    ]
  else:
    split["arms"] = [{"label": stable, "weight": 100}]
  entry["split"] = split
  models[name] = entry
  return {**config, "models": models}


def write(path: str, config: dict) -> None:
  """Replaces the file by `config` atomically (temp file in the same directory + rename)."""
  registry_serving.write_atomically(path, json.dumps(config, indent=1, sort_keys=True) + "\n")


def canary_weight(config: dict, name: str, canary: str) -> int:
  """The canary label's weight in `name`'s split (0 when absent)."""
  arms = config.get("models", {}).get(name, {}).get("split", {}).get("arms", [])
  return next((int(a["weight"]) for a in arms if a.get("label") == canary), 0)

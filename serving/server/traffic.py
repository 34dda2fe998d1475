"""The traffic policy (`--traffic_config_file`): per model, a sticky split of requests over
version labels (A/B tests, canaries) and a mirrored (shadow) label. JSON:

  {"models": {"digits": {
     "split": {"key": "x-user-id", "arms": [{"label": "stable", "weight": 90},
                                            {"label": "canary", "weight": 10}]},
     "mirror": {"label": "shadow", "percent": 100}}}}

* split: each request that names neither a version nor a label goes to one arm (a version
  label of the model). Weights are percentages (multiples of 0.01) summing to 100. The arm is
  sticky per value of the request key, the gRPC metadata / HTTP header named by `key`
  (random per request when the request lacks it): bucket = FNV-1a-32(str(FNV-1a-32(seed +
  value))) mod 10000 (GrowthBook's hash; `seed` defaults to the model's name), and the arms
  own contiguous bucket ranges in the order listed. Changing two adjacent arms' weights moves
  only the keys in the share that changed hands (list the canary last, next to stable).
* mirror: `percent` (0-100) of the model's Predict requests are copied to `label` after the
  primary answered (serving/server/shadow.py).

Every label must be one of the model's version labels, and the model must be served, when the
file is read; a file that breaks any rule is refused whole (`TrafficConfigError`) and the
previous policy stays.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import random
import threading
from collections.abc import Mapping

from absl import logging

BUCKETS = 10_000
_FNV_OFFSET = 0x811C9DC5
_FNV_PRIME = 0x01000193


class TrafficConfigError(ValueError):
  """A traffic config that cannot be applied; the message names the value and the fix."""


def fnv1a32(data: bytes) -> int:
  """The 32-bit FNV-1a hash of `data`."""
  h = _FNV_OFFSET
  for byte in data:
    h = ((h ^ byte) * _FNV_PRIME) & 0xFFFFFFFF
  return h


def bucket(seed: str, key: str) -> int:
  """The bucket (0..9999) of `key`: GrowthBook's v2 hash, FNV-1a hashed twice."""
  return fnv1a32(str(fnv1a32((seed + key).encode())).encode()) % BUCKETS


@dataclasses.dataclass(frozen=True)
class SplitPolicy:
  """A model's arms (labels) and the exclusive end bucket of each one's range."""

  key: str
  seed: str
  labels: tuple[str, ...]
  ends: tuple[int, ...]

  def arm_of_bucket(self, value: int) -> str:
    return self.labels[bisect.bisect_right(self.ends, value)]

  def choose(self, headers: Mapping[str, str]) -> str:
    """The arm of a request with these headers (`get` by lower-case name)."""
    value = headers.get(self.key)
    if not value:
      return self.arm_of_bucket(random.randrange(BUCKETS))
    return self.arm_of_bucket(bucket(self.seed, value))


@dataclasses.dataclass(frozen=True)
class MirrorPolicy:
  label: str
  percent: float

  def sampled(self) -> bool:
    return self.percent > 0 and random.random() * 100 < self.percent


@dataclasses.dataclass(frozen=True)
class ModelPolicy:
  split: SplitPolicy | None = None
  mirror: MirrorPolicy | None = None


def parse(text: str, labels: Mapping[str, set[str]], where: str) -> dict[str, ModelPolicy]:
  """The policy of a traffic config's text, checked against `labels` (model -> its version
  labels). Raises TrafficConfigError prefixed with `where`."""
  try:
    config = json.loads(text)
  except json.JSONDecodeError as e:
    raise TrafficConfigError(f"{where} is not JSON: {e}") from e
  if not isinstance(config, dict) or not isinstance(config.get("models"), dict):
    raise TrafficConfigError(f'{where}: needs {{"models": {{"MODEL": {{"split": ...}}}}}}')
  unknown = sorted(set(config) - {"models"})
  if unknown:
    raise TrafficConfigError(f"{where}: unknown keys {unknown}; only 'models'")
  policies = {}
  for name, entry in config["models"].items():
    model_where = f"{where}, model {name!r}"
    if name not in labels:
      raise TrafficConfigError(f"{model_where}: not served (served: {sorted(labels)})")
    if not isinstance(entry, dict) or set(entry) - {"split", "mirror"}:
      raise TrafficConfigError(f"{model_where}: give an object with 'split' and/or 'mirror'")
    known = labels[name]
    split = _split(entry["split"], name, known, model_where) if "split" in entry else None
    mirror = _mirror(entry["mirror"], known, model_where) if "mirror" in entry else None
    policies[name] = ModelPolicy(split, mirror)
  return policies


def _check_label(label, known: set[str], where: str) -> str:
  if not isinstance(label, str) or label not in known:
    raise TrafficConfigError(
      f"{where}: label {label!r} is not a version label of the model (labels: {sorted(known)}); "
      "add it to the model config's version_labels first"
    )
  return label


def _split(split, model: str, known: set[str], where: str) -> SplitPolicy:
  where = f"{where}, split"
  if not isinstance(split, dict) or not isinstance(split.get("arms"), list) or not split["arms"]:
    raise TrafficConfigError(f'{where}: needs "arms": [{{"label": ..., "weight": ...}}, ...]')
  key = split.get("key", "x-user-id")
  seed = split.get("seed", model)
  if not isinstance(key, str) or not key or not isinstance(seed, str):
    raise TrafficConfigError(f"{where}: 'key' (a header name) and 'seed' must be strings")
  labels, ends, total = [], [], 0
  for arm in split["arms"]:
    if not isinstance(arm, dict) or set(arm) != {"label", "weight"}:
      raise TrafficConfigError(f"{where}: arm {arm!r} must be {{'label': ..., 'weight': ...}}")
    label = _check_label(arm["label"], known, where)
    weight = arm["weight"]
    share = round(weight * 100) if isinstance(weight, int | float) else -1
    if isinstance(weight, bool) or share < 0 or abs(share - weight * 100) > 1e-6:
      raise TrafficConfigError(
        f"{where}: weight {weight!r} of arm {label!r} must be a percentage >= 0 "
        "(a multiple of 0.01)"
      )
    if label in labels:
      raise TrafficConfigError(f"{where}: arm {label!r} is listed twice")
    total += share
    labels.append(label)
    ends.append(total)
  if total != BUCKETS:
    raise TrafficConfigError(
      f"{where}: weights sum to {total / 100:g}, not 100; make them add up to 100"
    )
  return SplitPolicy(key.lower(), seed, tuple(labels), tuple(ends))


def _mirror(mirror, known: set[str], where: str) -> MirrorPolicy:
  where = f"{where}, mirror"
  if not isinstance(mirror, dict) or set(mirror) != {"label", "percent"}:
    raise TrafficConfigError(f'{where}: needs {{"label": ..., "percent": 0-100}}')
  label = _check_label(mirror["label"], known, where)
  percent = mirror["percent"]
  if isinstance(percent, bool) or not isinstance(percent, int | float) or not 0 <= percent <= 100:
    raise TrafficConfigError(f"{where}: percent {percent!r} must be a number from 0 to 100")
  return MirrorPolicy(label, float(percent))


class TrafficPolicy:
  """The policy in force, read per request (`split_for`, `mirror_for`: no lock, the dict is
  replaced whole) and replaced by `apply` (thread-safe)."""

  def __init__(self, models, metrics):
    """`models`: the ServedModels whose labels a config is checked against."""
    self.models = models
    self.metrics = metrics
    self.policies: dict[str, ModelPolicy] = {}
    self._lock = threading.Lock()

  def split_for(self, model: str) -> SplitPolicy | None:
    policy = self.policies.get(model)
    return policy.split if policy is not None else None

  def mirror_for(self, model: str) -> MirrorPolicy | None:
    policy = self.policies.get(model)
    return policy.mirror if policy is not None else None

  def served_labels(self) -> dict[str, set[str]]:
    return {name: set(c.version_labels) for name, c in self.models.configs.items()}

  def apply(
    self,
    text: str,
    where: str,
    labels: Mapping[str, set[str]] | None = None,
    *,
    count_refusal: bool = True,
  ) -> None:
    """Parses and applies `text`, checked against `labels` (model -> version labels; default:
    the served models'). Raises TrafficConfigError (counted unless `count_refusal` is False: a
    retry of the same text; the policy stays)."""
    with self._lock:
      try:
        policies = parse(text, self.served_labels() if labels is None else labels, where)
      except TrafficConfigError:
        if count_refusal:
          self.metrics.traffic_config_loads.labels("refused").inc()
        raise
      self.policies = policies
      self.metrics.traffic_config_loads.labels("applied").inc()


def watch(policy: TrafficPolicy, path: str, every_seconds: float, stop: threading.Event) -> None:
  """Applies `path` whenever its text changes, until `stop`. A text that was refused is tried
  again at every read (a label it names may reach the model config a moment later, as when a
  rollout moves a label and then the split), its error logged and counted once; meanwhile the
  previous policy stays."""
  last, error = None, None
  while not stop.wait(every_seconds):
    try:
      with open(path) as f:
        text = f.read()
    except OSError as e:
      if error != f"unreadable: {e}":
        logging.error("Not applying --traffic_config_file=%s: %s", path, e.strerror)
      last, error = None, f"unreadable: {e}"
      continue
    if text == last and error is None:
      continue
    retry, last = text == last, text
    try:
      policy.apply(text, f"--traffic_config_file={path}", count_refusal=not retry)
    except TrafficConfigError as e:
      if not retry:
        logging.error("Not applying (the previous policy stays): %s", e)
      error = str(e)
      continue
    error = None
    logging.info("Applied --traffic_config_file=%s: %s", path, sorted(policy.policies))

"""The allowed values of every config field, declared once, checked before anything runs.

`validate(config)` checks each field of a config against its rule in `RULES` and raises
`ConfigError` naming the field, its value and what to set instead:

  config.model.dropout_rate=1.5 is out of range: it must lie in [0, 1) (a probability);
  e.g. --config.model.dropout_rate=0.0

`trainer.main` calls it right after the command line is parsed, and `train.build_experiment`
calls it again for configs built in Python, so nothing reads data or touches the workdir with a
value outside its range. NaN and inf are named as such. Checks that need more than one field or
the devices (a batch divisible by the mesh, warmup within num_steps, an eval metric the task
reports, the files a path names) stay where those facts are known and raise ConfigError there.

Adding a field or a group (for example `config.tracking`): give each new field its default in
`configs/base.py` and its rule here, in `RULES`, under its dotted name:

  "tracking.uri": text(),                         # any string, "" allowed
  "tracking.experiment": text(nonempty=True),
  "tracking.log_every_steps": integer(min=1),     # sizes and intervals: >= 1
  "tracking.sample_rate": real(min=0, max=1, max_open=True),  # a probability in [0, 1)
  "tracking.backend": choice("mlflow", "none"),
  "tracking.enabled": boolean(),

`tests/test_bad_inputs.py` fails for any field of the base config without a rule, and for a
rule without a field. Rules are plain values (no registration at import time), so this table is
the single place to look.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator

import ml_collections

from configs import base
from trainer.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Rule:
  """What one field accepts: `problem(value)` is None when fine, else what is wrong with it."""

  # Says what the field must be, e.g. "an integer >= 1"; used in every message about it.
  expected: str
  problem: Callable[[object], str | None]


def integer(min: int | None = None, max: int | None = None, *, also: int | None = None) -> Rule:
  """An int (not a bool) in [min, max]; `also` is one more allowed value (e.g. -1: fill)."""
  bounds = _bounds_text(min, max, False, False)
  expected = f"an integer{bounds}" + (f" or {also}" if also is not None else "")

  def problem(value):
    if isinstance(value, bool) or not isinstance(value, int):
      return f"is a {type(value).__name__}, not an integer"
    if value == also:
      return None
    if (min is not None and value < min) or (max is not None and value > max):
      return "is out of range"
    return None

  return Rule(expected, problem)


def real(
  min: float | None = None,
  max: float | None = None,
  *,
  min_open: bool = False,
  max_open: bool = False,
  optional: bool = False,
  meaning: str = "",
) -> Rule:
  """A finite number in the interval; open ends exclude the bound; None allowed if optional."""
  expected = f"a finite number{_bounds_text(min, max, min_open, max_open)}"
  expected += f" ({meaning})" if meaning else ""
  expected += " or None (unset)" if optional else ""

  def problem(value):
    if value is None and optional:
      return None
    if isinstance(value, bool) or not isinstance(value, int | float):
      return f"is a {type(value).__name__}, not a number"
    if math.isnan(value):
      return "is NaN (not a number)"
    if math.isinf(value):
      return "is infinite"
    if min is not None and (value < min or (min_open and value == min)):
      return "is out of range"
    if max is not None and (value > max or (max_open and value == max)):
      return "is out of range"
    return None

  return Rule(expected, problem)


def probability() -> Rule:
  """Dropout-like rates and decays: [0, 1)."""
  return real(0, 1, max_open=True, meaning="a probability")


def rate() -> Rule:
  """Learning rates and other step sizes: finite and > 0."""
  return real(0, min_open=True)


def choice(*options: str) -> Rule:
  def problem(value):
    return None if value in options else "is not one of the choices"

  return Rule(f"one of {list(options)}", problem)


def boolean() -> Rule:
  def problem(value):
    return None if isinstance(value, bool) else f"is a {type(value).__name__}, not a bool"

  return Rule("true or false", problem)


def text(nonempty: bool = False) -> Rule:
  def problem(value):
    if not isinstance(value, str):
      return f"is a {type(value).__name__}, not a string"
    return "is empty" if nonempty and not value.strip() else None

  return Rule("a non-empty string" if nonempty else "a string", problem)


def shape() -> Rule:
  """A non-empty tuple of positive ints, e.g. an example shape (8, 8, 1)."""

  def problem(value):
    if not isinstance(value, tuple | list) or not value:
      return "is not a non-empty tuple"
    if any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in value):
      return "has a dimension that is not an integer >= 1"
    return None

  return Rule("a tuple of integers >= 1, e.g. '(8, 8, 1)'", problem)


def checked_elsewhere(where: str) -> Rule:
  """A field whose structure another module checks (named in `where`)."""
  return Rule(f"valid for {where}", lambda value: None)


def _bounds_text(min, max, min_open: bool, max_open: bool) -> str:
  if min is not None and max is not None:
    return f" in {'(' if min_open else '['}{min}, {max}{')' if max_open else ']'}"
  if min is not None:
    return f" {'>' if min_open else '>='} {min}"
  if max is not None:
    return f" {'<' if max_open else '<='} {max}"
  return ""


_STEPS = integer(min=1)
_MESH_AXIS = integer(min=1, also=-1)

RULES: dict[str, Rule] = {
  "seed": integer(min=0),
  "description": text(),
  # data
  "data.name": choice("digits", "synthetic", "npz", "array_record", "text"),
  "data.train_path": text(),  # Opened and checked by trainer.data.sources.
  "data.eval_path": text(),
  "data.test_path": text(),
  "data.inputs_key": text(nonempty=True),
  "data.labels_key": text(nonempty=True),
  "data.num_classes": integer(min=0),
  "data.mean": real(optional=True),
  "data.std": real(0, min_open=True, optional=True),
  "data.split_seed": integer(min=0),
  "data.synthetic_input_shape": shape(),
  "data.synthetic_num_classes": integer(min=2),
  "data.synthetic_train_examples": integer(min=1),
  "data.synthetic_eval_examples": integer(min=1),
  "data.files": text(),
  "data.seq_len": integer(min=2),
  "data.max_bytes": integer(min=0),
  "data.eval_every_documents": integer(min=2),
  "data.shuffle": boolean(),
  "data.worker_threads": integer(min=0),
  "data.prefetch_batches": integer(min=1),
  "data.device_resident_mb": integer(min=0),
  # model
  "model.name": text(nonempty=True),  # Looked up in models.MODELS, which lists the choices.
  "model.dtype": choice("float32", "bfloat16"),
  "model.dropout_rate": probability(),
  "model.remat": choice("none", "full", "dots_saveable"),
  # optim
  "optim.name": choice("adamw", "adam", "sgd", "lamb"),
  "optim.learning_rate": rate(),
  "optim.schedule": choice("cosine", "linear", "constant"),
  "optim.warmup_steps": integer(min=0),
  "optim.end_lr_factor": real(0, 1),
  "optim.weight_decay": real(0),
  "optim.b1": probability(),
  "optim.b2": probability(),
  "optim.eps": rate(),
  "optim.momentum": probability(),
  "optim.nesterov": boolean(),
  "optim.grad_clip_norm": real(0, meaning="0 disables clipping"),
  "optim.grad_accum_steps": _STEPS,
  "optim.ema_decay": probability(),
  # mesh
  "mesh.data": _MESH_AXIS,
  "mesh.fsdp": _MESH_AXIS,
  "mesh.tensor": _MESH_AXIS,
  "mesh.logical_axis_rules": checked_elsewhere("trainer.partitioning"),
  # train
  "train.num_steps": _STEPS,
  "train.global_batch_size": integer(min=1),
  "train.log_every_steps": _STEPS,
  "train.stall_timeout_s": real(0, meaning="0 derives it from the step time"),
  "train.stall_floor_s": real(0, min_open=True),
  # eval
  "eval.every_steps": _STEPS,
  "eval.global_batch_size": integer(min=1),
  "eval.max_batches": integer(min=0),
  "eval.best_metric": text(nonempty=True),  # Checked against the task's eval metrics.
  "eval.best_mode": choice("max", "min"),
  "eval.early_stopping_patience": integer(min=0),
  "eval.early_stopping_min_delta": real(0),
  # checkpoint
  "checkpoint.enabled": boolean(),
  "checkpoint.every_steps": _STEPS,
  "checkpoint.keep_last": integer(min=1),
  "checkpoint.keep_best": integer(min=0),
  "checkpoint.async_save": boolean(),
  # perf
  "perf.peak_tflops": real(0, meaning="0 looks the device up"),
  # tracking (trainer/tracking.py)
  "tracking.enabled": boolean(),
  "tracking.uri": text(),
  "tracking.experiment": text(nonempty=True),
  "tracking.artifact_location": text(),
  "tracking.flush_timeout_s": real(0),
  "tracking.metrics_every_s": real(0, meaning="0 sends each logging step's metrics at once"),
  "tracking.report": boolean(),
  # card (mlops/model_card.py): free text, empty prints "not provided".
  "card.intended_use": text(),
  "card.out_of_scope_use": text(),
  "card.ethical_considerations": text(),
}


def leaves(config: ml_collections.ConfigDict, prefix: str = "") -> Iterator[tuple[str, object]]:
  """`("optim.learning_rate", 0.003)` for every non-group field, depth first."""
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      yield from leaves(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", value


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError for the first field whose value its rule rejects.

  Fields without a rule pass (ConfigDict's lock still type-checks them); the test suite makes
  sure every field of the base config has one.
  """
  for name, value in leaves(config):
    rule = RULES.get(name)
    problem = rule.problem(value) if rule else None
    if problem:
      raise ConfigError(
        f"config.{name}={_show(value)} {problem}: it must be {rule.expected}; "
        f"{_example(name, rule)}"
      )


def _example(name: str, rule: Rule) -> str:
  """`e.g. --config.optim.learning_rate=0.001`: the base config's default, when it is valid."""
  default = dict(leaves(base.get_base_config())).get(name)
  if default is None or rule.problem(default) or not isinstance(default, bool | int | float | str):
    return f"set --config.{name}=VALUE"
  if isinstance(default, str) and not default:
    return f"set --config.{name}=VALUE"
  return f"e.g. --config.{name}={str(default).lower() if isinstance(default, bool) else default}"


def _show(value: object) -> str:
  return repr(value) if isinstance(value, str) else str(value)

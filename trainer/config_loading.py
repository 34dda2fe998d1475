"""Config files and `--config.<group>.<field>=VALUE` overrides, from command-line strings.

`trainer.main` reads `--config=FILE[:ARG]` and its overrides here rather than through
`ml_collections.config_flags`, whose errors for a missing file, a syntax error, a file without
`get_config`, a bad `:ARG` or a misspelled key arrive as tracebacks (or, for a missing file, only
when the config is first used). Every problem here raises ConfigError with one line that names
the file, the argument or the key, and what to write instead. Values parse by the type of the
field they override, as config_flags does: bool, int, float, str, tuple.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import os
import traceback
from collections.abc import Sequence

import ml_collections

from trainer.errors import ConfigError

_PREFIX = "--config."
_NEGATED_PREFIX = "--noconfig."
_TRUE = ("true", "t", "1", "yes")
_FALSE = ("false", "f", "0", "no")


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """(argv without the config overrides, the overrides in order); argv[0] is the program.

  `--config.a.b=V`, `--config.a.b V` (a separate value) and the bool forms `--config.a.b` /
  `--noconfig.a.b` are overrides; a following word that does not start with `--` is taken as
  the value of a bare `--config.a.b` (so `--config.mesh.data -1` works).
  """
  rest, overrides = [], []
  args = list(argv)
  i = 0
  while i < len(args):
    arg = args[i]
    if arg.startswith((_PREFIX, _NEGATED_PREFIX)):
      if "=" not in arg and i + 1 < len(args) and not args[i + 1].startswith("--"):
        arg = f"{arg}={args[i + 1]}"
        i += 1
      overrides.append(arg)
    else:
      rest.append(arg)
    i += 1
  return rest, overrides


def load_config(config_arg: str | None) -> ml_collections.ConfigDict:
  """Runs `get_config(ARG)` of the file in `FILE[:ARG]` and returns its config, locked."""
  if not config_arg or not config_arg.strip():
    raise ConfigError("--config is empty; pass a config file, e.g. --config=configs/digits_cnn.py")
  path, sep, arg = config_arg.partition(":")
  _check_config_path(path)
  get_config = _load_get_config(path)
  try:
    config = get_config(arg) if sep else get_config()
  except ValueError as e:  # How config files reject their argument (configs.base).
    raise ConfigError(f"--config={config_arg}: {e}") from e
  except Exception as e:  # The user's config code: name its file and line, not a traceback.
    raise ConfigError(
      f"--config={config_arg}: get_config({arg!r}) failed{_where(e, path)}: {type(e).__name__}: {e}"
    ) from e
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(
      f"--config={config_arg}: get_config() returned {type(config).__name__}, not an "
      "ml_collections.ConfigDict; return the config (see configs/digits_cnn.py)"
    )
  config.lock()
  return config


def _check_config_path(path: str) -> None:
  if os.path.isfile(path):
    return
  if os.path.isdir(path):
    raise ConfigError(f"--config={path} is a directory; name a config file in it, e.g. {path}/x.py")
  folder = os.path.dirname(path) or "."
  names = sorted(n for n in _listdir(folder) if _defines_get_config(os.path.join(folder, n)))
  close = difflib.get_close_matches(os.path.basename(path), names, n=1)
  hint = (
    f"did you mean {os.path.join(folder, close[0])}?"
    if close
    else (f"config files here: {', '.join(names)}" if names else "check the path")
  )
  raise ConfigError(f"--config={path}: no such file; {hint}")


def _listdir(folder: str) -> list[str]:
  try:
    return os.listdir(folder)
  except OSError:
    return []


def _defines_get_config(path: str) -> bool:
  try:
    with open(path, encoding="utf-8") as f:
      return path.endswith(".py") and "def get_config(" in f.read()
  except (OSError, UnicodeDecodeError):
    return False


def _load_get_config(path: str):
  spec = importlib.util.spec_from_file_location("_trainer_config_file", path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except SyntaxError as e:
    raise ConfigError(
      f"--config={path}: syntax error at line {e.lineno}: {e.msg}; fix the config file"
    ) from e
  except Exception as e:
    raise ConfigError(
      f"--config={path} failed to load{_where(e, path)}: {type(e).__name__}: {e}"
    ) from e
  get_config = getattr(module, "get_config", None)
  if not callable(get_config):
    raise ConfigError(
      f"--config={path} defines no get_config(arg=None); add one that returns an "
      "ml_collections.ConfigDict (see configs/digits_cnn.py)"
    )
  return get_config


def _where(error: BaseException, path: str) -> str:
  """` at FILE:LINE` of the deepest frame of the error that lies in the user's files."""
  frames = traceback.extract_tb(error.__traceback__)
  own = [f for f in frames if "/site-packages/" not in f.filename and "<frozen" not in f.filename]
  frame = (own or frames or [None])[-1]
  if frame is None:
    return ""
  shown = os.path.relpath(frame.filename)
  return f" at {frame.filename if shown.startswith('..') else shown}:{frame.lineno}"


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> None:
  """Sets each `--config.a.b=VALUE` on `config`, parsing VALUE by the field's type."""
  for override in overrides:
    negated = override.startswith(_NEGATED_PREFIX)
    dotted, sep, raw = override.removeprefix(_NEGATED_PREFIX).removeprefix(_PREFIX).partition("=")
    parent, leaf = _find_field(config, dotted, override)
    field_type = parent.get_type(leaf)
    if not sep and field_type is not bool:
      raise ConfigError(f"{override} needs a value: write --config.{dotted}=VALUE")
    if negated and (sep or field_type is not bool):
      raise ConfigError(f"{override}: --noconfig. only negates a bool field; use --config.{dotted}")
    value = (not negated) if not sep else _parse(raw, field_type, f"--config.{dotted}")
    try:
      parent[leaf] = value
    except (TypeError, ValueError) as e:
      raise ConfigError(f"--config.{dotted}={raw}: {e}") from e


def _find_field(config: ml_collections.ConfigDict, dotted: str, override: str):
  """The group holding `dotted`'s last part, and that part; with a "did you mean" if missing."""
  parts = dotted.split(".")
  node, path = config, "config"
  for i, part in enumerate(parts):
    if not isinstance(node, ml_collections.ConfigDict):
      raise ConfigError(
        f"{override}: {path} is a value, not a group; drop '.{'.'.join(parts[i:])}'"
      )
    if part not in node:
      kind = "group" if i < len(parts) - 1 else "field"
      raise ConfigError(f"{override}: {path} has no {kind} {part!r}; {_suggest(part, node)}")
    if i == len(parts) - 1:
      if isinstance(node[part], ml_collections.ConfigDict):
        fields = ", ".join(sorted(node[part].keys()))
        raise ConfigError(f"{override}: {path}.{part} is a group; set one of its fields: {fields}")
      return node, part
    node, path = node[part], f"{path}.{part}"
  raise ConfigError(f"{override}: name a field, e.g. --config.optim.learning_rate=0.001")


def _suggest(name: str, node: ml_collections.ConfigDict) -> str:
  keys = sorted(node.keys())
  close = difflib.get_close_matches(name, keys, n=1, cutoff=0.6)
  if close:
    return f"did you mean {close[0]!r}?"
  return f"choose one of {', '.join(keys)}"


def _parse(raw: str, field_type: type, name: str):
  """VALUE as the field's type; the error says which type was expected."""
  if field_type is bool:
    if raw.strip().lower() in _TRUE + _FALSE:
      return raw.strip().lower() in _TRUE
    raise ConfigError(f"{name}={raw!r} is not a bool; write true or false")
  if field_type is int:
    try:
      return int(raw)
    except ValueError:
      pass
    try:
      number = float(raw)
    except ValueError:
      number = None
    if number is not None and number.is_integer():
      return int(number)
    raise ConfigError(f"{name}={raw!r} is not an integer; write a whole number, e.g. {name}=10")
  if field_type is float:
    try:
      return float(raw)
    except ValueError:
      raise ConfigError(f"{name}={raw!r} is not a number; write e.g. {name}=0.001") from None
  if field_type is str:
    return raw
  if field_type in (tuple, list):
    try:
      value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
      value = None
    if not isinstance(value, tuple | list):
      raise ConfigError(f"{name}={raw!r} is not a tuple; write e.g. {name}='(8, 8, 1)'")
    return field_type(value)
  try:
    return ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    return raw

"""Every bad input ends `python -m trainer.main` with one `error:` line, exit 1, nothing written.

The table runs in-process through `trainer.main.run` (the function the CLI calls, argv in, exit
code out), so 60-odd cases cost about as much as one trainer start; a few cases run the real CLI
in a subprocess to prove that path (stderr, exit code, nothing printed twice). Each case asserts:
exit code 1, exactly one line starting with `error:` that names the offending value, no
traceback, and a workdir that is not created (fresh runs) or byte-for-byte unchanged (resumed
runs, manifest included).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable

import jax
import numpy as np
import pytest

from configs import base, schema
from tests.helpers.configs import smoke_config
from trainer import main, train
from trainer.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = f"--config={REPO}/configs/digits_cnn.py:smoke"
NPZ = "--config.data.name=npz"


@dataclasses.dataclass(frozen=True)
class Case:
  # Arguments after the program name; `{tmp}` is the case's scratch directory, `{workdir}` the
  # run's workdir (unless the case passes its own --workdir).
  args: tuple[str, ...]
  # Must match (re.search) the error line: the value the user got wrong, and the advice.
  message: str
  # Writes the files the case needs into `{tmp}`.
  setup: Callable[[str], None] | None = None
  # Must not appear in the error line (wrong advice seen before).
  not_message: str | None = None
  # False: no --workdir is passed at all.
  workdir: bool = True


def _write(name: str, text: str) -> Callable[[str], None]:
  def setup(tmp: str) -> None:
    with open(os.path.join(tmp, name), "w") as f:
      f.write(text)

  return setup


def _npz(train: dict | None = None, evaluation: dict | None = None, raw: bytes | None = None):
  """Writes train.npz / eval.npz (good digits-like arrays unless given), or raw bytes as train."""

  def setup(tmp: str) -> None:
    good = {"inputs": np.zeros((40, 8, 8, 1), np.float32), "labels": np.arange(40) % 10}
    np.savez(os.path.join(tmp, "train.npz"), **(train or good))
    np.savez(os.path.join(tmp, "eval.npz"), **(evaluation or good))
    if raw is not None:
      with open(os.path.join(tmp, "train.npz"), "wb") as f:
        f.write(raw)

  return setup


def _truncated_npz(tmp: str) -> None:
  _npz()(tmp)
  path = os.path.join(tmp, "train.npz")
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(data[: len(data) // 2])


def _file(name: str) -> Callable[[str], None]:
  return _write(name, "not a directory\n")


NPZ_PATHS = (
  NPZ,
  "--config.data.train_path={tmp}/train.npz",
  "--config.data.eval_path={tmp}/eval.npz",
)

CASES = {
  # The config file and its argument.
  "config_missing_file": Case(("--config=configs/nope.py",), r"configs/nope\.py: no such file"),
  "config_misspelled_file": Case(
    ("--config=configs/digit_cnn.py",), r"digit_cnn\.py: no such file; did you mean .*digits_cnn"
  ),
  "config_is_directory": Case(("--config=configs",), r"--config=configs is a directory"),
  "config_empty": Case(("--config=",), r"--config is empty"),
  "config_absent": Case((), r"--config is missing"),
  "config_syntax_error": Case(
    ("--config={tmp}/broken.py",),
    r"broken\.py: syntax error at line 1",
    _write("broken.py", "def get_config(:\n  pass\n"),
  ),
  "config_without_get_config": Case(
    ("--config={tmp}/empty.py",), r"empty\.py defines no get_config", _write("empty.py", "X = 1\n")
  ),
  "config_import_error": Case(
    ("--config={tmp}/imports.py",),
    r"imports\.py failed to load at .*imports\.py:1: ModuleNotFoundError: .*no_such_module",
    _write("imports.py", "import no_such_module\n"),
  ),
  "config_returns_dict": Case(
    ("--config={tmp}/plain.py",),
    r"plain\.py: get_config\(\) returned dict, not an ml_collections\.ConfigDict",
    _write("plain.py", "def get_config(arg=None):\n  return {'seed': 0}\n"),
  ),
  "config_get_config_raises": Case(
    ("--config={tmp}/raises.py",),
    r"raises\.py:2: KeyError: 'model'",
    _write("raises.py", "def get_config(arg=None):\n  return {}['model']\n"),
  ),
  "config_bad_argument": Case(
    (f"{SMOKE[: -len(':smoke')]}:smok",), r"unknown config argument 'smok'.*'smoke'"
  ),
  "config_bad_lm_size": Case((f"--config={REPO}/configs/lm.py:size=huge",), r"'huge'"),
  # Overrides that name no field or do not parse.
  "override_misspelled_group": Case(
    (SMOKE, "--config.optimizer.learning_rate=0.1"),
    r"--config\.optimizer\.learning_rate=0\.1: config has no group 'optimizer'; did you mean "
    r"'optim'\?",
  ),
  "override_misspelled_key": Case(
    (SMOKE, "--config.optim.learning_rat=0.1"),
    r"config\.optim has no field 'learning_rat'; did you mean 'learning_rate'\?",
  ),
  "override_group_as_value": Case((SMOKE, "--config.optim=3"), r"config\.optim is a group"),
  "override_value_as_group": Case(
    (SMOKE, "--config.seed.value=3"), r"config\.seed is a value, not a group"
  ),
  "override_not_an_integer": Case(
    (SMOKE, "--config.train.num_steps=abc"), r"num_steps='abc' is not an integer"
  ),
  "override_fractional_integer": Case(
    (SMOKE, "--config.train.num_steps=2.5"), r"num_steps='2\.5' is not an integer"
  ),
  "override_not_a_number": Case(
    (SMOKE, "--config.optim.learning_rate=fast"), r"learning_rate='fast' is not a number"
  ),
  "override_not_a_bool": Case((SMOKE, "--config.data.shuffle=maybe"), r"'maybe' is not a bool"),
  "override_without_value": Case(
    (SMOKE, "--config.optim.learning_rate"), r"--config\.optim\.learning_rate needs a value"
  ),
  "override_not_a_tuple": Case(
    (SMOKE, "--config.data.synthetic_input_shape=big"), r"'big' is not a tuple"
  ),
  # Values outside their range (configs/schema.py).
  "lr_nan": Case((SMOKE, "--config.optim.learning_rate=nan"), r"learning_rate=nan is NaN"),
  "device_resident_negative": Case(
    (SMOKE, "--config.data.device_resident_mb=-1"), r"device_resident_mb=-1 .*>= 0"
  ),
  "lr_inf": Case((SMOKE, "--config.optim.learning_rate=inf"), r"learning_rate=inf is infinite"),
  "lr_negative": Case(
    (SMOKE, "--config.optim.learning_rate=-1"), r"learning_rate=-1\.0 is out of range.*> 0"
  ),
  "lr_zero": Case((SMOKE, "--config.optim.learning_rate=0"), r"learning_rate=0\.0 .*> 0"),
  "dropout_above_one": Case(
    (SMOKE, "--config.model.dropout_rate=1.5"), r"dropout_rate=1\.5 is out of range.*\[0, 1\)"
  ),
  "dropout_negative": Case(
    (SMOKE, "--config.model.dropout_rate=-0.5"), r"dropout_rate=-0\.5 is out of range.*\[0, 1\)"
  ),
  "batch_negative": Case(
    (SMOKE, "--config.train.global_batch_size=-32"),
    r"global_batch_size=-32 is out of range: it must be an integer >= 1",
    not_message="multiple of",
  ),
  "batch_zero": Case((SMOKE, "--config.train.global_batch_size=0"), r"global_batch_size=0 "),
  "eval_batch_negative": Case(
    (SMOKE, "--config.eval.global_batch_size=-1"), r"eval\.global_batch_size=-1 "
  ),
  "num_steps_zero": Case((SMOKE, "--config.train.num_steps=0"), r"num_steps=0 .*>= 1"),
  "log_every_zero": Case((SMOKE, "--config.train.log_every_steps=0"), r"log_every_steps=0 "),
  "b2_one": Case((SMOKE, "--config.optim.b2=1.0"), r"b2=1\.0 .*\[0, 1\)"),
  "weight_decay_negative": Case(
    (SMOKE, "--config.optim.weight_decay=-0.1"), r"weight_decay=-0\.1 .*>= 0"
  ),
  "grad_clip_nan": Case((SMOKE, "--config.optim.grad_clip_norm=nan"), r"grad_clip_norm=nan is NaN"),
  "ema_decay_one": Case((SMOKE, "--config.optim.ema_decay=1"), r"ema_decay=1\.0 .*\[0, 1\)"),
  "eps_zero": Case((SMOKE, "--config.optim.eps=0"), r"eps=0\.0 .*> 0"),
  "warmup_negative": Case((SMOKE, "--config.optim.warmup_steps=-5"), r"warmup_steps=-5 "),
  "keep_last_zero": Case((SMOKE, "--config.checkpoint.keep_last=0"), r"keep_last=0 "),
  "std_zero": Case((SMOKE, "--config.data.std=0"), r"std=0\.0 .*> 0"),
  "mesh_zero": Case((SMOKE, "--config.mesh.data=0"), r"mesh\.data=0 .*>= 1 or -1"),
  "dtype_unknown": Case(
    (SMOKE, "--config.model.dtype=float16"), r"dtype='float16' .*\['float32', 'bfloat16'\]"
  ),
  "optimizer_unknown": Case((SMOKE, "--config.optim.name=adagrad9"), r"name='adagrad9' .*adamw"),
  "schedule_unknown": Case((SMOKE, "--config.optim.schedule=step"), r"schedule='step' .*cosine"),
  "best_mode_unknown": Case((SMOKE, "--config.eval.best_mode=median"), r"'median' .*'max'"),
  "dataset_unknown": Case((SMOKE, "--config.data.name=imagenet"), r"'imagenet' .*digits"),
  "remat_unknown": Case((SMOKE, "--config.model.remat=partial"), r"'partial' .*dots_saveable"),
  "shape_zero": Case(
    (SMOKE, "--config.data.synthetic_input_shape=(8, 0)"), r"synthetic_input_shape=\(8, 0\) "
  ),
  # Checks that need the devices or the task (trainer.train), 8 fake CPU devices here.
  "batch_not_divisible": Case(
    (SMOKE, "--config.train.global_batch_size=30"), r"global batch 30 .*multiple of 8"
  ),
  "grad_accum_indivisible": Case(
    (SMOKE, "--config.optim.grad_accum_steps=3"), r"grad_accum_steps=3 must divide"
  ),
  "best_metric_unknown": Case(
    (SMOKE, "--config.eval.best_metric=f1"), r"best_metric='f1' is not an eval metric"
  ),
  "model_unknown": Case((SMOKE, "--config.model.name=resnet9000"), r"'resnet9000'"),
  # The workdir.
  "workdir_empty": Case((SMOKE, "--workdir="), r"--workdir is empty"),
  "workdir_whitespace": Case((SMOKE, "--workdir=  "), r"--workdir is empty"),
  "workdir_absent": Case((SMOKE,), r"--workdir is missing", workdir=False),
  "workdir_is_file": Case(
    (SMOKE, "--workdir={tmp}/afile"), r"--workdir=.*afile is a file", _file("afile")
  ),
  "workdir_below_file": Case(
    (SMOKE, "--workdir={tmp}/afile/run"),
    r"afile/run cannot be created: .*afile is a file",
    _file("afile"),
  ),
  "workdir_under_proc": Case(
    (SMOKE, "--workdir=/proc/run"), r"--workdir=/proc/run lies under /proc"
  ),
  "workdir_under_sys": Case((SMOKE, "--workdir=/sys/run"), r"lies under /sys"),
  # Other flags.
  "unknown_flag": Case((SMOKE, "--workdr=/tmp/x"), r"Unknown command line flag 'workdr'"),
  "positional_argument": Case((SMOKE, "train"), r"unexpected arguments \['train'\]"),
  "num_processes_not_int": Case((SMOKE, "--num_processes=two"), r"num_processes.*'two'|two"),
  # Data files.
  "npz_garbage": Case(
    (SMOKE, *NPZ_PATHS), r"cannot read .*train\.npz as \.npz", _npz(raw=b"not a zip archive")
  ),
  "npz_truncated": Case(
    (SMOKE, *NPZ_PATHS), r"cannot read .*train\.npz as \.npz \(BadZipFile", _truncated_npz
  ),
  "npz_missing_key": Case(
    (SMOKE, *NPZ_PATHS, "--config.data.inputs_key=images"),
    r"train\.npz has no array 'images'; its arrays are \['inputs', 'labels'\]",
    _npz(),
  ),
  "npz_is_npy": Case(
    (SMOKE, NPZ, "--config.data.train_path={tmp}/x.npy", "--config.data.eval_path={tmp}/x.npy"),
    r"x\.npy is a single \.npy array",
    lambda tmp: np.save(os.path.join(tmp, "x.npy"), np.zeros(3)),
  ),
  "npz_lengths_differ": Case(
    (SMOKE, *NPZ_PATHS),
    r"train\.npz: 'inputs' has shape \(40, 8, 8, 1\) and 'labels' \(30,\)",
    _npz(train={"inputs": np.zeros((40, 8, 8, 1)), "labels": np.zeros(30, np.int64)}),
  ),
  "npz_float_labels": Case(
    (SMOKE, *NPZ_PATHS),
    r"train\.npz: labels 'labels' must be integers",
    _npz(train={"inputs": np.zeros((40, 8, 8, 1)), "labels": np.zeros(40)}),
  ),
  "npz_negative_labels": Case(
    (SMOKE, *NPZ_PATHS),
    r"minimum -1",
    _npz(train={"inputs": np.zeros((40, 8, 8, 1)), "labels": -np.ones(40, np.int64)}),
  ),
  "npz_split_shapes_differ": Case(
    (SMOKE, *NPZ_PATHS),
    r"train_path holds examples of shape \(8, 8, 1\) but config\.data\.eval_path of shape \(4, 4\)",
    _npz(evaluation={"inputs": np.zeros((10, 4, 4)), "labels": np.zeros(10, np.int64)}),
  ),
  "npz_path_missing": Case(
    (SMOKE, NPZ, "--config.data.train_path={tmp}/none.npz", "--config.data.eval_path=x"),
    r"train_path='.*none\.npz' matches no file",
  ),
  "npz_eval_path_unset": Case(
    (SMOKE, NPZ, "--config.data.train_path={tmp}/train.npz"),
    r"set config\.data\.eval_path",
    _npz(),
  ),
  "array_record_garbage": Case(
    (
      SMOKE,
      "--config.data.name=array_record",
      "--config.data.num_classes=10",
      "--config.data.train_path={tmp}/bad.array_record",
      "--config.data.eval_path={tmp}/bad.array_record",
    ),
    r"cannot read ArrayRecord files \[.*bad\.array_record",
    _write("bad.array_record", "not an array record file\n" * 10),
  ),
}

# Cases also run against the workdir of a finished run: the resume must leave it as it was.
RESUMED_CASES = (
  "lr_nan",
  "lr_negative",
  "dropout_above_one",
  "batch_negative",
  "override_misspelled_key",
  "batch_not_divisible",
  "npz_garbage",
  "best_metric_unknown",
)


def snapshot(path: str) -> dict[str, str] | None:
  """Every file and directory under `path` with a hash of its bytes (None if `path` is absent)."""
  if not os.path.exists(path):
    return None
  found = {}
  for root, dirs, files in os.walk(path):
    for name in dirs:
      found[os.path.relpath(os.path.join(root, name), path) + "/"] = ""
    for name in files:
      full = os.path.join(root, name)
      with open(full, "rb") as f:
        found[os.path.relpath(full, path)] = hashlib.sha256(f.read()).hexdigest()
  return found


@pytest.fixture(scope="module")
def finished_workdir(tmp_path_factory):
  """A workdir holding a finished 2-step smoke run (checkpoint, manifest, events)."""
  workdir = str(tmp_path_factory.mktemp("finished") / "run")
  config = smoke_config({"train.num_steps": 2, "eval.every_steps": 2, "eval.max_batches": 1})
  # One device compiles faster; the resumed runs below check it against all 8 as usual.
  train.train_and_evaluate(config, workdir, devices=jax.devices()[:1])
  return workdir


def _argv(case: Case, tmp: str, workdir: str) -> list[str]:
  args = [a.format(tmp=tmp, workdir=workdir) for a in case.args]
  if case.workdir and not any(a.startswith("--workdir") for a in args):
    args.append(f"--workdir={workdir}")
  return ["trainer.main", *args]


def check_error_output(stderr: str, case: Case) -> str:
  """The single `error:` line; asserts it names the value and nothing is printed twice."""
  assert "Traceback" not in stderr, stderr
  errors = [line for line in stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1, stderr
  assert re.search(case.message, errors[0]), (case.message, errors[0])
  if case.not_message:
    assert case.not_message not in errors[0], errors[0]
  body = errors[0].removeprefix("error: ")
  assert stderr.count(body[:60]) == 1, f"the error is printed more than once:\n{stderr}"
  return errors[0]


def _run_in_process(argv, capsys, monkeypatch) -> tuple[int, str]:
  monkeypatch.chdir(REPO)
  capsys.readouterr()
  code = main.run(argv)
  return code, capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_fresh_run(name, tmp_path, capsys, monkeypatch):
  case = CASES[name]
  if case.setup:
    case.setup(str(tmp_path))
  workdir = str(tmp_path / "run")
  code, stderr = _run_in_process(_argv(case, str(tmp_path), workdir), capsys, monkeypatch)
  assert code == 1, stderr
  check_error_output(stderr, case)
  assert not os.path.exists(workdir)
  assert not os.path.exists(os.path.join(str(tmp_path), "afile", "run"))


@pytest.mark.parametrize("name", RESUMED_CASES)
def test_bad_input_on_resume_leaves_workdir_unchanged(
  name, finished_workdir, tmp_path, capsys, monkeypatch
):
  case = CASES[name]
  if case.setup:
    case.setup(str(tmp_path))
  before = snapshot(finished_workdir)
  assert "manifest.json" in before
  argv = _argv(case, str(tmp_path), finished_workdir)
  code, stderr = _run_in_process(argv, capsys, monkeypatch)
  assert code == 1, stderr
  check_error_output(stderr, case)
  assert snapshot(finished_workdir) == before


def test_cases_cover_the_issue():
  assert len(CASES) + len(RESUMED_CASES) >= 40
  assert len(CASES) >= 40


def test_every_base_config_field_has_a_rule():
  fields = dict(schema.leaves(base.get_base_config()))
  assert sorted(set(fields) - set(schema.RULES)) == [], "add a rule in configs/schema.py"
  assert sorted(set(schema.RULES) - set(fields)) == [], "a rule names no field of the base config"
  for name, value in fields.items():  # Every default passes its own rule.
    assert schema.RULES[name].problem(value) is None, (name, value)


def test_schema_choices_match_the_code():
  """The choices declared in the schema are the names the code accepts."""
  from models import transformer
  from trainer import optimizers
  from trainer.data import load_dataset

  def choices(name):
    return set(re.findall(r"'([^']+)'", schema.RULES[name].expected))

  assert choices("optim.schedule") == set(optimizers.SCHEDULES)
  assert choices("model.remat") == set(transformer.REMAT_POLICIES)
  config = base.get_base_config()
  for name in choices("optim.name"):  # Each builds; an unknown name raises (tests/test_errors).
    config.optim.name = name
    optimizers.create_optimizer(config.optim, 10)
  config.data.max_bytes = 20_000  # The text dataset reads this much of the stdlib's sources.
  for name in choices("data.name"):
    config.data.name = name
    try:
      load_dataset(config.data)
    except ConfigError as e:  # npz / array_record: no paths set, but the name is known.
      assert "unknown dataset" not in str(e), e


def test_configs_shipped_pass_the_schema():
  from configs import digits_cnn, lm, resnet

  for config in (digits_cnn.get_config(), lm.get_config(), resnet.get_config()):
    schema.validate(config)


# --- The real CLI, in subprocesses (stderr as a user sees it) -----------------------------------


def _cli(args: list[str], timeout: int = 180, **kwargs) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, "-m", "trainer.main", *args],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=timeout,
    **kwargs,
  )


@pytest.mark.parametrize(
  "name", ["override_misspelled_key", "config_syntax_error", "config_missing_file", "lr_inf"]
)
def test_cli_prints_one_line_and_exits_1(name, tmp_path):
  case = CASES[name]
  if case.setup:
    case.setup(str(tmp_path))
  workdir = str(tmp_path / "run")
  proc = _cli(_argv(case, str(tmp_path), workdir)[1:])
  assert proc.returncode == 1, proc.stderr
  check_error_output(proc.stderr, case)
  # Nothing but the error: the command line is checked before JAX is even imported.
  assert proc.stderr.strip().count("\n") == 0, proc.stderr
  assert not os.path.exists(workdir)


def test_cli_nan_override_on_resume_keeps_the_manifest(finished_workdir):
  before = snapshot(finished_workdir)
  proc = _cli([SMOKE, f"--workdir={finished_workdir}", "--config.optim.learning_rate=nan"])
  assert proc.returncode == 1
  check_error_output(proc.stderr, CASES["lr_nan"])
  assert snapshot(finished_workdir) == before


def test_cli_corrupt_npz_names_the_file(tmp_path):
  case = CASES["npz_truncated"]
  case.setup(str(tmp_path))
  proc = _cli(_argv(case, str(tmp_path), str(tmp_path / "run"))[1:])
  assert proc.returncode == 1, proc.stderr
  check_error_output(proc.stderr, case)
  assert not (tmp_path / "run").exists()


def test_cli_read_only_workdir():
  """As a user who cannot write there (root writes anywhere, so the check runs as nobody)."""
  prefix = []
  if os.geteuid() == 0:
    setpriv = shutil.which("setpriv")
    if setpriv is None:
      pytest.skip("running as root without setpriv: no way to be a user who cannot write")
    prefix = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"]
  # Outside pytest's private (0700) temp root, so that the other user can reach it.
  home = tempfile.mkdtemp(prefix="readonly_workdir_")
  try:
    os.chmod(home, 0o755)
    readonly = os.path.join(home, "readonly")
    os.mkdir(readonly, 0o555)
    os.chmod(readonly, 0o555)
    cases = {readonly: "", os.path.join(readonly, "run"): f" (its parent directory {readonly})"}
    for target, where in cases.items():
      proc = subprocess.run(
        [*prefix, sys.executable, "-m", "trainer.main", SMOKE, f"--workdir={target}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HOME": home},
      )
      assert proc.returncode == 1, proc.stderr
      expected = re.escape(f"--workdir={target} is not writable{where}; fix its permissions")
      check_error_output(proc.stderr, Case((), expected))
    assert os.listdir(readonly) == []
  finally:
    os.chmod(os.path.join(home, "readonly"), 0o755)
    shutil.rmtree(home)


def test_good_override_forms_parse_by_field_type():
  """The forms the README documents, so that the checks above are not all the parser knows."""
  from trainer import config_loading

  argv = [
    "prog",
    "--config=configs/digits_cnn.py",
    "--config.mesh.data",
    "-1",
    "--config.optim.learning_rate=1e-2",
    "--config.train.num_steps",
    "1e3",
    "--noconfig.data.shuffle",
    "--config.checkpoint.async_save",
    "--config.data.synthetic_input_shape=(4, 4, 3)",
    "--config.data.mean=0.5",
    "--workdir=/tmp/x",
  ]
  rest, overrides = config_loading.split_overrides(argv)
  assert rest == ["prog", "--config=configs/digits_cnn.py", "--workdir=/tmp/x"]
  config = config_loading.load_config(f"{REPO}/configs/digits_cnn.py")
  config.checkpoint.async_save = False
  config_loading.apply_overrides(config, overrides)
  assert config.mesh.data == -1
  assert config.optim.learning_rate == 0.01
  assert config.train.num_steps == 1000 and isinstance(config.train.num_steps, int)
  assert config.data.shuffle is False and config.checkpoint.async_save is True
  assert config.data.synthetic_input_shape == (4, 4, 3)
  assert config.data.mean == 0.5  # A placeholder(float) field, None by default.
  schema.validate(config)

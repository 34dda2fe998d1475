r"""Batch inference with a SavedModel on Ray Data.

  python -m serving.batch_predict --saved_model=/models/digits/3 --input=rows.npz \
      --output=/out/predictions [--num_actors=2] [--batch_size=256] [--ray_address=auto] \
      [--prediction_log=/logs/batch]
  python -m serving.batch_predict --model=digits@production ...   (needs the MLflow registry)

Reads the input rows (npz, ArrayRecord or Parquet; serving/batch_predict/inputs.py), splits them
into Ray blocks, runs them through a fixed pool of `--num_actors` actors that each load the
SavedModel once and call its signature (`Dataset.map_batches` with `ActorPoolStrategy`), and
writes Parquet files to `--output` (a new directory, renamed into place when complete): per input
row its index `row`, every output of the signature, `model_name` and `model_version`.
`--prediction_log` also writes the results as PredictionLog TFRecords in the online log's format
(mlops/prediction_log.py), one request per row.

Ray: an embedded local instance by default (bound to 127.0.0.1, no dashboard, usage stats off);
`--ray_address=HOST:PORT` or `auto` joins a running cluster instead.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import sys
import time
import uuid

from absl import flags, logging

from serving.batch_predict import inputs as inputs_lib
from serving.batch_predict import predictor

FLAGS = flags.FLAGS
DEFAULT_BATCH_SIZE = 256
# At most this many batches per Ray block.
BATCHES_PER_BLOCK = 16
LOCAL_START_ATTEMPTS = 3
# A local Ray's shared memory for blocks (the inputs and outputs in flight); beyond it Ray
# spills to disk.
DEFAULT_OBJECT_STORE_BYTES = 512 << 20


class BatchPredictError(ValueError):
  """Bad flags, inputs or cluster addresses; printed as one line."""


@dataclasses.dataclass(frozen=True)
class Signature:
  input_name: str
  row_shape: tuple[int, ...]
  dtype: str


@dataclasses.dataclass(frozen=True)
class BatchResult:
  output: str
  rows: int
  seconds: float
  model_name: str
  model_version: int
  prediction_log: str | None = None


def read_signature(saved_model: str, signature_name: str) -> Signature:
  """The signature's single input (name, per-row shape, dtype) from saved_model.pb."""
  import tensorflow as tf
  from tensorflow.core.protobuf import saved_model_pb2

  path = os.path.join(saved_model, "saved_model.pb")
  if not os.path.isfile(path):
    raise BatchPredictError(f"--saved_model={saved_model} is not a SavedModel directory")
  with open(path, "rb") as f:
    meta_graph = saved_model_pb2.SavedModel.FromString(f.read()).meta_graphs[0]
  if signature_name not in meta_graph.signature_def:
    raise BatchPredictError(
      f"{saved_model} has no signature {signature_name!r}; it has "
      f"{sorted(meta_graph.signature_def)}"
    )
  signature_inputs = meta_graph.signature_def[signature_name].inputs
  if len(signature_inputs) != 1:
    raise BatchPredictError(f"signature {signature_name!r} takes {len(signature_inputs)} inputs")
  (name, info), *_ = signature_inputs.items()
  dims = [d.size for d in info.tensor_shape.dim[1:]]
  if any(d < 0 for d in dims):
    raise BatchPredictError(f"input {name!r} has variable dimensions {dims}; batch needs fixed")
  return Signature(name, tuple(dims), tf.dtypes.as_dtype(info.dtype).as_numpy_dtype().dtype.name)


def resolve_model(model: str | None, saved_model: str | None, model_name: str | None):
  """(export directory, model name, version) from --saved_model or --model=name@alias."""
  if model and saved_model:
    raise BatchPredictError("give --model or --saved_model, not both")
  if model:
    from mlops import profile

    if "@" not in model and "/" not in model:
      raise BatchPredictError(f"--model={model} is not NAME@ALIAS or NAME/VERSION")
    try:
      return profile.resolve_registered(model)
    except profile.ProfileError as e:
      raise BatchPredictError(f"--model={model}: {e}") from e
  if not saved_model:
    raise BatchPredictError("give --saved_model=BASE/VERSION (or --model=NAME@ALIAS)")
  saved_model = os.path.normpath(saved_model)
  version = os.path.basename(saved_model)
  if not version.isdigit():
    raise BatchPredictError(
      f"--saved_model={saved_model} should be a numeric version directory (BASE/VERSION)"
    )
  return saved_model, model_name or os.path.basename(os.path.dirname(saved_model)), int(version)


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
  """Fails fast on a HOST:PORT that does not answer (ray.init would retry for a minute)."""
  host, _, port = address.rpartition(":")
  if not host or not port.isdigit():
    raise BatchPredictError(f"--ray_address={address} is not HOST:PORT or auto")
  host = host.removeprefix("ray://")
  try:
    with socket.create_connection((host, int(port)), timeout=timeout_s):
      pass
  except OSError as e:
    raise BatchPredictError(
      f"--ray_address={address} does not answer ({e.strerror or e}); start the cluster "
      "(`ray start --head`) or omit --ray_address for a local Ray"
    ) from e


def init_ray(
  address: str | None,
  num_cpus: int | None,
  num_actors: int = 2,
  object_store_bytes: int = DEFAULT_OBJECT_STORE_BYTES,
) -> bool:
  """Connects to (or starts) Ray; True when this call started it (and should shut it down).

  A local Ray gets at least num_actors + 1 logical CPUs: each actor holds one for its life, and
  the Parquet write tasks need one beside them (else they wait until every batch is done).
  """
  os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no network at run time
  import ray

  if ray.is_initialized():
    return False
  if address:
    if address != "auto":
      _check_reachable(address)
    try:
      ray.init(address=address, log_to_driver=False)
    except ConnectionError as e:
      raise BatchPredictError(f"--ray_address={address}: {str(e).splitlines()[0]}") from e
    return True
  for attempt in range(1, LOCAL_START_ATTEMPTS + 1):
    try:
      ray.init(
        num_cpus=num_cpus or max(os.cpu_count() or 1, num_actors + 1),
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        object_store_memory=object_store_bytes,
        log_to_driver=False,
      )
      return True
    except Exception as e:
      if "timed out during startup" not in str(e) or attempt == LOCAL_START_ATTEMPTS:
        raise
      # The raylet gives its agents a fixed 15 s to start (ray#65983): on a loaded machine
      # the first start can miss it.
      logging.warning("Local Ray did not start (%s); retrying", str(e).splitlines()[0])
  return True


def batch_sizes(batch_size: int, batching_parameters_file: str | None) -> tuple[int, ...]:
  """The server's batch sizes up to `batch_size` (which must be one of them)."""
  from serving.server import batching

  try:
    options = batching.read_batching_parameters(batching_parameters_file)
  except ValueError as e:
    raise BatchPredictError(f"--batching_parameters_file: {e}") from e
  sizes = options.batch_sizes
  if batch_size not in sizes:
    raise BatchPredictError(
      f"--batch_size={batch_size} is not one of the model server's batch sizes {list(sizes)}; "
      "pick one so batch and online inference run the same shapes"
    )
  return tuple(s for s in sizes if s <= batch_size)


def run(
  saved_model: str,
  input_path: str,
  output: str,
  *,
  model_name: str,
  model_version: int,
  num_actors: int = 2,
  batch_size: int = DEFAULT_BATCH_SIZE,
  signature_name: str = "serving_default",
  input_key: str | None = None,
  batching_parameters_file: str | None = None,
  prediction_log_dir: str | None = None,
) -> BatchResult:
  """Predicts every input row with `saved_model` on Ray (already initialized: init_ray).

  Raises BatchPredictError or inputs.InputError before writing anything; `output` appears
  complete or not at all.
  """
  import ray

  if os.path.exists(output):
    raise BatchPredictError(f"--output={output} exists; results never overwrite, pick a new one")
  if num_actors < 1:
    raise BatchPredictError(f"--num_actors={num_actors} must be at least 1")
  sizes = batch_sizes(batch_size, batching_parameters_file)
  signature = read_signature(saved_model, signature_name)
  key = input_key or signature.input_name
  rows = inputs_lib.read_inputs(input_path, key, signature.row_shape, signature.dtype)
  start = time.perf_counter()
  # Small blocks of whole batches: they stream through the pool within Ray Data's object store
  # budget (one block of a quarter of the rows each stalls a pool of 1 on 500k rows).
  per_block = batch_size * max(
    1, min(BATCHES_PER_BLOCK, -(-len(rows) // (batch_size * num_actors)))
  )
  blocks = inputs_lib.to_blocks(rows, signature.input_name, per_block)
  dataset = ray.data.from_arrow(blocks).map_batches(
    predictor.SavedModelPredictor,
    fn_constructor_kwargs={
      "saved_model": os.path.abspath(saved_model),
      "signature_name": signature_name,
      "input_name": signature.input_name,
      "row_shape": signature.row_shape,
      "input_dtype": signature.dtype,
      "batch_sizes": sizes,
      "model_name": model_name,
      "model_version": model_version,
    },
    batch_size=batch_size,
    batch_format="pyarrow",
    compute=ray.data.ActorPoolStrategy(size=num_actors),
    num_cpus=1,
  )
  tmp = f"{output.rstrip('/')}.tmp-{uuid.uuid4().hex[:8]}"
  try:
    dataset.write_parquet(os.path.abspath(tmp))
    os.rename(tmp, output)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  seconds = time.perf_counter() - start
  log_path = None
  if prediction_log_dir:
    log_path = write_prediction_log(output, prediction_log_dir, signature, rows)
  return BatchResult(output, len(rows), seconds, model_name, model_version, log_path)


def read_output(output: str):
  """The Parquet results as one pyarrow Table ordered by `row`."""
  import pyarrow.parquet as pq

  table = pq.read_table(output)
  return table.sort_by(predictor.ROW_COLUMN)


def write_prediction_log(output: str, directory: str, signature: Signature, rows) -> str:
  """The results as PredictionLog records (one request per row) in `directory`."""
  import numpy as np

  from mlops import prediction_log

  table = read_output(output)
  names = [
    c
    for c in table.column_names
    if c not in (predictor.ROW_COLUMN, predictor.MODEL_NAME_COLUMN, predictor.MODEL_VERSION_COLUMN)
  ]
  outputs = {}
  for name in names:
    column = table.column(name).combine_chunks()
    shape = []
    kind = column.type
    while hasattr(kind, "list_size"):
      shape.append(kind.list_size)
      kind = kind.value_type
    outputs[name] = predictor.from_arrow(column, tuple(shape))
  order = table.column(predictor.ROW_COLUMN).to_numpy()
  model_name = table.column(predictor.MODEL_NAME_COLUMN)[0].as_py()
  version = int(table.column(predictor.MODEL_VERSION_COLUMN)[0].as_py())
  now_us, run_id = int(time.time() * 1e6), uuid.uuid4().hex[:8]
  records = []
  for i, row in enumerate(order):
    meta = prediction_log.RecordMetadata(
      request_id=f"batch-{run_id}-{row}", time_us=now_us, model_name=model_name, version=version
    )
    records.append(
      prediction_log.make_record(
        {signature.input_name: rows[row : row + 1]},
        {k: np.asarray(v[i : i + 1]) for k, v in outputs.items()},
        meta,
      )
    )
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, f"batch-{run_id}.tfrecord")
  prediction_log.write_records(path, records)
  return path


def define_flags() -> None:
  """The CLI's flags (defined only when run as a program; see __main__.py)."""
  flags.DEFINE_string("saved_model", None, "The export (BASE/VERSION) to run.")
  flags.DEFINE_string("model", None, "NAME@ALIAS through the MLflow model registry.")
  flags.DEFINE_string("model_name", None, "Name recorded per row; default: BASE's name.")
  flags.DEFINE_string("input", None, "Input rows: .npz, ArrayRecord or Parquet (glob or dir).")
  flags.DEFINE_string("input_key", None, "Array/column of the input; default: the signature's.")
  flags.DEFINE_string("output", None, "New directory for the Parquet results.")
  flags.DEFINE_string("prediction_log", None, "Also write PredictionLog TFRecords here.")
  flags.DEFINE_string("signature_name", "serving_default", "The signature to call.")
  flags.DEFINE_integer("batch_size", DEFAULT_BATCH_SIZE, "Rows per model call (a server size).")
  flags.DEFINE_string("batching_parameters_file", None, "The server's batching.config.")
  flags.DEFINE_integer("num_actors", 2, "Actors in the pool (each loads the model once).")
  flags.DEFINE_string("ray_address", None, "A Ray cluster (HOST:PORT or auto); default local.")
  flags.DEFINE_integer("num_cpus", None, "CPUs of the local Ray; default: all.")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    print(f"error: unexpected arguments {argv[1:]}", file=sys.stderr)
    sys.exit(1)
  import logging as std_logging

  std_logging.getLogger("ray").setLevel(std_logging.WARNING)  # Ray Data's progress lines
  started = False
  try:
    saved_model, name, version = resolve_model(FLAGS.model, FLAGS.saved_model, FLAGS.model_name)
    if not FLAGS.input or not FLAGS.output:
      raise BatchPredictError("--input and --output are required")
    if os.path.exists(FLAGS.output):
      raise BatchPredictError(f"--output={FLAGS.output} exists; pick a new directory")
    started = init_ray(FLAGS.ray_address, FLAGS.num_cpus, FLAGS.num_actors)
    result = run(
      saved_model,
      FLAGS.input,
      FLAGS.output,
      model_name=name,
      model_version=version,
      num_actors=FLAGS.num_actors,
      batch_size=FLAGS.batch_size,
      signature_name=FLAGS.signature_name,
      input_key=FLAGS.input_key,
      batching_parameters_file=FLAGS.batching_parameters_file,
      prediction_log_dir=FLAGS.prediction_log,
    )
  except (BatchPredictError, inputs_lib.InputError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  finally:
    if started:
      import ray

      ray.shutdown()
  logging.info("Batch predictions: %s", result)
  print(
    f"predicted {result.rows} rows with {name} version {version} in {result.seconds:.1f} s "
    f"({result.rows / max(result.seconds, 1e-9):.0f} rows/s) -> {result.output}"
  )
  if result.prediction_log:
    print(f"prediction log: {result.prediction_log}")

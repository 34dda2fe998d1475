"""`python -m serving.client` against a model server of a tiny byte-level LM: the --metadata
table, Predict, --text in and out, one-line errors, no TensorFlow runtime in the client, and
nothing on stderr; and the client's tensor conversion and generate inputs without a server."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest

pytest.importorskip("tensorflow_serving", reason="the serving side needs tensorflow-serving-api")

from configs import lm as lm_config
from serving import lm_text, model_client
from serving.api_protos import get_model_metadata_pb2, tensor_pb2, types_pb2
from serving.export import exporter
from tests.helpers import model_server
from trainer import train
from trainer.data import text as text_data

MAX_NEW_TOKENS = 4
PROMPT = "def main("


@pytest.fixture(scope="module")
def served(tmp_path_factory):
  """(server, LM workdir): a tiny byte-level LM (signatures serving_default and generate),
  trained for a few steps and served as model "lm"."""
  root = tmp_path_factory.mktemp("client")
  config = lm_config.get_config("size=tiny,smoke")
  config.data.worker_threads = 0
  config.data.max_bytes = 60_000
  config.data.eval_every_documents = 4
  config.train.num_steps = 4
  train.train_and_evaluate(config, str(root / "lm_run"), jax.devices()[:1])
  exporter.export(str(root / "lm_run"), str(root / "models"), max_new_tokens=MAX_NEW_TOKENS)
  args = ["--model_name=lm", f"--model_base_path={root / 'models'}"]
  server = model_server.Server(args, str(root / "server.log"), model_name="lm")
  try:
    # Four signatures to warm up; a shared 2-core machine has taken over 3 minutes.
    server.wait_ready(timeout_s=600)
    yield server, str(root / "models" / "1")
  finally:
    server.stop()


@pytest.fixture(scope="module")
def saved_model(served):
  """The served SavedModel, loaded in this process: what the client's answers must equal (the
  export's parity gate holds it to the JAX model)."""
  import tensorflow as tf

  return tf.saved_model.load(served[1])


def _client(server, *args: str, code: str | None = None) -> subprocess.CompletedProcess:
  command = ["-m", "serving.client"] if code is None else ["-c", code]
  return subprocess.run(
    # A first request of a new shape compiles on the server: slow on a busy machine.
    [
      sys.executable,
      *command,
      f"--server=127.0.0.1:{server.grpc_port}",
      "--timeout_seconds=300",
      *args,
    ],
    cwd=model_server.REPO,
    env={k: v for k, v in model_server.SERVER_ENV.items() if k != "TF_CPP_MIN_LOG_LEVEL"},
    capture_output=True,
    text=True,
    timeout=400,
  )


def _ok(result: subprocess.CompletedProcess) -> str:
  assert (result.returncode, result.stderr) == (0, ""), result.stderr[-2000:]
  return result.stdout


def test_metadata_prints_one_aligned_row_per_tensor(served):
  server = served[0]
  assert _ok(_client(server, "--model=lm", "--metadata")).splitlines() == [
    "signature        kind    tensor       dtype    shape",
    "generate         input   tokens       int32    [-1, -1]",
    f"generate         output  tokens       int32    [-1, {MAX_NEW_TOKENS}]",
    "generate_text    input   text         string   [-1]",
    "generate_text    output  text         string   [-1]",
    f"generate_text    output  tokens       int32    [-1, {MAX_NEW_TOKENS}]",
    "sample           input   seed         int32    [-1]",
    "sample           input   temperature  float32  [-1]",
    "sample           input   tokens       int32    [-1, -1]",
    "sample           input   top_k        int32    [-1]",
    f"sample           output  tokens       int32    [-1, {MAX_NEW_TOKENS}]",
    "serving_default  input   tokens       int32    [-1, -1]",
    f"serving_default  output  log_probs    float32  [-1, {text_data.VOCAB_SIZE}]",
  ]
  summary = json.loads(_ok(_client(server, "--model=lm", "--metadata", "--json")))
  assert summary["generate"]["inputs"]["tokens"] == {"dtype": "int32", "shape": [-1, -1]}


def test_predict_table_and_json_match_the_saved_model(served, saved_model, tmp_path):
  server = served[0]
  prompt = np.array([list(b"import o"), list(b"def f(x)")], np.int32)
  expected = saved_model.signatures["serving_default"](tokens=prompt)["log_probs"].numpy()
  (tmp_path / "prompt.json").write_text(json.dumps({"tokens": prompt.tolist()}))
  args = ("--model=lm", f"--input={tmp_path}/prompt.json")
  answer = json.loads(_ok(_client(server, *args, "--json")))
  assert answer["version"] == 1
  np.testing.assert_allclose(answer["outputs"]["log_probs"], expected, rtol=1e-6, atol=1e-6)
  lines = _ok(_client(server, *args)).splitlines()
  assert lines[:2] == ["version 1", "row  log_probs"]
  first = [float(v) for v in lines[2].split()[1:11]]
  np.testing.assert_allclose(first, expected[0, :10], rtol=1e-3)
  assert lines[2].endswith(f"... ({expected.shape[1]} values)") and len(lines) == 4


def _text_of(tokens: list[int]) -> str:
  """The continuation the token contract defines: bytes up to the first EOS, as UTF-8."""
  ends = tokens.index(text_data.EOS_ID) if text_data.EOS_ID in tokens else len(tokens)
  return bytes(t for t in tokens[:ends] if t < 256).decode(errors="replace")


def test_text_in_text_out_equals_the_saved_models_generate(served, saved_model):
  server = served[0]
  prompt = np.array([list(PROMPT.encode())], np.int32)  # The text's bytes, no BOS.
  expected = saved_model.signatures["generate"](tokens=prompt)["tokens"].numpy()[0].tolist()
  assert len(expected) == MAX_NEW_TOKENS
  generated = json.loads(_ok(_client(server, "--model=lm", f"--text={PROMPT}", "--json")))
  assert generated["tokens"] == expected
  assert generated["text"] == _text_of(expected)
  assert _ok(_client(server, "--model=lm", f"--text={PROMPT}")) == _text_of(expected) + "\n"


def test_sampling_flags_use_the_sample_signature_where_the_export_has_one(served, saved_model):
  server = served[0]
  args = ("--model=lm", f"--text={PROMPT}", "--temperature=1.5", "--top_k=5", "--seed=3", "--json")
  if "sample" not in saved_model.signatures:
    result = _client(server, *args)
    assert result.returncode == 1
    assert result.stderr == (
      "error: this export decodes greedily only (no temperature, top_k input); re-export the "
      "model with a newer serving.export to sample\n"
    )
    return
  expected = (
    saved_model.signatures["sample"](
      tokens=np.array([list(PROMPT.encode())], np.int32),
      temperature=np.float32([1.5]),
      top_k=np.int32([5]),
      seed=np.int32([3]),
    )["tokens"]
    .numpy()[0]
    .tolist()
  )
  first, again = (json.loads(_ok(_client(server, *args))) for _ in range(2))
  assert first["tokens"] == again["tokens"] == expected  # A fixed seed repeats.
  assert first["text"] == _text_of(expected)


def test_a_bad_request_is_a_one_line_error(served):
  result = _client(served[0], "--model=lm", "--text=hi", "--signature_name=generate", "--input=x")
  assert (result.returncode, result.stderr) == (1, "error: give --input or --text, not both\n")
  result = _client(served[0], "--model=nope", "--text=hi")
  assert result.returncode == 1 and result.stderr.startswith("error: server answered NOT_FOUND")
  assert result.stderr.count("\n") == 1


def test_the_client_never_starts_tensorflow(served):
  """A Predict in a fresh interpreter leaves TensorFlow's runtime unimported."""
  code = (
    "import runpy, sys\n"
    "sys.argv = ['serving.client', *sys.argv[1:]]\n"
    "try:\n  runpy.run_module('serving.client', run_name='__main__')\n"
    "except SystemExit:\n  pass\n"
    "print(sorted(m for m in sys.modules if m == 'tensorflow' or m.startswith('tensorflow.p')))\n"
  )
  out = _ok(_client(served[0], "--model=lm", f"--text={PROMPT}", code=code))
  assert out.splitlines()[-1] == "[]"


def test_the_server_started_without_native_notices(served):
  with open(served[0].log_path) as f:
    log = f.read()
  assert "absl::InitializeLog" not in log and "cudart_stub" not in log and "cuInit" not in log


def test_tokens_are_the_trainers_bytes_plus_bos_and_eos():
  assert (lm_text.BOS_ID, lm_text.EOS_ID, lm_text.PAD_ID) == (
    text_data.BOS_ID,
    text_data.EOS_ID,
    text_data.PAD_ID,
  )
  np.testing.assert_array_equal(lm_text.encode_prompt("é("), text_data.encode("é("))
  with pytest.raises(model_client.ClientError, match="the prompt is empty"):
    lm_text.encode_prompt("")
  assert (
    lm_text.decode_continuation([104, 105, text_data.PAD_ID, 33, text_data.EOS_ID, 65]) == "hi!"
  )
  assert lm_text.decode_continuation([0xC3]) == "\ufffd"  # A character cut in half.


def _signature(**inputs):
  """A SignatureDef with inputs {name: (dtype enum, rank)}."""
  signature = get_model_metadata_pb2.SignatureDefMap().signature_def["generate"]
  for name, (dtype, rank) in inputs.items():
    signature.inputs[name].dtype = dtype
    for _ in range(rank):
      signature.inputs[name].tensor_shape.dim.add(size=-1)
  return signature


def test_generate_inputs_fill_what_the_signature_declares():
  signature = _signature(
    tokens=(types_pb2.DT_INT32, 2),
    lengths=(types_pb2.DT_INT32, 1),
    temperature=(types_pb2.DT_FLOAT, 1),
    top_k=(types_pb2.DT_INT32, 0),
    seed=(types_pb2.DT_INT64, 0),
  )
  prompt = lm_text.encode_prompt("ab")
  inputs = lm_text.generate_inputs(signature, prompt, lm_text.Sampling(0.5, 7, 3))
  assert inputs["tokens"].tolist() == [[97, 98]]
  assert (inputs["lengths"].tolist(), inputs["lengths"].dtype) == ([2], np.int32)
  assert (inputs["temperature"].tolist(), inputs["temperature"].dtype) == ([0.5], np.float32)
  assert (inputs["top_k"].shape, int(inputs["top_k"])) == ((), 7)
  assert (inputs["seed"].dtype, int(inputs["seed"])) == (np.int64, 3)
  with pytest.raises(model_client.ClientError, match="input 'beam_width' is not known"):
    lm_text.generate_inputs(
      _signature(tokens=(types_pb2.DT_INT32, 2), beam_width=(types_pb2.DT_INT32, 0)),
      prompt,
      lm_text.Sampling(),
    )


def test_a_connection_names_a_model_and_one_way_to_pick_its_version():
  with pytest.raises(model_client.ClientError, match="a model name is required"):
    model_client.Connection("localhost:8500", "")
  with pytest.raises(model_client.ClientError, match="not both"):
    model_client.Connection("localhost:8500", "digits", version=2, version_label="stable")


@pytest.mark.parametrize(
  "value",
  [
    np.arange(6, dtype=np.float32).reshape(2, 3),
    np.array([[1, 2]], np.int64),
    np.array([True, False]),
    np.array([b"a", b"bc"], dtype=object),
  ],
)
def test_tensor_protos_round_trip_without_tensorflow(value):
  proto = tensor_pb2.TensorProto()
  model_client.to_tensor_proto(value, proto)
  decoded = model_client.from_tensor_proto(proto)
  assert decoded.dtype == value.dtype and decoded.tolist() == value.tolist()


def test_values_in_typed_fields_repeat_the_last_one_as_tensorflow_writes_them():
  proto = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, float_val=[1.0, 2.0])
  proto.tensor_shape.dim.add(size=4)
  assert model_client.from_tensor_proto(proto).tolist() == [1.0, 2.0, 2.0, 2.0]


def test_greedy_text_goes_to_generate_and_sampling_to_sample():
  both = ("generate", "sample", "serving_default")
  assert lm_text.signature_for(lm_text.Sampling(), both) == "generate"
  assert lm_text.signature_for(lm_text.Sampling(seed=4), both) == "generate"
  assert lm_text.signature_for(lm_text.Sampling(temperature=0.7), both) == "sample"
  assert lm_text.signature_for(lm_text.Sampling(top_k=3), both) == "sample"
  with pytest.raises(model_client.ClientError, match="needs a language model with a 'generate'"):
    lm_text.signature_for(lm_text.Sampling(), ("serving_default", "classify"))
  greedy_only = _signature(tokens=(types_pb2.DT_INT32, 2))
  with pytest.raises(model_client.ClientError, match="decodes greedily only"):
    lm_text.generate_inputs(greedy_only, lm_text.encode_prompt("a"), lm_text.Sampling(0.5))

"""The language model: packing, masking, decoding, sharding, remat, FLOPs."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import lm as lm_config
from models import decoding, transformer
from tests.helpers.steps import WrappedStep
from trainer import partitioning, train
from trainer.data import text as text_data


def _lm_config(**overrides):
  config = lm_config.get_config("smoke")
  config.data.worker_threads = 0
  config.data.max_bytes = 60_000
  config.data.eval_every_documents = 4
  for dotted, value in overrides.items():
    section, key = dotted.split(".")
    config[section][key] = value
  return config


def test_tokenizer_round_trips_text():
  text = "def f(x):\n  return 'héllo' + x\n"
  ids = text_data.encode(text)
  assert ids.max() < text_data.BYTE_VOCAB
  assert text_data.decode(np.concatenate([[text_data.BOS_ID], ids, [text_data.EOS_ID]])) == text


def test_stdlib_corpus_is_found():
  files = text_data.stdlib_source_files()
  assert len(files) > 100
  assert any(f.endswith("os.py") for f in files)


def test_packing_marks_document_boundaries():
  docs = [np.arange(1, 6), np.arange(10, 13), np.arange(20, 30)]  # 5, 3 and 10 bytes.
  source = text_data.PackedTextSource(docs, seq_len=8)
  # Stream: [BOS 1..5 EOS][BOS 10 11 12 EOS][BOS 20..29 EOS] = 7 + 5 + 12 = 24 tokens.
  assert len(source) == (24 - 1) // 8
  row = source[0]
  np.testing.assert_array_equal(row["inputs"], [256, 1, 2, 3, 4, 5, 257, 256])
  np.testing.assert_array_equal(row["targets"], [1, 2, 3, 4, 5, 257, 256, 10])
  np.testing.assert_array_equal(row["segment_ids"], [1, 1, 1, 1, 1, 1, 1, 2])
  np.testing.assert_array_equal(row["positions"], [0, 1, 2, 3, 4, 5, 6, 0])
  # Predicting the next document's BOS from this one's EOS is masked out.
  np.testing.assert_array_equal(row["loss_mask"], [1, 1, 1, 1, 1, 1, 0, 1])
  row = source[1]  # Starts mid-document: positions continue, segments renumber from 1.
  assert row["positions"][0] == 1 and row["segment_ids"][0] == 1


def test_attention_stays_inside_each_document():
  model = transformer.LM_TINY(vocab_size=text_data.VOCAB_SIZE)
  tokens = jax.random.randint(jax.random.PRNGKey(0), (1, 12), 0, 256)
  segments = jnp.array([[1] * 5 + [2] * 7])
  positions = jnp.array([list(range(5)) + list(range(7))])
  params = model.init(jax.random.PRNGKey(1), tokens)["params"]

  def logits(t):
    return model.apply({"params": params}, t, positions=positions, segment_ids=segments)

  changed = tokens.at[0, :5].set((tokens[0, :5] + 1) % 256)  # Rewrite the first document only.
  np.testing.assert_allclose(logits(changed)[0, 5:], logits(tokens)[0, 5:], atol=1e-6)
  assert not np.allclose(logits(changed)[0, :5], logits(tokens)[0, :5])
  # Without segment ids the second document would see the first.
  plain = lambda t: model.apply({"params": params}, t)  # noqa: E731
  assert not np.allclose(plain(changed)[0, 5:], plain(tokens)[0, 5:])


def test_greedy_decoding_with_cache_matches_recomputation():
  model = transformer.LM_TINY(vocab_size=text_data.VOCAB_SIZE)
  prompt = jax.random.randint(jax.random.PRNGKey(1), (2, 5), 0, 256)
  params = model.init(jax.random.PRNGKey(0), prompt)["params"]
  generate = jax.jit(
    lambda p, x: decoding.generate(model, p, x, jax.random.PRNGKey(0), max_new_tokens=4)
  )
  generated = generate(params, prompt)
  sequence = prompt
  for _ in range(4):  # No cache: rerun the whole sequence for every token.
    next_token = model.apply({"params": params}, sequence)[:, -1].argmax(-1)
    sequence = jnp.concatenate([sequence, next_token[:, None].astype(jnp.int32)], axis=1)
  np.testing.assert_array_equal(generated, sequence[:, 5:])


def _tiny_lm_and_params(vocab_size=text_data.VOCAB_SIZE):
  model = transformer.LM_TINY(vocab_size=vocab_size)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"]
  return model, params


def test_ragged_prompts_decode_as_each_would_alone():
  model, params = _tiny_lm_and_params()
  rng = np.random.default_rng(0)
  prompts = [rng.integers(0, 256, n).astype(np.int32) for n in (1, 5, 9)]
  padded = np.full((3, 9), text_data.PAD_ID, np.int32)
  for i, p in enumerate(prompts):
    padded[i, : len(p)] = p
  run = jax.jit(
    lambda x, n: decoding.generate(
      model, params, x, jax.random.PRNGKey(0), max_new_tokens=6, lengths=n
    )
  )
  together = np.asarray(run(padded, np.array([1, 5, 9], np.int32)))
  for i, p in enumerate(prompts):
    alone = np.asarray(run(p[None], np.array([len(p)], np.int32)))
    np.testing.assert_array_equal(together[i], alone[0], err_msg=f"prompt of length {len(p)}")
  # Without the lengths, the padding is read as prompt and the short prompts change.
  unmasked = np.asarray(run(padded, np.array([9, 9, 9], np.int32)))
  assert not np.array_equal(unmasked[:2], together[:2])


def test_sampling_is_seeded_per_row_and_greedy_at_temperature_zero():
  model, params = _tiny_lm_and_params()
  prompt = jnp.asarray(np.random.default_rng(1).integers(0, 256, (3, 4)), jnp.int32)

  def run(seeds, temperature, top_k):
    keys = jax.vmap(jax.random.PRNGKey)(jnp.asarray(seeds))
    return np.asarray(
      decoding.generate(
        model,
        params,
        prompt,
        keys,
        max_new_tokens=8,
        temperature=jnp.asarray(temperature, jnp.float32),
        top_k=jnp.asarray(top_k, jnp.int32),
        vocab_size=text_data.VOCAB_SIZE,
      )
    )

  hot = run([1, 2, 3], [1.5] * 3, [0] * 3)
  np.testing.assert_array_equal(hot, run([1, 2, 3], [1.5] * 3, [0] * 3))  # Fixed seeds repeat.
  assert not np.array_equal(hot, run([4, 5, 6], [1.5] * 3, [0] * 3))
  assert hot.max() < text_data.VOCAB_SIZE  # Never an id of the padded embedding rows.
  greedy = decoding.generate(
    model, params, prompt, jax.random.PRNGKey(0), max_new_tokens=8, vocab_size=text_data.VOCAB_SIZE
  )
  np.testing.assert_array_equal(run([1, 2, 3], [0.0] * 3, [5] * 3), greedy)
  # top_k=1 samples the argmax whatever the temperature.
  np.testing.assert_array_equal(run([7, 8, 9], [2.0] * 3, [1] * 3), greedy)
  # A row's continuation does not depend on its neighbours' settings.
  mixed = run([1, 2, 3], [1.5, 0.0, 1.5], [0, 0, 0])
  np.testing.assert_array_equal(mixed[[0, 2]], hot[[0, 2]])
  np.testing.assert_array_equal(mixed[1], greedy[1])


def test_sampling_respects_temperature_and_top_k():
  logits = jnp.log(jnp.array([[0.1, 0.2, 0.3, 0.4]] * 512))
  greedy = decoding.sample_token(logits, jax.random.PRNGKey(0), temperature=0.0, top_k=0)
  assert set(np.asarray(greedy)) == {3}
  top2 = decoding.sample_token(logits, jax.random.PRNGKey(0), temperature=1.0, top_k=2)
  assert set(np.asarray(top2)) == {2, 3}
  free = decoding.sample_token(logits, jax.random.PRNGKey(0), temperature=1.0, top_k=0)
  assert set(np.asarray(free)) == {0, 1, 2, 3}


def test_flops_formula_counts_the_parameters():
  # GPT-3's own vocabulary (GPT-2's 50257 BPE ids, padded to 50304), so the count compares.
  model = transformer.LM_125M(vocab_size=50304)
  tokens = jnp.zeros((1, 8), jnp.int32)
  params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), tokens))["params"]
  total = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
  norms = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params) if len(p.shape) == 1)
  attention = 12 * 12 * 12 * 64 * 1024
  # Tied embedding: every non-norm parameter is one matmul weight.
  assert model.flops_per_token(1024) == pytest.approx(6 * (total - norms) + attention)
  assert 120e6 < total < 135e6  # GPT-3 Small: 125M.


MESHES = {
  "fsdp8": dict(data=1, fsdp=8, tensor=1),
  "data4_tensor2": dict(data=4, fsdp=1, tensor=2),
  "data2_fsdp2_tensor2": dict(data=2, fsdp=2, tensor=2),
}


def _losses(config, workdir, devices=None):
  config.train.num_steps = 5
  config.train.log_every_steps = 1
  config.eval.every_steps = 5
  config.checkpoint.enabled = False
  result = train.train_and_evaluate(config, str(workdir), devices=devices)
  assert sorted(result.logged_losses) == list(range(1, config.train.num_steps + 1))
  return np.array([result.logged_losses[s] for s in sorted(result.logged_losses)])


@pytest.fixture(scope="module")
def single_device_lm_losses(tmp_path_factory):
  return _losses(_lm_config(), tmp_path_factory.mktemp("lm1"), jax.devices()[:1])


@pytest.mark.parametrize("mesh", sorted(MESHES))
def test_lm_meshes_match_single_device(single_device_lm_losses, tmp_path, mesh):
  config = _lm_config()
  config.mesh.update(MESHES[mesh])
  np.testing.assert_allclose(_losses(config, tmp_path), single_device_lm_losses, rtol=1e-4)
  assert single_device_lm_losses[-1] < single_device_lm_losses[0]


def _built_state(config):
  experiment = train.build_experiment(config)
  state = experiment.init_state(jax.random.PRNGKey(0))
  partitioning.check_sharding(state, experiment.state_shardings)
  return state.params


def test_fsdp_holds_a_quarter_of_each_large_matrix():
  params = _built_state(_lm_config(**{"mesh.data": 2, "mesh.fsdp": 4}))
  for path, array in jax.tree_util.tree_leaves_with_path(params):
    if array.ndim >= 2:
      shard = array.addressable_shards[0].data
      assert shard.size * 4 == array.size, jax.tree_util.keystr(path)


def test_tensor_parallelism_splits_heads_and_mlp_megatron_style():
  params = _built_state(_lm_config(**{"mesh.data": 4, "mesh.tensor": 2}))
  block = params["block_0"]

  def shard_shape(array):
    return array.addressable_shards[0].data.shape

  query = block["attention"]["query"]["kernel"]  # (embed, heads, head_dim)
  assert shard_shape(query) == (query.shape[0], query.shape[1] // 2, query.shape[2])
  out = block["attention"]["out"]["kernel"]  # (heads, head_dim, embed)
  assert shard_shape(out) == (out.shape[0] // 2, *out.shape[1:])
  gate = block["mlp"]["gate"]["kernel"]  # (embed, mlp): column-parallel
  assert shard_shape(gate) == (gate.shape[0], gate.shape[1] // 2)
  down = block["mlp"]["down"]["kernel"]  # (mlp, embed): row-parallel
  assert shard_shape(down) == (down.shape[0] // 2, down.shape[1])


def _one_lm_step(remat):
  config = _lm_config(**{"model.remat": remat, "optim.warmup_steps": 0})
  experiment = train.build_experiment(config, jax.devices()[:1])
  state = experiment.init_state(jax.random.PRNGKey(0))
  rows = [experiment.dataset.train[i] for i in range(16)]
  batch = {k: jnp.asarray(np.stack([row[k] for row in rows])) for k in rows[0]}
  state, metrics = experiment.train_step(state, batch)
  return jax.device_get(state.params), jax.device_get(metrics)


@pytest.fixture(scope="module")
def step_without_remat():
  return _one_lm_step("none")


@pytest.mark.parametrize("remat", ["full", "dots_saveable"])
def test_remat_policies_compute_the_same_step(step_without_remat, remat):
  base_params, base_metrics = step_without_remat
  params, metrics = _one_lm_step(remat)
  np.testing.assert_allclose(metrics["train/loss"], base_metrics["train/loss"], rtol=1e-6)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), params, base_params
  )


def test_steps_compile_once_and_norms_run_only_where_metrics_are_read(tmp_path):
  config = _lm_config(
    **{
      "train.num_steps": 6,
      "train.log_every_steps": 3,
      "eval.every_steps": 3,
      "checkpoint.every_steps": 2,
    }
  )
  experiment = train.build_experiment(config)
  plain, diagnostic = WrappedStep(experiment.loop_step), WrappedStep(experiment.diagnostic_step)
  experiment = dataclasses.replace(experiment, loop_step=plain, diagnostic_step=diagnostic)
  from trainer import checkpointing
  from trainer.metrics import MetricWriter

  checkpointer = checkpointing.Checkpointer(
    str(tmp_path), config.checkpoint, best_metric="eval/loss", best_mode="min"
  )
  state, iterator, loop_state = train._initial_state(experiment, checkpointer)
  loop = train.TrainLoop(
    experiment, checkpointer, MetricWriter(str(tmp_path / "tb")), 0, loop_state
  )
  result = loop.run(state, iterator)
  checkpointer.close()
  assert result.step == 6
  # Each step compiled once, before the first step, through 6 steps, 2 evals, 3 saves and the
  # final test eval (a compiled executable never retraces); the norms ran on the steps saved,
  # evaluated or logged (2, 3, 4, 6), the cheap step on the others (1, 5).
  assert (plain.lowerings, diagnostic.lowerings) == (1, 1)
  assert (plain.calls, diagnostic.calls) == (2, 4)
  assert experiment.eval_step._cache_size() == 1
  assert (
    result.train_metrics["train/grad_norm"] > 0 and result.train_metrics["train/param_norm"] > 0
  )


def test_bfloat16_lm_keeps_float32_parameters(tmp_path):
  config = _lm_config(
    **{"model.dtype": "bfloat16", "train.num_steps": 3, "checkpoint.enabled": False}
  )
  result = train.train_and_evaluate(config, str(tmp_path), devices=jax.devices()[:1])
  assert np.isfinite(result.train_metrics["train/loss"])
  experiment = train.build_experiment(config)
  assert {leaf.dtype for leaf in jax.tree.leaves(experiment.abstract_state.params)} == {
    np.dtype("float32")
  }


def test_mfu_and_tokens_per_second_are_logged(tmp_path):
  from tensorboard.backend.event_processing import event_accumulator

  config = _lm_config(**{"perf.peak_tflops": 0.5, "checkpoint.enabled": False})
  config.train.num_steps = 10
  train.train_and_evaluate(config, str(tmp_path))
  events = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
  events.Reload()
  tags = set(events.Tags()["scalars"])
  assert {"perf/mfu", "perf/tflops_per_device", "perf/tokens_per_sec", "eval/perplexity"} <= tags
  mfu = events.Scalars("perf/mfu")[-1].value
  tflops = events.Scalars("perf/tflops_per_device")[-1].value
  assert mfu == pytest.approx(tflops / 0.5, rel=1e-4)


def test_user_text_and_token_array_record_files(tmp_path):
  texts = [f"document {i}: " + "lorem ipsum dolor sit amet " * 20 for i in range(12)]
  for i, text in enumerate(texts):
    (tmp_path / f"doc{i:02d}.txt").write_text(text)
  text_config = _lm_config(
    **{"data.files": str(tmp_path / "*.txt"), "data.eval_every_documents": 6}
  )
  from trainer.data import load_dataset

  from_text = load_dataset(text_config.data)
  text_data.write_token_array_record(
    str(tmp_path / "tokens.array_record"), [text_data.encode(t) for t in texts]
  )
  records_config = _lm_config(
    **{"data.files": str(tmp_path / "*.array_record"), "data.eval_every_documents": 6}
  )
  from_records = load_dataset(records_config.data)
  # The same documents through either format pack into the same rows.
  assert len(from_text.train) == len(from_records.train) > 0
  np.testing.assert_array_equal(from_text.train.stream, from_records.train.stream)
  row = from_records.train[0]
  assert text_data.decode(row["inputs"]).startswith("document 1: lorem")


def test_token_array_record_rejects_ids_outside_the_byte_vocabulary(tmp_path):
  text_data.write_token_array_record(str(tmp_path / "bad.array_record"), [np.array([1, 300])])
  config = _lm_config(**{"data.files": str(tmp_path / "bad.array_record")})
  from trainer.data import load_dataset
  from trainer.errors import ConfigError

  with pytest.raises(ConfigError, match=r"token id 300 outside the byte vocabulary"):
    load_dataset(config.data)

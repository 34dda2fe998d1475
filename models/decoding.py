"""Autoregressive decoding for `TransformerLM` with a key/value cache: greedy, temperature, top-k.

`generate` is a pure function of fixed shapes, so it jits (and exports) as one program: the
prompt fills the cache in one pass, then a `lax.scan` emits one token per step.

Ragged prompts: a batch holds prompts of different lengths right-padded to one width, with their
`lengths`. Padding is written to the cache but masked out of attention, and each row's positions
continue from its own length, so every prompt decodes exactly as it would alone. Sampling is
per row too (each row's own temperature, top-k and random key), so a row's continuation does not
depend on what else is in the batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from models.transformer import TransformerLM


def init_cache(model: TransformerLM, batch_size: int, max_length: int) -> dict:
  """An empty cache for `batch_size` sequences of up to `max_length` tokens."""
  tokens = jnp.zeros((batch_size, max_length), jnp.int32)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), tokens, decode=True))
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["cache"])


def sample_token(
  logits: jax.Array,
  rng: jax.Array,
  *,
  temperature: float | jax.Array,
  top_k: int | jax.Array,
) -> jax.Array:
  """Next token ids (batch,) from logits (batch, vocab).

  `temperature` and `top_k` are scalars or one value per row, static or traced: a row with
  temperature 0 takes the argmax (greedy), a row with top_k > 0 samples among its k most likely
  tokens only. `rng` is one key (split per row) or one key per row (batch, key).
  """
  batch, vocab = logits.shape
  temperature = jnp.broadcast_to(jnp.asarray(temperature, jnp.float32), (batch,))
  top_k = jnp.broadcast_to(jnp.asarray(top_k, jnp.int32), (batch,))
  keys = rng if rng.ndim == 2 else jax.random.split(rng, batch)
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  scaled = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]
  descending = -jnp.sort(-scaled, axis=-1)
  kth = jnp.take_along_axis(descending, jnp.clip(top_k - 1, 0, vocab - 1)[:, None], axis=-1)
  keep = (top_k[:, None] <= 0) | (scaled >= kth)
  filtered = jnp.where(keep, scaled, -jnp.inf)
  sampled = jax.vmap(lambda key, row: jax.random.categorical(key, row))(keys, filtered)
  return jnp.where(temperature > 0, sampled.astype(jnp.int32), greedy)


def generate(
  model: TransformerLM,
  params: dict,
  prompt: jax.Array,
  rng: jax.Array,
  *,
  max_new_tokens: int,
  lengths: jax.Array | None = None,
  temperature: float | jax.Array = 0.0,
  top_k: int | jax.Array = 0,
  vocab_size: int | None = None,
) -> jax.Array:
  """Continues `prompt` (batch, width) by `max_new_tokens`; returns (batch, max_new_tokens).

  `lengths` (batch,), each in [1, width]: the real tokens of each right-padded prompt (default:
  all of them). `temperature`/`top_k`: scalars or per row (see sample_token); greedy at
  temperature 0. `rng`: one key, or one per row (batch, key) for continuations that do not
  depend on the batch. `vocab_size`: sample only ids below it (the model's embedding table
  may be padded beyond the real vocabulary).
  """
  batch, width = prompt.shape
  if lengths is None:
    lengths = jnp.full((batch,), width, jnp.int32)
  lengths = jnp.asarray(lengths, jnp.int32)
  keys = rng if rng.ndim == 2 else jax.random.split(rng, batch)

  def sample(logits: jax.Array, index: int | jax.Array) -> jax.Array:
    logits = logits[:, :vocab_size] if vocab_size else logits
    step_keys = jax.vmap(lambda key: jax.random.fold_in(key, index))(keys)
    return sample_token(logits, step_keys, temperature=temperature, top_k=top_k)

  cache = init_cache(model, batch, width + max_new_tokens)
  slots = jnp.broadcast_to(jnp.arange(width), prompt.shape)
  logits, mutated = model.apply(
    {"params": params, "cache": cache},
    prompt,
    positions=slots,
    segment_ids=(slots < lengths[:, None]).astype(jnp.int32),
    decode=True,
    mutable=["cache"],
  )
  last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
  first = sample(last, 0)

  def step(carry, index):
    cache, token = carry
    logits, mutated = model.apply(
      {"params": params, "cache": cache},
      token[:, None],
      positions=(lengths + index)[:, None],
      segment_ids=jnp.ones((batch, 1), jnp.int32),
      decode=True,
      mutable=["cache"],
    )
    return (mutated["cache"], sample(logits[:, -1], index + 1)), token

  (_, last), tokens = jax.lax.scan(step, (mutated["cache"], first), jnp.arange(max_new_tokens - 1))
  return jnp.concatenate([tokens.T, last[:, None]], axis=1)  # (batch, max_new_tokens)

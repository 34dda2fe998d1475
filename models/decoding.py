"""Autoregressive decoding for `TransformerLM` with a key/value cache: greedy, temperature, top-k.

`generate` is a pure function of fixed shapes, so it jits (and exports) as one program: the
prompt fills the cache in one pass, then a `lax.scan` emits one token per step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from models.transformer import TransformerLM


def init_cache(model: TransformerLM, batch_size: int, max_length: int):
  """An empty cache for `batch_size` sequences of up to `max_length` tokens."""
  tokens = jnp.zeros((batch_size, max_length), jnp.int32)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), tokens, decode=True))
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["cache"])


def sample_token(logits: jax.Array, rng: jax.Array, *, temperature: float, top_k: int) -> jax.Array:
  """Next token ids (batch,) from logits (batch, vocab): greedy when temperature == 0."""
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  if top_k > 0:
    kth_largest = jax.lax.top_k(logits, top_k)[0][:, -1:]  # (batch, 1)
    logits = jnp.where(logits < kth_largest, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def generate(
  model: TransformerLM,
  params,
  prompt: jax.Array,
  rng: jax.Array,
  *,
  max_new_tokens: int,
  temperature: float = 0.0,
  top_k: int = 0,
) -> jax.Array:
  """Continues `prompt` (batch, prompt_len) by `max_new_tokens`; returns (batch, max_new_tokens).

  All prompts in a batch have the same length (pad them on the left for ragged prompts).
  `temperature` and `top_k` are static: each setting compiles its own program.
  """
  batch, prompt_len = prompt.shape
  cache = init_cache(model, batch, prompt_len + max_new_tokens)
  positions = jnp.broadcast_to(jnp.arange(prompt_len), prompt.shape)
  logits, mutated = model.apply(
    {"params": params, "cache": cache}, prompt, positions=positions, decode=True, mutable=["cache"]
  )
  first = sample_token(
    logits[:, -1], jax.random.fold_in(rng, 0), temperature=temperature, top_k=top_k
  )

  def step(carry, index):
    cache, token = carry
    position = jnp.full((batch, 1), prompt_len + index, jnp.int32)
    logits, mutated = model.apply(
      {"params": params, "cache": cache},
      token[:, None],
      positions=position,
      decode=True,
      mutable=["cache"],
    )
    next_token = sample_token(
      logits[:, -1], jax.random.fold_in(rng, index + 1), temperature=temperature, top_k=top_k
    )
    return (mutated["cache"], next_token), token

  (_, last), tokens = jax.lax.scan(step, (mutated["cache"], first), jnp.arange(max_new_tokens - 1))
  return jnp.concatenate([tokens.T, last[:, None]], axis=1)  # (batch, max_new_tokens)

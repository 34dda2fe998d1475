"""A decoder-only (GPT-style) language model.

Token embedding, rotary position embedding, RMSNorm, causal self-attention with grouped-query
heads through `jax.nn.dot_product_attention` (cuDNN flash attention on GPU), a SwiGLU MLP, and
optionally tied input/output embeddings. With `decode=True` it keeps a key/value cache in the
`cache` collection and consumes one chunk of tokens per call (see models/decoding.py).

Every parameter and large activation carries logical axis names: `vocab`, `embed`, `mlp`,
`heads`, `kv` (per-head features), `batch`, `length`. Tensor parallelism maps `heads` and `mlp`
to the `tensor` mesh axis: attention is split by heads and the MLP by its hidden width, as in
Megatron-LM, so each block needs one reduction after attention and one after the MLP.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

REMAT_POLICIES = {
  "none": None,
  "full": jax.checkpoint_policies.nothing_saveable,
  "dots_saveable": jax.checkpoint_policies.dots_saveable,
}


_LECUN_NORMAL = nn.initializers.lecun_normal()


def _init(axes, init=_LECUN_NORMAL):
  return nn.with_logical_partitioning(init, axes)


def rotary_embedding(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotates feature pairs of `x` (batch, length, heads, head_dim) by position-dependent angles."""
  half = x.shape[-1] // 2
  frequencies = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)  # (head_dim / 2,)
  angles = positions[..., None].astype(jnp.float32) * frequencies  # (batch, length, head_dim / 2)
  sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]
  first, second = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
  rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
  return rotated.astype(x.dtype)


class RMSNorm(nn.Module):
  dtype: jnp.dtype = jnp.float32
  epsilon: float = 1e-6

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param("scale", _init(("embed",), nn.initializers.ones_init()), (x.shape[-1],))
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.epsilon)
    return (normed * scale).astype(self.dtype)


class Attention(nn.Module):
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float
  dtype: jnp.dtype
  decode: bool = False

  @nn.compact
  def __call__(
    self,
    x: jax.Array,
    positions: jax.Array,
    mask: jax.Array | None,
    valid: jax.Array | None = None,
  ) -> jax.Array:
    """`valid` (batch, length), decoding only: which tokens of this chunk are real (padding
    is written to the cache but never attended to)."""
    dense = functools.partial(
      nn.DenseGeneral, dtype=self.dtype, param_dtype=jnp.float32, use_bias=False
    )
    q = dense(
      (self.num_heads, self.head_dim), kernel_init=_init(("embed", "heads", "kv")), name="query"
    )(x)
    k = dense(
      (self.num_kv_heads, self.head_dim), kernel_init=_init(("embed", "heads", "kv")), name="key"
    )(x)
    v = dense(
      (self.num_kv_heads, self.head_dim), kernel_init=_init(("embed", "heads", "kv")), name="value"
    )(x)
    # q: (batch, length, heads, head_dim); k, v: (batch, length, kv_heads, head_dim)
    q = nn.with_logical_constraint(q, ("batch", "length", "heads", "kv"))
    q = rotary_embedding(q, positions, self.rope_theta)
    k = rotary_embedding(k, positions, self.rope_theta)
    if self.decode:
      k, v, mask = self._update_cache(k, v, valid)
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=mask is None)
    out = nn.with_logical_constraint(out, ("batch", "length", "heads", "kv"))
    return nn.DenseGeneral(
      x.shape[-1],
      axis=(-2, -1),
      dtype=self.dtype,
      param_dtype=jnp.float32,
      use_bias=False,
      kernel_init=_init(("heads", "kv", "embed")),
      name="out",
    )(out)  # (batch, length, embed)

  def _update_cache(self, k: jax.Array, v: jax.Array, valid: jax.Array | None):
    """Writes this chunk's keys/values at the cache index; returns the full cache and its mask.

    The cache is sized at init (the length of the input then is the maximum decode length).
    Each row's mask is causal over the cache and skips the slots written as padding, so a
    padded prompt attends to exactly the keys it would alone.
    """
    batch, chunk = k.shape[:2]
    cached_k = self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
    cached_v = self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
    cached_valid = self.variable("cache", "cached_valid", jnp.zeros, (batch, chunk), bool)
    index = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
    if self.is_initializing():
      return k, v, None
    if valid is None:
      valid = jnp.ones((batch, chunk), bool)
    max_len = cached_k.value.shape[1]
    start = index.value
    cached_k.value = jax.lax.dynamic_update_slice(cached_k.value, k, (0, start, 0, 0))
    cached_v.value = jax.lax.dynamic_update_slice(cached_v.value, v, (0, start, 0, 0))
    cached_valid.value = jax.lax.dynamic_update_slice(cached_valid.value, valid, (0, start))
    index.value = start + chunk
    query_pos = start + jnp.arange(chunk)  # (chunk,)
    key_pos = jnp.arange(max_len)  # (max_len,)
    causal = key_pos[None, :] <= query_pos[:, None]  # (chunk, max_len): over what is cached.
    mask = causal[None, None] & cached_valid.value[:, None, None, :]  # (batch, 1, chunk, max_len)
    return cached_k.value, cached_v.value, mask


class MLP(nn.Module):
  hidden_dim: int
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=jnp.float32, use_bias=False)
    gate = dense(self.hidden_dim, kernel_init=_init(("embed", "mlp")), name="gate")(x)
    up = dense(self.hidden_dim, kernel_init=_init(("embed", "mlp")), name="up")(x)
    hidden = nn.with_logical_constraint(nn.silu(gate) * up, ("batch", "length", "mlp"))
    return dense(x.shape[-1], kernel_init=_init(("mlp", "embed")), name="down")(hidden)


class DecoderBlock(nn.Module):
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  rope_theta: float
  dtype: jnp.dtype
  decode: bool = False

  @nn.compact
  def __call__(
    self,
    x: jax.Array,
    positions: jax.Array,
    mask: jax.Array | None,
    valid: jax.Array | None = None,
  ) -> jax.Array:
    attention = Attention(
      self.num_heads,
      self.num_kv_heads,
      self.head_dim,
      self.rope_theta,
      self.dtype,
      self.decode,
      name="attention",
    )
    x = x + attention(RMSNorm(self.dtype, name="attention_norm")(x), positions, mask, valid)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    x = x + MLP(self.mlp_dim, self.dtype, name="mlp")(RMSNorm(self.dtype, name="mlp_norm")(x))
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class TransformerLM(nn.Module):
  vocab_size: int
  num_layers: int
  d_model: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  tie_embeddings: bool = True
  rope_theta: float = 10_000.0
  remat: str = "none"
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(
    self,
    tokens: jax.Array,
    *,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    train: bool = False,
    decode: bool = False,
  ) -> jax.Array:
    """Logits (batch, length, vocab) for `tokens` (batch, length).

    `segment_ids` keep attention inside each packed document; without them attention is
    plainly causal. Positions default to 0..length-1; decoding passes each chunk's own, and
    its `segment_ids` mark real tokens (non-zero) against padding (0).
    """
    del train  # No dropout: large-LM pretraining does without it.
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    embed = nn.Embed(
      self.vocab_size,
      self.d_model,
      dtype=self.dtype,
      param_dtype=jnp.float32,
      # Unit-variance logits at init when the embedding doubles as the output projection.
      embedding_init=_init(("vocab", "embed"), nn.initializers.normal(self.d_model**-0.5)),
      name="embed",
    )
    x = embed(tokens)  # (batch, length, embed)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    mask = valid = None
    if decode and segment_ids is not None:
      valid = segment_ids != 0
    elif segment_ids is not None:
      same_doc = segment_ids[:, :, None] == segment_ids[:, None, :]  # (batch, length, length)
      causal = jnp.tril(jnp.ones((tokens.shape[1], tokens.shape[1]), bool))
      mask = (same_doc & causal)[:, None]  # (batch, 1, length, length)
    block = DecoderBlock
    if REMAT_POLICIES.get(self.remat) is not None:
      block = nn.remat(DecoderBlock, policy=REMAT_POLICIES[self.remat], prevent_cse=True)
    for i in range(self.num_layers):
      x = block(
        self.num_heads,
        self.num_kv_heads,
        self.head_dim,
        self.mlp_dim,
        self.rope_theta,
        self.dtype,
        decode,
        name=f"block_{i}",
      )(x, positions, mask, valid)
    x = RMSNorm(self.dtype, name="final_norm")(x)
    if self.tie_embeddings:
      logits = embed.attend(x)
    else:
      logits = nn.Dense(
        self.vocab_size,
        dtype=self.dtype,
        param_dtype=jnp.float32,
        use_bias=False,
        kernel_init=_init(("embed", "vocab")),
        name="unembed",
      )(x)
    logits = nn.with_logical_constraint(logits, ("batch", "length", "vocab"))
    return logits.astype(jnp.float32)  # (batch, length, vocab)

  def flops_per_token(self, seq_len: int) -> float:
    """Training FLOPs per token: 6 * matmul parameters + 12 * layers * heads * head_dim * seq_len.

    The first term counts every weight matmul forward and backward (the embedding lookup is not
    a matmul; a tied embedding is counted once, as the output projection); the second the
    attention score and value matmuls (PaLM, Chowdhery et al. 2022, appendix B).
    """
    attention = self.d_model * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
    mlp = 3 * self.d_model * self.mlp_dim
    matmul_params = self.num_layers * (attention + mlp) + self.vocab_size * self.d_model
    return 6.0 * matmul_params + 12.0 * self.num_layers * self.num_heads * self.head_dim * seq_len


def _swiglu_width(d_model: int) -> int:
  """8/3 d_model (a SwiGLU MLP with the parameters of a 4 d_model GELU MLP), rounded to 128."""
  return -(-8 * d_model // 3 // 128) * 128


# GPT-3 sizes: Brown et al. 2020, "Language Models are Few-Shot Learners", Table 2.1
# (n_layers, d_model, n_heads, d_head). The table lists 24 heads of 128 for 1.3B, which does not
# multiply to its d_model of 2048; we use 16 heads of 128.
def _gpt3(num_layers: int, d_model: int, num_heads: int, head_dim: int):
  return functools.partial(
    TransformerLM,
    num_layers=num_layers,
    d_model=d_model,
    num_heads=num_heads,
    num_kv_heads=num_heads,
    head_dim=head_dim,
    mlp_dim=_swiglu_width(d_model),
  )


LM_TINY = functools.partial(
  TransformerLM, num_layers=2, d_model=64, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=128
)
LM_125M = _gpt3(12, 768, 12, 64)
LM_350M = _gpt3(24, 1024, 16, 64)
LM_760M = _gpt3(24, 1536, 16, 96)
LM_1_3B = _gpt3(24, 2048, 16, 128)

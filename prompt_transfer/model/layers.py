"""T5's building blocks in Flax linen: layer norm, dense, embedding, relative
position biases, attention, dropout and the feed-forward block.

Parameter names follow t5x/examples/t5/network.py (and layers.py there), so a
T5X checkpoint maps one-to-one. Shape letters: b batch, s encoder length
(prompt included), t decoder length, e emb_dim, h heads, d head_dim, m
mlp_dim, v vocab. Every MLP `sow`s its first projection (`pre_activation`) and
its hidden activation into `intermediates`: pass `mutable=['intermediates']`
to read FFN neurons (transferability, FPT). The FFN width comes from the bound
`wo` kernel, so FFN-reduced partial models run with the full model's config.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from prompt_transfer.model.config import DROPOUT_MASKS, T5Config

Array = jax.Array
Initializer = Callable[..., Array]

# Logical axis names (T5X conventions), mapped to mesh axes by partitioning.py.
BATCH, LENGTH, EMBED, MLP, HEADS, KV, VOCAB = ('batch', 'length', 'embed', 'mlp',
                                               'heads', 'kv', 'vocab')
JOINED_KV = 'joined_kv'


def _param(module: nn.Module, name: str, init: Initializer, shape: Tuple[int, ...],
           axes: Tuple[str, ...], dtype: Any) -> Array:
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


def constrain(x: Array, axes: Tuple[str, ...]) -> Array:
  # No-op without a mesh and axis rules in context; shards activations with them.
  return nn.with_logical_constraint(x, axes)


class LayerNorm(nn.Module):
  """T5's layer norm: RMS scaling only, no bias and no mean subtraction."""
  epsilon: float = 1e-6
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x32 = x.astype(jnp.float32)
    var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    y = x32 * jax.lax.rsqrt(var + self.epsilon)
    scale = _param(self, 'scale', nn.initializers.ones, (x.shape[-1],), (EMBED,),
                   self.param_dtype)
    return (y * scale.astype(jnp.float32)).astype(self.dtype)


class Dense(nn.Module):
  """A bias-free projection whose kernel is stored 2-D, as T5X stores it."""
  features: int
  kernel_axes: Tuple[str, str]
  kernel_init: Initializer = nn.initializers.lecun_normal()
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kernel = _param(self, 'kernel', self.kernel_init, (x.shape[-1], self.features),
                    self.kernel_axes, self.param_dtype)
    return _dot(x, kernel, self.dtype)


def _dot(x: Array, kernel: Array, dtype: Any) -> Array:
  """x [..., e] @ kernel [e, f] in `dtype`, accumulated in float32."""
  y = einsum('me,ef->mf', x.reshape(-1, x.shape[-1]), kernel, dtype, dtype)
  return y.reshape(*x.shape[:-1], kernel.shape[-1])


def einsum(spec: str, a: Array, b: Array, dtype: Any, out_dtype: Any) -> Array:
  """Two-operand einsum on `dtype` operands with float32 accumulation.

  float32 (or wider): a plain einsum. bfloat16 (or another 16-bit type): the forward
  and both backward products take `dtype` operands and accumulate in float32
  (what TPU/GPU matmul units do for a bf16 dot). Written out because JAX's
  own transpose of a float32-accumulating dot multiplies the float32
  cotangent with the bf16 operand, and XLA's CPU backend upcasts such mixed
  or bf16-output dots to float32 matmuls, 5x slower than bf16 ones with AMX.
  Every index of each operand must appear in the other operand or the output.
  """
  if jnp.dtype(dtype).itemsize >= 4:
    return jnp.einsum(spec, a.astype(dtype), b.astype(dtype)).astype(out_dtype)
  return _low_precision_einsum(spec, jnp.dtype(out_dtype), a.astype(dtype), b.astype(dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _low_precision_einsum(spec: str, out_dtype: Any, a: Array, b: Array) -> Array:
  return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32).astype(out_dtype)


def _low_precision_einsum_fwd(spec, out_dtype, a, b):
  return _low_precision_einsum(spec, out_dtype, a, b), (a, b)


def _low_precision_einsum_bwd(spec, out_dtype, residuals, g):
  del out_dtype
  a, b = residuals
  ins, out = spec.split('->')
  sa, sb = ins.split(',')
  g = g.astype(a.dtype)
  da = jnp.einsum(f'{out},{sb}->{sa}', g, b, preferred_element_type=jnp.float32)
  db = jnp.einsum(f'{sa},{out}->{sb}', a, g, preferred_element_type=jnp.float32)
  return da.astype(a.dtype), db.astype(b.dtype)


_low_precision_einsum.defvjp(_low_precision_einsum_fwd, _low_precision_einsum_bwd)


class Embed(nn.Module):
  """Token embedding table, also used as the tied output layer (T5 1.0)."""
  num_embeddings: int
  features: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    self.embedding = _param(self, 'embedding', nn.initializers.normal(stddev=1.0),
                            (self.num_embeddings, self.features), (VOCAB, EMBED),
                            self.param_dtype)

  def __call__(self, tokens: Array) -> Array:
    return jnp.take(self.embedding, tokens, axis=0).astype(self.dtype)

  def attend(self, x: Array) -> Array:
    return _dot(x, self.embedding.T, self.dtype)


def relative_position_bucket(relative_position: Array, bidirectional: bool,
                             num_buckets: int, max_distance: int) -> Array:
  """Maps key-minus-query offsets to T5's log-spaced buckets ([q, k] int32)."""
  ret = jnp.zeros_like(relative_position)
  n = -relative_position
  if bidirectional:
    num_buckets //= 2
    ret += (n < 0).astype(jnp.int32) * num_buckets
    n = jnp.abs(n)
  else:
    n = jnp.maximum(n, 0)
  max_exact = num_buckets // 2
  is_small = n < max_exact
  # Guard log(0); those positions take the exact branch anyway.
  val_if_large = max_exact + (
      jnp.log(jnp.maximum(n, 1).astype(jnp.float32) / max_exact) /
      math.log(max_distance / max_exact) * (num_buckets - max_exact)).astype(jnp.int32)
  val_if_large = jnp.minimum(val_if_large, num_buckets - 1)
  return ret + jnp.where(is_small, n, val_if_large)


class RelativePositionBiases(nn.Module):
  """Learned per-head bias of each relative-position bucket (shared by layers)."""
  config: T5Config
  bidirectional: bool

  @nn.compact
  def __call__(self, query_positions: Array, key_positions: Array) -> Array:
    """Positions [q] and [k] -> bias [1, h, q, k]."""
    cfg = self.config
    rel = key_positions[None, :] - query_positions[:, None]  # [q, k]
    buckets = relative_position_bucket(rel, self.bidirectional,
                                       cfg.relative_attention_num_buckets,
                                       cfg.relative_attention_max_distance)
    table = _param(self, 'rel_embedding', nn.initializers.normal(stddev=1.0),
                   (cfg.num_heads, cfg.relative_attention_num_buckets),
                   (HEADS, 'relpos_buckets'), cfg.param_dtype)
    bias = jnp.take(table, buckets, axis=1)  # [h, q, k]
    return bias[None].astype(cfg.dtype)


class MultiHeadAttention(nn.Module):
  """Multi-head dot-product attention with T5's conventions.

  No 1/sqrt(d) scaling in the forward pass: T5 folds it into the query
  initialisation, and checkpoints are trained that way.
  """
  config: T5Config

  @nn.compact
  def __call__(self, inputs_q: Array, inputs_kv: Array, mask: Optional[Array],
               bias: Optional[Array], enable_dropout: bool = False,
               decode: bool = False, cache_kv_once: bool = False) -> Array:
    """inputs_q [b, q, e], inputs_kv [b, k, e], mask [b, 1|h, q, k] -> [b, q, e].

    decode: autoregressive self-attention; the keys/values of each new position
      are written into the `cache` collection at `cache_index`.
    cache_kv_once: cross-attention while decoding; keys/values of the encoder
      output are projected on the cache-initialising call and reused after.
    """
    cfg = self.config
    b = inputs_q.shape[0]
    h, d = cfg.num_heads, cfg.head_dim
    query_init = nn.initializers.variance_scaling(1.0 / d, 'fan_in', 'normal')
    dense = functools.partial(Dense, features=h * d, kernel_axes=(EMBED, JOINED_KV),
                              dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    # Heads-major [b, h, len, d] throughout: the layout the attention dots
    # read, so XLA's CPU batched matmuls run 1.7-3.4x faster than on
    # [b, len, h, d] operands, and no decode step re-transposes a whole cache
    # (that copy was about half of the CPU decode time).
    q = dense(name='query', kernel_init=query_init)(inputs_q)
    q = q.reshape(b, -1, h, d).transpose(0, 2, 1, 3)  # [b, h, q, d]
    if cache_kv_once and self.has_variable('cache', 'cached_key'):
      k = self.get_variable('cache', 'cached_key')  # [b, h, k, d]
      v = self.get_variable('cache', 'cached_value')
    else:
      k = dense(name='key')(inputs_kv).reshape(b, -1, h, d).transpose(0, 2, 1, 3)
      v = dense(name='value')(inputs_kv).reshape(b, -1, h, d).transpose(0, 2, 1, 3)
      if cache_kv_once and self.is_mutable_collection('cache'):
        self.put_variable('cache', 'cached_key', k)
        self.put_variable('cache', 'cached_value', v)
    axes = (BATCH, HEADS, LENGTH, KV)
    q, k, v = constrain(q, axes), constrain(k, axes), constrain(v, axes)

    if decode:
      # Self-attention cache: [b, h, max_len, d] keys and values.
      is_initialized = self.has_variable('cache', 'cached_key')
      cached_key = self.variable('cache', 'cached_key', jnp.zeros, k.shape, k.dtype)
      cached_value = self.variable('cache', 'cached_value', jnp.zeros, v.shape, v.dtype)
      cache_index = self.variable('cache', 'cache_index',
                                  lambda: jnp.array(0, dtype=jnp.int32))
      if is_initialized:
        idx = cache_index.value
        k = jax.lax.dynamic_update_slice(cached_key.value, k, (0, 0, idx, 0))
        v = jax.lax.dynamic_update_slice(cached_value.value, v, (0, 0, idx, 0))
        cached_key.value, cached_value.value = k, v
        cache_index.value = idx + 1
        # Only keys at or before the current position are visible.
        visible = jnp.arange(k.shape[2]) <= idx
        mask = jnp.broadcast_to(visible[None, None, None, :], (b, 1, 1, k.shape[2]))

    # float32 accumulation from `dtype` operands: with float32 logits, the same
    # forward numbers as upcasting q and k first (a bf16 product is exact in
    # float32); the backward pass rounds the logits' cotangent to `dtype`.
    logits_dtype = jnp.float32 if cfg.float32_attention_logits else cfg.dtype
    logits = einsum('bhqd,bhkd->bhqk', q, k, cfg.dtype, logits_dtype)
    if bias is not None:
      logits = logits + bias.astype(logits_dtype)
    if mask is not None:
      logits = jnp.where(mask, logits, jnp.finfo(logits_dtype).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(cfg.dtype)
    if enable_dropout and cfg.dropout_rate > 0:
      weights = Dropout(cfg.dropout_rate, mask=cfg.dropout_mask)(weights)
    out = einsum('bhqk,bhkd->bhqd', weights, v, cfg.dtype, cfg.dtype)
    out = out.transpose(0, 2, 1, 3).reshape(b, -1, h * d)  # [b, q, h*d]
    return Dense(cfg.emb_dim, (JOINED_KV, EMBED), name='out', dtype=cfg.dtype,
                 param_dtype=cfg.param_dtype)(out)


_GOLDEN = 0x9E3779B9  # odd: the counter's multiplier is a bijection mod 2^32


def _fmix32(h: Array) -> Array:
  """MurmurHash3's 32-bit finaliser: a bijection with full avalanche."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def hash_keep_mask(seeds: Array, shape: Tuple[int, ...], rate: float) -> Array:
  """A bool keep mask of `shape`, P(keep) = 1 - rate, from two uint32 seeds.

  Each element hashes its own index (a counter-based generator, like threefry,
  but with 2 multiplies instead of 20 rounds). Written here because JAX's PRNGs
  are slow on the CPU: a [8, 6, 228, 228] mask costs 19.5 ms with threefry and
  12.5 ms with XLA's RngBitGenerator, 0.6 ms hashed (one vectorised fusion),
  and T5-small's step draws ~35M mask bits. The seeds come from the dropout
  key (jax.random), so masks differ per step, layer and run; seed 1 enters
  additively (two seeds give the same stream only shifted), seed 2 after a
  full hash, so shifted overlaps need both seeds to collide. The leading axis
  enters separately so masks of 2^32 elements or more do not repeat. Computed
  from iotas, it shards with the activations (no `threefry_partitionable`).
  """
  flat = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for d in reversed(range(len(shape))):  # row-major element index mod 2^32
    flat = flat + jax.lax.broadcasted_iota(jnp.uint32, shape, d) * jnp.uint32(stride % 2**32)
    stride *= shape[d]
  lead = (jax.lax.broadcasted_iota(jnp.uint32, shape, 0) * jnp.uint32(_GOLDEN)
          if shape else jnp.uint32(0))
  h = _fmix32(flat * jnp.uint32(_GOLDEN) + seeds[0])
  h = _fmix32(h ^ (seeds[1] + lead))
  # keep iff h >= rate * 2^32: exact to 2^-32.
  return h >= jnp.uint32(min(int(round(rate * 2**32)), 2**32 - 1))


class Dropout(nn.Module):
  """Inverted dropout (flax.linen.Dropout's arithmetic) with a choice of mask.

  mask 'hash' (default): hash_keep_mask seeded by two words drawn from the
  'dropout' rng; 'prng': flax's own Dropout (jax.random.bernoulli over the
  mask, the bits of the key's PRNG, see train.rng_impl).
  """
  rate: float
  broadcast_dims: Tuple[int, ...] = ()
  mask: str = 'hash'

  @nn.compact
  def __call__(self, x: Array) -> Array:
    if self.mask not in DROPOUT_MASKS:
      raise ValueError(f'dropout_mask must be one of {DROPOUT_MASKS}; got {self.mask!r}.')
    if self.rate == 0:
      return x
    if self.mask == 'prng':
      return nn.Dropout(self.rate, broadcast_dims=self.broadcast_dims)(x, deterministic=False)
    if self.rate >= 1.0:
      return jnp.zeros_like(x)
    dims = {d % x.ndim for d in self.broadcast_dims}
    shape = tuple(1 if d in dims else n for d, n in enumerate(x.shape))
    seeds = jax.random.bits(self.make_rng('dropout'), (2,), jnp.uint32)
    keep = hash_keep_mask(seeds, shape, self.rate)
    keep = jnp.broadcast_to(keep, x.shape)
    return jax.lax.select(keep, x / jnp.asarray(1.0 - self.rate, x.dtype), jnp.zeros_like(x))


_ACTIVATIONS = {
    'relu': jax.nn.relu,
    # Hugging Face's "gelu_new" (tanh approximation), which T5 1.1 was trained with.
    'gelu': functools.partial(jax.nn.gelu, approximate=True),
    'silu': jax.nn.silu,
    'linear': lambda x: x,
}


class MlpBlock(nn.Module):
  """T5's feed-forward block: wi (ReLU) or gated wi_0 * wi_1 (GELU), then wo.

  The width comes from the bound `wo` kernel when there is one, so FFN-reduced
  partial models (FPT) run unchanged. Sows `pre_activation` (the first
  projection, before its non-linearity: positive = neuron fires) and `hidden`
  (the input of wo) into `intermediates`.
  """
  config: T5Config

  @nn.compact
  def __call__(self, x: Array, enable_dropout: bool = False) -> Array:
    cfg = self.config
    bound = {} if self.is_initializing() else self.variables.get('params', {})
    width = bound['wo']['kernel'].shape[0] if 'wo' in bound else cfg.mlp_dim
    dense = functools.partial(Dense, width, (EMBED, MLP), dtype=cfg.dtype,
                              param_dtype=cfg.param_dtype)
    acts = cfg.mlp_activations
    names = ['wi'] if len(acts) == 1 else [f'wi_{i}' for i in range(len(acts))]
    projections = [dense(name=n)(x) for n in names]  # each [b, s, m]
    self.sow('intermediates', 'pre_activation', projections[0])
    h = _ACTIVATIONS[acts[0]](projections[0])
    for act, proj in zip(acts[1:], projections[1:]):
      h = h * _ACTIVATIONS[act](proj)
    h = constrain(h, (BATCH, LENGTH, MLP))
    self.sow('intermediates', 'hidden', h)
    if enable_dropout and cfg.dropout_rate > 0:
      h = Dropout(cfg.dropout_rate, mask=cfg.dropout_mask)(h)
    return Dense(cfg.emb_dim, (MLP, EMBED), name='wo', dtype=cfg.dtype,
                 param_dtype=cfg.param_dtype)(h)

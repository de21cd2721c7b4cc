"""Model configurations of the T5 family, as one frozen dataclass per model.

Following t5x/examples/t5/network.py: every hyper-parameter of the network sits in
`T5Config`, so modules take one `config` argument instead of a dozen kwargs.
Named configurations cover T5 1.0, T5 1.1, LM-adapted, Flan-T5 and mT5 in sizes
tiny (tests) to xxl.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax.numpy as jnp

# Vocabulary sizes as stored in public checkpoints (seqio adds 100 extra ids and
# T5X pads to a multiple of 128).
T5_VOCAB_SIZE = 32128
MT5_VOCAB_SIZE = 250112
# T5Config.dropout_mask values (layers.Dropout) and remat_policy values
# (network.REMAT_POLICIES).
DROPOUT_MASKS = ('hash', 'prng')
REMAT_POLICY_NAMES = ('dots', 'nothing')


class ConfigError(ValueError):
  """A model configuration that cannot be built; says the field, expected and got."""


@dataclasses.dataclass(frozen=True)
class T5Config:
  """Global hyper-parameters of a T5 encoder-decoder."""
  vocab_size: int = T5_VOCAB_SIZE
  emb_dim: int = 512
  num_heads: int = 8
  num_encoder_layers: int = 6
  num_decoder_layers: int = 6
  head_dim: int = 64
  mlp_dim: int = 2048
  # ('relu',) for T5 1.0; ('gelu', 'linear') is the gated-GELU of T5 1.1.
  mlp_activations: Sequence[str] = ('relu',)
  dropout_rate: float = 0.1
  # How dropout masks are drawn (layers.Dropout): 'hash' hashes each element's
  # index with two seeds from the dropout key (30x cheaper than threefry on a
  # CPU); 'prng' is flax's Dropout, jax.random.bernoulli with the key's PRNG.
  dropout_mask: str = 'hash'
  # T5 1.0 ties the output layer to the token embedding; T5 1.1 does not.
  logits_via_embedding: bool = True
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  # Activation dtype ('bfloat16': matmuls take bf16 operands and accumulate in
  # float32). Parameters stay in `param_dtype`; the trainer keeps FROZEN kernels
  # and embeddings in `dtype` (models.frozen_storage_dtype: same numbers).
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  float32_attention_logits: bool = True
  # Rematerialise each layer in the backward pass (saves activation memory).
  remat: bool = False
  # What remat keeps (network.REMAT_POLICIES): 'dots' keeps the outputs of the
  # weight projections and recomputes the cheap rest (layer norms, softmax,
  # GELU, dropout masks); 'nothing' recomputes the whole layer.
  remat_policy: str = 'dots'
  name: str = 't5'

  def __post_init__(self):
    # Checked here so a gin typo fails when the config is built, not at the
    # first traced step.
    if self.dropout_mask not in DROPOUT_MASKS:
      raise ConfigError(f'dropout_mask must be one of {DROPOUT_MASKS}; got {self.dropout_mask!r}.')
    if self.remat_policy not in REMAT_POLICY_NAMES:
      raise ConfigError(f'remat_policy must be one of {REMAT_POLICY_NAMES}; '
                        f'got {self.remat_policy!r}.')
    for field in ('dtype', 'param_dtype'):
      value = getattr(self, field)
      try:
        ok = jnp.issubdtype(jnp.dtype(value), jnp.floating)
      except TypeError:
        ok = False
      if not ok:
        raise ConfigError(f'{field} must be a floating dtype such as "float32" or "bfloat16"; '
                          f'got {value!r}.')

  def replace(self, **changes: Any) -> 'T5Config':
    return dataclasses.replace(self, **changes)

  @property
  def is_gated(self) -> bool:
    return len(self.mlp_activations) > 1

  def describe(self) -> dict:
    """A JSON-friendly description (for prompt sidecars and error messages)."""
    return {
        'name': self.name,
        'vocab_size': self.vocab_size,
        'emb_dim': self.emb_dim,
        'num_heads': self.num_heads,
        'head_dim': self.head_dim,
        'mlp_dim': self.mlp_dim,
        'num_encoder_layers': self.num_encoder_layers,
        'num_decoder_layers': self.num_decoder_layers,
        'mlp_activations': list(self.mlp_activations),
        'logits_via_embedding': self.logits_via_embedding,
    }


# (emb_dim, mlp_dim, num_heads, head_dim, num_layers) per size.
_T5_1_0_SIZES = {
    'tiny': (32, 64, 4, 8, 2),
    'small': (512, 2048, 8, 64, 6),
    'base': (768, 3072, 12, 64, 12),
    'large': (1024, 4096, 16, 64, 24),
    'xl': (1024, 16384, 32, 128, 24),
    'xxl': (1024, 65536, 128, 128, 24),
}
_T5_1_1_SIZES = {
    'tiny': (32, 64, 4, 8, 2),
    'small': (512, 1024, 6, 64, 8),
    'base': (768, 2048, 12, 64, 12),
    'large': (1024, 2816, 16, 64, 24),
    'xl': (2048, 5120, 32, 64, 24),
    'xxl': (4096, 10240, 64, 64, 24),
}

VARIANTS = ('t5_1_0', 't5_1_1', 'lm_adapted', 'flan', 'mt5')
SIZES = tuple(_T5_1_1_SIZES)


def get_config(variant: str = 't5_1_1', size: str = 'small', **overrides: Any) -> T5Config:
  """Returns the named configuration, e.g. get_config('lm_adapted', 'base').

  tiny configs use a byte-level vocabulary size by default (see overrides) so
  tests and the quick-start need no SentencePiece model.
  """
  if variant not in VARIANTS:
    raise ConfigError(f'Unknown T5 variant {variant!r}; expected one of {VARIANTS}.')
  if size not in SIZES:
    raise ConfigError(f'Unknown T5 size {size!r}; expected one of {SIZES}.')
  gated = variant != 't5_1_0'
  table = _T5_1_1_SIZES if gated else _T5_1_0_SIZES
  emb, mlp, heads, head_dim, layers = table[size]
  cfg = T5Config(
      vocab_size=MT5_VOCAB_SIZE if variant == 'mt5' else T5_VOCAB_SIZE,
      emb_dim=emb,
      num_heads=heads,
      head_dim=head_dim,
      mlp_dim=mlp,
      num_encoder_layers=layers,
      num_decoder_layers=layers,
      mlp_activations=('gelu', 'linear') if gated else ('relu',),
      # T5 1.1 checkpoints were pre-trained without dropout; fine-tuning uses 0.1.
      dropout_rate=0.1,
      logits_via_embedding=not gated,
      name=f'{variant}_{size}',
  )
  return cfg.replace(**overrides) if overrides else cfg

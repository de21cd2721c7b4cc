"""The T5 encoder-decoder in Flax linen, with a prompt slot on the encoder.

Layout and parameter names follow t5x/examples/t5/network.py, so a T5X
checkpoint maps one-to-one onto this module's parameter tree. The forward pass
equals Hugging Face's `T5ForConditionalGeneration` (tested against it). The
blocks (attention, MLP, ...) are in layers.py.

Shape letters: b batch, s encoder length (prompt included), t decoder length,
e emb_dim, h heads, d head_dim, m mlp_dim, v vocab, l prompt length.

Seams used by the methods:
  * `Transformer.prompt_module`: a prompt module factory (the contract is in
    prompts/slot.py: [l, e] shared or [b, l, e] per-example rows, a mask,
    auxiliary losses); its parameters live under `encoder/prompt/...` and are
    what the trainer updates; per-example features reach it via
    `prompt_features`;
  * the number of layers is read from the bound `layers_N` parameters when
    there are any, so a partial model (fewer layers, fewer FFN neurons) runs
    with the full model's config.
"""
from __future__ import annotations

import functools
import re
from typing import Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from prompt_transfer.model.config import T5Config
from prompt_transfer.model.layers import (BATCH, EMBED, LENGTH, VOCAB, Dense, Dropout, Embed,
                                          LayerNorm, MlpBlock, MultiHeadAttention,
                                          RelativePositionBiases, constrain)
from prompt_transfer.prompts.slot import PromptModuleFactory, PromptSlot

Array = jax.Array


def _dropout(cfg: T5Config, x: Array, enable_dropout: bool) -> Array:
  if not enable_dropout or cfg.dropout_rate == 0:
    return x
  # T5X shares each hidden-state mask along the sequence.
  return Dropout(cfg.dropout_rate, broadcast_dims=(-2,), mask=cfg.dropout_mask)(x)


class EncoderLayer(nn.Module):
  config: T5Config

  @nn.compact
  def __call__(self, x: Array, mask: Array, bias: Array, enable_dropout: bool = False
               ) -> Array:
    cfg = self.config
    ln = functools.partial(LayerNorm, cfg.layer_norm_epsilon, cfg.dtype, cfg.param_dtype)
    y = ln(name='pre_attention_layer_norm')(x)
    y = MultiHeadAttention(cfg, name='attention')(y, y, mask, bias, enable_dropout)
    x = x + _dropout(cfg, y, enable_dropout)
    y = ln(name='pre_mlp_layer_norm')(x)
    y = MlpBlock(cfg, name='mlp')(y, enable_dropout)
    x = x + _dropout(cfg, y, enable_dropout)
    return constrain(x, (BATCH, LENGTH, EMBED))


class DecoderLayer(nn.Module):
  config: T5Config

  @nn.compact
  def __call__(self, x: Array, encoded: Array, self_mask: Optional[Array],
               cross_mask: Array, bias: Array, enable_dropout: bool = False,
               decode: bool = False) -> Array:
    cfg = self.config
    ln = functools.partial(LayerNorm, cfg.layer_norm_epsilon, cfg.dtype, cfg.param_dtype)
    y = ln(name='pre_self_attention_layer_norm')(x)
    y = MultiHeadAttention(cfg, name='self_attention')(
        y, y, self_mask, bias, enable_dropout, decode=decode)
    x = x + _dropout(cfg, y, enable_dropout)
    y = ln(name='pre_cross_attention_layer_norm')(x)
    y = MultiHeadAttention(cfg, name='encoder_decoder_attention')(
        y, encoded, cross_mask, None, enable_dropout, cache_kv_once=decode)
    x = x + _dropout(cfg, y, enable_dropout)
    y = ln(name='pre_mlp_layer_norm')(x)
    y = MlpBlock(cfg, name='mlp')(y, enable_dropout)
    x = x + _dropout(cfg, y, enable_dropout)
    return constrain(x, (BATCH, LENGTH, EMBED))


def _num_layers(module: nn.Module, default: int) -> int:
  """Layer count from the bound `layers_N` parameters, else from the config."""
  if module.is_initializing():
    return default
  names = [k for k in module.variables.get('params', {}) if re.fullmatch(r'layers_\d+', k)]
  return len(names) if names else default


# config.remat_policy (one of config.REMAT_POLICY_NAMES) -> jax.checkpoint
# policy. 'dots' saves only the projections against weights (no batch dims), so
# the backward pass recomputes elementwise work and the small attention dots,
# not the matmuls.
REMAT_POLICIES = {
    'dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    'nothing': jax.checkpoint_policies.nothing_saveable,
}


def _layer_cls(cfg: T5Config, cls: type) -> type:
  # Recompute activations in the backward pass instead of storing them.
  if not cfg.remat:
    return cls
  # static_argnums count `self` as 0: the Python bools enable_dropout (and decode).
  return nn.remat(cls, static_argnums=(6, 7) if cls is DecoderLayer else (4,),
                  policy=REMAT_POLICIES[cfg.remat_policy])


class Encoder(nn.Module):
  """Embeds tokens, prepends the prompt, runs the layer stack."""
  config: T5Config
  shared_embedding: nn.Module
  # Factory of the prompt module (see prompts/slot.py); None = plain T5.
  prompt_module: Optional[PromptModuleFactory] = None

  @nn.compact
  def __call__(self, encoder_input_tokens: Array, enable_dropout: bool = False,
               prompt_features: Optional[Mapping[str, Array]] = None
               ) -> Tuple[Array, Array]:
    """tokens [b, s0] -> (encoded [b, l+s0, e], input mask [b, l+s0])."""
    cfg = self.config
    x = self.shared_embedding(encoder_input_tokens)  # [b, s0, e]
    mask = encoder_input_tokens > 0  # [b, s0]
    if self.prompt_module is not None:
      # [b, l+s0, e], [b, l+s0]: the prompt's rows first, masked as it says.
      features = {'encoder_input_tokens': encoder_input_tokens, **(prompt_features or {})}
      x, mask = PromptSlot(self.prompt_module, name='prompt')(
          x, mask, self.shared_embedding.embedding, features)
    x = constrain(x, (BATCH, LENGTH, EMBED))
    x = _dropout(cfg, x, enable_dropout)
    # Relative positions run over the prompt and the tokens as one sequence.
    positions = jnp.arange(x.shape[1])
    bias = RelativePositionBiases(cfg, bidirectional=True, name='relpos_bias')(
        positions, positions)  # [1, h, s, s]
    attn_mask = mask[:, None, None, :]  # [b, 1, 1, s]
    layer = _layer_cls(cfg, EncoderLayer)
    for i in range(_num_layers(self, cfg.num_encoder_layers)):
      x = layer(cfg, name=f'layers_{i}')(x, attn_mask, bias, enable_dropout)
    x = LayerNorm(cfg.layer_norm_epsilon, cfg.dtype, cfg.param_dtype,
                  name='encoder_norm')(x)
    return _dropout(cfg, x, enable_dropout), mask


class Decoder(nn.Module):
  """Causal layer stack over the decoder tokens, attending to the encoder."""
  config: T5Config
  shared_embedding: nn.Module

  @nn.compact
  def __call__(self, encoded: Array, encoder_mask: Array, decoder_input_tokens: Array,
               decoder_target_tokens: Optional[Array] = None, enable_dropout: bool = False,
               decode: bool = False, max_decode_length: Optional[int] = None) -> Array:
    """encoded [b, s, e], decoder tokens [b, t] -> logits [b, t, v].

    In decode mode t == 1 and the position comes from the cache index.
    """
    cfg = self.config
    y = self.shared_embedding(decoder_input_tokens)  # [b, t, e]
    y = _dropout(cfg, y, enable_dropout)
    t = decoder_input_tokens.shape[1]
    relpos = RelativePositionBiases(cfg, bidirectional=False, name='relpos_bias')
    if decode:
      initialized = self.has_variable('cache', 'position')
      step = self.variable('cache', 'position', lambda: jnp.array(0, jnp.int32))
      length = max_decode_length or t
      bias = relpos(step.value[None], jnp.arange(length))  # [1, h, 1, max_len]
      if initialized:
        step.value = step.value + 1
      self_mask = None  # attention builds it from its cache index
    else:
      positions = jnp.arange(t)
      bias = relpos(positions, positions)  # [1, h, t, t]
      causal = positions[None, :] <= positions[:, None]  # [t, t]
      self_mask = causal[None, None]
      if decoder_target_tokens is not None:
        # Padding targets attend nowhere useful; T5X masks them out too.
        valid = decoder_target_tokens > 0
        self_mask = self_mask & valid[:, None, :, None] & valid[:, None, None, :]
    cross_mask = encoder_mask[:, None, None, :]  # [b, 1, 1, s]
    layer = _layer_cls(cfg, DecoderLayer)
    for i in range(_num_layers(self, cfg.num_decoder_layers)):
      y = layer(cfg, name=f'layers_{i}')(y, encoded, self_mask, cross_mask, bias,
                                         enable_dropout, decode)
    y = LayerNorm(cfg.layer_norm_epsilon, cfg.dtype, cfg.param_dtype,
                  name='decoder_norm')(y)
    y = _dropout(cfg, y, enable_dropout)
    if cfg.logits_via_embedding:
      # Tied head: T5 rescales by 1/sqrt(e) before attending to the embedding.
      logits = self.shared_embedding.attend(y * (cfg.emb_dim ** -0.5))
    else:
      logits = Dense(cfg.vocab_size, (EMBED, VOCAB), name='logits_dense',
                     dtype=cfg.dtype, param_dtype=cfg.param_dtype)(y)
    return constrain(logits.astype(jnp.float32), (BATCH, LENGTH, VOCAB))


class Transformer(nn.Module):
  """T5 encoder-decoder with an optional prompt module on the encoder input."""
  config: T5Config
  # A factory (e.g. free.free_prompt(100)) rather than a module instance, so
  # the prompt's parameters live under encoder/prompt/.
  prompt_module: Optional[PromptModuleFactory] = None

  def setup(self):
    cfg = self.config
    self.token_embedder = Embed(cfg.vocab_size, cfg.emb_dim, cfg.dtype, cfg.param_dtype)
    self.encoder = Encoder(cfg, self.token_embedder, self.prompt_module)
    self.decoder = Decoder(cfg, self.token_embedder)

  def encode(self, encoder_input_tokens: Array, enable_dropout: bool = False,
             prompt_features: Optional[Mapping[str, Array]] = None) -> Tuple[Array, Array]:
    return self.encoder(encoder_input_tokens, enable_dropout, prompt_features)

  def decode(self, encoded: Array, encoder_mask: Array, decoder_input_tokens: Array,
             decoder_target_tokens: Optional[Array] = None, enable_dropout: bool = False,
             decode: bool = False, max_decode_length: Optional[int] = None) -> Array:
    return self.decoder(encoded, encoder_mask, decoder_input_tokens, decoder_target_tokens,
                        enable_dropout, decode, max_decode_length)

  def __call__(self, encoder_input_tokens: Array, decoder_input_tokens: Array,
               decoder_target_tokens: Optional[Array] = None, enable_dropout: bool = False,
               prompt_features: Optional[Mapping[str, Array]] = None) -> Array:
    """-> logits [b, t, v] (float32). prompt_features: per-example features
    for the prompt module (e.g. task_ids [b])."""
    encoded, mask = self.encode(encoder_input_tokens, enable_dropout, prompt_features)
    return self.decode(encoded, mask, decoder_input_tokens, decoder_target_tokens,
                       enable_dropout)

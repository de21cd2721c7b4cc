"""T5X-style model wrapper: loss, scoring and decoding around the Flax module.

`EncoderDecoderModel` holds no parameters; every method is a pure function of
(params, batch), so callers jit, shard and differentiate them as they need.
Batches are T5X's encoder-decoder features: `encoder_input_tokens`,
`decoder_input_tokens`, `decoder_target_tokens` (and optional
`decoder_loss_weights`), token 0 = padding and decoder BOS, 1 = EOS, plus the
per-example features a prompt module reads (`PROMPT_FEATURES`, e.g.
`task_ids`).
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from prompt_transfer.model import decoding
from prompt_transfer.model.config import T5Config
from prompt_transfer.model.network import Transformer
from prompt_transfer.prompts.slot import LOSSES, PromptModuleFactory, split_output

Array = jax.Array
Params = Mapping[str, Any]
Batch = Mapping[str, Array]

# Where prompt modules keep their parameters: the trainable subtree.
PROMPT_PATH = ('encoder', 'prompt')
# The features a model batch has (T5X's encoder-decoder features) ...
MODEL_FEATURES = ('encoder_input_tokens', 'decoder_input_tokens', 'decoder_target_tokens')
# ... and the per-example ones a prompt module may read, when the data carries them.
PROMPT_FEATURES = ('task_ids',)


def model_features(batch: Batch) -> dict:
  """The arrays the model reads (drops strings and other seqio extras)."""
  return {k: batch[k] for k in MODEL_FEATURES + PROMPT_FEATURES if k in batch}


def prompt_features(batch: Batch) -> Optional[dict]:
  """The batch's per-example prompt features, None when it has none."""
  out = {k: batch[k] for k in PROMPT_FEATURES if k in batch}
  return out or None


class EncoderDecoderModel:
  """A Flax T5 `module` plus the functions T5X's models provide."""

  def __init__(self, config: T5Config, module: Transformer, vocabulary: Any = None,
               z_loss: float = 1e-4, label_smoothing: float = 0.0,
               task_loss_weight: float = 1.0):
    self.config = config
    self.module = module
    self.vocabulary = vocabulary
    self.z_loss = z_loss
    self.label_smoothing = label_smoothing
    # 0: train on the prompt module's auxiliary losses alone (a projector's
    # distance minimisation); the task loss is still logged.
    self.task_loss_weight = task_loss_weight
    # Compiled once per batch shape; callers may still wrap them in their own jit.
    self._predict_jit = jax.jit(self._predict, static_argnames=('num_decodes',))
    self._score_jit = jax.jit(self._score)

  def with_config(self, **changes: Any) -> 'EncoderDecoderModel':
    """The same model (prompt module, vocabulary, losses) under
    config.replace(**changes); e.g. remat=False to count model FLOPs."""
    config = self.config.replace(**changes)
    return EncoderDecoderModel(config, self.module.clone(config=config), self.vocabulary,
                               z_loss=self.z_loss, label_smoothing=self.label_smoothing,
                               task_loss_weight=self.task_loss_weight)

  @property
  def prompt_module(self) -> Optional[PromptModuleFactory]:
    return self.module.prompt_module

  # ---- parameters -----------------------------------------------------------
  def _dummy_batch(self, batch_size: int = 1, input_len: int = 4, target_len: int = 4):
    return (jnp.ones((batch_size, input_len), jnp.int32),
            jnp.ones((batch_size, target_len), jnp.int32),
            jnp.ones((batch_size, target_len), jnp.int32))

  def _dummy_init(self, rng: Array) -> Any:
    # Per-example prompt modules (a bank, a projector over K prompts) need
    # their features even to build parameters: id 0 for every example.
    enc, dec, tgt = self._dummy_batch()
    features = {k: jnp.zeros((enc.shape[0],), jnp.int32) for k in PROMPT_FEATURES}
    return self.module.init(rng, enc, dec, tgt, prompt_features=features)

  def init_params(self, rng: Array) -> Params:
    """Random parameters (float32 arrays, logical-axis boxes removed)."""
    # One compiled program instead of hundreds of op-by-op dispatches.
    init = jax.jit(lambda rng: nn.unbox(self._dummy_init(rng)['params']))
    return init(rng)

  def param_shapes(self) -> Params:
    """Shape/dtype tree of every parameter, without allocating them."""
    boxed = jax.eval_shape(self._dummy_init, jax.random.PRNGKey(0))
    return nn.unbox(boxed['params'])

  def param_logical_axes(self) -> Params:
    """Tree of PartitionSpecs of logical axis names (see partitioning)."""
    boxed = jax.eval_shape(self._dummy_init, jax.random.PRNGKey(0))
    return nn.get_partition_spec(boxed['params'])

  def init_prompt(self, rng: Array, frozen_params: Params) -> Params:
    """Creates the prompt module's parameters given the frozen model's ones.

    Runs the prompt initialiser against the real (loaded) embedding table, so
    sampled-vocab and class-label inits read pretrained rows. Returns the full
    tree with `encoder/prompt` added.
    """
    enc, dec, tgt = self._dummy_batch()
    params = dict(frozen_params)
    params['encoder'] = {k: v for k, v in params['encoder'].items() if k != 'prompt'}
    features = {k: jnp.zeros((enc.shape[0],), jnp.int32) for k in PROMPT_FEATURES}
    @jax.jit
    def init(params, rng):
      _, variables = self.module.apply({'params': params}, enc, dec, tgt,
                                       prompt_features=features,
                                       rngs={'params': rng}, mutable=['params', LOSSES])
      # Only the new subtree leaves the jit: returning the whole tree would
      # copy every frozen weight into fresh output buffers.
      return nn.unbox(variables['params'])['encoder'].get('prompt')
    prompt = init(params, rng)
    if prompt is not None:
      params['encoder'] = {**params['encoder'], 'prompt': prompt}
    return params

  def materialize_prompt(self, params: Params, features: Optional[Batch] = None) -> Any:
    """The prompt rows the prompt module produces, as the encoder sees them.

    A shared module: one [l, e] array (rows its mask leaves out dropped).
    A per-example module: one [l_i, e] array per example of `features`
    (e.g. {'task_ids': [b]}); without features, one per prompt of a module
    with `num_prompts` (task ids 0..K-1). Numpy float32, on the host.
    """
    factory = self.prompt_module
    if factory is None:
      raise ValueError('This model has no prompt module.')
    module = factory()
    if features is None:
      k = getattr(module, 'num_prompts', None)
      features = {'task_ids': np.arange(k)} if k else {}
    n = len(next(iter(features.values()))) if features else 1
    feats = {'encoder_input_tokens': jnp.ones((n, 1), jnp.int32),
             **{k: jnp.asarray(v) for k, v in features.items()}}
    out = module.apply({'params': params['encoder']['prompt']['prompt']},
                       params['token_embedder']['embedding'], feats,
                       mutable=[LOSSES])[0]
    prompt, mask = split_output(out)
    prompt = np.asarray(jax.device_get(prompt), np.float32)
    mask = None if mask is None else np.asarray(jax.device_get(mask), bool)
    if prompt.ndim == 2:
      return prompt if mask is None else prompt[np.broadcast_to(mask, prompt.shape[:1])]
    if mask is None:
      return list(prompt)
    mask = np.broadcast_to(mask, prompt.shape[:2])
    return [p[m] for p, m in zip(prompt, mask)]

  # ---- training -------------------------------------------------------------
  def loss_fn(self, params: Params, batch: Batch, dropout_rng: Optional[Array]
              ) -> Tuple[Array, dict]:
    """Token-averaged cross entropy (+ z-loss) + the prompt module's auxiliary
    loss terms -> (loss, metrics); each term is also a metric `losses/<name>`."""
    logits, state = self.module.apply(
        {'params': params}, batch['encoder_input_tokens'], batch['decoder_input_tokens'],
        batch['decoder_target_tokens'], enable_dropout=dropout_rng is not None,
        prompt_features=prompt_features(batch),
        rngs={'dropout': dropout_rng} if dropout_rng is not None else None,
        mutable=[LOSSES])
    targets = batch['decoder_target_tokens']
    weights = batch.get('decoder_loss_weights', (targets > 0).astype(jnp.float32))
    weights = weights.astype(jnp.float32)
    ce, z = cross_entropy_with_z_loss(logits, targets, self.z_loss, self.label_smoothing)
    denom = jnp.maximum(jnp.sum(weights), 1.0)
    loss = self.task_loss_weight * jnp.sum((ce + z) * weights) / denom
    accuracy = jnp.sum((jnp.argmax(logits, -1) == targets) * weights) / denom
    metrics = {'cross_entropy': jnp.sum(ce * weights) / denom,
               'z_loss': jnp.sum(z * weights) / denom, 'token_accuracy': accuracy,
               'num_tokens': jnp.sum(weights)}
    for name, value in aux_losses(state).items():
      loss = loss + value
      metrics[f'{LOSSES}/{name}'] = value
    metrics['loss'] = loss
    return loss, metrics

  # ---- inference ------------------------------------------------------------
  def score_batch(self, params: Params, batch: Batch) -> Array:
    """Summed log-likelihood of each example's targets [b] (rank classification)."""
    return self._score_jit(params, _model_features(batch))

  def _score(self, params: Params, batch: Batch) -> Array:
    logits = self.module.apply({'params': params}, batch['encoder_input_tokens'],
                               batch['decoder_input_tokens'], batch['decoder_target_tokens'],
                               prompt_features=prompt_features(batch))
    targets = batch['decoder_target_tokens']
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    token_logp = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(token_logp * (targets > 0), axis=-1)

  def capture_activations(self, params: Params, batch: Batch, decoder: bool = True
                          ) -> dict:
    """FFN activations sown by every MLP block: the `intermediates` tree.

    Leaves: {encoder,decoder}/layers_i/mlp/{pre_activation,hidden}, each a
    1-tuple holding [b, len, mlp].
    """
    targets = batch.get('decoder_target_tokens', batch['decoder_input_tokens'])
    _, state = self.module.apply({'params': params}, batch['encoder_input_tokens'],
                                 batch['decoder_input_tokens'], targets,
                                 prompt_features=prompt_features(batch),
                                 mutable=['intermediates'])
    inter = state['intermediates']
    return inter if decoder else {'encoder': inter['encoder']}

  def predict_batch(self, params: Params, batch: Batch, num_decodes: int = 1,
                    length_penalty: float = 1.0, return_scores: bool = False) -> Any:
    """Decodes up to `decoder_input_tokens.shape[1]` tokens per example.

    num_decodes == 1: greedy; > 1: beam search with that many beams (the best
    beam is returned; a finished beam of n tokens scores sum(log p) /
    n ** length_penalty). Returns int32 tokens [b, max_len], zeros after EOS,
    and with return_scores=True also each sequence's score.
    """
    tokens, scores = self._predict_jit(params, _model_features(batch), num_decodes,
                                       jnp.float32(length_penalty))
    return (tokens, scores) if return_scores else tokens

  def _predict(self, params: Params, batch: Batch, num_decodes: int,
               length_penalty: Array) -> Tuple[Array, Array]:
    enc_tokens = batch['encoder_input_tokens']
    b, max_len = enc_tokens.shape[0], batch['decoder_input_tokens'].shape[1]
    encoded, mask = self.module.apply({'params': params}, enc_tokens,
                                      prompt_features=prompt_features(batch),
                                      method=Transformer.encode)
    # A full-length pass in decode mode creates the caches: zeros for
    # self-attention, projected encoder keys/values for cross-attention.
    _, state = self.module.apply(
        {'params': params}, encoded, mask, jnp.zeros((b, max_len), jnp.int32),
        decode=True, max_decode_length=max_len, method=Transformer.decode,
        mutable=['cache'])
    cache = state['cache']
    if num_decodes > 1:
      cache, encoded, mask = decoding.expand_for_beams((cache, encoded, mask), b, num_decodes)

    def step_fn(tokens, cache):
      logits, new_state = self.module.apply(
          {'params': params, 'cache': cache}, encoded, mask, tokens, decode=True,
          max_decode_length=max_len, method=Transformer.decode, mutable=['cache'])
      return logits[:, -1, :], new_state['cache']

    if num_decodes == 1:
      tokens, scores = decoding.greedy_search(step_fn, cache, b, max_len)
    else:
      seqs, beam_scores = decoding.beam_search(step_fn, cache, b, max_len, num_decodes,
                                               length_penalty)
      tokens, scores = seqs[:, 0], beam_scores[:, 0]
    return tokens, scores


def _model_features(batch: Batch) -> dict:
  return {k: jnp.asarray(v) for k, v in model_features(batch).items()}


def aux_losses(state: Mapping[str, Any]) -> dict:
  """{name: scalar} of the terms prompt modules sowed into the `losses`
  collection (a name sown several times is summed)."""
  out: dict = {}
  flat = traverse_util.flatten_dict(dict(state.get(LOSSES, {})))
  for path, values in flat.items():
    values = values if isinstance(values, tuple) else (values,)
    out[path[-1]] = out.get(path[-1], 0.0) + sum(jnp.sum(v) for v in values)
  return out


def cross_entropy_with_z_loss(logits: Array, targets: Array, z_loss: float = 0.0,
                              label_smoothing: float = 0.0) -> Tuple[Array, Array]:
  """Per-token cross entropy and T5X's z-loss (z_loss * log(Z)^2), both [b, t].

  optax has the cross entropy but not the z-loss term, which needs log(Z).
  """
  logits = logits.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  ce = log_z - target_logit
  if label_smoothing:
    ce = (1 - label_smoothing) * ce + label_smoothing * (log_z - jnp.mean(logits, -1))
  return ce, z_loss * jnp.square(log_z)


def build_model(config: T5Config, prompt_module: Optional[PromptModuleFactory] = None,
                vocabulary: Any = None, **model_kwargs: Any) -> EncoderDecoderModel:
  """The model with a prompt module (see prompts/slot.py; e.g.
  `free.free_prompt(100, init)`), or plain T5 without one."""
  module = Transformer(config, prompt_module=prompt_module)
  return EncoderDecoderModel(config, module, vocabulary, **model_kwargs)


def get_prompt(params: Params) -> Optional[Params]:
  """The prompt module's parameter subtree (None for a plain model)."""
  return params.get('encoder', {}).get('prompt')


def split_prompt(params: Params) -> Tuple[Params, Params]:
  """(trainable prompt subtree, frozen rest) of a full parameter tree."""
  frozen = dict(params)
  frozen['encoder'] = {k: v for k, v in params['encoder'].items() if k != 'prompt'}
  return params['encoder']['prompt'], frozen


def merge_prompt(prompt: Params, frozen: Params) -> Params:
  """Inverse of split_prompt."""
  params = dict(frozen)
  params['encoder'] = dict(frozen['encoder'], prompt=prompt)
  return params


# Frozen leaves that every use casts to config.dtype before computing with them
# (projection kernels, token embeddings, relative-position tables). Layer-norm
# scales are used in float32 and keep param_dtype.
_CAST_IN_EVERY_USE = ('kernel', 'embedding', 'rel_embedding')


def frozen_storage_dtype(config: T5Config, path: Tuple[str, ...], dtype: Any) -> Any:
  """The dtype to keep a FROZEN weight in: config.dtype where every use casts to it.

  With bfloat16 activations this stores frozen kernels and embeddings in
  bfloat16 once instead of converting them in every step: the same numbers
  (the same rounding, done earlier), half the memory, and no per-step
  converts (on CPU they cost ~15% of a T5-small step). Trainable weights must
  keep param_dtype. `path` is the leaf's key path, `dtype` its current dtype.
  """
  if path and path[-1] in _CAST_IN_EVERY_USE and (
      jnp.dtype(config.dtype) != jnp.dtype(config.param_dtype)):
    return jnp.dtype(config.dtype)
  return dtype

"""A prompt bank: K prompts of one model, each example picks its own by id.

The per-example prompt module (see slot.py): `prompts` [K, L, e] holds every
prompt; `features['task_ids']` [b] selects one per example, so a batch can mix
tasks (Lester et al. 2021's mixed-task inference) under one compiled program.
Prompts shorter than L are stored right-aligned and their leading rows masked:
each prompt keeps exactly its own relative positions to the input, so an
example gets the output it would get with its prompt alone.
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from prompt_transfer.prompts.initializers import PromptInit, random_uniform

Array = jax.Array
TASK_IDS = 'task_ids'


class PromptBank(nn.Module):
  num_prompts: int
  length: int
  init: PromptInit = random_uniform()
  # Real rows of each prompt (<= length); None: all `length`.
  lengths: Optional[Tuple[int, ...]] = None
  feature: str = TASK_IDS

  @property
  def per_example_features(self) -> Tuple[str, ...]:
    """The batch features this module reads (the data pipeline carries them)."""
    return (self.feature,)

  def _row_mask(self) -> Array:
    """[K, L] bool: the rows each prompt really has (right-aligned)."""
    lengths = np.asarray(self.lengths if self.lengths is not None
                         else [self.length] * self.num_prompts)
    if lengths.shape != (self.num_prompts,) or lengths.max() > self.length or lengths.min() < 1:
      raise ValueError(f'PromptBank lengths {tuple(lengths)} must be {self.num_prompts} '
                       f'values in [1, {self.length}].')
    return jnp.asarray(np.arange(self.length)[None, :] >= self.length - lengths[:, None])

  @nn.compact
  def __call__(self, embedding: Array, features: Mapping[str, Array]
               ) -> Tuple[Array, Array]:
    shape = (self.num_prompts, self.length, embedding.shape[-1])

    def init(rng, shape):
      keys = jax.random.split(rng, shape[0])
      return jnp.stack([self.init(k, shape[1:], embedding) for k in keys])

    prompts = self.param('prompts', nn.with_logical_partitioning(
        init, (None, 'prompt', 'prompt_embed')), shape)  # [K, L, e]
    mask = self._row_mask()  # [K, L]
    prompts = jnp.where(mask[..., None], prompts, 0.0)
    if self.feature not in features:
      raise KeyError(f'PromptBank needs the per-example feature {self.feature!r} in the '
                     f'batch; it has {sorted(features)}.')
    ids = jnp.asarray(features[self.feature]).astype(jnp.int32).reshape(-1)  # [b]
    return jnp.take(prompts, ids, axis=0), jnp.take(mask, ids, axis=0)  # [b, L, e], [b, L]


def bank_params(prompt_arrays: Sequence[np.ndarray]) -> Tuple[dict, Tuple[int, ...]]:
  """({'prompts': [K, L, e]}, lengths) from K prompts [l_k, e] (right-aligned)."""
  length = max(a.shape[0] for a in prompt_arrays)
  width = {a.shape[1] for a in prompt_arrays}
  if len(width) != 1:
    raise ValueError(f'Prompts of one bank must share d_model; got widths {sorted(width)}.')
  out = np.zeros((len(prompt_arrays), length, width.pop()), np.float32)
  for k, a in enumerate(prompt_arrays):
    out[k, length - a.shape[0]:] = a
  return {'prompts': out}, tuple(int(a.shape[0]) for a in prompt_arrays)

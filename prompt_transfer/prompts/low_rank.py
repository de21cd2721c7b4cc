"""A low-rank prompt: [length, d_model] = u [length, rank] @ v [rank, d_model].

Trains length*rank + rank*d_model numbers instead of length*d_model; v starts
from the initialiser's rows (e.g. sampled vocabulary embeddings), u at a small
random mix of them.
"""
from __future__ import annotations

from typing import Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from prompt_transfer.prompts.initializers import PromptInit, random_uniform

Array = jax.Array


class LowRankPrompt(nn.Module):
  length: int
  rank: int = 4
  init: PromptInit = random_uniform()

  @nn.compact
  def __call__(self, embedding: Array, features: Optional[Mapping[str, Array]] = None
               ) -> Array:
    del features
    e = embedding.shape[-1]
    u = self.param('u', nn.with_logical_partitioning(
        nn.initializers.normal(self.rank ** -0.5), ('prompt', None)), (self.length, self.rank))
    v = self.param('v', nn.with_logical_partitioning(
        lambda rng, shape: self.init(rng, shape, embedding), (None, 'prompt_embed')),
        (self.rank, e))
    return jnp.dot(u, v)  # [l, e]

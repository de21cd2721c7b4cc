"""The free prompt: prompt tuning's [length, d_model] parameter (Lester et al. 2021)."""
from __future__ import annotations

import functools
from typing import Mapping, Optional

import flax.linen as nn
import jax

from prompt_transfer.prompts.initializers import PromptInit, random_uniform
from prompt_transfer.prompts.slot import PromptModuleFactory

Array = jax.Array


class Prompt(nn.Module):
  """A free [length, emb] array, `encoder/prompt/prompt/prompt` in the tree."""
  length: int
  init: PromptInit = random_uniform()

  @nn.compact
  def __call__(self, embedding: Array, features: Optional[Mapping[str, Array]] = None
               ) -> Array:
    del features  # one prompt for every example
    shape = (self.length, embedding.shape[-1])
    init = nn.with_logical_partitioning(
        lambda rng, shape: self.init(rng, shape, embedding), ('prompt', 'prompt_embed'))
    return self.param('prompt', init, shape)  # [l, e]


def free_prompt(length: int, init: Optional[PromptInit] = None
                ) -> Optional[PromptModuleFactory]:
  """The prompt-module factory of a free prompt; None for length 0 (no prompt)."""
  if length <= 0:
    return None
  return functools.partial(Prompt, length=length, init=init or random_uniform())

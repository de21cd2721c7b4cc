"""The prompt-module contract, and the slot that prepends a module's rows.

A prompt module is any Flax module the model is given as a factory
(`prompt_module`, e.g. `functools.partial(free.Prompt, length=20)`); the
encoder creates it as `encoder/prompt/prompt` (`encoder/prompt` is the
`PromptSlot`), so its parameters are the trainable subtree `encoder/prompt/.*`
and a free prompt's array is `encoder/prompt/prompt/prompt`, as in Google's
prompt-tuning checkpoints. It is called as

    module(embedding, features) -> prompt  or  (prompt, mask)

* embedding: the frozen token-embedding table [v, e];
* features: what the module may read of the batch: 'encoder_input_tokens'
  [b, s] always, and the per-example features the data pipeline carries
  through (`models.PROMPT_FEATURES`, e.g. 'task_ids' [b]);
* prompt: [l, e], one prompt for every example, or [b, l, e], one per example;
* mask: optional bool [l] or [b, l], the rows that exist (prompts of several
  lengths padded to l); default: every row.

A module adds a named auxiliary loss term with `self.sow('losses', name,
scalar)`: the model's training loss adds every sown term and metrics.jsonl
logs each as `losses/<name>`. A module serving several prompts (one per
task id) says how many with a `num_prompts` attribute. A module bound to one
frozen model's weights (an IPT subspace) may define
`check_frozen_weights(config, weights_fingerprint)`, which the trainer calls
before a new run trains, to refuse other weights.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
PromptModuleFactory = Callable[..., nn.Module]
# The collection auxiliary loss terms are sown into.
LOSSES = 'losses'


def split_output(out: Any) -> Tuple[Array, Optional[Array]]:
  """A module's return value -> (prompt [l, e] or [b, l, e], mask or None)."""
  prompt, mask = out if isinstance(out, tuple) else (out, None)
  if prompt.ndim not in (2, 3):
    raise ValueError(f'A prompt module must return [l, e] or [b, l, e]; got shape {prompt.shape}.')
  if mask is not None and mask.shape != prompt.shape[:-1][-mask.ndim:]:
    raise ValueError(f'Prompt mask of shape {mask.shape} does not fit a prompt of shape '
                     f'{prompt.shape}.')
  return prompt, mask


class PromptSlot(nn.Module):
  """Prepends the prompt module's rows to the embedded input and extends the mask."""
  prompt_module: PromptModuleFactory

  @nn.compact
  def __call__(self, x: Array, mask: Array, embedding: Array,
               features: Mapping[str, Array]) -> Tuple[Array, Array]:
    """x [b, s, e], mask [b, s] -> ([b, l+s, e], [b, l+s])."""
    prompt, prompt_mask = split_output(self.prompt_module(name='prompt')(embedding, features))
    b = x.shape[0]
    if prompt.ndim == 2:  # shared: [l, e] -> [b, l, e]
      prompt = jnp.broadcast_to(prompt[None], (b,) + prompt.shape)
    elif prompt.shape[0] != b:
      raise ValueError(f'A per-example prompt module returned {prompt.shape[0]} prompts for '
                       f'a batch of {b}.')
    l = prompt.shape[1]
    if prompt_mask is None:
      prompt_mask = jnp.ones((b, l), bool)
    else:
      prompt_mask = jnp.broadcast_to(prompt_mask.astype(bool), (b, l))
    x = jnp.concatenate([prompt.astype(x.dtype), x], axis=1)
    mask = jnp.concatenate([prompt_mask, mask], axis=1)
    return x, mask

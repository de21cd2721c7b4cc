"""Soft prompts: the module that prepends them, and their initialisers.

The parameter of a free prompt lives at `encoder/prompt/prompt/prompt`
(flattened: `encoder.prompt.prompt.prompt`), as in Google's prompt-tuning code:
`encoder/prompt` is the `PromptSlot` (prepends, extends the mask), the inner
`prompt` is the prompt-producing module (here `Prompt`, a free array; a
projector or an intrinsic-subspace decoder elsewhere) and the last `prompt` is
its array.

An initialiser is a function `init(rng, shape, embedding) -> [length, emb]`,
where `embedding` is the model's token-embedding table (sampled-vocab and
class-label initialisers read rows of it).
"""
from __future__ import annotations

import os
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
PromptInit = Callable[[Array, tuple, Array], Array]

# Google's prompt tuning: 5,000 rows (the most frequent tokens of the T5
# SentencePiece vocabulary come first).
DEFAULT_POPULATION = 5000


class PromptFileError(ValueError):
  """A prompt file that cannot be used: missing, wrong shape, dtype or values."""


def random_uniform(scale: float = 0.5) -> PromptInit:
  """Uniform in [-scale, scale] (Lester et al.'s random init uses 0.5)."""
  def init(rng: Array, shape: tuple, embedding: Optional[Array] = None) -> Array:
    del embedding
    return jax.random.uniform(rng, shape, jnp.float32, -scale, scale)
  return init


def from_sampled_vocab(population_size: int = DEFAULT_POPULATION) -> PromptInit:
  """Rows of the embedding table for token ids drawn from [0, population_size).

  Drawn without replacement when the population is large enough, as Google's
  code does, so no two prompt rows start equal.
  """
  def init(rng: Array, shape: tuple, embedding: Array) -> Array:
    n = min(population_size, embedding.shape[0])
    ids = jax.random.choice(rng, n, (shape[0],), replace=shape[0] > n)
    return jnp.take(embedding, ids, axis=0).astype(jnp.float32)
  return init


def from_class_labels(class_label_ids: Sequence[Sequence[int]],
                      fallback: Optional[PromptInit] = None) -> PromptInit:
  """Row i = mean embedding of label word i's sub-tokens; the rest from fallback.

  class_label_ids: token ids of each label word (see `class_label_ids` to get
  them from a vocabulary). fallback defaults to sampled vocab.
  """
  labels = [list(ids) for ids in class_label_ids]
  if not labels or any(not ids for ids in labels):
    raise ValueError(f'Class-label init needs a non-empty token list per label, got {labels}.')
  fallback = fallback or from_sampled_vocab()

  def init(rng: Array, shape: tuple, embedding: Array) -> Array:
    if len(labels) > shape[0]:
      raise ValueError(f'{len(labels)} class labels do not fit a prompt of length {shape[0]}.')
    rows = fallback(rng, shape, embedding)
    label_rows = jnp.stack([jnp.mean(jnp.take(embedding, jnp.asarray(ids), axis=0), axis=0)
                            for ids in labels])
    return rows.at[:len(labels)].set(label_rows.astype(rows.dtype))
  return init


def class_label_ids(labels: Sequence[str], vocabulary: Any) -> list[list[int]]:
  """Token ids of each label word under a seqio vocabulary (no EOS)."""
  return [list(vocabulary.encode(word)) for word in labels]


def from_array(array: Any) -> PromptInit:
  """A given [length, emb] array (e.g. another task's prompt: SPoT transfer)."""
  value = np.asarray(array, dtype=np.float32)

  def init(rng: Array, shape: tuple, embedding: Optional[Array] = None) -> Array:
    del rng, embedding
    if tuple(value.shape) != tuple(shape):
      raise PromptFileError(f'Prompt array has shape {value.shape}, the model expects {shape}.')
    return jnp.asarray(value)
  return init


def load_prompt_file(path: str, expected_shape: Optional[tuple] = None) -> np.ndarray:
  """Reads a numpy prompt file (with or without `.npy`) and validates it.

  Raises PromptFileError naming the file, the expected and the actual shape.
  """
  path = os.fspath(path)
  if not path:
    raise PromptFileError('PROMPT_FILE is empty: add --gin.PROMPT_FILE=\\"\'/path/to/prompt\'\\".')
  if not os.path.exists(path):
    raise PromptFileError(f'Prompt file {path!r} does not exist.')
  try:
    with open(path, 'rb') as f:
      value = np.load(f, allow_pickle=False)
  except Exception as e:  # numpy raises several types for a non-numpy file
    raise PromptFileError(f'Prompt file {path!r} is not a numpy array file: {e}') from e
  if not np.issubdtype(value.dtype, np.floating):
    raise PromptFileError(f'Prompt file {path!r} has dtype {value.dtype}; expected a float array.')
  if value.ndim != 2:
    raise PromptFileError(f'Prompt file {path!r} has shape {value.shape}; expected a 2-D '
                          f'[length, d_model] array{f" of shape {expected_shape}" if expected_shape else ""}.')
  if expected_shape is not None and tuple(value.shape) != tuple(expected_shape):
    raise PromptFileError(f'Prompt file {path!r} has shape {tuple(value.shape)}; the model '
                          f'expects {tuple(expected_shape)} ([PROMPT_LENGTH, d_model]).')
  if not np.all(np.isfinite(value)):
    raise PromptFileError(f'Prompt file {path!r} contains NaN or infinite values.')
  return value.astype(np.float32)


def from_file(path: str) -> PromptInit:
  """The prompt stored in a numpy file (Google's numpy-checkpoint layout)."""
  def init(rng: Array, shape: tuple, embedding: Optional[Array] = None) -> Array:
    del rng, embedding
    return jnp.asarray(load_prompt_file(path, tuple(shape)))
  return init


class Prompt(nn.Module):
  """A free [length, emb] prompt array: the prompt-tuning parameter."""
  length: int
  init: PromptInit = random_uniform()

  @nn.compact
  def __call__(self, embedding: Array) -> Array:
    shape = (self.length, embedding.shape[-1])
    init = nn.with_logical_partitioning(
        lambda rng, shape: self.init(rng, shape, embedding), ('prompt', 'prompt_embed'))
    return self.param('prompt', init, shape)


class PromptSlot(nn.Module):
  """Prepends the produced prompt to the embedded input and extends the mask.

  producer: factory of the prompt-producing module; called with
  `name='prompt'`, its module maps the embedding table to a [l, e] prompt.
  """
  producer: Callable[..., nn.Module]

  @nn.compact
  def __call__(self, x: Array, mask: Array, embedding: Array) -> tuple[Array, Array]:
    """x [b, s, e], mask [b, s] -> ([b, l+s, e], [b, l+s])."""
    prompt = self.producer(name='prompt')(embedding)  # [l, e]
    b = x.shape[0]
    prompt = jnp.broadcast_to(prompt.astype(x.dtype)[None], (b,) + prompt.shape)
    x = jnp.concatenate([prompt, x], axis=1)
    mask = jnp.concatenate([jnp.ones((b, prompt.shape[1]), bool), mask], axis=1)
    return x, mask

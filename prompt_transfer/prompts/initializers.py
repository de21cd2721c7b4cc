"""Initialisers of a free prompt (Lester et al. 2021's options, and from_file).

An initialiser is a function `init(rng, shape, embedding) -> [length, emb]`,
where `embedding` is the model's token-embedding table (sampled-vocab and
class-label initialisers read rows of it).
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from prompt_transfer.prompts.files import PromptFileError, load_prompt_file

Array = jax.Array
PromptInit = Callable[[Array, tuple, Array], Array]

# Google's prompt tuning: 5,000 rows (the most frequent tokens of the T5
# SentencePiece vocabulary come first).
DEFAULT_POPULATION = 5000


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


def from_file(path: str) -> PromptInit:
  """The prompt stored in a numpy file (Google's numpy-checkpoint layout)."""
  def init(rng: Array, shape: tuple, embedding: Optional[Array] = None) -> Array:
    del rng, embedding
    return jnp.asarray(load_prompt_file(path, tuple(shape)))
  init.prompt_file = path  # the trainer compares its sidecar with the frozen model
  return init

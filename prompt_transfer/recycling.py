"""Prompt recycling (Lester et al. 2022, "Reducing Retraining by Recycling
Parameter-Efficient Prompts"): map a prompt of a source model to a target
model with no task data, through the two models' token embeddings on tokens
both vocabularies share.

Recyclers (Google's `prompt_tuning/recycling/` names):
* `v2v-lin`: the least-squares linear map W with E_S W ~ E_T; prompt P_S W.
* `lin-comb`: the prompt's rows as least-squares combinations C of source
  embeddings (C E_S ~ P_S); the same combinations of target embeddings, C E_T.
* `v2v-nn`: a small MLP (hidden 4 x d_T, ReLU) fitted from E_S to E_T rows
  (Adam, lr 3e-4, 25 epochs of batch 50, as theirs); prompt MLP(P_S).
Shared tokens: Lester et al. use 4,000 English words after skipping the 1,000
most frequent; `shared_token_ids` takes SentencePiece ids 1,000-4,999 (its
ids are ordered by frequency) and, for the byte vocabulary, every byte.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Sequence

import numpy as np

RECYCLERS = ('v2v-lin', 'lin-comb', 'v2v-nn')
BYTE_IDS = range(3, 259)  # seqio.ByteVocabulary: 0 pad, 1 eos, 2 unk, then bytes


def shared_token_ids(vocab_size: int, skip: int = 1000, count: int = 4000) -> np.ndarray:
  """Ids whose embeddings pair the two models (both use one vocabulary)."""
  if vocab_size <= 512:  # a byte vocabulary (plus padding rows)
    return np.asarray(BYTE_IDS)
  return np.arange(skip, min(skip + count, vocab_size))


def _v2v_lin(src: np.ndarray, tgt: np.ndarray, seed: int) -> Callable[[np.ndarray], np.ndarray]:
  del seed
  w, *_ = np.linalg.lstsq(src, tgt, rcond=None)  # [d_S, d_T]
  return lambda p: p @ w


def _lin_comb(src: np.ndarray, tgt: np.ndarray, seed: int
              ) -> Callable[[np.ndarray], np.ndarray]:
  del seed
  # C [L, n] with C src ~ P: solve src^T C^T = P^T (minimum-norm when n > d_S).
  return lambda p: np.linalg.lstsq(src.T, p.T, rcond=None)[0].T @ tgt


def _v2v_nn(src: np.ndarray, tgt: np.ndarray, seed: int, epochs: int = 25,
            batch_size: int = 50, learning_rate: float = 3e-4
            ) -> Callable[[np.ndarray], np.ndarray]:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top

  class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(tgt.shape[1])(nn.relu(nn.Dense(4 * tgt.shape[1])(x)))

  mlp, tx = MLP(), optax.adam(learning_rate)
  params = mlp.init(jax.random.PRNGKey(seed), jnp.zeros((1, src.shape[1])))
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, x, y):
    loss, grads = jax.value_and_grad(lambda p: jnp.mean(jnp.square(mlp.apply(p, x) - y)))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  rng = np.random.default_rng(seed)
  for _ in range(epochs):
    order = rng.permutation(len(src))
    for i in range(0, len(order), batch_size):
      idx = order[i:i + batch_size]
      params, opt_state, _ = step(params, opt_state, src[idx], tgt[idx])
  return lambda p: np.asarray(mlp.apply(params, jnp.asarray(p)))


_FITS: Dict[str, Callable[..., Callable[[np.ndarray], np.ndarray]]] = {
    'v2v-lin': _v2v_lin, 'lin-comb': _lin_comb, 'v2v-nn': _v2v_nn}


def fit_recycler(name: str, source_embedding: np.ndarray, target_embedding: np.ndarray,
                 token_ids: Optional[Sequence[int]] = None, seed: int = 0,
                 **options: Any) -> Callable[[np.ndarray], np.ndarray]:
  """A function mapping source-model prompts [L, d_S] to target prompts [L, d_T].

  source_embedding / target_embedding: the two models' token-embedding
  tables (one vocabulary); token_ids: the rows that pair them (default
  `shared_token_ids`). options: v2v-nn's epochs, batch_size, learning_rate
  (Lester et al.'s 25 epochs are ~2,000 steps over 4,000 words; a byte
  vocabulary's 256 rows give 130).
  """
  if name not in _FITS:
    raise ValueError(f'Unknown recycler {name!r}; choose one of {RECYCLERS}.')
  src = np.asarray(source_embedding, np.float32)
  tgt = np.asarray(target_embedding, np.float32)
  ids = np.asarray(token_ids if token_ids is not None else
                   shared_token_ids(min(len(src), len(tgt))))
  if ids.max() >= min(len(src), len(tgt)):
    raise ValueError(f'Token id {ids.max()} is beyond a vocabulary of '
                     f'{min(len(src), len(tgt))} rows.')
  fn = _FITS[name](src[ids], tgt[ids], seed, **options)
  return lambda prompt: np.asarray(fn(np.asarray(prompt, np.float32)), np.float32)

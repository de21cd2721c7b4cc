"""Autoregressive search over a key/value-cached decoder: greedy and beam.

Both take `step_fn(tokens [n, 1], cache) -> (logits [n, vocab], cache)`; the
cache is any pytree whose arrays have the batch (times beams) as leading axis
(scalars such as cache indices are left alone). Loops are `lax.while_loop`s
that stop early once every sequence has ended, so one compiled program serves
any batch of the same shape.

Written here rather than taken from t5x.decoding because t5x is not installable
from PyPI; the beam search follows the same alive/finished scheme.
"""
from __future__ import annotations

from typing import Any, Callable, Tuple

import jax
import jax.numpy as jnp

Array = jax.Array
StepFn = Callable[[Array, Any], Tuple[Array, Any]]
NEG_INF = -1.0e7


def greedy_search(step_fn: StepFn, cache: Any, batch_size: int, max_len: int,
                  eos_id: int = 1, bos_id: int = 0) -> Tuple[Array, Array]:
  """-> (tokens [b, max_len] with zeros after EOS, summed log-probs [b])."""
  tokens = jnp.full((batch_size, max_len + 1), bos_id, jnp.int32)

  def cond(state):
    i, _, _, done, _ = state
    return (i < max_len) & ~jnp.all(done)

  def body(state):
    i, tokens, cache, done, score = state
    logits, cache = step_fn(jax.lax.dynamic_slice_in_dim(tokens, i, 1, axis=1), cache)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nxt = jnp.argmax(logp, axis=-1).astype(jnp.int32)  # [b]
    score = score + jnp.where(done, 0.0, jnp.take_along_axis(logp, nxt[:, None], 1)[:, 0])
    nxt = jnp.where(done, 0, nxt)
    tokens = jax.lax.dynamic_update_slice_in_dim(tokens, nxt[:, None], i + 1, axis=1)
    return i + 1, tokens, cache, done | (nxt == eos_id), score

  init = (jnp.array(0), tokens, cache, jnp.zeros((batch_size,), bool),
          jnp.zeros((batch_size,), jnp.float32))
  _, tokens, _, _, score = jax.lax.while_loop(cond, body, init)
  return tokens[:, 1:], score


def _gather_beams(tree: Any, beam_idx: Array, batch_size: int, old_beams: int) -> Any:
  """Reorders [b*old_beams, ...] leaves by beam_idx [b, new_beams]."""
  new_beams = beam_idx.shape[1]
  flat = (beam_idx + jnp.arange(batch_size)[:, None] * old_beams).reshape(-1)

  def gather(x):
    if x.ndim == 0 or x.shape[0] != batch_size * old_beams:
      return x
    return jnp.take(x, flat, axis=0)
  del new_beams
  return jax.tree_util.tree_map(gather, tree)


def expand_for_beams(tree: Any, batch_size: int, num_beams: int) -> Any:
  """Repeats each example's leading-axis rows num_beams times."""
  def rep(x):
    if x.ndim == 0 or x.shape[0] != batch_size:
      return x
    return jnp.repeat(x, num_beams, axis=0)
  return jax.tree_util.tree_map(rep, tree)


def beam_search(step_fn: StepFn, cache: Any, batch_size: int, max_len: int,
                num_beams: int, length_penalty: float = 1.0, eos_id: int = 1,
                bos_id: int = 0) -> Tuple[Array, Array]:
  """-> (sequences [b, num_beams, max_len] best first, scores [b, num_beams]).

  A finished hypothesis of n tokens (EOS included) scores
  sum(log p) / n ** length_penalty (Hugging Face's convention). `cache` must
  already hold num_beams rows per example (see `expand_for_beams`).
  """
  b, k = batch_size, num_beams
  seqs = jnp.full((b, k, max_len + 1), bos_id, jnp.int32)
  alive_logp = jnp.tile(jnp.array([0.0] + [NEG_INF] * (k - 1), jnp.float32), (b, 1))
  fin_seqs = seqs
  fin_scores = jnp.full((b, k), NEG_INF, jnp.float32)

  def penalty(n):
    return jnp.power(n.astype(jnp.float32), length_penalty)

  def cond(state):
    i, _, alive_logp, _, fin_scores, _ = state
    # Stop when no alive beam can still beat the worst kept finished one
    # (length_penalty >= 0 and negative log-probs: the best case is max_len).
    best_possible = jnp.max(alive_logp, axis=1) / penalty(jnp.array(max_len))
    worst_finished = jnp.min(fin_scores, axis=1)
    can_improve = jnp.any(best_possible > worst_finished)
    return (i < max_len) & can_improve

  def body(state):
    i, seqs, alive_logp, fin_seqs, fin_scores, cache = state
    last = jax.lax.dynamic_slice_in_dim(seqs, i, 1, axis=2).reshape(b * k, 1)
    logits, cache = step_fn(last, cache)
    vocab = logits.shape[-1]
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1).reshape(b, k, vocab)
    cand = (alive_logp[:, :, None] + logp).reshape(b, k * vocab)
    top_logp, top_idx = jax.lax.top_k(cand, 2 * k)  # [b, 2k]
    beam_idx, token = top_idx // vocab, (top_idx % vocab).astype(jnp.int32)
    cand_seqs = jnp.take_along_axis(seqs, beam_idx[:, :, None], axis=1)
    cand_seqs = jax.lax.dynamic_update_slice_in_dim(
        cand_seqs, token[:, :, None], i + 1, axis=2)
    is_eos = token == eos_id

    # Finished pool: the old finished plus candidates that just emitted EOS.
    new_fin = jnp.where(is_eos, top_logp / penalty(i + 1), NEG_INF)
    all_scores = jnp.concatenate([fin_scores, new_fin], axis=1)
    all_seqs = jnp.concatenate([fin_seqs, cand_seqs], axis=1)
    fin_scores, keep = jax.lax.top_k(all_scores, k)
    fin_seqs = jnp.take_along_axis(all_seqs, keep[:, :, None], axis=1)

    # Alive pool: the best k candidates that did not end.
    alive_cand = jnp.where(is_eos, NEG_INF, top_logp)
    alive_logp, keep = jax.lax.top_k(alive_cand, k)
    seqs = jnp.take_along_axis(cand_seqs, keep[:, :, None], axis=1)
    cache = _gather_beams(cache, jnp.take_along_axis(beam_idx, keep, axis=1), b, k)
    return i + 1, seqs, alive_logp, fin_seqs, fin_scores, cache

  state = (jnp.array(0), seqs, alive_logp, fin_seqs, fin_scores, cache)
  _, seqs, alive_logp, fin_seqs, fin_scores, _ = jax.lax.while_loop(cond, body, state)
  # Examples with no finished hypothesis return their alive beams.
  none_finished = jnp.all(fin_scores <= NEG_INF / 2, axis=1)
  alive_scores = alive_logp / penalty(jnp.array(max_len))
  out_seqs = jnp.where(none_finished[:, None, None], seqs, fin_seqs)[:, :, 1:]
  out_scores = jnp.where(none_finished[:, None], alive_scores, fin_scores)
  # Zero everything after the first EOS (finished beams are already clean).
  after_eos = jnp.cumsum(jnp.cumsum(out_seqs == eos_id, axis=2), axis=2) > 1
  return jnp.where(after_eos, 0, out_seqs), out_scores

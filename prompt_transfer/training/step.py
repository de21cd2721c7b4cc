"""The train step: loss -> gradient w.r.t. the trainable subtree -> update.

`make_train_step` is pure (not jitted); `compile_train_step` jits it with a
set-up's shardings and donates the state, so XLA updates the prompt and its
optimizer slots in place.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import optax

from prompt_transfer.model.models import EncoderDecoderModel
from prompt_transfer.training import partitioning
from prompt_transfer.training.state import TrainingError, TrainSetup, merge_params

RNG_IMPLS = ('threefry', 'rbg', 'unsafe_rbg')


def dropout_key(seed: int, rng_impl: str = 'threefry') -> Any:
  """The run's dropout key (step keys are fold_in(key, step)).

  rng_impl: 'threefry' (JAX's default, the same on every backend and mesh),
  'rbg' or 'unsafe_rbg' (XLA's RngBitGenerator, T5X's `use_hardware_rng`).
  """
  if rng_impl not in RNG_IMPLS:
    raise TrainingError(f'rng_impl must be one of {RNG_IMPLS}; got {rng_impl!r}.')
  if rng_impl == 'threefry':
    return jax.random.PRNGKey(seed)
  return jax.random.key(seed, impl=rng_impl)


def make_train_step(model: EncoderDecoderModel, tx: optax.GradientTransformation,
                    use_dropout: bool = True) -> Callable:
  """(state, frozen, batch, dropout_rng) -> (state, metrics), not yet jitted.

  The gradient is taken w.r.t. state['trainable'] only: the frozen weights get
  neither gradients nor optimizer state. The loss includes the prompt
  module's auxiliary terms (metrics `losses/<name>`).
  """
  def train_step(state, frozen, batch, dropout_rng):
    def loss_fn(trainable):
      return model.loss_fn(merge_params(trainable, frozen), batch,
                           dropout_rng if use_dropout else None)
    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state['trainable'])
    updates, opt_state = tx.update(grads, state['opt_state'], state['trainable'])
    trainable = optax.apply_updates(state['trainable'], updates)
    metrics['grad_norm'] = optax.tree.norm(grads)
    return {'step': state['step'] + 1, 'trainable': trainable, 'opt_state': opt_state}, metrics
  return train_step


def compile_train_step(setup: TrainSetup, use_dropout: bool = True,
                       model: Optional[EncoderDecoderModel] = None) -> Callable:
  """The jitted step with the set-up's shardings; the state is donated.
  model: another model of the same parameters (default: the set-up's)."""
  replicated = partitioning.replicated(setup.mesh)
  return jax.jit(
      make_train_step(model or setup.model, setup.tx, use_dropout),
      in_shardings=(setup.state_sharding, setup.frozen_sharding,
                    partitioning.batch_sharding(setup.mesh), replicated),
      out_shardings=(setup.state_sharding, replicated), donate_argnums=(0,))


def model_flops_step(setup: TrainSetup, use_dropout: bool, jitted_step: Callable) -> Callable:
  """The step whose FLOPs count as model FLOPs: with remat, the same step
  without it (rematerialised forward passes are not useful work, so MFU
  does not count them); otherwise the jitted step itself."""
  if not setup.model.config.remat:
    return jitted_step
  return compile_train_step(setup, use_dropout, setup.model.with_config(remat=False))

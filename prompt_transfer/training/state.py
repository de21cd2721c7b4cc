"""Run set-up: the model's frozen weights and train state placed on a mesh.

What one stage of a run trains with, built in one call (`set_up`) that the
trainer and the benchmarks share: the frozen parameters sharded over 'model'
by their logical axes (kernels and embeddings stored in the compute dtype),
the train state {'step', 'trainable', 'opt_state'} with the trainable subtree
and its optimizer slots replicated, and every sharding the jitted step needs.
Only the parameters matching `trainable_params` (a regex over '/'-joined
paths; `encoder/prompt/.*` for prompt tuning, `.*` for model tuning) are
trainable; the rest is frozen and gets neither gradients nor optimizer state.
"""
from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Mapping, Optional, Tuple

import jax
import numpy as np
import optax
from flax import traverse_util
from jax.sharding import Mesh

from prompt_transfer.model.models import EncoderDecoderModel, Params, frozen_storage_dtype
from prompt_transfer.training import partitioning

PROMPT_PARAMS = 'encoder/prompt/.*'


class TrainingError(RuntimeError):
  """A run that cannot go on (NaN loss, inconsistent restore, ...)."""


def partition_params(params: Params, pattern: str) -> Tuple[dict, dict]:
  """Splits a tree into (trainable, frozen) nested dicts by a path regex."""
  flat = traverse_util.flatten_dict(dict(params), sep='/')
  regex = re.compile(pattern)
  trainable = {k: v for k, v in flat.items() if regex.fullmatch(k)}
  if not trainable:
    raise TrainingError(f'No parameter matches trainable_params={pattern!r}; '
                        f'parameters are e.g. {sorted(flat)[:5]}.')
  frozen = {k: v for k, v in flat.items() if k not in trainable}
  return (traverse_util.unflatten_dict(trainable, sep='/'),
          traverse_util.unflatten_dict(frozen, sep='/'))


def merge_params(trainable: Mapping, frozen: Mapping) -> dict:
  flat = traverse_util.flatten_dict(dict(frozen), sep='/')
  flat.update(traverse_util.flatten_dict(dict(trainable), sep='/'))
  return traverse_util.unflatten_dict(flat, sep='/')


def prompt_tuning_optimizer(learning_rate: Any = 0.3) -> optax.GradientTransformation:
  """Google's prompt-tuning Adafactor: second-moment decay 0.8, no parameter
  scaling, weight decay 1e-5, update clipping 1.0 (runs/prompt_tune.gin)."""
  return optax.adafactor(learning_rate=learning_rate, decay_rate=0.8,
                         multiply_by_parameter_scale=False, weight_decay_rate=1e-5,
                         clipping_threshold=1.0)


@dataclasses.dataclass
class TrainSetup:
  """What one stage trains with; `state` and `frozen` live on the mesh."""
  model: EncoderDecoderModel
  mesh: Mesh
  tx: optax.GradientTransformation
  trainable_params: str
  frozen: Params
  frozen_sharding: Any
  state: dict
  state_sharding: dict

  @property
  def num_trainable(self) -> int:
    return sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(self.state['trainable']))

  @property
  def num_frozen(self) -> int:
    return sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(self.frozen))


def set_up(model: EncoderDecoderModel, frozen_host: Params, tx: optax.GradientTransformation,
           mesh: Mesh, rng: Any, trainable_params: str = PROMPT_PARAMS,
           carry: Optional[dict] = None) -> TrainSetup:
  """Places a stage's frozen weights and train state on `mesh`.

  frozen_host: the model's weights on the host, without the prompt module's
  (consumed: its arrays are moved to the devices one at a time). rng: the
  prompt module's init key, used when there is no `carry`. carry: the train
  state of the previous stage, placed as it is (bit for bit) instead of a
  freshly initialised one: only the frozen model changes at a stage boundary.
  """
  if model.prompt_module is not None:
    # The prompt initialised against the real (loaded) embedding table; a
    # from_file prompt of the wrong shape fails here, before any training.
    frozen_host = model.init_prompt(rng, frozen_host)
  trainable, frozen_host = partition_params(frozen_host, trainable_params)
  axes = model.param_logical_axes()
  train_axes, frozen_axes = partition_params(axes, trainable_params)
  frozen_sharding = partitioning.logical_shardings(mesh, frozen_axes)
  # One array at a time; kernels and embeddings in config.dtype (bfloat16
  # activations: stored once in bf16 instead of converted in every step).
  frozen = partitioning.put_consuming(
      frozen_host, frozen_sharding, functools.partial(frozen_storage_dtype, model.config))
  partitioning.release_host_memory()
  trainable_sharding = partitioning.logical_shardings(mesh, train_axes)
  replicated = partitioning.replicated(mesh)
  if carry is None:
    opt_state = tx.init(trainable)
    state = {'step': np.zeros((), np.int32), 'trainable': trainable, 'opt_state': opt_state}
  else:
    _check_carry(carry['trainable'], trainable)
    state = jax.tree_util.tree_map(partitioning.to_host, carry)
  # Optimizer slots follow their parameter's sharding when shaped like it
  # (Adafactor's factored rows/columns and scalars are replicated).
  state_sharding = {'step': replicated, 'trainable': trainable_sharding,
                    'opt_state': jax.tree_util.tree_map(lambda _: replicated,
                                                        state['opt_state'])}
  state = partitioning.put(state, state_sharding)
  return TrainSetup(model, mesh, tx, trainable_params, frozen, frozen_sharding, state,
                    state_sharding)


def _check_carry(carried: Params, fresh: Params) -> None:
  a = jax.tree_util.tree_map(np.shape, carried)
  b = jax.tree_util.tree_map(np.shape, fresh)
  if a != b:
    raise TrainingError(f'The trainable parameters change shape at a stage boundary '
                        f'({a} -> {b}); a stage may change the frozen model only.')

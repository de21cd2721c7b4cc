"""A run's checkpoints: the full train state with orbax, the prompt as numpy.

`PromptCheckpointer.save(step, ...)` writes both: the train state (step,
trainable parameters, optimizer state) with orbax, which commits each step
atomically, and the numpy checkpoint of prompts/files.py (the materialised
prompt at `encoder.prompt.prompt.prompt`, the prompt module's free
parameters, `prompt_info.json`). A run restarted on the same MODEL_DIR
restores the latest complete orbax step and rewrites a missing numpy export.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Optional

import jax
import numpy as np
from etils import epath
from flax import traverse_util

from prompt_transfer import fileio
from prompt_transfer.model.models import EncoderDecoderModel
from prompt_transfer.prompts import files
from prompt_transfer.training import partitioning
from prompt_transfer.training.state import TrainingError


class TrainStateCheckpointer:
  """Full train state (step, trainable params, optimizer state) with orbax.

  orbax writes each step to a temporary folder and commits it atomically, so
  a run killed at any moment restarts from the last complete step.
  """

  def __init__(self, model_dir: str, max_to_keep: Optional[int] = 3):
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    self._ocp = ocp
    self.directory = os.fspath(epath.Path(fileio.normalize_dir(model_dir)) / 'checkpoints')
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                             enable_async_checkpointing=False))

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state: Any) -> None:
    self.manager.save(step, args=self._ocp.args.StandardSave(state), force=True)
    self.manager.wait_until_finished()

  def restore(self, step: int, target: Any) -> Any:
    abstract = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype
                                       if not hasattr(x, 'dtype') else x.dtype,
                                       sharding=getattr(x, 'sharding', None)), target)
    return self.manager.restore(step, args=self._ocp.args.StandardRestore(abstract))

  def close(self) -> None:
    self.manager.close()


def prompt_info(model: EncoderDecoderModel, task: str, vocabulary: Any) -> files.PromptInfo:
  """The sidecar fields known before training: task, model, vocabulary, module."""
  module = model.prompt_module() if model.prompt_module is not None else None
  return files.PromptInfo(task=task, model=model.config.describe(),
                          vocabulary=files.describe_vocabulary(vocabulary),
                          module=type(module).__name__ if module is not None else '')


class PromptCheckpointer:
  """orbax train state + numpy prompt + sidecar for one MODEL_DIR.

  Every process calls `save` (gathering the trainable state is a collective);
  process 0 writes the numpy files. Use as a context manager, or `close()`.
  """

  def __init__(self, model_dir: str, info: files.PromptInfo,
               keep_checkpoints: Optional[int] = 3):
    self.model_dir = model_dir
    self.info = info
    self.orbax = TrainStateCheckpointer(model_dir, keep_checkpoints)

  def __enter__(self) -> 'PromptCheckpointer':
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()

  def close(self) -> None:
    self.orbax.close()

  @property
  def directory(self) -> str:
    return self.orbax.directory

  def latest_step(self) -> Optional[int]:
    return self.orbax.latest_step()

  def restore(self, step: int, state: dict) -> dict:
    return self.orbax.restore(step, state)

  def has_numpy(self, step: int) -> bool:
    return files.latest_numpy_step(self.model_dir) == step

  def save(self, step: int, state: dict, model: EncoderDecoderModel, frozen: Mapping,
           metrics: Optional[Mapping[str, float]] = None) -> None:
    """Writes step `step` (orbax unless it has it already, then numpy)."""
    host_trainable = jax.tree_util.tree_map(partitioning.to_host, state['trainable'])
    if not all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(host_trainable)):
      raise TrainingError(f'Trainable parameters are not finite at step {step}; '
                          'not saving. The last good checkpoint is kept.')
    if self.orbax.latest_step() != step:
      self.orbax.save(step, state)
    embedding = None
    if model.prompt_module is not None:  # a collective when the table is sharded
      embedding = {'token_embedder': {'embedding': partitioning.to_host(
          frozen['token_embedder']['embedding'])}}
    if jax.process_index() != 0:
      return
    flat = {k: np.asarray(v) for k, v in
            traverse_util.flatten_dict(dict(host_trainable), sep='.').items()}
    prompt = None
    info = dataclasses.replace(self.info, step=int(step), metrics=dict(metrics or {}))
    if embedding is not None:
      # The rows the encoder sees, whatever the module (Google's layout).
      prompt = model.materialize_prompt(
          {**embedding, 'encoder': {'prompt': host_trainable['encoder']['prompt']}})
      info.prompt_length = int(prompt.shape[0]) if isinstance(prompt, np.ndarray) else max(
          p.shape[0] for p in prompt)
      info.param_shapes = {k: list(v.shape) for k, v in flat.items()}
    files.save_numpy_checkpoint(self.model_dir, step, prompt, flat, info)

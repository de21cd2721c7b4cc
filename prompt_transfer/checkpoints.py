"""Train-state checkpoints (orbax) and numpy prompt files (Google's layout).

Numpy prompts: `MODEL_DIR/numpy_checkpoints/checkpoint_STEP/<param path joined
by dots>`, plain `np.save` content without the `.npy` suffix, e.g.
`encoder.prompt.prompt.prompt`, exactly as Google's prompt-tuning code writes
them, plus `prompt_info.json` (what the prompt was trained for, see
`PromptInfo`). The folder is written under a temporary name and renamed, so a
reader never sees a half-written step.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import time
from typing import Any, Mapping, Optional

import jax
import numpy as np
from flax import traverse_util

NUMPY_DIR = 'numpy_checkpoints'
INFO_FILE = 'prompt_info.json'


@dataclasses.dataclass
class PromptInfo:
  """The JSON sidecar of a saved prompt (read back by the prompt library)."""
  task: str = ''
  model: dict = dataclasses.field(default_factory=dict)
  vocabulary: str = ''
  prompt_length: int = 0
  step: int = 0
  metrics: dict = dataclasses.field(default_factory=dict)


def atomic_write_bytes(path: str, data: bytes) -> None:
  tmp = f'{path}.tmp-{os.getpid()}-{time.time_ns()}'
  with open(tmp, 'wb') as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def numpy_checkpoint_dir(model_dir: str, step: int) -> str:
  return os.path.join(model_dir, NUMPY_DIR, f'checkpoint_{step}')


def save_numpy_prompt(model_dir: str, step: int, trainable: Mapping[str, Any],
                      info: Optional[PromptInfo] = None) -> str:
  """Writes every trainable array as `<dotted.path>` under checkpoint_STEP/.

  `trainable` is the trainable subtree of the full parameter tree, with its
  full paths (e.g. {'encoder': {'prompt': {'prompt': {'prompt': x}}}}).
  Only process 0 writes. Returns the final folder.
  """
  final = numpy_checkpoint_dir(model_dir, step)
  if jax.process_index() != 0:
    return final
  os.makedirs(os.path.dirname(final), exist_ok=True)
  tmp = f'{final}.tmp-{int(time.time() * 1e6)}'
  os.makedirs(tmp)
  for path, value in traverse_util.flatten_dict(dict(trainable), sep='.').items():
    with open(os.path.join(tmp, path), 'wb') as f:
      np.save(f, np.asarray(jax.device_get(value)))
  if info is not None:
    with open(os.path.join(tmp, INFO_FILE), 'w') as f:
      json.dump(dataclasses.asdict(info), f, indent=1, default=float)
  if os.path.exists(final):  # a re-run of the same step replaces it
    shutil.rmtree(final)
  os.replace(tmp, final)
  return final


def latest_numpy_step(model_dir: str) -> Optional[int]:
  root = os.path.join(model_dir, NUMPY_DIR)
  if not os.path.isdir(root):
    return None
  steps = [int(m.group(1)) for n in os.listdir(root)
           if (m := re.fullmatch(r'checkpoint_(\d+)', n))]
  return max(steps) if steps else None


def load_prompt_info(prompt_file: str) -> Optional[PromptInfo]:
  path = os.path.join(os.path.dirname(prompt_file), INFO_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return PromptInfo(**json.load(f))


class TrainStateCheckpointer:
  """Full train state (step, trainable params, optimizer state) with orbax.

  orbax writes each step to a temporary folder and commits it atomically, so
  a run killed at any moment restarts from the last complete step.
  """

  def __init__(self, model_dir: str, max_to_keep: Optional[int] = 3):
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    self._ocp = ocp
    self.directory = os.path.abspath(os.path.join(model_dir, 'checkpoints'))
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

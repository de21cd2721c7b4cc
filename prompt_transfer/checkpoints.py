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
import time
from typing import Any, Mapping, Optional

import jax
import numpy as np
from etils import epath
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


# File I/O goes through etils.epath so MODEL_DIR may be local or gs://
# (renames are atomic on local disks; on GCS a rename is copy-then-delete,
# and readers ignore the *.tmp-* names either way).


def normalize_dir(path: str) -> str:
  """Local paths made absolute; URLs such as gs://bucket/run kept as given."""
  path = os.fspath(path)
  return path if '://' in path else os.path.abspath(os.path.expanduser(path))


def atomic_write_bytes(path: str, data: bytes) -> None:
  path = epath.Path(path)
  tmp = path.parent / f'{path.name}.tmp-{os.getpid()}-{time.time_ns()}'
  if '://' in os.fspath(path):
    tmp.write_bytes(data)
    if path.exists():
      path.unlink()
    tmp.rename(path)
    return
  with open(tmp, 'wb') as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())  # the data is on disk before the name points at it
  os.replace(tmp, path)


def numpy_checkpoint_dir(model_dir: str, step: int) -> str:
  return os.fspath(epath.Path(model_dir) / NUMPY_DIR / f'checkpoint_{step}')


def save_numpy_prompt(model_dir: str, step: int, trainable: Mapping[str, Any],
                      info: Optional[PromptInfo] = None) -> str:
  """Writes every trainable array as `<dotted.path>` under checkpoint_STEP/.

  `trainable` is the trainable subtree of the full parameter tree, with its
  full paths (e.g. {'encoder': {'prompt': {'prompt': {'prompt': x}}}}).
  Only process 0 writes. Returns the final folder.
  """
  final = epath.Path(numpy_checkpoint_dir(model_dir, step))
  if jax.process_index() != 0:
    return os.fspath(final)
  final.parent.mkdir(parents=True, exist_ok=True)
  tmp = final.parent / f'{final.name}.tmp-{int(time.time() * 1e6)}'
  tmp.mkdir()
  for path, value in traverse_util.flatten_dict(dict(trainable), sep='.').items():
    with (tmp / path).open('wb') as f:
      np.save(f, np.asarray(jax.device_get(value)))
  if info is not None:
    (tmp / INFO_FILE).write_text(json.dumps(dataclasses.asdict(info), indent=1, default=float))
  if final.exists():  # a re-run of the same step replaces it
    final.rmtree()
  tmp.rename(final)
  return os.fspath(final)


def latest_numpy_step(model_dir: str) -> Optional[int]:
  root = epath.Path(model_dir) / NUMPY_DIR
  if not root.is_dir():
    return None
  steps = [int(m.group(1)) for p in root.iterdir()
           if (m := re.fullmatch(r'checkpoint_(\d+)', p.name))]
  return max(steps) if steps else None


def load_prompt_info(prompt_file: str) -> Optional[PromptInfo]:
  path = epath.Path(prompt_file).parent / INFO_FILE
  if not path.exists():
    return None
  return PromptInfo(**json.loads(path.read_text()))


class TrainStateCheckpointer:
  """Full train state (step, trainable params, optimizer state) with orbax.

  orbax writes each step to a temporary folder and commits it atomically, so
  a run killed at any moment restarts from the last complete step.
  """

  def __init__(self, model_dir: str, max_to_keep: Optional[int] = 3):
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    self._ocp = ocp
    self.directory = os.fspath(epath.Path(normalize_dir(model_dir)) / 'checkpoints')
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

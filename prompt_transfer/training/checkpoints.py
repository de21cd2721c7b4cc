"""A run's checkpoints: the full train state with orbax, the prompt as numpy.

`PromptCheckpointer.save(step, ...)` writes both: the train state (step,
trainable parameters, optimizer state) with orbax, which commits each step
atomically, plus a SHA-256 of that state beside it (`state.sha256`), and the
numpy checkpoint of prompts/files.py (the materialised prompt at
`encoder.prompt.prompt.prompt`, the prompt module's free parameters,
`prompt_info.json`). A run restarted on the same MODEL_DIR restores the
newest orbax step that reads back and matches its checksum: an unreadable or
corrupted one is moved to MODEL_DIR/corrupt_checkpoints/ with a warning naming
it and why, and the previous one is used. The numpy export of the resumed step
is verified and rewritten if missing or damaged.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import time
from typing import Any, Mapping, Optional, Tuple

import jax
import numpy as np
from etils import epath
from flax import traverse_util

from prompt_transfer import fileio
from prompt_transfer.model.models import EncoderDecoderModel
from prompt_transfer.prompts import files
from prompt_transfer.training import partitioning
from prompt_transfer.training.state import TrainingError


def log_warning(message: str) -> None:
  if jax.process_index() == 0:
    print(f'[prompt-transfer] warning: {message}', flush=True)


CHECKSUM_FILE = 'state.sha256'
CORRUPT_DIR = 'corrupt_checkpoints'

# A write that could not happen (disk full, no permission, read-only
# filesystem): an OSError from our writes, a ValueError with this text from
# orbax/TensorStore.
_WRITE_FAILURE = re.compile(r'No space left on device|Disk quota exceeded|Permission denied|'
                            r'Read-only file system')


def drop_closed_loop_reports() -> None:
  """After a failed orbax save closes its event loop, TensorStore writes
  still in flight complete and call back into the closed loop; TensorStore
  reports that `RuntimeError: Event loop is closed` as unraisable, a bare
  traceback around the one error line the user should see. Drops those
  reports (others go to the previous hook) for the rest of a run that is
  stopping on a failed write; not with PROMPT_TRANSFER_DEBUG."""
  import sys  # pylint: disable=g-import-not-at-top
  previous = sys.unraisablehook
  if os.environ.get('PROMPT_TRANSFER_DEBUG') or getattr(previous, 'drops_closed_loop', False):
    return

  def hook(unraisable: Any) -> None:
    value = unraisable.exc_value
    if not (isinstance(value, RuntimeError) and str(value) == 'Event loop is closed'):
      previous(unraisable)

  hook.drops_closed_loop = True
  sys.unraisablehook = hook


def write_failure(error: BaseException, where: Optional[str] = None) -> Optional[str]:
  """'<reason> while writing <path>' when `error` is a failed write, else None;
  `where` names the folder when the error does not say which file (orbax's
  small metadata writes raise a bare OSError)."""
  text = str(error)
  reason = _WRITE_FAILURE.search(text)
  if not (reason or isinstance(error, OSError)) or isinstance(error, TrainingError):
    return None
  path = getattr(error, 'filename', None) or next(iter(re.findall(
      r'(?:Failed writing|Error writing|opening|writing)[^"]*"([^"]+)"', text)), None)
  why = reason.group(0) if reason else (getattr(error, 'strerror', None) or text.splitlines()[0])
  if path:
    return f'{why} while writing {path}'
  return f'{why} while writing under {where}' if where else why


def state_digest(state: Any) -> str:
  """SHA-256 over every leaf's path, dtype, shape and bytes (host values)."""
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    a = np.ascontiguousarray(np.asarray(leaf))
    h.update(f'{jax.tree_util.keystr(path)}|{a.dtype}|{a.shape}|'.encode())
    h.update(a.tobytes())
  return h.hexdigest()


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

  def __exit__(self, exc_type: Any, exc: Optional[BaseException], tb: Any) -> None:
    failed = write_failure(exc, self.model_dir) if exc is not None else None
    if failed:
      drop_closed_loop_reports()  # before close() shuts orbax's event loop
    try:
      self.close()
    except Exception:  # pylint: disable=broad-except
      if exc is None:
        raise  # otherwise the run's own error is the one to report
    if failed:
      # Say what is safe on disk, so nobody deletes a good MODEL_DIR.
      raise TrainingError(f'{failed}. Kept: {self.kept()}. Make room (or fix the '
                          'permissions) and run the same command again to resume from '
                          'there.') from exc

  def kept(self) -> str:
    """What a rerun resumes from: the newest committed train-state checkpoint."""
    self.orbax.manager.reload()
    step = self.orbax.latest_step()
    if step is None:
      return f'no checkpoint yet in {self.model_dir} (a rerun starts from step 0)'
    numpy_dir = files.numpy_checkpoint_dir(self.model_dir, step)
    prompt = (f' and its numpy prompt {numpy_dir}' if self.has_numpy(step) else
              ' (its numpy prompt is rewritten on resume)')
    return f'the step-{step} checkpoint {self.orbax.directory}/{step}{prompt}'

  def close(self) -> None:
    self.orbax.close()

  @property
  def directory(self) -> str:
    return self.orbax.directory

  def latest_step(self) -> Optional[int]:
    return self.orbax.latest_step()

  def restore_latest(self, state: dict) -> Tuple[int, dict]:
    """(step, state) of the newest checkpoint that reads back and matches its
    checksum; (0, state) when there is none. Bad ones are moved aside."""
    skipped = []
    for step in sorted(self.orbax.manager.all_steps(), reverse=True):
      folder = epath.Path(self.orbax.directory) / str(step)
      try:
        restored = self.orbax.restore(step, state)
        host = jax.tree_util.tree_map(partitioning.to_host, restored)
      except Exception as e:  # orbax/TensorStore raise many types for damaged files
        why = f'unreadable ({type(e).__name__}: {str(e).splitlines()[0][:200]})'
      else:
        expected = folder / CHECKSUM_FILE
        if not expected.exists():  # written before checksums existed: trusted
          return step, restored
        if expected.read_text().strip() == state_digest(host):
          return step, restored
        why = 'its data does not match the checksum written with it (corrupted)'
      moved = self._move_aside(step)
      skipped.append(f'checkpoint {folder} ({why}; moved to {moved})')
      log_warning(f'checkpoint {folder} is {why}; moved to {moved}, trying the previous one')
    if skipped:
      raise TrainingError('No usable train-state checkpoint in '
                          f'{self.orbax.directory}: ' + '; '.join(skipped) +
                          '. Remove MODEL_DIR (or use another) to start over.')
    return 0, state

  def _move_aside(self, step: int) -> str:
    """Moves a bad step folder out of orbax's sight (kept for inspection)."""
    src = epath.Path(self.orbax.directory) / str(step)
    dst_root = epath.Path(self.model_dir) / CORRUPT_DIR
    dst = dst_root / f'{step}-{time.strftime("%Y%m%d-%H%M%S")}'
    if jax.process_index() == 0:
      dst_root.mkdir(parents=True, exist_ok=True)
      src.rename(dst)
    self.orbax.manager.reload()
    return os.fspath(dst)

  def has_numpy(self, step: int) -> bool:
    """Whether step's numpy checkpoint is there and every file in it reads."""
    return files.numpy_checkpoint_problem(self.model_dir, step) is None

  def save(self, step: int, state: dict, model: EncoderDecoderModel, frozen: Mapping,
           metrics: Optional[Mapping[str, float]] = None) -> None:
    """Writes step `step` (orbax unless it has it already, then numpy)."""
    host_trainable = jax.tree_util.tree_map(partitioning.to_host, state['trainable'])
    if not all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(host_trainable)):
      raise TrainingError(f'Trainable parameters are not finite at step {step}; '
                          'not saving. The last good checkpoint is kept.')
    if self.orbax.latest_step() != step:
      self.orbax.save(step, state)
      # The trainable subtree is on the host already; gather only the rest.
      host_state = {k: host_trainable if k == 'trainable' else
                    jax.tree_util.tree_map(partitioning.to_host, v) for k, v in state.items()}
      if jax.process_index() == 0:
        fileio.atomic_write_text(epath.Path(self.orbax.directory) / str(step) / CHECKSUM_FILE,
                                 state_digest(host_state) + '\n')
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
      if not self.info.weights:  # hashed once per run (the table is frozen)
        self.info.weights = files.weights_fingerprint(
            embedding['token_embedder']['embedding'])
      info.weights = self.info.weights
      info.param_shapes = {k: list(v.shape) for k, v in flat.items()}
    module = model.prompt_module() if model.prompt_module is not None else None
    extra = module.extra_files(info) if hasattr(module, 'extra_files') else None
    from prompt_transfer.training import data  # pylint: disable=g-import-not-at-top
    # A per-example module's prompt K serves task K of a task_ids mixture.
    files.save_numpy_checkpoint(self.model_dir, step, prompt, flat, info, extra,
                                data.tasks_by_id(info.task) if isinstance(prompt, list) else None)

"""Cross-model prompt projection (Su et al. 2022): a prompt of source model S
mapped to a prompt for target model T by a small trained network.

The authors' projector: flatten the source prompt [L, d_S], Linear(L*d_S ->
hidden), tanh (or LeakyReLU), Linear(hidden -> L*d_T), reshape to [L, d_T],
LayerNorm over d_T (or none). `ProjectedPrompt` is that network as a prompt
module (prompts/slot.py): the K source prompts are frozen inputs, the
projector's weights are its parameters, so `t5x train` on the target model
trains the projector and nothing else. Two trainings, chosen by gin:

* task tuning (gin/projectors/task_tuning.gin): the target model's task loss
  on the projected prompt(s), one source prompt per task (K > 1 picks each
  example's by its `task_ids`);
* distance minimisation (gin/projectors/distance.gin): given the target
  model's own prompts for the same tasks, the mean squared distance between
  projected and target prompts (sown as `losses/distance`, with
  `train.task_loss_weight = 0`).

A projector run's numpy checkpoint is a projector: the weights
(`encoder.prompt.prompt.dense_in.kernel`, ...) beside `projector.json`
(source and target models, length, hidden size, activation) and the
projected prompt(s) in the usual layout. `load_projector` reads one back;
`project` applies it to any prompts of the source model.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Callable, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from prompt_transfer import fileio
from prompt_transfer.prompts import files

Array = jax.Array
TASK_IDS = 'task_ids'
PROJECTOR_FILE = 'projector.json'
ACTIVATIONS: dict = {'tanh': jnp.tanh, 'leaky_relu': nn.leaky_relu}


class ProjectorError(ValueError):
  """A projector that cannot be used here (files missing, other models)."""


class Frozen:
  """A constant array (or a tree of them) as a module attribute: hashed by
  identity, so Flax neither compares nor copies megabytes of prompt on every
  module use."""

  def __init__(self, value: Any):
    self.value = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), value)

  def __hash__(self) -> int:
    return id(self)

  def __eq__(self, other: Any) -> bool:
    return self is other


class ProjectedPrompt(nn.Module):
  """K source prompts [K, L, d_S] -> K prompts for this model [K, L, d_T].

  targets: the target model's own prompts [K, L, d_T] (distance training),
  or None. Returns [L, d_T] when K == 1, else each example's prompt by its
  task id ([b, L, d_T]).
  """
  sources: Frozen
  hidden: int = 768
  activation: str = 'tanh'
  layer_norm: bool = True
  targets: Optional[Frozen] = None
  feature: str = TASK_IDS
  # Where the sources came from (their sidecars name the source model and tasks).
  source_files: Tuple[str, ...] = ()

  def extra_files(self, info: files.PromptInfo) -> dict:
    """projector.json for the numpy checkpoint (info: the target-side sidecar)."""
    return {PROJECTOR_FILE: json.dumps(dataclasses.asdict(projector_info(self, info)), indent=1)}

  @property
  def num_prompts(self) -> int:
    return int(self.sources.value.shape[0])

  @property
  def per_example_features(self) -> Tuple[str, ...]:
    # Distance training feeds the encoder the first pair's projection (the
    # loss does not read the batch), so it needs no ids.
    return (self.feature,) if self.num_prompts > 1 and self.targets is None else ()

  @nn.compact
  def __call__(self, embedding: Array, features: Optional[Mapping[str, Array]] = None
               ) -> Array:
    src = jnp.asarray(self.sources.value)  # [K, L, d_S]
    k, length, _ = src.shape
    width = embedding.shape[-1]
    if self.activation not in ACTIVATIONS:
      raise ProjectorError(f'projector activation must be one of {sorted(ACTIVATIONS)}; '
                           f'got {self.activation!r}.')
    h = nn.Dense(self.hidden, name='dense_in')(src.reshape(k, -1))  # [K, hidden]
    h = ACTIVATIONS[self.activation](h)
    y = nn.Dense(length * width, name='dense_out')(h).reshape(k, length, width)  # [K, L, d_T]
    if self.layer_norm:
      y = nn.LayerNorm(name='layer_norm')(y)  # over d_T
    if self.targets is not None:
      target = jnp.asarray(self.targets.value)
      self.sow('losses', 'distance', jnp.mean(jnp.square(y - target)))
    if k == 1 or self.targets is not None:
      return y[0]  # [L, d_T], shared
    if not features or self.feature not in features:
      raise KeyError(f'A projector over {k} source prompts needs the per-example feature '
                     f'{self.feature!r} (training.data.register_with_task_ids).')
    ids = jnp.asarray(features[self.feature]).astype(jnp.int32).reshape(-1)
    return jnp.take(y, ids, axis=0)  # [b, L, d_T]


def _read_prompts(paths: Sequence[str], what: str) -> np.ndarray:
  """[K, L, d] from K prompt files (one length and width)."""
  if not paths:
    raise ProjectorError(f'{what}: no prompt file given.')
  arrays = [files.load_prompt_file(p) for p in paths]
  shapes = {a.shape for a in arrays}
  if len(shapes) != 1:
    raise ProjectorError(f'{what} must share one shape; got ' + ', '.join(
        f'{p}: {a.shape}' for p, a in zip(paths, arrays)))
  return np.stack(arrays)


def projected_prompt(source_prompt_files: Sequence[str], hidden: int = 768,
                     activation: str = 'tanh', layer_norm: bool = True,
                     target_prompt_files: Optional[Sequence[str]] = None,
                     task_names: Optional[Sequence[str]] = None
                     ) -> Callable[..., ProjectedPrompt]:
  """The prompt-module factory of a projector over these source prompts
  (and, for distance training, the target model's prompts of the same tasks,
  in the same order). task_names: the tasks of a task-tuning mixture
  (projectors/task_tuning_multi.gin), one per source prompt, in order."""
  if isinstance(source_prompt_files, str):
    source_prompt_files = [source_prompt_files]
  sources = _read_prompts(list(source_prompt_files), 'SOURCE_PROMPT_FILES')
  if task_names is not None:
    task_names = [task_names] if isinstance(task_names, str) else list(task_names)
    if len(task_names) != sources.shape[0]:
      raise ProjectorError(
          f'Task tuning pairs source prompts and tasks by position: {sources.shape[0]} '
          f'SOURCE_PROMPT_FILES ({", ".join(map(str, source_prompt_files))}) vs '
          f'{len(task_names)} TASKS ({", ".join(task_names)}).')
  targets = None
  if target_prompt_files:
    if isinstance(target_prompt_files, str):
      target_prompt_files = [target_prompt_files]
    targets = _read_prompts(list(target_prompt_files), 'TARGET_PROMPT_FILES')
    if targets.shape[:2] != sources.shape[:2]:
      raise ProjectorError(
          f'Distance training pairs prompts by position: {sources.shape[0]} source prompts of '
          f'length {sources.shape[1]} vs {targets.shape[0]} target prompts of length '
          f'{targets.shape[1]}.')
    targets = Frozen(targets)
  return functools.partial(ProjectedPrompt, sources=Frozen(sources), hidden=hidden,
                           activation=activation, layer_norm=layer_norm, targets=targets,
                           source_files=tuple(os.fspath(p) for p in source_prompt_files))


# ---------------------------------------------------------------------------
# A trained projector on disk.
# ---------------------------------------------------------------------------
@dataclasses.dataclass
class ProjectorInfo:
  """projector.json: what maps what."""
  source_model: dict
  target_model: dict
  length: int
  source_dim: int
  target_dim: int
  hidden: int
  activation: str
  layer_norm: bool
  trained_on: list = dataclasses.field(default_factory=list)  # the source prompts' tasks
  training: str = ''  # 'task_tuning' or 'distance'
  source_weights: str = ''
  target_weights: str = ''


def projector_info(module: ProjectedPrompt, target_info: files.PromptInfo) -> ProjectorInfo:
  """What a projector run's module maps: source model (from the source
  prompts' sidecars) to target model (the run's own sidecar)."""
  src = module.sources.value
  source_infos = [files.load_prompt_info(p) for p in module.source_files]
  first = next((i for i in source_infos if i is not None), None)
  return ProjectorInfo(
      source_model=dict(first.model) if first else {}, target_model=dict(target_info.model),
      length=int(src.shape[1]), source_dim=int(src.shape[2]),
      target_dim=int(target_info.model.get('emb_dim', 0)), hidden=module.hidden,
      activation=module.activation, layer_norm=module.layer_norm,
      trained_on=[(i.task if i else '') for i in source_infos],
      training='distance' if module.targets is not None else 'task_tuning',
      source_weights=first.weights if first else '', target_weights=target_info.weights)


def projector_folder(path: fileio.PathLike) -> str:
  """A projector run's MODEL_DIR (its latest numpy checkpoint) or a checkpoint folder."""
  folder = files.folder_with(path, PROJECTOR_FILE)
  if folder is None:
    raise ProjectorError(f'{path} is not a projector: no {PROJECTOR_FILE} in it or in its '
                         'latest numpy checkpoint (train one with gin/projectors/*.gin).')
  return folder


def load_projector(path: fileio.PathLike) -> Tuple[ProjectorInfo, dict]:
  """(ProjectorInfo, projector params) of a trained projector."""
  folder = epath.Path(projector_folder(path))
  info = ProjectorInfo(**json.loads((folder / PROJECTOR_FILE).read_text()))
  names = ['dense_in.kernel', 'dense_in.bias', 'dense_out.kernel', 'dense_out.bias'] + (
      ['layer_norm.scale', 'layer_norm.bias'] if info.layer_norm else [])
  params = files.read_module_params(folder, names)
  if params is None:
    raise ProjectorError(f'{folder} lacks one of {files.MODULE_PREFIX}{{{", ".join(names)}}}: '
                         'not a complete projector.')
  return info, params


def project(prompts: np.ndarray, info: ProjectorInfo, params: Mapping[str, Any]) -> np.ndarray:
  """Applies a trained projector to source prompts [K, L, d_S] (or [L, d_S])."""
  prompts = np.asarray(prompts, np.float32)
  single = prompts.ndim == 2
  batch = prompts[None] if single else prompts
  if batch.shape[1:] != (info.length, info.source_dim):
    raise ProjectorError(f'The projector maps prompts of shape [{info.length}, '
                         f'{info.source_dim}]; got {list(batch.shape[1:])}.')
  module = ProjectedPrompt(sources=Frozen(batch), hidden=info.hidden,
                           activation=info.activation, layer_norm=info.layer_norm)
  dummy = jnp.zeros((1, info.target_dim), jnp.float32)  # only its width is read
  out = np.asarray(module.apply({'params': params}, dummy,
                                {TASK_IDS: jnp.arange(batch.shape[0])}))
  out = out.reshape(batch.shape[0], info.length, info.target_dim)
  return out[0] if single else out


def from_projector(source_prompt_file: str, projector_dir: str) -> Callable[..., Array]:
  """A prompt initialiser: the source prompt mapped by a trained projector
  (prompts/from_projector.gin). Checked before training: the source prompt's
  shape against the projector's, the result's against the model's prompt."""
  from prompt_transfer.prompts.initializers import from_array  # pylint: disable=g-import-not-at-top
  info, params = load_projector(projector_dir)
  source = files.load_prompt_file(source_prompt_file, (info.length, info.source_dim))
  source_info = files.load_prompt_info(source_prompt_file)
  if source_info and source_info.weights and info.source_weights and (
      source_info.weights != info.source_weights):
    raise ProjectorError(
        f'{source_prompt_file} was trained on {source_info.model.get("name", "a model")} '
        f'(weights {source_info.weights}); the projector {projector_dir} maps prompts of '
        f'{info.source_model.get("name", "another model")} (weights {info.source_weights}).')
  init = from_array(project(source, info, params))
  return init

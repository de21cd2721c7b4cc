"""Staged training: one run, several frozen models in turn, one prompt.

A run may be a sequence of `Stage`s (FPT's progressive training: a partial
model first, the full one last). Each stage has its own model config
(`config_overrides`) and/or frozen-parameter transform (`transform(config,
params) -> (config, params)`, e.g. `keep_layers`), and a step count. At a
stage boundary the model and its frozen weights are rebuilt; the prompt
module's parameters and optimizer state carry over bit for bit and the step
counter continues. A resumed run restarts inside the stage its step falls in.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional, Sequence, Tuple

from prompt_transfer.model.config import T5Config

Params = Mapping[str, Any]
Transform = Callable[[T5Config, Params], Tuple[T5Config, Params]]


class StageError(ValueError):
  """A stage list that cannot run (steps that do not add up, bad layer indices)."""


@dataclasses.dataclass(frozen=True)
class Stage:
  """steps: this stage's number of steps (None for the last stage: until
  TRAIN_STEPS). config_overrides: T5Config fields changed in this stage.
  transform: applied to the full frozen parameters (and config) for it."""
  steps: Optional[int] = None
  config_overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  transform: Optional[Transform] = None
  name: str = ''

  def build(self, config: T5Config, frozen: Params) -> Tuple[T5Config, Params]:
    """This stage's (config, frozen params) from the full model's."""
    config = config.replace(**dict(self.config_overrides)) if self.config_overrides else config
    if self.transform is not None:
      config, frozen = self.transform(config, frozen)
    return config, frozen


@dataclasses.dataclass(frozen=True)
class StagePlan:
  """Stages with their [start, end) steps."""
  stages: Tuple[Stage, ...]
  bounds: Tuple[Tuple[int, int], ...]

  def index_at(self, step: int) -> int:
    """The stage that runs step `step` (0-based: the step that makes step+1)."""
    for i, (start, end) in enumerate(self.bounds):
      if start <= step < end:
        return i
    return len(self.stages) - 1

  def label(self, i: int) -> str:
    return self.stages[i].name or f'stage {i + 1}/{len(self.stages)}'


def plan(stages: Optional[Sequence[Stage]], train_steps: int) -> StagePlan:
  """The stages' step ranges; no stages = one stage of the configured model."""
  stages = tuple(stages or (Stage(),))
  bounds, start = [], 0
  for i, stage in enumerate(stages):
    last = i == len(stages) - 1
    if stage.steps is None and not last:
      raise StageError(f'Stage {i + 1} of {len(stages)} has no step count; only the last '
                       'stage may run until TRAIN_STEPS.')
    if stage.steps is not None and stage.steps <= 0:
      raise StageError(f'Stage {i + 1} has {stage.steps} steps; each stage needs at least 1.')
    end = train_steps if last and stage.steps is None else start + stage.steps
    if last and end != train_steps:
      raise StageError(f'The stages add up to {end} steps but TRAIN_STEPS is {train_steps}; '
                       'leave the last stage\'s steps unset to run until TRAIN_STEPS.')
    if end < start:
      raise StageError(f'The stages before the last add up to {start} steps, more than '
                       f'TRAIN_STEPS={train_steps}.')
    bounds.append((start, end))
    start = end
  return StagePlan(stages, tuple(bounds))


# ---------------------------------------------------------------------------
# Frozen-parameter transforms.
# ---------------------------------------------------------------------------
def keep_layers(encoder: Optional[Sequence[int]] = None,
                decoder: Optional[Sequence[int]] = None) -> Transform:
  """Keeps these encoder / decoder layers (in order, renumbered from 0); None
  keeps a stack whole. The final layer norms and embeddings are kept."""
  def transform(config: T5Config, params: Params) -> Tuple[T5Config, Params]:
    params = dict(params)
    changes = {}
    for stack, keep, field in (('encoder', encoder, 'num_encoder_layers'),
                               ('decoder', decoder, 'num_decoder_layers')):
      if keep is None:
        continue
      n = getattr(config, field)
      keep = [int(i) for i in keep]
      if not keep or len(set(keep)) != len(keep) or min(keep) < 0 or max(keep) >= n:
        raise StageError(f'keep_layers({stack}={keep}): need distinct indices in [0, {n}).')
      layers = dict(params[stack])
      kept = {f'layers_{j}': layers[f'layers_{i}'] for j, i in enumerate(keep)}
      rest = {k: v for k, v in layers.items() if not k.startswith('layers_')}
      params[stack] = {**rest, **kept}
      changes[field] = len(keep)
    return config.replace(**changes), params
  return transform

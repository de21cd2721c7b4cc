"""FPT: Fast Prompt Tuning by progressive training (Huang et al. 2022).

The prompt is first trained on a partial model and the model grows to full
size in stages; the prompt and its optimizer state carry over unchanged at
each boundary (the staged training of training/stages.py), only the frozen
model is rebuilt. A partial model is the full one with:

* fewer layers (`layer_indices`): k evenly spaced layers, always the first
  and the last, the final layer norm kept. Encoder only for classification
  tasks, encoder and decoder for generation tasks (`drop_decoder`, by
  default from the task's kind);
* narrower FFNs (`keep_neurons`): per layer the top fraction of neurons by
  FPT's activation score (the mean over non-pad tokens of |the input of wo|,
  analysis.neurons.ffn_importance, through the full model with the untrained
  prompt on validation examples): those columns of wi / wi_0 / wi_1 and rows
  of wo;
* both at once (compound reduction).

`fpt_stages` turns a schedule [(steps, layer fraction, width fraction), ...]
into stages (gin: runs/fpt.gin's FPT_SCHEDULE). The trainer computes the
neuron scores once when a stage needs them and caches them in MODEL_DIR
(`fpt_neuron_scores.npz`), so a resumed run keeps the same neurons.
"""
from __future__ import annotations

import dataclasses
import io
import re
from typing import Any, Callable, Mapping, Optional, Sequence, Tuple

import numpy as np
from etils import epath

from prompt_transfer import fileio
from prompt_transfer.model.config import T5Config
from prompt_transfer.training import stages as stages_lib

Params = Mapping[str, Any]
Scores = Mapping[str, np.ndarray]  # 'encoder/layers_i' -> [d_ff]
SCORES_FILE = 'fpt_neuron_scores.npz'


# ---------------------------------------------------------------------------
# Which layers and which neurons.
# ---------------------------------------------------------------------------
def layer_indices(num_layers: int, keep: int) -> list:
  """k of n layers, evenly spaced, first and last always kept.

  The n-1 steps between the first and the last layer are split into k-1 gaps
  of floor((n-1)/(k-1)), the remainder adding one to the last gaps: 6 of 24
  gives 0, 4, 8, 13, 18, 23 (the authors' choice), 12 of 24 gives
  0, 2, 4, ..., 20, 23 (thunlp/FastPromptTuning's evenly_select_layers).
  """
  if not 1 <= keep <= num_layers:
    raise stages_lib.StageError(f'Cannot keep {keep} of {num_layers} layers.')
  if keep == num_layers:
    return list(range(num_layers))
  if keep == 1:
    return [0]
  gap, extra = divmod(num_layers - 1, keep - 1)
  gaps = [gap] * (keep - 1 - extra) + [gap + 1] * extra
  return [0] + list(np.cumsum(gaps).astype(int).tolist())


def _check_fraction(fraction: float) -> float:
  if not 0 < fraction <= 1:
    raise stages_lib.StageError(f'A fraction of the model must be in (0, 1]; got {fraction}.')
  return fraction


def count_of(fraction: float, total: int) -> int:
  """How many of `total` a fraction keeps (at least one)."""
  return max(1, int(round(_check_fraction(fraction) * total)))


def top_neurons(scores: np.ndarray, keep: int) -> np.ndarray:
  """The `keep` highest-scoring neuron indices, in their original order
  (ties: the lower index)."""
  order = np.argsort(-np.asarray(scores, np.float64), kind='stable')[:keep]
  return np.sort(order)


_MLP_IN = re.compile(r'^wi(_\d+)?$')


def _slice_mlp(mlp: Mapping[str, Any], kept: np.ndarray) -> dict:
  out = {}
  for name, sub in mlp.items():
    if _MLP_IN.match(name):  # [d_model, d_ff]: columns
      out[name] = {**sub, 'kernel': np.asarray(sub['kernel'])[:, kept]}
    elif name == 'wo':  # [d_ff, d_model]: rows
      out[name] = {**sub, 'kernel': np.asarray(sub['kernel'])[kept, :]}
    else:
      out[name] = sub
  return out


def keep_neurons(scores: Scores, fraction: float) -> stages_lib.Transform:
  """Transform: every FFN of both stacks keeps its top `fraction` of neurons
  by `scores` ({'encoder/layers_i': [d_ff], ...} of the full model)."""
  def transform(config: T5Config, params: Params) -> Tuple[T5Config, Params]:
    keep = count_of(fraction, config.mlp_dim)
    params = dict(params)
    for stack in ('encoder', 'decoder'):
      layers = dict(params[stack])
      for name, layer in layers.items():
        if not name.startswith('layers_'):
          continue
        key = f'{stack}/{name}'
        if key not in scores:
          raise stages_lib.StageError(f'No FFN neuron scores for {key}; the scores cover '
                                      f'{sorted(scores)[:4]}...')
        score = np.asarray(scores[key])
        if score.shape != (config.mlp_dim,):
          raise stages_lib.StageError(f'FFN neuron scores of {key} have shape {score.shape}; '
                                      f'the model has d_ff {config.mlp_dim}.')
        layers[name] = {**layer, 'mlp': _slice_mlp(layer['mlp'], top_neurons(score, keep))}
      params[stack] = layers
    return config.replace(mlp_dim=keep), params
  return transform


# ---------------------------------------------------------------------------
# A partial model and the progressive schedule.
# ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class PartialModel:
  """Stage transform: the full model cut to `layers` of its depth and `width`
  of its FFN width (1.0 = untouched). drop_decoder: also drop decoder
  layers (None: decided by the task, `bind`). scores: FFN neuron scores
  (needed when width < 1; the trainer fills them in, `bind`)."""
  layers: float = 1.0
  width: float = 1.0
  drop_decoder: Optional[bool] = None
  score_examples: int = 1000  # validation examples the neuron scores average over
  scores: Optional[Any] = dataclasses.field(default=None, compare=False, repr=False)

  @property
  def needs_scores(self) -> bool:
    return self.width < 1.0

  def __call__(self, config: T5Config, params: Params) -> Tuple[T5Config, Params]:
    if self.width < 1.0:
      if self.scores is None:
        raise stages_lib.StageError('An FFN-reduced stage has no neuron scores (the trainer '
                                    'computes them: progressive.bind).')
      config, params = keep_neurons(self.scores, self.width)(config, params)
    if self.layers < 1.0:
      encoder = layer_indices(config.num_encoder_layers,
                              count_of(self.layers, config.num_encoder_layers))
      decoder = (layer_indices(config.num_decoder_layers,
                               count_of(self.layers, config.num_decoder_layers))
                 if self.drop_decoder else None)
      config, params = stages_lib.keep_layers(encoder, decoder)(config, params)
    return config, params


def fpt_stages(schedule: Sequence[Sequence[float]], drop_decoder: Optional[bool] = None,
               score_examples: int = 1000) -> list:
  """Stages from [(steps, layer fraction, width fraction), ...]; the last
  entry's steps may be None (until TRAIN_STEPS). Its fractions must be 1:
  FPT ends on the full model. drop_decoder: None = only for generation
  tasks. score_examples: validation examples for the neuron scores."""
  out = []
  for i, entry in enumerate(schedule):
    if len(entry) != 3:
      raise stages_lib.StageError(f'FPT_SCHEDULE entry {i + 1} is {entry!r}; expected '
                                  '(steps, layer fraction, width fraction).')
    steps, layers, width = entry
    _check_fraction(layers), _check_fraction(width)
    partial = layers < 1 or width < 1
    if i == len(schedule) - 1 and partial:
      raise stages_lib.StageError(f'The last FPT stage is {entry!r}; FPT ends on the full '
                                  'model (1.0, 1.0).')
    name = (f'partial model (layers {layers:g}, width {width:g})' if partial
            else 'full model')
    out.append(stages_lib.Stage(
        steps=None if steps is None else int(steps), name=name,
        transform=PartialModel(layers, width, drop_decoder, score_examples) if partial
        else None))
  return out


def needs_scores(stages: Optional[Sequence[stages_lib.Stage]]) -> bool:
  return any(getattr(s.transform, 'needs_scores', False) for s in stages or ())


def bind(stages: Optional[Sequence[stages_lib.Stage]], generation: bool,
         scores: Optional[Scores] = None) -> Optional[list]:
  """The stages with their PartialModels' open choices made: decoder layers
  dropped only for generation tasks (unless set), the neuron scores filled."""
  if stages is None:
    return None
  out = []
  for s in stages:
    t = s.transform
    if isinstance(t, PartialModel):
      t = dataclasses.replace(t, drop_decoder=generation if t.drop_decoder is None
                              else t.drop_decoder,
                              scores=scores if t.needs_scores else None)
      s = dataclasses.replace(s, transform=t)
    out.append(s)
  return out


def is_partial(stage: stages_lib.Stage) -> bool:
  """Whether a stage runs a cut model (its eval also runs the full one)."""
  return stage.transform is not None or bool(stage.config_overrides)


# ---------------------------------------------------------------------------
# Neuron scores: computed once per run, cached in MODEL_DIR.
# ---------------------------------------------------------------------------
def score_examples(stages: Optional[Sequence[stages_lib.Stage]]) -> int:
  return max([s.transform.score_examples for s in stages or ()
              if getattr(s.transform, 'needs_scores', False)] or [0])


def load_or_compute_scores(model_dir: str, compute: Callable[[], Scores],
                           write: bool = True) -> Scores:
  """MODEL_DIR/fpt_neuron_scores.npz, or `compute()` written there
  atomically (a resumed run keeps the neurons it started with). write:
  False on all processes but the first."""
  path = epath.Path(model_dir) / SCORES_FILE
  if path.exists():
    with path.open('rb') as f:
      data = np.load(io.BytesIO(f.read()))
      return {k.replace('__', '/'): data[k] for k in data.files}
  # float32 as stored: a resumed run reads exactly the numbers this one ranks.
  scores = {k: np.asarray(v, np.float32) for k, v in compute().items()}
  if write:
    buf = io.BytesIO()
    np.savez(buf, **{k.replace('/', '__'): v for k, v in scores.items()})
    fileio.atomic_write_bytes(path, buf.getvalue())
  return scores


"""FFN neuron read-outs of the frozen model: activated-neuron overlap and importance.

Both read the `intermediates` every MLP block sows (see layers.MlpBlock) via
`EncoderDecoderModel.capture_activations`; nothing here re-implements the
forward pass.

Activated-neuron overlap (ON, Su et al. 2022, "model stimulation
similarity"): feed a prompt to the frozen model, record the first FFN
projection before its non-linearity (`pre_activation`: `wi` of ReLU T5 1.0;
the gate `wi_0` of gated-GELU T5 1.1, where gelu(x) > 0 exactly when x > 0, so
"positive" still means "the neuron fires"), mark a neuron active when that
value is positive and compare two prompts' binary vectors by cosine,
|A and B| / sqrt(|A| |B|), over all layers, per layer and per window of 3
consecutive layers (windows 0-2, 3-5, ..., as the authors' code slices
`layer:layer+3`; a last shorter window when the depth is not a multiple of 3).

Probes (`activation_pattern(probe=...)`):
* 'prompt' (default, the authors' task-agnostic probe): batch 1, the prompt
  followed by one start token (`</s>`, id 1); decoder layers are read at the
  first decoding position (decoder input = BOS 0), encoder layers at the
  start token's position (the authors' commented-out encoder variant reads
  the position right after the prompt).
* 'examples': real task inputs (a batch of encoder-decoder features); encoder
  layers average the pre-activations over every non-pad position (prompt rows
  included), decoder layers over the examples' first decoding position; the
  averaged value is then binarised.

FFN importance (FPT, Huang et al. 2022, width reduction): each neuron's score
is the mean over non-pad tokens of |hidden|, the input of `wo`
(|gelu(x wi_0) * (x wi_1)| for T5 1.1, |relu(x wi)| for T5 1.0), computed
through the full model with its prompt; FPT keeps each layer's top-k neurons.
"""
from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Iterable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from prompt_transfer.model.models import (MODEL_FEATURES, EncoderDecoderModel, Params, build_model,
                                          merge_prompt, model_features)
from prompt_transfer.prompts.free import free_prompt

STACKS = ('decoder', 'encoder', 'both')
PROBES = ('prompt', 'examples')
EOS_ID = 1
WINDOW = 3


@dataclasses.dataclass
class ActivationPattern:
  """Averaged FFN pre-activations of one prompt: values[layer, neuron]."""
  layers: tuple  # e.g. ('decoder/layers_0', 'decoder/layers_1')
  values: np.ndarray  # [num_layers, mlp] float32

  @property
  def active(self) -> np.ndarray:
    """Binary pattern [num_layers, mlp]: the neuron fires (value > 0)."""
    return self.values > 0


@dataclasses.dataclass
class NeuronOverlap:
  """Cosine of two binary activation patterns."""
  overall: float
  per_layer: dict  # layer name -> overlap
  windows: dict  # 'decoder/layers_0-2' -> overlap

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


def _layer_index(name: str) -> int:
  return int(re.fullmatch(r'layers_(\d+)', name).group(1))


def _layer_arrays(inter: Mapping[str, Any], stack: str, key: str) -> list:
  """[(name, array [b, len, mlp])] of one stack, in layer order."""
  layers = {k: v for k, v in inter.get(stack, {}).items() if k.startswith('layers_')}
  out = []
  for name in sorted(layers, key=_layer_index):
    leaf = layers[name]['mlp'][key]
    out.append((f'{stack}/{name}', leaf[0] if isinstance(leaf, tuple) else leaf))
  return out


def _stacks(stack: str) -> tuple:
  if stack not in STACKS:
    raise ValueError(f'stack must be one of {STACKS}; got {stack!r}.')
  return ('encoder', 'decoder') if stack == 'both' else (stack,)


@functools.lru_cache(maxsize=16)
def _prompted_model(config: Any, length: int) -> EncoderDecoderModel:
  # One module per (config, prompt length); the prompt values come in params.
  return build_model(config, free_prompt(length))


@functools.lru_cache(maxsize=16)
def _capture_fn(model: EncoderDecoderModel) -> Any:
  # jit once per model: every prompt of a length then reuses the compilation.
  return jax.jit(lambda params, batch: model.capture_activations(params, batch))


def with_prompt(params: Params, prompt_array: Any) -> Params:
  """The frozen tree with `encoder/prompt/prompt/prompt` = prompt_array."""
  prompt = jnp.asarray(np.asarray(prompt_array, np.float32))
  return merge_prompt({'prompt': {'prompt': prompt}}, params)


def prompt_probe(start_token: int = EOS_ID) -> dict:
  """The authors' probe: one start token after the prompt, batch 1."""
  return {'encoder_input_tokens': np.array([[start_token]], np.int32),
          'decoder_input_tokens': np.zeros((1, 1), np.int32),  # BOS
          # Non-zero so the decoder's one position is not masked as padding.
          'decoder_target_tokens': np.ones((1, 1), np.int32)}


def activation_pattern(model: EncoderDecoderModel, params_without_prompt: Params,
                       prompt_array: Any, probe: str = 'prompt',
                       batch: Optional[Mapping[str, Any]] = None, stack: str = 'decoder',
                       start_token: int = EOS_ID) -> ActivationPattern:
  """The prompt's FFN activation pattern on the frozen model.

  Args:
    model: any model of the frozen network (only its config is used: a
      free-prompt model of the prompt's length is built, once per length).
    params_without_prompt: the frozen parameters (a prompt in them is ignored).
    prompt_array: [L, emb_dim] prompt.
    probe: 'prompt' (task-agnostic, the default) or 'examples' (needs batch).
    batch: encoder-decoder features for probe='examples'
      (encoder_input_tokens, decoder_input_tokens, decoder_target_tokens).
    stack: read 'decoder' layers (the authors' choice for T5), 'encoder' or
      'both' (encoder layers first).
    start_token: the probe's single input token (default `</s>`).

  Returns:
    ActivationPattern with one row per layer.
  """
  if probe not in PROBES:
    raise ValueError(f'probe must be one of {PROBES}; got {probe!r}.')
  prompt_array = np.asarray(prompt_array, np.float32)
  if prompt_array.ndim != 2 or prompt_array.shape[1] != model.config.emb_dim:
    raise ValueError(f'Prompt of shape {prompt_array.shape} does not fit {model.config.name} '
                     f'(emb_dim {model.config.emb_dim}).')
  length = prompt_array.shape[0]
  # Always a free-prompt model of this length: the given one may have none,
  # another length or a custom prompt module (projector, subspace decoder).
  try:
    model = _prompted_model(model.config, length)
  except TypeError:  # a config with unhashable fields (lists from gin)
    model = build_model(model.config, free_prompt(length))
  if probe == 'prompt':
    batch = prompt_probe(start_token)
  elif batch is None:
    raise ValueError("probe='examples' needs a batch of task examples.")
  batch = {k: jnp.asarray(batch[k]) for k in MODEL_FEATURES}
  inter = _capture_fn(model)(with_prompt(params_without_prompt, prompt_array), batch)
  inter = jax.device_get(inter)
  names, rows = [], []
  enc_tokens = np.asarray(batch['encoder_input_tokens'])
  for s in _stacks(stack):
    for name, x in _layer_arrays(inter, s, 'pre_activation'):
      x = np.asarray(x, np.float32)  # [b, len, mlp]
      if s == 'decoder':
        row = x[:, 0].mean(0)  # first decoding position
      elif probe == 'prompt':
        row = x[:, length].mean(0)  # the start token after the prompt
      else:
        mask = np.concatenate([np.ones((enc_tokens.shape[0], length), bool),
                               enc_tokens > 0], axis=1)
        row = x[mask].mean(0)  # over every non-pad (example, position)
      names.append(name)
      rows.append(row)
  return ActivationPattern(tuple(names), np.stack(rows))


def binary_cosine(a: np.ndarray, b: np.ndarray) -> float:
  """|A and B| / sqrt(|A| |B|) of two boolean vectors (0 when one is empty)."""
  a, b = np.asarray(a, bool).ravel(), np.asarray(b, bool).ravel()
  denom = np.sqrt(float(a.sum()) * float(b.sum()))
  return float(np.sum(a & b) / denom) if denom else 0.0


def _windows(layers: Sequence[str], size: int = WINDOW) -> dict:
  """'stack/layers_i-j' -> row indices: stride-`size` windows within each stack."""
  out = {}
  for s in dict.fromkeys(n.split('/')[0] for n in layers):
    idx = [i for i, n in enumerate(layers) if n.startswith(s + '/')]
    for k in range(0, len(idx), size):
      part = idx[k:k + size]
      first, last = (_layer_index(layers[i].split('/')[1]) for i in (part[0], part[-1]))
      out[f'{s}/layers_{first}-{last}'] = part
  return out


def neuron_overlap(pattern_a: ActivationPattern, pattern_b: ActivationPattern,
                   window: int = WINDOW) -> NeuronOverlap:
  """ON between two prompts' patterns (same model, same probe and stack)."""
  if pattern_a.layers != pattern_b.layers or pattern_a.values.shape != pattern_b.values.shape:
    raise ValueError(f'Patterns of different layers/widths: {pattern_a.layers} '
                     f'{pattern_a.values.shape} vs {pattern_b.layers} {pattern_b.values.shape}.')
  a, b = pattern_a.active, pattern_b.active
  return NeuronOverlap(
      overall=binary_cosine(a, b),
      per_layer={n: binary_cosine(a[i], b[i]) for i, n in enumerate(pattern_a.layers)},
      windows={n: binary_cosine(a[idx], b[idx])
               for n, idx in _windows(pattern_a.layers, window).items()})


def activation_patterns(model: EncoderDecoderModel, params_without_prompt: Params,
                        prompts: Mapping[str, Any], **kwargs: Any) -> dict:
  """{name: ActivationPattern} for a dict of prompts (kwargs as activation_pattern)."""
  return {n: activation_pattern(model, params_without_prompt, p, **kwargs)
          for n, p in prompts.items()}


def overlap_matrix(patterns: Mapping[str, ActivationPattern], window: Optional[str] = None
                   ) -> np.ndarray:
  """[n, n] ON matrix in dict order: overall, or one window/layer by name."""
  names = list(patterns)
  out = np.eye(len(names))
  for i in range(len(names)):
    for j in range(i):
      o = neuron_overlap(patterns[names[i]], patterns[names[j]])
      v = o.overall if window is None else {**o.per_layer, **o.windows}[window]
      out[i, j] = out[j, i] = v
  # A prompt with no active neuron has overlap 0 even with itself.
  for i, n in enumerate(names):
    out[i, i] = binary_cosine(patterns[n].active, patterns[n].active)
  return out


def ffn_importance(model: EncoderDecoderModel, params: Params,
                   batches: Iterable[Mapping[str, Any]], stack: str = 'both') -> dict:
  """FPT's neuron scores: mean over non-pad tokens of |hidden| per layer.

  Args:
    model: the model the params belong to (with its prompt, if any).
    params: full parameters (prompt included: FPT scores with the untrained
      prompt in place).
    batches: encoder-decoder feature batches (e.g. 1,000 validation examples).
    stack: 'encoder', 'decoder' or 'both'.

  Returns:
    {'encoder/layers_i': [mlp] float64, ...}; encoder tokens count the prompt
    rows and the non-pad input tokens, decoder tokens the non-pad targets.
  """
  capture = _capture_fn(model)
  sums: dict = {}
  counts: dict = {}
  for batch in batches:
    batch = {k: jnp.asarray(v) for k, v in model_features(batch).items()}
    inter = jax.device_get(capture(params, batch))
    enc = np.asarray(batch['encoder_input_tokens'])
    tgt = np.asarray(batch['decoder_target_tokens'])
    for s in _stacks(stack):
      for name, h in _layer_arrays(inter, s, 'hidden'):
        h = np.abs(np.asarray(h, np.float64))  # [b, len, mlp]
        if s == 'encoder':
          prompt_rows = h.shape[1] - enc.shape[1]
          mask = np.concatenate([np.ones((enc.shape[0], prompt_rows), bool), enc > 0], 1)
        else:
          mask = tgt > 0
        sums[name] = sums.get(name, 0.0) + h[mask].sum(0)
        counts[name] = counts.get(name, 0) + int(mask.sum())
  if not sums:
    raise ValueError('ffn_importance got no batches.')
  return {n: sums[n] / max(counts[n], 1) for n in sums}

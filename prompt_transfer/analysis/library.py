"""A prompt library: a folder (or list) of trained prompts and their sidecars.

Accepted entries, in any mix:
* a training run folder `MODEL_DIR` (its latest, or a given, numpy
  checkpoint: `MODEL_DIR/numpy_checkpoints/checkpoint_STEP/encoder.prompt.prompt.prompt`);
* a numpy checkpoint folder `.../checkpoint_STEP/`;
* a prompt file: our trainer's `encoder.prompt.prompt.prompt` (next to its
  `prompt_info.json`) or a bare `.npy` such as Google's pretrained prompts;
* a folder holding any of the above (searched recursively).

A prompt's name is the task in its `prompt_info.json`, else the run folder's
name (a sidecar-less numpy checkpoint), else the file stem (`sst2.npy` ->
`sst2`). Two prompts of one name get `@<run folder>` appended.
"""
from __future__ import annotations

import os
import re
from typing import Any, Iterable, Mapping, Optional, Union

import numpy as np
from etils import epath

from prompt_transfer import fileio
from prompt_transfer.prompts import files
from prompt_transfer.prompts.files import PROMPT_FILE, PromptInfo
PathLike = Union[str, os.PathLike]
# Model fields that must agree for a prompt to be meaningful on a model.
MODEL_FIELDS = ('emb_dim', 'vocab_size', 'num_heads', 'head_dim', 'mlp_dim',
                'num_encoder_layers', 'num_decoder_layers', 'mlp_activations')


class IncompatiblePromptError(ValueError):
  """A prompt trained for a model of other dimensions or vocabulary."""


def _as_list(paths_or_dir: Union[PathLike, Iterable[PathLike]]) -> list:
  if isinstance(paths_or_dir, (str, os.PathLike)):
    return [os.fspath(paths_or_dir)]
  return [os.fspath(p) for p in paths_or_dir]


def _checkpoint_files(model_dir: str, step: Optional[int]) -> list:
  """The prompt file of a run's numpy checkpoint, or a prompt bank's files."""
  step = files.latest_numpy_step(model_dir) if step is None else step
  if step is None:
    return []
  folder = epath.Path(files.numpy_checkpoint_dir(model_dir, step))
  if (folder / PROMPT_FILE).exists():
    return [os.fspath(folder / PROMPT_FILE)]
  if not folder.is_dir():
    return []
  return [os.fspath(sub / PROMPT_FILE) for sub in sorted(folder.iterdir(), key=lambda s: s.name)
          if re.fullmatch(files.PER_PROMPT_DIR.format(r'\d+'), sub.name)
          and (sub / PROMPT_FILE).exists()]


def _files_in(path: str, step: Optional[int]) -> list:
  """Prompt files under one path (see the module docstring); local or remote."""
  p = epath.Path(path)
  if p.is_file():
    return [path]
  if not p.is_dir():
    raise FileNotFoundError(f'Prompt library entry {path!r} does not exist.')
  if (p / files.NUMPY_DIR).is_dir():
    found = _checkpoint_files(path, step)
    if not found:
      raise FileNotFoundError(f'{path} has no numpy prompt checkpoint'
                              f'{"" if step is None else f" at step {step}"}.')
    return found
  if (p / PROMPT_FILE).is_file():
    return [os.fspath(p / PROMPT_FILE)]
  out = []
  for child in sorted(p.iterdir(), key=lambda c: c.name):
    if child.is_dir() and not child.name.startswith('.') and not fileio.is_tmp(child.name):
      # Sub-folders without any prompt (logs, TensorBoard) are skipped.
      try:
        out.extend(_files_in(os.fspath(child), step))
      except FileNotFoundError:
        continue
    elif child.name.endswith('.npy'):
      out.append(os.fspath(child))
  return out


def _run_dir(path: str) -> str:
  """The training run folder of a numpy checkpoint file, else its folder."""
  p = epath.Path(fileio.normalize_dir(path))
  if re.fullmatch(files.PER_PROMPT_DIR.format(r'\d+'), p.parent.name):
    p = p.parent  # a prompt bank's prompt_K/ sub-folder
  if p.parent.parent.name == files.NUMPY_DIR and re.fullmatch(r'checkpoint_\d+', p.parent.name):
    return os.fspath(p.parent.parent.parent)
  return os.fspath(p.parent)


def _default_name(path: str, info: Optional[PromptInfo]) -> str:
  if info is not None and info.task:
    return info.task
  base = epath.Path(path).name
  if base == PROMPT_FILE:
    return epath.Path(_run_dir(path)).name
  return base[:-4] if base.endswith('.npy') else base


def find_prompt_files(paths_or_dir: Union[PathLike, Iterable[PathLike]],
                      step: Optional[int] = None) -> dict:
  """{name: prompt file} for every prompt found (see the module docstring)."""
  out: dict = {}
  for entry in _as_list(paths_or_dir):
    found = _files_in(entry, step)
    if not found:  # a given folder with nothing in it is a mistake, not a no-op
      raise FileNotFoundError(
          f'{entry} holds no prompt (no numpy_checkpoints/, {PROMPT_FILE} or .npy file in it '
          'or its sub-folders); leave it out of the inputs.')
    for path in found:
      name = _default_name(path, files.load_prompt_info(path))
      if name in out:
        name = f'{name}@{epath.Path(_run_dir(path)).name}'
      k, unique = 2, name
      while unique in out:
        unique, k = f'{name}#{k}', k + 1
      out[unique] = path
  return out


def load_library(paths_or_dir: Union[PathLike, Iterable[PathLike]],
                 step: Optional[int] = None) -> dict:
  """{name: (prompt [L, d] float32, PromptInfo)} of every prompt found.

  A prompt without a sidecar (Google's .npy files) gets a PromptInfo with its
  length only: no task (its name is a file stem, not a registered task), no
  model description, no vocabulary.
  """
  out = {}
  for name, path in find_prompt_files(paths_or_dir, step).items():
    array = files.load_prompt_file(path)
    info = files.load_prompt_info(path) or PromptInfo(prompt_length=array.shape[0])
    out[name] = (array, info)
  if not out:
    raise FileNotFoundError(f'No prompt found in {_as_list(paths_or_dir)}.')
  return out


def describe_model(model: Mapping[str, Any]) -> str:
  """One line for messages, from a T5Config.describe() dict."""
  if not model:
    return 'an unknown model'
  fields = ', '.join(f'{k}={model[k]}' for k in MODEL_FIELDS if k in model)
  return f'{model.get("name", "model")} ({fields})'


def _vocab_key(text: str) -> Any:
  # 'Type(/path/spm.model, size=N)': the same file copied elsewhere still matches.
  m = re.fullmatch(r'(\w+)\((.*), size=(\d+)\)', text.strip())
  if not m:
    return text.strip()
  return m.group(1), os.path.basename(m.group(2)), int(m.group(3))


def other_weights_warning(info: PromptInfo, model_config: Any, weights: Optional[str],
                          name: str) -> Optional[str]:
  """A warning line when the prompt was trained on other frozen weights of
  the same dimensions (e.g. LM-adapted vs Flan-T5 base), else None.

  Such a prompt loads (check_compatible passes) but was not trained for this
  model. Compared by the sidecar's weights fingerprint, or by model name for
  sidecars written before fingerprints.
  """
  theirs = (info.model or {}).get('name', '')
  if info.weights and weights:
    if info.weights == weights:
      return None
    what = f'{theirs or "a model"} (weights {info.weights})', \
        f'{model_config.name} (weights {weights})'
  elif theirs and theirs != model_config.name:
    what = theirs, model_config.name
  else:
    return None
  return (f'prompt {name} was trained on other frozen weights, {what[0]}, than this '
          f'model\'s, {what[1]}: same dimensions, so it loads, but it was not trained '
          'for these weights.')


def check_compatible(info: PromptInfo, model_config: Any, vocab: Any = None,
                     array: Optional[np.ndarray] = None, projector: bool = False,
                     name: Optional[str] = None) -> None:
  """Raises IncompatiblePromptError if the prompt was made for another model.

  Compares the sidecar's model description with `model_config` (a T5Config)
  on MODEL_FIELDS, the sidecar's vocabulary with `vocab` (a seqio vocabulary
  or its description), and the array's width with the model's emb_dim (the
  only check possible for a bare .npy file); `name` labels the prompt in the
  message (default: its task). projector=True skips the checks
  (for a caller that maps the prompt with projector.py first).
  """
  if projector:
    return
  want = model_config.describe()
  have = dict(info.model or {})
  problems = []
  for key in MODEL_FIELDS:
    if key in have and key in want:
      a, b = have[key], want[key]
      if (list(a) if isinstance(a, (list, tuple)) else a) != (
          list(b) if isinstance(b, (list, tuple)) else b):
        problems.append(f'{key} {a} vs {b}')
  if array is not None and np.shape(array)[-1] != want['emb_dim'] and not any(
      p.startswith('emb_dim') for p in problems):
    problems.append(f'prompt width {np.shape(array)[-1]} vs emb_dim {want["emb_dim"]}')
  vocab_text = files.describe_vocabulary(vocab)
  if vocab_text and info.vocabulary and _vocab_key(vocab_text) != _vocab_key(info.vocabulary):
    problems.append(f'vocabulary {info.vocabulary} vs {vocab_text}')
  if problems:
    theirs = describe_model(have) if have else (
        f'an unknown model (bare file, width {np.shape(array)[-1]})' if array is not None
        else 'an unknown model')
    raise IncompatiblePromptError(
        f'Prompt {name or info.task or "(unnamed)"!r} was trained for {theirs}'
        f'{f" with vocabulary {info.vocabulary}" if info.vocabulary else ""}; the model is '
        f'{describe_model(want)}{f" with vocabulary {vocab_text}" if vocab_text else ""}. '
        f'Differences: {"; ".join(problems)}. A prompt only transfers across models '
        'through a projector.')

"""Prompt files: Google's numpy-checkpoint layout and our `prompt_info.json` sidecar.

`MODEL_DIR/numpy_checkpoints/checkpoint_STEP/encoder.prompt.prompt.prompt` is
the prompt as the model sees it ([length, d_model], plain `np.save` content,
no suffix: what Google's prompt-tuning code writes and reads), whatever module
produced it (`EncoderDecoderModel.materialize_prompt`). Beside it: the prompt
module's own free parameters (`encoder.prompt.prompt.<name>`, when they are
not that array) and `prompt_info.json` (`PromptInfo`). A per-example module
(a prompt bank) writes one sub-folder `prompt_K/` per prompt, each in the same
layout. A step's folder is written under a temporary name and renamed.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Mapping, Optional, Sequence

import numpy as np
from etils import epath

from prompt_transfer import fileio

NUMPY_DIR = 'numpy_checkpoints'
INFO_FILE = 'prompt_info.json'
# The materialised prompt's file name: the flattened path of a free prompt.
PROMPT_FILE = 'encoder.prompt.prompt.prompt'
PER_PROMPT_DIR = 'prompt_{}'
# A numpy header is a few hundred bytes; more is not a prompt file.
_MAX_HEADER = 4096


class PromptFileError(ValueError):
  """A prompt file that cannot be used: missing, wrong shape, dtype or values."""


@dataclasses.dataclass
class PromptInfo:
  """The JSON sidecar of a saved prompt (read back by the prompt library).

  module: the prompt module's class (`Prompt`, `LowRankPrompt`, ...);
  param_shapes: its free parameters' shapes by dotted name; prompt_length:
  rows of the materialised prompt. weights: `weights_fingerprint` of the
  frozen model it was trained on (tells apart checkpoints of one shape, such
  as LM-adapted and Flan-T5 base).
  """
  task: str = ''
  model: dict = dataclasses.field(default_factory=dict)
  vocabulary: str = ''
  prompt_length: int = 0
  step: int = 0
  metrics: dict = dataclasses.field(default_factory=dict)
  module: str = ''
  param_shapes: dict = dataclasses.field(default_factory=dict)
  weights: str = ''
  origin: str = ''  # a projected or recycled prompt: from which file, by what

  @classmethod
  def from_json(cls, text: str) -> 'PromptInfo':
    data = json.loads(text)
    known = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in known})

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=1, default=float)


def describe_vocabulary(vocab: Any) -> str:
  """The sidecar's text for a seqio vocabulary: 'Type(model file, size=N)'."""
  if vocab is None or isinstance(vocab, str):
    return vocab or ''
  path = (getattr(vocab, 'sentencepiece_model_file', None)
          or getattr(vocab, '_sentencepiece_model_file', None))
  return f'{type(vocab).__name__}({path or ""}, size={vocab.vocab_size})'


# ---------------------------------------------------------------------------
# Reading one prompt file.
# ---------------------------------------------------------------------------
def load_prompt_file(path: fileio.PathLike, expected_shape: Optional[tuple] = None
                     ) -> np.ndarray:
  """Reads a numpy prompt file (with or without `.npy`, local or remote) and
  validates it. Raises PromptFileError naming the file, the expected and the
  actual shape.
  """
  path = os.fspath(path)
  if not path:
    raise PromptFileError('PROMPT_FILE is empty: add --gin.PROMPT_FILE=\\"\'/path/to/prompt\'\\".')
  p = epath.Path(path)
  if not p.exists():
    raise PromptFileError(f'Prompt file {path!r} does not exist.')
  if p.is_dir():
    raise PromptFileError(f'Prompt file {path!r} is a folder; give the file inside it, e.g. '
                          f'{path.rstrip("/")}/{PROMPT_FILE}.')
  with p.open('rb') as f:
    magic = f.read(6)
    if magic.startswith(b'PK'):
      raise PromptFileError(f'Prompt file {path!r} is an .npz archive (several arrays); '
                            'expected one [length, d_model] array saved with np.save.')
    if magic != b'\x93NUMPY':
      raise PromptFileError(f'Prompt file {path!r} is not a numpy .npy file (it starts with '
                            f'{magic!r}, not the .npy magic b"\\x93NUMPY").')
    f.seek(0)
    try:
      # The header first: shape and dtype are checked before any allocation.
      version = np.lib.format.read_magic(f)
      read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                     else np.lib.format.read_array_header_2_0)
      shape, _, dtype = read_header(f)
    except Exception as e:  # a truncated or garbled header
      raise PromptFileError(f'Prompt file {path!r} has a damaged .npy header: {e}') from e
    expected_text = f' of shape {tuple(expected_shape)}' if expected_shape else ''
    if len(shape) != 2:
      raise PromptFileError(f'Prompt file {path!r} has shape {shape}; expected a 2-D '
                            f'[length, d_model] array{expected_text}.')
    if expected_shape is not None and tuple(shape) != tuple(expected_shape):
      raise PromptFileError(f'Prompt file {path!r} has shape {tuple(shape)}; the model '
                            f'expects {tuple(expected_shape)} ([PROMPT_LENGTH, d_model]).')
    if dtype.hasobject or not np.issubdtype(dtype, np.floating):
      raise PromptFileError(f'Prompt file {path!r} has dtype {dtype}; expected a float array.')
    f.seek(0)
    try:
      value = np.load(f, allow_pickle=False)
    except Exception as e:  # numpy raises several types for a truncated file
      raise PromptFileError(f'Prompt file {path!r} cannot be read: {e}') from e
  if not np.issubdtype(value.dtype, np.floating):
    raise PromptFileError(f'Prompt file {path!r} has dtype {value.dtype}; expected a float array.')
  if value.ndim != 2:
    raise PromptFileError(f'Prompt file {path!r} has shape {value.shape}; expected a 2-D '
                          f'[length, d_model] array{f" of shape {expected_shape}" if expected_shape else ""}.')
  if expected_shape is not None and tuple(value.shape) != tuple(expected_shape):
    raise PromptFileError(f'Prompt file {path!r} has shape {tuple(value.shape)}; the model '
                          f'expects {tuple(expected_shape)} ([PROMPT_LENGTH, d_model]).')
  if not np.all(np.isfinite(value)):
    raise PromptFileError(f'Prompt file {path!r} contains NaN or infinite values.')
  return value.astype(np.float32)


def weights_fingerprint(embedding: Any) -> str:
  """The first 16 hex digits of the SHA-256 of the frozen token embedding
  (float32 bytes): every pretrained checkpoint has its own embedding, and it
  is the one frozen table every stage of a run shares."""
  import hashlib  # pylint: disable=g-import-not-at-top
  table = np.ascontiguousarray(np.asarray(embedding, dtype=np.float32))
  return hashlib.sha256(table.tobytes()).hexdigest()[:16]


def load_prompt_info(prompt_file: fileio.PathLike) -> Optional[PromptInfo]:
  """The sidecar next to a prompt file, or None."""
  path = epath.Path(prompt_file).parent / INFO_FILE
  if not path.exists():
    return None
  return PromptInfo.from_json(path.read_text())


# ---------------------------------------------------------------------------
# The numpy checkpoint layout of a run.
# ---------------------------------------------------------------------------
def numpy_checkpoint_dir(model_dir: fileio.PathLike, step: int) -> str:
  return os.fspath(epath.Path(model_dir) / NUMPY_DIR / f'checkpoint_{step}')


def prompt_file(model_dir: fileio.PathLike, step: Optional[int] = None) -> str:
  """The materialised prompt of a run at `step` (default: its latest numpy step)."""
  if step is None:
    step = latest_numpy_step(model_dir)
    if step is None:
      raise FileNotFoundError(f'No numpy prompt checkpoint under {os.fspath(model_dir)}/'
                              f'{NUMPY_DIR}; pass --gin.PROMPT_FILE=... instead.')
  return os.fspath(epath.Path(numpy_checkpoint_dir(model_dir, step)) / PROMPT_FILE)


def latest_numpy_step(model_dir: fileio.PathLike) -> Optional[int]:
  root = epath.Path(model_dir) / NUMPY_DIR
  if not root.is_dir():
    return None
  steps = [int(m.group(1)) for p in root.iterdir()
           if (m := re.fullmatch(r'checkpoint_(\d+)', p.name))]
  return max(steps) if steps else None


def folder_with(path: fileio.PathLike, name: str) -> Optional[str]:
  """The folder holding file `name`: `path` itself, or the latest numpy
  checkpoint of the run `path` (a projector's or subspace's sidecar); None."""
  p = epath.Path(fileio.normalize_dir(path))
  if (p / name).exists():
    return os.fspath(p)
  step = latest_numpy_step(os.fspath(p)) if (p / NUMPY_DIR).is_dir() else None
  if step is not None:
    folder = epath.Path(numpy_checkpoint_dir(os.fspath(p), step))
    if (folder / name).exists():
      return os.fspath(folder)
  return None


MODULE_PREFIX = 'encoder.prompt.prompt.'


def read_module_params(folder: fileio.PathLike, names: Any) -> Optional[dict]:
  """A prompt module's saved parameters `encoder.prompt.prompt.<name>` (dotted
  names such as 'dense_in.kernel') as a nested dict; None if one is missing."""
  folder = epath.Path(folder)
  params: dict = {}
  for name in names:
    f = folder / (MODULE_PREFIX + name)
    if not f.exists():
      return None
    *path, leaf = name.split('.')
    node = params
    for key in path:
      node = node.setdefault(key, {})
    with f.open('rb') as fh:
      node[leaf] = np.load(fh)
  return params


def numpy_checkpoint_problem(model_dir: fileio.PathLike, step: int) -> Optional[str]:
  """None if step's numpy checkpoint is complete and every file reads back;
  else what is wrong with it."""
  folder = epath.Path(numpy_checkpoint_dir(model_dir, step))
  if not folder.is_dir():
    return f'{os.fspath(folder)} is missing'
  names = [p.name for p in folder.iterdir()]
  if INFO_FILE not in names:
    return f'{os.fspath(folder)} has no {INFO_FILE}'
  try:
    PromptInfo.from_json((folder / INFO_FILE).read_text())
    for name in names:
      if name != INFO_FILE and not (folder / name).is_dir():
        with (folder / name).open('rb') as f:
          np.load(f, allow_pickle=False)
  except Exception as e:  # truncated or garbled files raise several types
    return f'{os.fspath(folder)}: {type(e).__name__}: {e}'
  return None


def _write_arrays(folder: epath.Path, arrays: Mapping[str, np.ndarray],
                  info: Optional[PromptInfo]) -> None:
  folder.mkdir(parents=True, exist_ok=True)
  for name, value in arrays.items():
    with (folder / name).open('wb') as f:
      np.save(f, np.asarray(value))
  if info is not None:
    (folder / INFO_FILE).write_text(info.to_json())


def save_prompt_folder(folder: fileio.PathLike, prompt: np.ndarray, info: PromptInfo) -> str:
  """One prompt outside a run (a projected or recycled one): FOLDER/
  encoder.prompt.prompt.prompt + prompt_info.json, written whole or not at all."""
  final = epath.Path(folder)
  final.parent.mkdir(parents=True, exist_ok=True)
  tmp = fileio.tmp_name(final)
  _write_arrays(tmp, {PROMPT_FILE: np.asarray(prompt, np.float32)}, info)
  if final.exists():
    final.rmtree()
  tmp.rename(final)
  return os.fspath(final)


def save_numpy_checkpoint(model_dir: fileio.PathLike, step: int, prompt: Any,
                          params: Mapping[str, np.ndarray],
                          info: Optional[PromptInfo] = None,
                          extra_files: Optional[Mapping[str, str]] = None,
                          prompt_tasks: Optional[Sequence[str]] = None) -> str:
  """Writes a step's prompt(s), the module's free parameters and the sidecar.

  prompt: the materialised prompt, one [l, e] array (shared), a list of them
  (a per-example module's prompts: one `prompt_K/` sub-folder each), or None
  (no prompt module: model tuning). extra_files: {name: text} a prompt module
  adds (a projector's projector.json). prompt_tasks: the task of each of a
  per-example module's prompts (a `task_ids` mixture's tasks), for their
  sidecars; default `<task>#K`. params: the trainable parameters by
  dotted full path (`encoder.prompt.prompt.u`); a free prompt's own array has
  the prompt file's name and is written once. Only process 0 should call it.
  The folder appears whole or not at all. Returns the final folder.
  """
  final = epath.Path(numpy_checkpoint_dir(model_dir, step))
  final.parent.mkdir(parents=True, exist_ok=True)
  tmp = fileio.tmp_name(final)
  arrays = {k: np.asarray(v) for k, v in params.items()}
  if isinstance(prompt, np.ndarray):
    arrays[PROMPT_FILE] = np.asarray(prompt, np.float32)
  _write_arrays(tmp, arrays, info)
  for name, text in (extra_files or {}).items():
    fileio.atomic_write_text(tmp / name, text)
  if isinstance(prompt, (list, tuple)):
    for k, row in enumerate(prompt):
      sub = None
      if info is not None:
        task = (prompt_tasks[k] if prompt_tasks and len(prompt_tasks) == len(prompt)
                else f'{info.task}#{k}' if info.task else f'#{k}')
        sub = dataclasses.replace(info, prompt_length=int(row.shape[0]), task=task)
      _write_arrays(tmp / PER_PROMPT_DIR.format(k), {PROMPT_FILE: np.asarray(row, np.float32)},
                    sub)
  if final.exists():  # a re-run of the same step replaces it
    final.rmtree()
  tmp.rename(final)
  return os.fspath(final)

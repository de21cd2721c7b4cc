"""Prompts to and from Hugging Face PEFT's prompt-tuning adapter format.

A PEFT prompt-tuning adapter is a folder with `adapter_config.json`
(`peft_type` PROMPT_TUNING, `task_type` SEQ_2_SEQ_LM, `num_virtual_tokens` L,
`token_dim` d, `num_transformer_submodules` S, ...) and
`adapter_model.safetensors` holding `prompt_embeddings` [L * S, d].

The decoder rows. For seq2seq models PEFT defaults to S = 2 and stores 2L
rows: the first L are prepended to the encoder input, the last L were meant
for the decoder. PEFT before 0.4.0 did prepend them to the decoder input;
since 0.4.0 (PR #519) prompt tuning uses only the encoder rows and the
decoder rows are never read (nor trained). Our models, like Lester et al.'s,
have an encoder prompt only, so:
- export writes S = 1: exactly our L rows, which every PEFT version puts in
  front of the encoder input, nothing on the decoder;
- import takes the first L rows. The decoder rows are dropped, and said so;
  an adapter written by PEFT < 0.4.0 (its `peft_version`), whose decoder rows
  were in use, is refused unless `drop_decoder_rows=True`, because our prompt
  would not reproduce it.

Our sidecar (`prompt_info.json`) travels inside the adapter folder (PEFT
ignores it), so a round trip keeps task, model, vocabulary and weights.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional, Tuple

import numpy as np
from etils import epath

from prompt_transfer import fileio
from prompt_transfer.prompts import files

ADAPTER_CONFIG = 'adapter_config.json'
ADAPTER_WEIGHTS = 'adapter_model.safetensors'
ADAPTER_WEIGHTS_BIN = 'adapter_model.bin'  # PEFT before safetensors became the default
PROMPT_KEY = 'prompt_embeddings'
# Since this version PEFT's seq2seq prompt tuning ignores the decoder rows.
ENCODER_ONLY_SINCE = (0, 4, 0)


class PeftAdapterError(ValueError):
  """A PEFT adapter that cannot be read as (or written from) our prompt."""


def _version(text: Optional[str]) -> Optional[Tuple[int, ...]]:
  if not text:
    return None
  parts = []
  for piece in str(text).split('.')[:3]:
    digits = ''.join(c for c in piece if c.isdigit())
    parts.append(int(digits) if digits else 0)
  return tuple(parts + [0] * (3 - len(parts)))


def adapter_config(prompt: np.ndarray, model: dict,
                   base_model_name_or_path: Optional[str] = None) -> dict:
  """The adapter_config.json of an encoder-only prompt [L, d] for `model`
  (a T5Config.describe() dict; its heads and layers fill PEFT's fields)."""
  length, width = (int(n) for n in prompt.shape)
  return {
      'auto_mapping': None,
      'base_model_name_or_path': base_model_name_or_path,
      'inference_mode': True,
      'modules_to_save': None,
      'num_attention_heads': model.get('num_heads'),
      'num_layers': model.get('num_encoder_layers'),
      'num_transformer_submodules': 1,  # encoder only: see the module docstring
      'num_virtual_tokens': length,
      'peft_type': 'PROMPT_TUNING',
      'prompt_tuning_init': 'RANDOM',
      'prompt_tuning_init_text': None,
      'revision': None,
      'task_type': 'SEQ_2_SEQ_LM',
      'token_dim': width,
      'tokenizer_kwargs': None,
      'tokenizer_name_or_path': None,
  }


def write_adapter(out_dir: fileio.PathLike, prompt: np.ndarray, info: files.PromptInfo,
                  base_model_name_or_path: Optional[str] = None) -> str:
  """Writes OUT_DIR as a PEFT prompt-tuning adapter of `prompt` [L, d], with
  our sidecar beside; whole or not at all (temporary folder, then rename)."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  prompt = np.ascontiguousarray(np.asarray(prompt, np.float32))
  if prompt.ndim != 2:
    raise PeftAdapterError(f'A prompt to export must be [length, d_model]; got shape '
                           f'{prompt.shape}.')
  final = epath.Path(out_dir)
  final.parent.mkdir(parents=True, exist_ok=True)
  tmp = fileio.tmp_name(final)
  tmp.mkdir(parents=True)
  try:
    config = adapter_config(prompt, info.model or {}, base_model_name_or_path)
    (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + '\n')
    # metadata format=pt: what PEFT's save_pretrained writes and transformers expects.
    save_file({PROMPT_KEY: prompt}, os.fspath(tmp / ADAPTER_WEIGHTS), metadata={'format': 'pt'})
    (tmp / files.INFO_FILE).write_text(info.to_json())
    if final.exists():
      final.rmtree()
    tmp.rename(final)
  except BaseException:
    if tmp.exists():
      tmp.rmtree()
    raise
  return os.fspath(final)


@dataclasses.dataclass
class Adapter:
  """What read_adapter found: the encoder prompt [L, d], the adapter's config,
  our sidecar if the adapter came from us, and a note on dropped rows."""
  prompt: np.ndarray
  config: dict
  info: Optional[files.PromptInfo]
  note: str = ''


def _read_weights(folder: epath.Path) -> np.ndarray:
  path = folder / ADAPTER_WEIGHTS
  if path.exists():
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    try:
      tensors = load_file(os.fspath(path))
    except Exception as e:  # safetensors raises its own error types
      raise PeftAdapterError(f'{path} cannot be read as safetensors: {e}') from e
  elif (folder / ADAPTER_WEIGHTS_BIN).exists():
    path = folder / ADAPTER_WEIGHTS_BIN
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise PeftAdapterError(f'{path} is a PyTorch pickle; reading it needs torch (pip '
                             'install torch), or re-save the adapter with safetensors.') from e
    state = torch.load(os.fspath(path), map_location='cpu', weights_only=True)
    tensors = {k: v.float().numpy() for k, v in state.items()}
  else:
    raise PeftAdapterError(f'{folder} has no {ADAPTER_WEIGHTS} (or {ADAPTER_WEIGHTS_BIN}).')
  if PROMPT_KEY not in tensors:
    raise PeftAdapterError(f'{path} holds {sorted(tensors)}; a prompt-tuning adapter holds '
                           f'{PROMPT_KEY!r}.')
  return np.asarray(tensors[PROMPT_KEY], np.float32)


def read_adapter(adapter_dir: fileio.PathLike, drop_decoder_rows: bool = False) -> Adapter:
  """The encoder prompt of a PEFT prompt-tuning adapter folder (see the
  module docstring for the decoder rows). Raises PeftAdapterError naming the
  file, what was expected and what it holds."""
  folder = epath.Path(adapter_dir)
  config_path = folder / ADAPTER_CONFIG
  if not config_path.exists():
    raise PeftAdapterError(f'{folder} is not a PEFT adapter: it has no {ADAPTER_CONFIG}.')
  try:
    config = json.loads(config_path.read_text())
  except json.JSONDecodeError as e:
    raise PeftAdapterError(f'{config_path} is not valid JSON: {e}') from e
  peft_type = config.get('peft_type')
  if peft_type != 'PROMPT_TUNING':
    raise PeftAdapterError(
        f'{config_path} is a {peft_type} adapter; only PROMPT_TUNING adapters are prompts '
        'of this kind (P-tuning and multitask prompt tuning re-parametrise the prompt, '
        'prefix tuning and LoRA are not input prompts).')
  task_type = config.get('task_type')
  if task_type not in ('SEQ_2_SEQ_LM', None):
    raise PeftAdapterError(f'{config_path} has task_type {task_type}; expected SEQ_2_SEQ_LM '
                           '(a prompt for an encoder-decoder T5).')
  length, width = config.get('num_virtual_tokens'), config.get('token_dim')
  subs = int(config.get('num_transformer_submodules') or 1)
  rows = _read_weights(folder)
  if rows.ndim != 2 or (length and rows.shape[0] != length * subs) or (
      width and rows.shape[1] != width):
    raise PeftAdapterError(
        f'{folder / ADAPTER_WEIGHTS}: {PROMPT_KEY} has shape {rows.shape}; {ADAPTER_CONFIG} '
        f'says [{length} virtual tokens x {subs} submodules, {width}] = '
        f'[{(length or 0) * subs}, {width}].')
  length = length or rows.shape[0] // subs
  note = ''
  if subs == 2:
    version = _version(config.get('peft_version'))
    if version is not None and version < ENCODER_ONLY_SINCE and not drop_decoder_rows:
      raise PeftAdapterError(
          f'{config_path} was written by PEFT {config["peft_version"]}, which prepended the '
          f'last {length} rows of {PROMPT_KEY} to the decoder input; our prompt is encoder-only '
          'and would not reproduce this adapter. Pass --drop_decoder_rows to import the '
          'encoder rows anyway.')
    note = (f'dropped the {length} decoder rows (num_transformer_submodules 2): '
            + ('PEFT >= 0.4 never uses them for prompt tuning' if version is None
               or version >= ENCODER_ONLY_SINCE else
               f'PEFT {config["peft_version"]} used them; imported as asked'))
  elif subs != 1:
    raise PeftAdapterError(f'{config_path} has num_transformer_submodules {subs}; expected '
                           '1 or 2.')
  prompt = rows[:length]
  if not np.all(np.isfinite(prompt)):
    raise PeftAdapterError(f'{folder / ADAPTER_WEIGHTS}: the prompt has NaN or infinite values.')
  info_path = folder / files.INFO_FILE
  info = files.PromptInfo.from_json(info_path.read_text()) if info_path.exists() else None
  return Adapter(prompt=np.ascontiguousarray(prompt), config=config, info=info, note=note)

"""Exports a T5X parameter tree as a Hugging Face T5 directory.

Google's prompt-tuning code has no way back to PyTorch; this writes what
`T5ForConditionalGeneration.from_pretrained` reads: `config.json` and
`model.safetensors` (float32, torch layouts), the inverse of
`checkpoint_import.read_hf_checkpoint` and built on the same name map
(`checkpoint_import.hf_name_map`). A trained prompt, which HF T5 has no place
for, goes beside it as `prompt.npy` ([length, d_model]; prepend it to the
encoder's input embeddings).

The tied-embedding case follows `save_pretrained`: only `shared.weight` is
written (HF re-ties `encoder/decoder.embed_tokens` and `lm_head` on load) and
`tie_word_embeddings: true`, which HF reads as "scale the decoder output by
d_model**-0.5", as our network does. An untied model gets `lm_head.weight` and
`tie_word_embeddings: false` (the public T5 1.1 / Flan-T5 configs), which
transformers 4 and 5 both read as an unscaled, separate head.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from typing import Any, Dict, Optional

import numpy as np

from prompt_transfer.model import checkpoint_import as ci
from prompt_transfer.model.config import T5Config

PROMPT_FILE = 'prompt.npy'
# The encoder's prompt subtree (CONTRACT.md); HF T5 has no such parameter.
_PROMPT_PARAM = 'encoder/prompt/prompt/prompt'
PAD_ID, EOS_ID = 0, 1


def _feed_forward_proj(config: T5Config) -> str:
  """HF's `feed_forward_proj` for the config's MLP activations."""
  activations = tuple(config.mlp_activations)
  # First match wins: _HF_ACTIVATIONS lists the canonical spelling of each
  # activation before its aliases ('silu' before 'swish').
  for proj, acts in ci._HF_ACTIVATIONS.items():  # pylint: disable=protected-access
    if acts == activations:
      return proj
  raise NotImplementedError(f'mlp_activations {activations} have no Hugging Face T5 '
                            'equivalent (feed_forward_proj).')


def hf_config_dict(config: T5Config) -> Dict[str, Any]:
  """The `config.json` contents of `config` (inverse of reading one)."""
  proj = _feed_forward_proj(config)
  return {
      'architectures': ['T5ForConditionalGeneration'],
      'model_type': 't5',
      'vocab_size': int(config.vocab_size),
      'd_model': int(config.emb_dim),
      'd_kv': int(config.head_dim),
      'd_ff': int(config.mlp_dim),
      'num_layers': int(config.num_encoder_layers),
      'num_decoder_layers': int(config.num_decoder_layers),
      'num_heads': int(config.num_heads),
      'relative_attention_num_buckets': int(config.relative_attention_num_buckets),
      'relative_attention_max_distance': int(config.relative_attention_max_distance),
      'layer_norm_epsilon': float(config.layer_norm_epsilon),
      'feed_forward_proj': proj,
      # Derived by HF from feed_forward_proj; spelled out for older readers.
      'dense_act_fn': 'gelu_new' if proj == 'gated-gelu' else proj.split('-')[-1],
      'is_gated_act': proj.startswith('gated-'),
      'tie_word_embeddings': bool(config.logits_via_embedding),
      'dropout_rate': float(config.dropout_rate),
      'initializer_factor': 1.0,
      'is_encoder_decoder': True,
      'decoder_start_token_id': PAD_ID,
      'pad_token_id': PAD_ID,
      'eos_token_id': EOS_ID,
      'use_cache': True,
  }


def hf_state_dict(params: Any, config: T5Config) -> Dict[str, np.ndarray]:
  """{HF tensor name: float32 array in torch layout} for a CONTRACT tree.

  The prompt subtree, if any, is ignored. Raises CheckpointMismatchError when
  `params` does not have exactly the shapes `config` implies.
  """
  flat = {n: v for n, v in ci.flatten_params(params).items()
          if not n.startswith('encoder/prompt/')}
  ci.check_params(ci.unflatten_params(flat), ci.param_shapes(config),
                  source='export_hf_checkpoint(params)')
  tensors = {}
  for hf_name, (t5x_name, transpose) in ci.hf_name_map(config).items():
    arr = np.asarray(flat[t5x_name], dtype=np.float32)
    # safetensors wants C-contiguous buffers; .T of a kernel is not.
    tensors[hf_name] = np.ascontiguousarray(arr.T if transpose else arr)
  return tensors


def _prompt_array(params: Any, prompt: Any) -> Optional[np.ndarray]:
  if prompt is None:
    prompt = ci.flatten_params(params).get(_PROMPT_PARAM)
  elif isinstance(prompt, dict):  # a (sub)tree holding the prompt
    flat = ci.flatten_params(prompt)
    prompt = flat.get(_PROMPT_PARAM, flat.get('prompt/prompt/prompt', flat.get('prompt')))
  if prompt is None:
    return None
  return np.asarray(prompt, dtype=np.float32)


def export_hf_checkpoint(params: Any, config: T5Config, out_dir: str,
                         prompt: Any = None, overwrite: bool = False) -> str:
  """Writes `params` as a Hugging Face T5 directory (config.json + model.safetensors).

  Args:
    params: CONTRACT parameter tree (numpy / jax arrays or flax boxes; a
      top-level {'params': ...} is accepted).
    config: the model's T5Config.
    out_dir: directory to create. Written under a temporary name beside it and
      renamed, so a reader never sees a half-written export.
    prompt: a [length, d_model] prompt array (or a tree holding
      encoder/prompt/prompt/prompt) saved as `prompt.npy`; by default the
      prompt in `params`, if any.
    overwrite: replace an existing `out_dir` (else FileExistsError).

  Returns:
    The absolute path of the export.
  """
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top

  final_dir = os.path.abspath(os.fspath(out_dir))
  if os.path.exists(final_dir) and not overwrite:
    raise FileExistsError(f'{final_dir} already exists; pass overwrite=True to replace it.')
  tensors = hf_state_dict(params, config)  # validates before anything is written
  prompt_arr = _prompt_array(params, prompt)
  if prompt_arr is not None and (prompt_arr.ndim != 2 or prompt_arr.shape[1] != config.emb_dim):
    raise ValueError(f'prompt has shape {prompt_arr.shape}; expected [length, '
                     f'{config.emb_dim}].')

  os.makedirs(os.path.dirname(final_dir), exist_ok=True)
  tmp_dir = f'{final_dir}.tmp-{os.getpid()}-{time.time_ns()}'
  os.makedirs(tmp_dir)
  try:
    with open(os.path.join(tmp_dir, ci.HF_CONFIG), 'w') as f:
      json.dump(hf_config_dict(config), f, indent=2, sort_keys=True)
      f.write('\n')
    # metadata format=pt: transformers refuses safetensors files without it.
    save_file(tensors, os.path.join(tmp_dir, ci.HF_WEIGHTS), metadata={'format': 'pt'})
    if prompt_arr is not None:
      np.save(os.path.join(tmp_dir, PROMPT_FILE), prompt_arr)
    # safetensors creates its file 0600; an export (or a packaged asset) is
    # meant to be read by others, like the files np.save / open() make.
    umask = os.umask(0)
    os.umask(umask)
    for name in os.listdir(tmp_dir):
      os.chmod(os.path.join(tmp_dir, name), 0o666 & ~umask)
    os.chmod(tmp_dir, 0o777 & ~umask)
    if os.path.exists(final_dir):
      # Move the old export aside first: a rename over a non-empty dir fails.
      old = f'{final_dir}.old-{os.getpid()}-{time.time_ns()}'
      os.rename(final_dir, old)
      os.rename(tmp_dir, final_dir)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.rename(tmp_dir, final_dir)
  except BaseException:
    shutil.rmtree(tmp_dir, ignore_errors=True)
    raise
  return final_dir


def load_prompt(export_dir: str) -> Optional[np.ndarray]:
  """The `prompt.npy` saved beside an export, or None."""
  path = os.path.join(os.fspath(export_dir), PROMPT_FILE)
  return np.load(path) if os.path.exists(path) else None

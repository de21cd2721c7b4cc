"""`load_pretrained`: a frozen T5 from a Hugging Face or T5X checkpoint directory."""
from __future__ import annotations

import os
from typing import Any, Optional, Tuple

import jax
import numpy as np

from prompt_transfer.config import T5Config
from prompt_transfer.models import EncoderDecoderModel, Params, build_model


# Checkpoints shipped inside the package (the quick-start's tiny model).
PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
PKG_PREFIX = 'pkg://'


def resolve_checkpoint_path(path: str) -> str:
  """Where a checkpoint path points; packaged assets resolve inside the package.

  'pkg://assets/t5_1_1_tiny_synthetic' is relative to the installed
  prompt_transfer package, so gin files can name shipped checkpoints on any
  machine. A relative path that does not exist from the current folder is
  also looked up under the package and its assets/ folder. Other paths are
  returned as given (with ~ expanded).
  """
  path = os.path.expanduser(os.fspath(path))
  if path.startswith(PKG_PREFIX):
    return os.path.join(PACKAGE_DIR, path[len(PKG_PREFIX):])
  if not os.path.isabs(path) and not os.path.exists(path):
    for root in (PACKAGE_DIR, os.path.join(PACKAGE_DIR, 'assets')):
      if os.path.exists(os.path.join(root, path)):
        return os.path.join(root, path)
  return path


def detect_format(path: str) -> str:
  """'hf' for a Hugging Face directory, 't5x' for a native T5X checkpoint."""
  path = os.fspath(path)
  if os.path.isdir(path) and os.path.exists(os.path.join(path, 'config.json')):
    return 'hf'
  if os.path.basename(path) == 'checkpoint' or (
      os.path.isdir(path) and (os.path.exists(os.path.join(path, 'checkpoint')) or any(
          n.startswith('checkpoint_') for n in os.listdir(path)))):
    return 't5x'
  raise FileNotFoundError(
      f'{path!r} is neither a Hugging Face T5 directory (config.json + model.safetensors) '
      'nor a T5X checkpoint directory (checkpoint_N/checkpoint).')


def load_pretrained(path: str, prompt_length: int = 0, config: Optional[T5Config] = None,
                    **model_kwargs: Any) -> Tuple[EncoderDecoderModel, Params]:
  """Reads a checkpoint and returns (model, frozen params) on the host.

  path: a Hugging Face T5 directory or a T5X checkpoint directory. config:
  overrides the configuration read (HF) or inferred from the arrays (T5X).
  The parameters are checked against the model's expected shapes; a missing,
  extra or mis-shaped parameter raises CheckpointMismatchError naming it.
  With prompt_length > 0 the prompt is not in the checkpoint: create it with
  `model.init_prompt(rng, params)`.
  """
  from prompt_transfer import checkpoint_import  # pylint: disable=g-import-not-at-top
  path = resolve_checkpoint_path(path)
  fmt = detect_format(path)
  if fmt == 'hf':
    read_config, params = checkpoint_import.read_hf_checkpoint(path)
  else:
    params = checkpoint_import.read_t5x_checkpoint(path)
    read_config = checkpoint_import.config_from_params(params, base=config)
  config = config or read_config
  model = build_model(config, prompt_length=prompt_length, **model_kwargs)
  expected = build_model(config).param_shapes()
  checkpoint_import.check_params(params, expected, source=os.fspath(path))
  params = jax.tree_util.tree_map(lambda x: np.asarray(x, dtype=np.float32), params)
  return model, params

"""`load_pretrained`: a frozen T5 from a Hugging Face or T5X checkpoint directory."""
from __future__ import annotations

import os
from typing import Any, Optional, Tuple

import jax
import numpy as np

from prompt_transfer.model.config import T5Config
from prompt_transfer.model.models import EncoderDecoderModel, Params, build_model
from prompt_transfer.prompts.slot import PromptModuleFactory


# Checkpoints shipped inside the package (the quick-start's tiny model).
PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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


CACHE_ENV = 'PROMPT_TRANSFER_CHECKPOINT_CACHE'
_MANIFEST = '.prompt_transfer_manifest.json'


def _files_under(folder: Any) -> list:
  """Every file below an epath folder (epath's rglob refuses `**` on GCS)."""
  out = []
  for p in folder.iterdir():
    out.extend(_files_under(p) if p.is_dir() else [p])
  return out


def local_checkpoint(path: str) -> str:
  """A checkpoint on a remote filesystem (gs://, s3://, ...) copied once into
  a local cache (env PROMPT_TRANSFER_CHECKPOINT_CACHE, default
  ~/.cache/prompt_transfer/checkpoints); local paths are returned unchanged.

  Why a copy rather than reading in place: safetensors maps its file from a
  local disk and a T5X msgpack checkpoint's TensorStore specs name files
  relative to it, so every reader stays one tested local code path. The copy is
  reused while the remote files keep their names and sizes, and written under
  a temporary name then renamed, so a killed copy is never taken for a good one.
  """
  path = os.fspath(path)
  if '://' not in path or path.startswith(PKG_PREFIX):
    return path
  import hashlib  # pylint: disable=g-import-not-at-top
  import json  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  from etils import epath  # pylint: disable=g-import-not-at-top
  from prompt_transfer import fileio  # pylint: disable=g-import-not-at-top
  src = epath.Path(path)
  if not src.exists():
    raise FileNotFoundError(f'Checkpoint {path} does not exist.')
  if src.is_dir():
    files = sorted((str(p.relative_to(src)), p.stat().length) for p in _files_under(src))
  else:
    files = [(src.name, src.stat().length)]
  if not files:
    raise FileNotFoundError(f'Checkpoint {path} holds no files.')
  root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser('~'), '.cache',
                                                   'prompt_transfer', 'checkpoints')
  key = hashlib.sha256(path.rstrip('/').encode()).hexdigest()[:12]
  dest = os.path.join(root, f'{src.name or "checkpoint"}-{key}')
  manifest = json.dumps({'source': path, 'files': files})
  target = dest if src.is_dir() else os.path.join(dest, src.name)
  if os.path.exists(os.path.join(dest, _MANIFEST)):
    with open(os.path.join(dest, _MANIFEST)) as f:
      if f.read() == manifest:
        return target
  print(f'[prompt-transfer] copying {path} ({len(files)} files, '
        f'{sum(n for _, n in files) / 2**20:.1f} MiB) to {dest}', flush=True)
  tmp = os.fspath(fileio.tmp_name(dest))
  try:
    for rel, _ in files:
      out = os.path.join(tmp, rel)
      os.makedirs(os.path.dirname(out), exist_ok=True)
      with (src / rel if src.is_dir() else src).open('rb') as fin, open(out, 'wb') as fout:
        shutil.copyfileobj(fin, fout, 16 << 20)
    with open(os.path.join(tmp, _MANIFEST), 'w') as f:
      f.write(manifest)
    if os.path.exists(dest):
      shutil.rmtree(dest, ignore_errors=True)
    try:
      os.rename(tmp, dest)
    except OSError:  # another process on this host finished the same copy first
      if not os.path.exists(os.path.join(dest, _MANIFEST)):
        raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return target


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


def load_pretrained(path: str, prompt_module: Optional[PromptModuleFactory] = None,
                    config: Optional[T5Config] = None,
                    **model_kwargs: Any) -> Tuple[EncoderDecoderModel, Params]:
  """Reads a checkpoint and returns (model, frozen params) on the host.

  path: a Hugging Face T5 directory or a T5X checkpoint directory. config:
  overrides the configuration read (HF) or inferred from the arrays (T5X).
  The parameters are checked against the model's expected shapes; a missing,
  extra or mis-shaped parameter raises CheckpointMismatchError naming it.
  With a prompt module, its parameters are not in the checkpoint: create them
  with `model.init_prompt(rng, params)`.
  """
  from prompt_transfer.model import checkpoint_import  # pylint: disable=g-import-not-at-top
  path = local_checkpoint(resolve_checkpoint_path(path))
  fmt = detect_format(path)
  if fmt == 'hf':
    read_config, params = checkpoint_import.read_hf_checkpoint(path)
  else:
    params = checkpoint_import.read_t5x_checkpoint(path)
    read_config = checkpoint_import.config_from_params(params, base=config)
  config = config or read_config
  model = build_model(config, prompt_module, **model_kwargs)
  expected = build_model(config).param_shapes()
  checkpoint_import.check_params(params, expected, source=os.fspath(path))
  params = jax.tree_util.tree_map(lambda x: np.asarray(x, dtype=np.float32), params)
  return model, params


def load_frozen_params(config: T5Config, checkpoint_path: Optional[str], seed: int = 0
                       ) -> Params:
  """The frozen model's weights: pretrained from checkpoint_path, else a
  seeded random model of `config` (host arrays, no prompt).

  A checkpoint whose shapes do not fit the configured model is refused with
  both descriptions (checkpoint_import.CheckpointMismatchError).
  """
  if not checkpoint_path:
    # Deterministic from `seed`: every run (and every resume) gets the same
    # frozen model, which is what makes prompts of tiny demo models reusable.
    return build_model(config).init_params(jax.random.PRNGKey(seed))
  _, params = load_pretrained(checkpoint_path, config=config)
  return params

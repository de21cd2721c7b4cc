"""`t5x export-prompt` / `t5x import-prompt`: prompts to and from Hugging Face
PEFT prompt-tuning adapters (the format: prompts/peft_format.py).

  t5x export-prompt --format peft RUN_OR_PROMPT --output_dir DIR [--base_model CKPT]
  t5x import-prompt ADAPTER_DIR --output_dir OUT [--base_model CKPT] [--task NAME]

With --base_model the prompt is checked against that model (dimensions and
frozen weights) before anything is written; export names it in the adapter's
`base_model_name_or_path` (a T5X checkpoint is first exported as a Hugging
Face folder, DIR/base_model, so PEFT can load it); import records it in the
sidecar. The imported prompt is OUT/encoder.prompt.prompt.prompt +
prompt_info.json, what prompts/from_file.gin, `t5x eval` and `similarity` read.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Optional, Sequence, Tuple

from prompt_transfer.analysis import library
from prompt_transfer.prompts import files
from prompt_transfer.prompts import peft_format

HELPS = {
    'export-prompt': 'Write prompts as Hugging Face PEFT prompt-tuning adapters '
                     '(adapter_config.json + adapter_model.safetensors).',
    'import-prompt': 'Turn a Hugging Face PEFT prompt-tuning adapter into our numpy '
                     'prompt layout with a sidecar.',
}
HELP = HELPS['export-prompt']


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument('prompts', nargs='+', help='Run folders (MODEL_DIR), prompt files or a '
                      'library of them; one prompt -> OUTPUT_DIR, several -> OUTPUT_DIR/<name>.')
  parser.add_argument('--format', choices=('peft',), default='peft')
  parser.add_argument('--output_dir', required=True)
  parser.add_argument('--step', type=int, default=None, help='Numpy checkpoint step of runs '
                      '(default: the latest).')
  parser.add_argument('--base_model', default=None,
                      help='The frozen model (HF folder, T5X checkpoint or pkg://assets/...): '
                      'the prompt is checked against it and the adapter names it.')


def add_import_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument('adapter', help='A PEFT prompt-tuning adapter folder.')
  parser.add_argument('--output_dir', required=True)
  parser.add_argument('--base_model', default=None,
                      help="The frozen model the adapter is for (default: the adapter's "
                      'base_model_name_or_path when it is a local folder).')
  parser.add_argument('--task', default=None, help='Task name for the sidecar.')
  parser.add_argument('--drop_decoder_rows', action='store_true',
                      help='Import an adapter of PEFT < 0.4 (decoder rows in use) anyway.')


ARGUMENTS = {'export-prompt': add_export_arguments, 'import-prompt': add_import_arguments}
add_arguments = add_export_arguments


def _usage(message: str) -> Exception:
  from prompt_transfer import cli  # pylint: disable=g-import-not-at-top
  return cli.UsageError(message)


def _load_base(path: str) -> Tuple[object, str, str]:
  """(T5Config, weights fingerprint, checkpoint format) of a frozen model."""
  from prompt_transfer.model import pretrained  # pylint: disable=g-import-not-at-top
  model, params = pretrained.load_pretrained(path)
  fmt = pretrained.detect_format(pretrained.resolve_checkpoint_path(path))
  return model.config, files.weights_fingerprint(params['token_embedder']['embedding']), fmt


def _check_for_base(name: str, array, info: files.PromptInfo, config, weights: str,
                    base: str) -> None:
  library.check_compatible(info, config, array=array, name=name)
  if info.weights and info.weights != weights:
    raise library.IncompatiblePromptError(
        f'Prompt {name!r} was trained on frozen weights {info.weights}; {base} has weights '
        f'{weights} (same dimensions, other checkpoint).')


def run_export(args: argparse.Namespace) -> int:
  lib = library.load_library(args.prompts, args.step)
  base_path: Optional[str] = None
  if args.base_model:
    config, weights, fmt = _load_base(args.base_model)
    for name, (array, info) in lib.items():  # every prompt checked before anything is written
      _check_for_base(name, array, info, config, weights, args.base_model)
    from prompt_transfer.model import pretrained  # pylint: disable=g-import-not-at-top
    base_path = os.path.abspath(pretrained.resolve_checkpoint_path(args.base_model))
    if fmt != 'hf':  # PEFT loads Hugging Face folders only
      from prompt_transfer.model import export  # pylint: disable=g-import-not-at-top
      model, params = pretrained.load_pretrained(args.base_model)
      base_path = export.export_hf_checkpoint(
          params, model.config, os.path.join(args.output_dir, 'base_model'), overwrite=True)
      print(f'[prompt-transfer] {args.base_model} exported as a Hugging Face folder: {base_path}')
  for name, (array, info) in lib.items():
    out = args.output_dir if len(lib) == 1 else os.path.join(args.output_dir, name)
    folder = peft_format.write_adapter(out, array, info, base_path)
    print(f'[prompt-transfer] {name}: PEFT prompt-tuning adapter {list(array.shape)} in {folder}'
          f' (num_transformer_submodules 1: encoder only)')
  return 0


def run_import(args: argparse.Namespace) -> int:
  adapter = peft_format.read_adapter(args.adapter, args.drop_decoder_rows)
  prompt, source = adapter.prompt, os.path.abspath(args.adapter)
  info = adapter.info or files.PromptInfo(prompt_length=int(prompt.shape[0]), module='Prompt',
                                          origin=f'PEFT adapter {source}')
  if args.task:
    info = dataclasses.replace(info, task=args.task)
  base = args.base_model
  named = adapter.config.get('base_model_name_or_path')
  if not base and named and os.path.isdir(named):
    base = named
  if base:
    config, weights, _ = _load_base(base)
    if prompt.shape[1] != config.emb_dim:
      raise peft_format.PeftAdapterError(
          f'{os.path.join(source, peft_format.ADAPTER_WEIGHTS)}: the prompt is '
          f'{list(prompt.shape)}; {base} has d_model {config.emb_dim}, so it expects '
          f'[{prompt.shape[0]}, {config.emb_dim}].')
    if adapter.info is not None:
      _check_for_base(info.task or source, prompt, info, config, weights, base)
    else:
      info = dataclasses.replace(info, model=config.describe(), weights=weights)
  elif adapter.info is None:
    print('[prompt-transfer] warning: no --base_model and the adapter names no local model: '
          'the sidecar cannot say which model the prompt is for (only its width is checked '
          'when it is used).')
  if adapter.note:
    print(f'[prompt-transfer] {adapter.note}')
  folder = files.save_prompt_folder(args.output_dir, prompt, info)
  print(f'[prompt-transfer] {list(prompt.shape)} prompt in '
        f'{os.path.join(folder, files.PROMPT_FILE)}')
  return 0


def run(args: argparse.Namespace, gin_bindings: Sequence[str]) -> int:
  if gin_bindings:
    raise _usage(f't5x {args.command} takes no --gin flags.')
  return run_export(args) if args.command == 'export-prompt' else run_import(args)

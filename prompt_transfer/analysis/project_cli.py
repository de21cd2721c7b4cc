"""`t5x project PROMPTS... --output_dir OUT`: source-model prompts mapped to
a target model, by a trained projector (`--projector DIR`, projector.py) or
training-free recycling (`--recycler v2v-lin|lin-comb|v2v-nn`, recycling.py,
with both models' checkpoints). Each result is written as
OUT/<name>/encoder.prompt.prompt.prompt with a prompt_info.json naming the
target model, its weights and where the prompt came from (`origin`), so
`t5x eval`, `similarity` and prompts/from_file.gin take it as they are.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Sequence

from prompt_transfer.analysis import library
from prompt_transfer.prompts import files

HELP = ('Map prompts of one model to another: by a trained projector (--projector) or '
        'by recycling through the vocabulary embeddings (--recycler).')


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument('prompts', nargs='+', help='Prompt files, run folders or a library.')
  parser.add_argument('--output_dir', required=True)
  how = parser.add_mutually_exclusive_group(required=True)
  how.add_argument('--projector', help='A projector run (MODEL_DIR or numpy checkpoint).')
  how.add_argument('--recycler', choices=('v2v-lin', 'lin-comb', 'v2v-nn'))
  parser.add_argument('--source_checkpoint', help='Recycling: the source model (HF folder, '
                      'T5X checkpoint or pkg://assets/...).')
  parser.add_argument('--target_checkpoint', help='Recycling: the target model.')
  parser.add_argument('--step', type=int, default=None, help='Numpy checkpoint step of runs.')
  parser.add_argument('--seed', type=int, default=0, help='v2v-nn initialisation.')


def _usage(message: str) -> Exception:
  from prompt_transfer import cli  # pylint: disable=g-import-not-at-top
  return cli.UsageError(message)


def run(args: argparse.Namespace, gin_bindings: Sequence[str]) -> int:
  if gin_bindings:
    raise _usage('t5x project takes no --gin flags.')
  lib = library.load_library(args.prompts, args.step)
  paths = library.find_prompt_files(args.prompts, args.step)  # the same names
  if args.projector:
    from prompt_transfer import projector  # pylint: disable=g-import-not-at-top
    proj_info, params = projector.load_projector(args.projector)
    mapping = lambda p: projector.project(p, proj_info, params)  # pylint: disable=unnecessary-lambda-assignment
    target_model, target_weights = proj_info.target_model, proj_info.target_weights
    source_weights, how = proj_info.source_weights, f'projector {args.projector}'
  else:
    if not (args.source_checkpoint and args.target_checkpoint):
      raise _usage('--recycler needs --source_checkpoint and --target_checkpoint.')
    from prompt_transfer import recycling  # pylint: disable=g-import-not-at-top
    from prompt_transfer.model.pretrained import load_pretrained  # pylint: disable=g-import-not-at-top
    src_model, src_params = load_pretrained(args.source_checkpoint)
    tgt_model, tgt_params = load_pretrained(args.target_checkpoint)
    src_emb = src_params['token_embedder']['embedding']
    tgt_emb = tgt_params['token_embedder']['embedding']
    mapping = recycling.fit_recycler(args.recycler, src_emb, tgt_emb, seed=args.seed)
    target_model, target_weights = tgt_model.config.describe(), files.weights_fingerprint(tgt_emb)
    source_weights = files.weights_fingerprint(src_emb)
    how = f'recycler {args.recycler} ({args.source_checkpoint} -> {args.target_checkpoint})'
    for name, (array, info) in lib.items():  # a prompt of another model is refused
      library.check_compatible(info, src_model.config, array=array, name=name)
  for name, (array, info) in lib.items():
    if info.weights and source_weights and info.weights != source_weights:
      raise _usage(f'{name} was trained on other weights ({info.weights}) than the source '
                   f'model the {how.split(" ")[0]} maps ({source_weights}).')
    out = mapping(array)
    new_info = dataclasses.replace(info, model=dict(target_model), weights=target_weights,
                                   prompt_length=int(out.shape[0]), module='Prompt',
                                   param_shapes={}, origin=f'{paths[name]} by {how}')
    folder = files.save_prompt_folder(os.path.join(args.output_dir, name), out, new_info)
    print(f'[prompt-transfer] {name}: {list(array.shape)} -> {list(out.shape)} in {folder}')
  return 0

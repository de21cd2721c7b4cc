"""Pretrains the tiny T5 1.1 of the CPU quick-start and packages it.

Prompt tuning only steers what a frozen model already computes; on a random
tiny T5 the quick-start barely moves the loss. This script model-tunes (all
parameters, runs/model_tune.gin, through the real `t5x train` entry point) the
tiny byte-level T5 1.1 on a mixture of the synthetic tasks, leaving out the
quick-start's source and target tasks so that prompt tuning on them is still
a task the model has not seen. The result is exported as a Hugging Face T5
directory (config.json + model.safetensors + README.md) to
prompt_transfer/assets/t5_1_1_tiny_synthetic/, which the quick-start loads as
its frozen model.

  python tools/make_tiny_checkpoint.py          # the packaged model: ~13 min on 2 cores
  python tools/make_tiny_checkpoint.py --steps 200 --out /tmp/tiny   # a smoke run

The model's dims come from models/t5_1_1_tiny_synthetic.gin (d_model 64; the
32-wide models/t5_1_1_tiny.gin learns majority but not copy, reverse or
greater in 3,000 steps).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(ROOT, 'prompt_transfer', 'assets', 't5_1_1_tiny_synthetic')
MIXTURE_NAME = 'synthetic_pretrain_tiny'
# Long enough for every synthetic task: inputs <= 48 bytes, targets <= 12 + EOS.
FEATURE_LENGTHS = {'inputs': 64, 'targets': 16}
LOG_PERIOD = 100
# Pinned (the byte-level synthetic tasks when the packaged model was made), so
# tasks added to tasks/synthetic.py later stay unseen and the model reproducible.
PRETRAIN_POOL = tuple(f'synthetic_{r}_{t}' for r, ts in (
    ('majority', ('yesno', 'truefalse', 'posneg')), ('parity', ('yesno', 'truefalse', 'evenodd')),
    ('greater', ('yesno', 'truefalse', 'posneg')), ('copy', ('plain',)), ('reverse', ('plain',)))
                      for t in ts)


def register_mixture(exclude: Sequence[str]) -> List[str]:
  """Registers MIXTURE_NAME: the byte-level synthetic tasks minus `exclude`."""
  import seqio  # pylint: disable=g-import-not-at-top
  import tasks.synthetic  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import  (registers tasks)
  unknown = sorted(set(exclude) - set(PRETRAIN_POOL))
  if unknown:
    raise ValueError(f'--exclude: not synthetic byte-level tasks: {unknown}')
  names = [n for n in PRETRAIN_POOL if n not in set(exclude)]
  if MIXTURE_NAME in seqio.MixtureRegistry.names():
    seqio.MixtureRegistry.remove(MIXTURE_NAME)
  # Equal rates: every task has 2,000 training examples anyway.
  seqio.MixtureRegistry.add(MIXTURE_NAME, names, default_rate=1.0)
  return names


def read_numpy_params(model_dir: str, step: int) -> Dict[str, np.ndarray]:
  """The full parameter tree the trainer saved (model tuning: every parameter)."""
  # pylint: disable=g-import-not-at-top
  from prompt_transfer.prompts import files
  from prompt_transfer.model.checkpoint_import import unflatten_params
  # pylint: enable=g-import-not-at-top
  folder = files.numpy_checkpoint_dir(model_dir, step)
  flat = {}
  for name in os.listdir(folder):
    if name == files.INFO_FILE:
      continue
    with open(os.path.join(folder, name), 'rb') as f:
      flat[name.replace('.', '/')] = np.load(f)
  return unflatten_params(flat)


def read_metrics(model_dir: str) -> List[dict]:
  with open(os.path.join(model_dir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f if line.strip()]


def _readme(args: argparse.Namespace, config, tasks: Sequence[str], metrics: List[dict],
            seconds: float, n_params: int, size_bytes: int) -> str:
  import jax  # pylint: disable=g-import-not-at-top
  first, last = metrics[0], metrics[-1]
  cpu = platform.processor() or platform.machine()
  tail = [m['loss'] for m in metrics[-5:]]  # one batch's loss is noisy
  evals = {k[len('eval/'):]: v for k, v in last.items() if k.startswith('eval/')}
  # Beside the packaged tiny model's scores, when this is another model.
  tiny = {} if config.name == 't5_1_1_tiny_synthetic' else _card_scores(
      os.path.join(os.path.dirname(DEFAULT_OUT), 't5_1_1_tiny_synthetic', 'README.md'))
  eval_lines = '\n'.join(
      f'| {k.split("/")[0]} | {k.split("/")[1]} | {v:.3f} |' +
      (f' {tiny[k]:.3f} |' if tiny else '') for k, v in sorted(evals.items()))
  argv = sys.argv[1:]
  if '--card_only' in argv:  # the command that made the model, not the card
    i = argv.index('--card_only')
    argv = argv[:i] + argv[i + 2:]
  cmd = ' '.join(['python', 'tools/make_tiny_checkpoint.py'] + argv)
  purpose = ('pretrained for the CPU quick-start (`gin/runs/quickstart.gin`)'
             if config.name == 't5_1_1_tiny_synthetic' else
             'pretrained as the second stand-in model (cross-model transfer, FPT)')
  return f"""# {config.name}

A small T5 1.1 (gated GELU, untied head, byte vocabulary of {config.vocab_size} ids:
d_model {config.emb_dim}, {config.num_heads} heads x {config.head_dim}, d_ff {config.mlp_dim},
{config.num_encoder_layers}+{config.num_decoder_layers} layers, {n_params:,} parameters,
{size_bytes / 1024:.0f} KiB) {purpose}.
A Hugging Face T5 directory: `T5ForConditionalGeneration.from_pretrained(this_dir)` loads
it, and so do `prompt_transfer.load_pretrained` and `CHECKPOINT_PATH`.

Made by `{cmd}` ({args.gin_file} + runs/model_tune.gin through `t5x train`):
all parameters trained (Adafactor, learning rate {args.learning_rate}, batch {args.batch_size},
dropout {config.dropout_rate}, seed 0) for {last['step']} steps on the seqio mixture
`{MIXTURE_NAME}` (equal rates) of the byte-level synthetic tasks (tasks/synthetic.py,
seed 0 data) except `{'`, `'.join(args.exclude)}`, which stay unseen so prompt tuning on
them is a real learning task:

{chr(10).join('- ' + t for t in tasks)}

Training loss (one batch's, logged every {LOG_PERIOD} steps): {first['loss']:.3f} at
step {first['step']}, {last['loss']:.3f} at step {last['step']}; mean of the last
{len(tail)} logged: {np.mean(tail):.3f}. Training and evaluation took {seconds / 60:.1f} minutes
on {os.cpu_count()} CPU cores ({cpu}), jax {jax.__version__}.

Validation ({args.eval_examples} examples per task, greedy decoding, step {last['step']}):

| task | metric | value |{' t5_1_1_tiny_synthetic |' if tiny else ''}
|---|---|---|{'---|' if tiny else ''}
{eval_lines}

Regenerate with the command above; it overwrites this directory atomically.
"""


def _card_scores(path: str) -> Dict[str, float]:
  """{'task/metric': value} from a model card's validation table."""
  if not os.path.exists(path):
    return {}
  out = {}
  for line in open(path):
    cells = [c.strip() for c in line.strip().strip('|').split('|')]
    if len(cells) >= 3 and cells[0].startswith('synthetic_'):
      out[f'{cells[0]}/{cells[1]}'] = float(cells[2])
  return out


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--steps', type=int, default=3000)
  parser.add_argument('--batch_size', type=int, default=32)
  parser.add_argument('--learning_rate', type=float, default=0.01)
  parser.add_argument('--gin_file', default='models/t5_1_1_tiny_synthetic.gin',
                      help='The model gin file (dims of the pretrained model).')
  parser.add_argument('--exclude', nargs='*', default=None,
                      help='Synthetic tasks left out (default: the quick-start pair).')
  parser.add_argument('--eval_examples', type=int, default=100)
  parser.add_argument('--model_dir', default=None,
                      help='Training directory (default: a temporary one, deleted).')
  parser.add_argument('--out', default=DEFAULT_OUT)
  parser.add_argument('--card_only', type=float, default=None, metavar='MINUTES',
                      help='Rewrite --out/README.md from --model_dir (already trained and '
                           'exported; MINUTES: how long it took) without training.')
  args, gin_overrides = parser.parse_known_args(argv)

  from tasks import synthetic  # pylint: disable=g-import-not-at-top
  if args.exclude is None:
    args.exclude = [synthetic.QUICKSTART_SOURCE, synthetic.QUICKSTART_TARGET]
  tasks = register_mixture(args.exclude)

  from prompt_transfer import cli  # pylint: disable=g-import-not-at-top
  model_dir = args.model_dir or tempfile.mkdtemp(prefix='tiny_pretrain_')
  steps = args.steps
  train_argv = [
      'train', f'--gin_file={args.gin_file}', '--gin_file=runs/model_tune.gin',
      # From random weights, even where the model gin file names a checkpoint.
      '--gin.CHECKPOINT_PATH=None', f'--gin.MODEL_DIR={model_dir}',
      f'--gin.MIXTURE_OR_TASK_NAME={MIXTURE_NAME}',
      f'--gin.TASK_FEATURE_LENGTHS={FEATURE_LENGTHS!r}', f'--gin.TRAIN_STEPS={steps}',
      f'--gin.BATCH_SIZE={args.batch_size}', f'--gin.LEARNING_RATE={args.learning_rate}',
      # One checkpoint and one evaluation (every task of the mixture), at the end.
      f'--gin.train.checkpoint_period={steps}', f'--gin.train.eval_period={steps}',
      f'--gin.train.eval_num_examples={args.eval_examples}',
      f'--gin.train.log_period={LOG_PERIOD}',
      '--gin.train.keep_checkpoints=1',
  ] + list(gin_overrides)
  if args.card_only is not None:
    if not args.model_dir:
      parser.error('--card_only needs the --model_dir of the run.')
    # The run's gin configuration, to describe its model.
    cli.parse_gin(cli.build_parser().parse_args(train_argv[:3]), [
        f'{name} = {cli.gin_value(value)}' for name, value in (
            a[len('--gin.'):].split('=', 1) for a in train_argv[3:] if a.startswith('--gin.'))],
                  'train')
    seconds = args.card_only * 60
  else:
    print('[make_tiny_checkpoint] t5x ' + ' '.join(train_argv), flush=True)
    t0 = time.time()
    code = cli.run(train_argv)
    seconds = time.time() - t0
    if code:
      return code

  import jax  # pylint: disable=g-import-not-at-top
  from prompt_transfer.model import export  # pylint: disable=g-import-not-at-top
  from prompt_transfer.training import configurables  # pylint: disable=g-import-not-at-top
  config = configurables.model_config()  # as gin configured it for the run
  params = read_numpy_params(model_dir, steps)
  metrics = read_metrics(model_dir)
  out = args.out if args.card_only is not None else export.export_hf_checkpoint(
      params, config, args.out, overwrite=True)
  n_params = sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(params))
  size = os.path.getsize(os.path.join(out, 'model.safetensors'))
  readme = _readme(args, config, tasks, metrics, seconds, n_params, size)
  with open(os.path.join(out, 'README.md'), 'w') as f:
    f.write(readme)
  print(readme)
  print(f'[make_tiny_checkpoint] wrote {out}', flush=True)
  if args.model_dir is None:
    shutil.rmtree(model_dir, ignore_errors=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())

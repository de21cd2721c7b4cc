#!/usr/bin/env python
"""Prompt tuning on real-task lengths: length buckets and grouping vs PEFT's dynamic padding.

Run by hand (not part of the test suite):

    python bench/real_lengths.py                                  # sst2, rte, boolq; 2 pairs
    python bench/real_lengths.py --config tiny --tasks sst2 --pairs 1 --steps 4   # smoke run
    python bench/real_lengths.py --out bench/results/real_lengths_cpu2.json

The fixed-shape benchmark (peft_compare.py) pads every example to one input
length on both sides. Real prompt-tuning tasks are mostly short and vary, so
what a user pays depends on how batches are padded. Here every side trains on
the SAME pool of examples (steps x batch of them, lengths drawn from a real
task's length distribution, see TASK_LENGTHS), with the SAME frozen model
(T5 1.1 small shape, random weights exported as a Hugging Face directory) and
the SAME initial prompt (--prompt-length, 100 as in the papers):

  ours_fixed      T5X's one shape: every batch padded to --max-input (512)
  ours_buckets    random batches, each cut to the smallest power-of-two bucket
                  its longest row fits in (train.length_buckets='pow2')
  ours_grouped    + batches drawn from one bucket each (train.length_grouping,
                  data.group_by_length over the shuffled stream, as t5x train
                  runs it)
  theirs_dynamic  transformers + PEFT prompt tuning as its users run it: random
                  batches padded to the longest row of the batch (what
                  DataCollatorForSeq2Seq's default padding does)
  theirs_grouped  + HF Trainer's group_by_length (transformers'
                  LengthGroupedSampler: mega-batches of 50 batches sorted by
                  length), padded to each batch's longest row
  ours_grouped_fine  ours_grouped with LENGTH_BUCKETS=--fine-buckets ('pow2/4':
                  four buckets per doubling, less padding, more compiles)
  ours_grouped_p20 (--short-prompt 20) ours_grouped with a 20-token prompt:
                  what the prompt's own length costs on short tasks

Random-batch sides use one shuffled order of the pool; grouped sides group
that order their own way. Each side: one fresh process; every batch shape it
will meet is compiled (ours) or warmed up (theirs) first and timed apart
(`compile_s`: what a run pays once per bucket; the persistent compilation
cache of `t5x` pays it once per machine), then `--steps` steps are timed.
Padding efficiency = useful encoder positions / computed ones, prompt
included: sum over rows of (prompt + input length) over sum over batches of
batch x (prompt + padded length). Sides run in rotation, `--pairs` times;
ratios are per rotation, then the median.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.join(ROOT, 'bench')):
  if path not in sys.path:
    sys.path.insert(0, path)

import peft_compare  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

# Input lengths in T5 SentencePiece tokens (task prefix and EOS included) of
# the training sets, shaped from published statistics (words x ~1.3 T5
# tokens per English word + the T5 task prefix + EOS); a log-normal of that
# mean, spread `sigma` (our assumption, the papers give means), clipped to
# [lo, hi]. No task text ships with any installed package, so none is
# tokenised here.
TASK_LENGTHS = {
    # SST-2 (GLUE train, 67k phrases of the Stanford Sentiment Treebank): about
    # 9-10 words on average, 1 to ~50; 'sst2 sentence:' is 5 tokens.
    'sst2': dict(mean=19.0, sigma=0.55, lo=7, hi=80, targets=2),
    # RTE (GLUE train, 2.5k pairs): premise ~43 words, hypothesis ~9;
    # 'rte sentence1: ... sentence2: ...' adds ~8 tokens.
    'rte': dict(mean=77.0, sigma=0.5, lo=20, hi=400, targets=3),
    # BoolQ (Clark et al. 2019, section 3: questions 8.9 tokens, passages 108
    # on average): 'boolq passage: ... question: ...' adds ~6; T5 cuts at 512.
    'boolq': dict(mean=160.0, sigma=0.45, lo=30, hi=512, targets=2),
}
OURS = ('ours_fixed', 'ours_buckets', 'ours_grouped', 'ours_grouped_fine', 'ours_grouped_p20')
THEIRS = ('theirs_dynamic', 'theirs_grouped')
EOS = peft_compare.EOS


def draw_lengths(task: str, n: int, rs: Any) -> Any:
  """n input lengths (with EOS) from the task's log-normal."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  spec = TASK_LENGTHS[task]
  mu = np.log(spec['mean']) - spec['sigma'] ** 2 / 2   # so that E[length] = mean
  lengths = np.round(rs.lognormal(mu, spec['sigma'], n)).astype(int)
  return np.clip(lengths, spec['lo'], spec['hi'])


def prepare(args: argparse.Namespace, directory: str) -> Dict[str, Any]:
  """The HF export of the model and both prompts (shared by every task)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from prompt_transfer.model.config import get_config  # pylint: disable=g-import-not-at-top
  from prompt_transfer.model.export import export_hf_checkpoint  # pylint: disable=g-import-not-at-top
  from prompt_transfer.model.models import build_model  # pylint: disable=g-import-not-at-top
  config = get_config(**peft_compare.CONFIGS[args.config])
  params = build_model(config).init_params(jax.random.PRNGKey(args.seed))
  hf_dir = export_hf_checkpoint(params, config, os.path.join(directory, 'hf'), overwrite=True)
  del params
  rs = np.random.RandomState(args.seed)
  prompt = rs.uniform(-0.5, 0.5, (args.prompt_length, config.emb_dim)).astype(np.float32)
  np.save(os.path.join(directory, 'prompt.npy'), prompt)
  np.save(os.path.join(directory, 'prompt_short.npy'), prompt[:args.short_prompt])
  return {'config': config.describe(), 'hf_dir': hf_dir, 'vocab_size': config.vocab_size}


def make_pool(task: str, args: argparse.Namespace, vocab_size: int, path: str) -> Dict[str, Any]:
  """steps x batch examples of the task's lengths, padded to --max-input, and
  the one shuffled order every random-batch side uses."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  rs = np.random.RandomState(args.seed + 1)
  n, s, t = args.steps * args.batch, args.max_input, args.max_target
  lengths = np.minimum(draw_lengths(task, n, rs), s)
  tlen = TASK_LENGTHS[task]['targets']
  enc = np.zeros((n, s), np.int32)
  tgt = np.zeros((n, t), np.int32)
  for i, length in enumerate(lengths):
    enc[i, :length - 1] = rs.randint(2, vocab_size, length - 1)
    enc[i, length - 1] = EOS
    tgt[i, :tlen - 1] = rs.randint(2, vocab_size, tlen - 1)
    tgt[i, tlen - 1] = EOS
  dec_in = np.zeros_like(tgt)
  dec_in[:, 1:] = tgt[:, :-1]
  order = rs.permutation(n)
  np.savez(path, encoder_input_tokens=enc, decoder_input_tokens=dec_in,
           decoder_target_tokens=tgt, lengths=lengths, order=order)
  return {'examples': int(n), 'input_length_mean': float(lengths.mean()),
          'input_length_median': float(np.median(lengths)),
          'input_length_p90': float(np.percentile(lengths, 90)),
          'input_length_max': int(lengths.max()), 'target_length': tlen}


def _efficiency(batches: List[Dict[str, Any]], prompt_len: int) -> Dict[str, Any]:
  """Useful / computed positions (prompt included) of the encoder and decoder."""
  useful = computed = dec_useful = dec_computed = 0
  for b in batches:
    rows, width = b['encoder_input_tokens'].shape
    useful += int((b['encoder_input_tokens'] != 0).sum()) + rows * prompt_len
    computed += rows * (width + prompt_len)
    dec_useful += int((b['decoder_target_tokens'] != 0).sum())
    dec_computed += b['decoder_target_tokens'].size
  rows = sum(b['encoder_input_tokens'].shape[0] for b in batches)
  return {'encoder_padding_efficiency': useful / computed,
          # the trained examples' mean input length (the pool's on random batches)
          'input_length_mean': (useful - rows * prompt_len) / rows,
          'decoder_padding_efficiency': dec_useful / dec_computed,
          'encoder_positions_computed': computed, 'encoder_positions_useful': useful,
          'shapes': sorted({tuple(b['encoder_input_tokens'].shape[1:]) +
                            tuple(b['decoder_target_tokens'].shape[1:]) for b in batches})}


# ---------------------------------------------------------------------------
# Ours: the trainer's step on the trainer's batches.
# ---------------------------------------------------------------------------
def our_batches(side: str, pool: Dict[str, Any], batch_size: int, steps: int,
                max_input: int, max_target: int, fine: str = 'pow2/4') -> List[Dict[str, Any]]:
  """The batches t5x train would build for this side."""
  from prompt_transfer.training import data  # pylint: disable=g-import-not-at-top
  keys = ('encoder_input_tokens', 'decoder_input_tokens', 'decoder_target_tokens')
  ordered = {k: pool[k][pool['order']] for k in keys}
  if side == 'ours_fixed':
    return [{k: v[i * batch_size:(i + 1) * batch_size] for k, v in ordered.items()}
            for i in range(steps)]
  buckets = data.resolve_buckets(fine if side.endswith('_fine') else 'pow2',
                                 {'inputs': max_input, 'targets': max_target})
  if side == 'ours_buckets':
    raw = [{k: v[i * batch_size:(i + 1) * batch_size] for k, v in ordered.items()}
           for i in range(steps)]
  else:  # the training stream's grouping (an endless stream, as in training)
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    ds = tf.data.Dataset.from_tensor_slices(ordered).repeat()
    # In steady state: the first batches of a grouped stream come from the
    # buckets that fill first (the common, short ones), which would flatter it.
    grouped = data.group_by_length(buckets)(ds, batch_size).skip(4 * steps)
    raw = list(grouped.take(steps).as_numpy_iterator())
  return [data.bucket_batch(b, buckets) for b in raw]


def run_ours(spec: Dict[str, Any]) -> Dict[str, Any]:
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from prompt_transfer.training import partitioning  # pylint: disable=g-import-not-at-top
  from prompt_transfer.training.step import compile_train_step, dropout_key  # pylint: disable=g-import-not-at-top
  prompt = np.load(spec['prompt'])
  setup = peft_compare._our_setup(spec['hf_dir'], prompt)  # pylint: disable=protected-access
  with np.load(spec['pool']) as f:
    pool = {k: f[k] for k in f.files}
  host = our_batches(spec['side'], pool, spec['batch'], spec['steps'], spec['max_input'],
                     spec['max_target'], spec['fine_buckets'])
  batches = [partitioning.global_batch(b, setup.mesh) for b in host]
  step_fn = compile_train_step(setup)
  state, frozen = setup.state, setup.frozen
  setup.state = None
  rng = dropout_key(spec['seed'], 'threefry')
  # Every shape this side meets, compiled (and run once) before the clock starts.
  first: Dict[Any, int] = {}
  for i, b in enumerate(batches):
    first.setdefault(tuple(v.shape for v in b.values()), i)
  t0 = time.perf_counter()
  for i in first.values():
    state, metrics = step_fn(state, frozen, batches[i], jax.random.fold_in(rng, 10**6 + i))
  jax.block_until_ready(state)
  compile_s = time.perf_counter() - t0
  partitioning.release_host_memory()
  losses = []
  t0 = time.perf_counter()
  for i, b in enumerate(batches):
    state, metrics = step_fn(state, frozen, b, jax.random.fold_in(rng, i))
    if i == 0:
      losses.append(float(metrics['loss']))
  losses.append(float(metrics['loss']))
  train_s = time.perf_counter() - t0
  return {'train_s': train_s, 'compile_s': compile_s, 'compiled_shapes': len(first),
          'train_examples_per_s': len(batches) * spec['batch'] / train_s,
          'loss_first': losses[0], 'loss_last': losses[-1],
          **_efficiency(host, prompt.shape[0])}


# ---------------------------------------------------------------------------
# Theirs: transformers + PEFT as its users run it.
# ---------------------------------------------------------------------------
def their_batches(side: str, pool: Dict[str, Any], batch_size: int, steps: int,
                  seed: int) -> List[Dict[str, Any]]:
  """Random batches (the pool's shuffled order) or LengthGroupedSampler's,
  each padded to its longest row (inputs and labels)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  if side == 'theirs_grouped':
    import torch  # pylint: disable=g-import-not-at-top
    from transformers.trainer_pt_utils import LengthGroupedSampler  # pylint: disable=g-import-not-at-top
    sampler = LengthGroupedSampler(batch_size, lengths=[int(x) for x in pool['lengths']],
                                   generator=torch.Generator().manual_seed(seed))
    order = np.array(list(iter(sampler)))
  else:
    order = pool['order']
  out = []
  for i in range(steps):
    rows = order[i * batch_size:(i + 1) * batch_size]
    enc, tgt = pool['encoder_input_tokens'][rows], pool['decoder_target_tokens'][rows]
    width = max(int(pool['lengths'][rows].max()), 1)
    twidth = int((tgt != 0).sum(axis=1).max())
    out.append({'encoder_input_tokens': enc[:, :width], 'decoder_target_tokens': tgt[:, :twidth]})
  return out


def run_theirs(spec: Dict[str, Any]) -> Dict[str, Any]:
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import peft  # pylint: disable=g-import-not-at-top
  from transformers import T5ForConditionalGeneration  # pylint: disable=g-import-not-at-top
  from transformers.optimization import Adafactor  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(spec['threads'])
  torch.manual_seed(spec['seed'])
  prompt = np.load(spec['prompt'])
  base = T5ForConditionalGeneration.from_pretrained(spec['hf_dir'])
  model = peft.get_peft_model(base, peft.PromptTuningConfig(
      task_type=peft.TaskType.SEQ_2_SEQ_LM, num_virtual_tokens=prompt.shape[0],
      num_transformer_submodules=1, prompt_tuning_init=peft.PromptTuningInit.RANDOM))
  with torch.no_grad():
    model.prompt_encoder['default'].embedding.weight.copy_(torch.from_numpy(prompt))
  opt = Adafactor([p for p in model.parameters() if p.requires_grad], lr=0.3,
                  scale_parameter=False, relative_step=False, warmup_init=False,
                  decay_rate=-0.8, clip_threshold=1.0, weight_decay=1e-5)
  model.train()
  with np.load(spec['pool']) as f:
    pool = {k: f[k] for k in f.files}
  host = their_batches(spec['side'], pool, spec['batch'], spec['steps'], spec['seed'])
  batches = []
  for b in host:
    enc = torch.from_numpy(b['encoder_input_tokens'].astype(np.int64))
    tgt = torch.from_numpy(b['decoder_target_tokens'].astype(np.int64))
    batches.append({'input_ids': enc, 'attention_mask': (enc > 0).long(),
                    'labels': torch.where(tgt > 0, tgt, torch.full_like(tgt, -100))})

  def step(b: Dict[str, Any]) -> float:
    loss = model(**b).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss

  # Allocator warm-up on the longest batch and one more, timed apart.
  longest = max(range(len(batches)), key=lambda i: batches[i]['input_ids'].shape[1])
  t0 = time.perf_counter()
  for i in (longest, 0):
    step(batches[i])
  compile_s = time.perf_counter() - t0
  losses = []
  t0 = time.perf_counter()
  for i, b in enumerate(batches):
    loss = step(b)
    if i == 0:
      losses.append(float(loss))
  losses.append(float(loss))
  train_s = time.perf_counter() - t0
  return {'train_s': train_s, 'compile_s': compile_s,
          'train_examples_per_s': len(batches) * spec['batch'] / train_s,
          'loss_first': losses[0], 'loss_last': losses[-1], 'torch_threads': torch.get_num_threads(),
          **_efficiency(host, prompt.shape[0])}


# ---------------------------------------------------------------------------
# Driver.
# ---------------------------------------------------------------------------
def fixed_on(run: Dict[str, Any], pool: Dict[str, Any], args: argparse.Namespace
             ) -> Dict[str, Any]:
  """An ours_fixed run measured on another task, for this task's pool: the
  same examples/s (one shape), this pool's lengths and padding efficiency."""
  p, mean = args.prompt_length, pool['input_length_mean']
  eff = (p + mean) / (p + args.max_input)
  return {**run, 'input_length_mean': mean, 'encoder_padding_efficiency': eff,
          'encoder_positions_useful': None, 'encoder_positions_computed': None,
          'decoder_padding_efficiency': pool['target_length'] / args.max_target,
          'measured_on': 'the first task (--fixed-once)'}


def summarise(runs: Dict[str, List[dict]]) -> Dict[str, Any]:
  """Medians per side and the issue's ratios (per rotation, then median)."""
  med = {side: {k: statistics.median(r[k] for r in rs) for k in
                ('train_examples_per_s', 'compile_s', 'encoder_padding_efficiency',
                 'decoder_padding_efficiency', 'input_length_mean')} for side, rs in runs.items()}

  def ratio(a: str, b: str) -> Optional[Dict[str, Any]]:
    if a not in runs or b not in runs:
      return None
    per = [x['train_examples_per_s'] / y['train_examples_per_s']
           for x, y in zip(runs[a], runs[b])]
    # Input tokens/s: the same ratio corrected for a grouped stream's window
    # holding slightly longer or shorter examples than the pool's mean.
    tok = [x['train_examples_per_s'] * x['input_length_mean'] /
           (y['train_examples_per_s'] * y['input_length_mean']) for x, y in zip(runs[a], runs[b])]
    return {'median': statistics.median(per), 'per_rotation': per,
            'input_tokens_per_s_median': statistics.median(tok)}
  ratios = {f'{a}/{b}': ratio(a, b) for a, b in (
      ('ours_grouped', 'ours_fixed'), ('ours_buckets', 'ours_fixed'),
      ('ours_grouped', 'theirs_grouped'), ('ours_grouped', 'theirs_dynamic'),
      ('ours_grouped_fine', 'ours_fixed'), ('ours_grouped_fine', 'theirs_grouped'),
      ('ours_grouped_fine', 'theirs_dynamic'),
      ('ours_buckets', 'theirs_dynamic'), ('theirs_grouped', 'theirs_dynamic'),
      ('ours_grouped_p20', 'ours_grouped'))}
  ratios = {k: v for k, v in ratios.items() if v}
  get = lambda k: ratios.get(k, {}).get('median')  # noqa: E731
  eff = {s: m['encoder_padding_efficiency'] for s, m in med.items()}
  def at_least(key: str, bound: float) -> Optional[bool]:
    return None if get(key) is None else get(key) >= bound
  targets = {}
  for ours in ('ours_grouped', 'ours_grouped_fine'):   # the targets, per bucket spec
    if ours in med:
      targets[ours] = {
          'ge_3x_own_fixed': at_least(f'{ours}/ours_fixed', 3.0),
          'ge_1.15x_peft_group_by_length': at_least(f'{ours}/theirs_grouped', 1.15),
          'ge_1.3x_peft_random_batches': at_least(f'{ours}/theirs_dynamic', 1.3),
          'padding_efficiency_ge_peft': eff[ours] >= max(
              eff.get('theirs_grouped', 0), eff.get('theirs_dynamic', 0))}
  return {'median': med, 'ratios': ratios, 'targets_met': targets}


def main(argv: Optional[List[str]] = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--config', default='small', choices=sorted(peft_compare.CONFIGS))
  p.add_argument('--tasks', default='sst2,rte,boolq', help=','.join(TASK_LENGTHS))
  p.add_argument('--sides', default=','.join(OURS[:3] + THEIRS),
                 help=f'comma-separated: {",".join(OURS + THEIRS)}')
  p.add_argument('--fixed-once', action='store_true',
                 help='ours_fixed on the first task only (its shape, hence its speed, is '
                      'the same for every task)')
  p.add_argument('--pairs', type=int, default=2, help='rotations over the sides')
  p.add_argument('--steps', type=int, default=16, help='timed steps (the pool is steps x batch)')
  p.add_argument('--batch', type=int, default=8)
  p.add_argument('--prompt-length', type=int, default=100)
  p.add_argument('--short-prompt', type=int, default=20, help='prompt of ours_grouped_p20')
  p.add_argument('--fine-buckets', default='pow2/4', help="LENGTH_BUCKETS of ours_grouped_fine")
  p.add_argument('--max-input', type=int, default=512, help='TASK_FEATURE_LENGTHS inputs')
  p.add_argument('--max-target', type=int, default=8, help='TASK_FEATURE_LENGTHS targets')
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--threads', type=int, default=None, help='torch threads (default: cores)')
  p.add_argument('--timeout', type=float, default=3600)
  p.add_argument('--out', default=None)
  peft_compare.add_worker_args(p, OURS + THEIRS)
  args = p.parse_args(argv)
  if args.worker:
    return peft_compare.serve_worker(
        args, lambda side, spec: (run_theirs if side.startswith('theirs') else run_ours)(
            dict(spec, side=side)))

  tasks = [t.strip() for t in args.tasks.split(',') if t.strip()]
  sides = [s.strip() for s in args.sides.split(',') if s.strip()]
  bad = [t for t in tasks if t not in TASK_LENGTHS] + [s for s in sides if s not in OURS + THEIRS]
  if bad:
    p.error(f'unknown task(s) or side(s): {bad}')
  machine = peft_compare.machine_info()
  threads = args.threads or machine['usable_cores'] or os.cpu_count()
  report: Dict[str, Any] = {
      'benchmark': 'prompt tuning on real-task length distributions: ours (fixed / buckets / '
                   'grouped) vs transformers+peft (dynamic padding, group_by_length)',
      'machine': machine, 'versions': peft_compare.versions(),
      'settings': {k: v for k, v in vars(args).items() if k not in ('worker', 'spec', 'result')},
      'task_lengths': TASK_LENGTHS, 'loadavg_start': os.getloadavg(),
      'started': time.strftime('%Y-%m-%dT%H:%M:%S%z'), 'tasks': {}}
  script = os.path.abspath(__file__)
  with tempfile.TemporaryDirectory(prefix='real_lengths_') as workdir:
    print(f'preparing the {args.config} model in {workdir}', file=sys.stderr)
    prep = prepare(args, workdir)
    report['config'] = prep['config']
    for t_i, task in enumerate(tasks):
      pool_path = os.path.join(workdir, f'{task}.npz')
      report['tasks'][task] = {'pool': make_pool(task, args, prep['vocab_size'], pool_path)}
      spec = {'hf_dir': prep['hf_dir'], 'prompt': os.path.join(workdir, 'prompt.npy'),
              'pool': pool_path, 'batch': args.batch, 'steps': args.steps,
              'max_input': args.max_input, 'max_target': args.max_target, 'seed': args.seed,
              'fine_buckets': args.fine_buckets,
              'threads': threads}
      task_sides = [s for s in sides if not (args.fixed_once and t_i and s == 'ours_fixed')]
      runs: Dict[str, List[dict]] = {s: [] for s in task_sides}
      for rotation in range(args.pairs):
        for side in task_sides:
          side_spec = dict(spec, prompt=os.path.join(workdir, 'prompt_short.npy')) \
              if side == 'ours_grouped_p20' else spec
          r = peft_compare.run_worker(side, side_spec, args.timeout, script=script)
          runs[side].append(r)
          print(f'[{task}] {rotation + 1}/{args.pairs} {side}: '
                f'{r["train_examples_per_s"]:.2f} ex/s, padding efficiency '
                f'{r["encoder_padding_efficiency"]:.2f}, mean input {r["input_length_mean"]:.0f}, '
                f'{len(r["shapes"])} shapes '
                f'(compile/warm-up {r["compile_s"]:.0f} s), load {r["loadavg_before"][0]:.2f}',
                file=sys.stderr)
      if args.fixed_once and t_i and 'ours_fixed' in sides:  # one shape: the same speed
        runs['ours_fixed'] = [fixed_on(r, report['tasks'][task]['pool'], args)
                              for r in report['tasks'][tasks[0]]['runs']['ours_fixed']]
      report['tasks'][task].update(summarise(runs))
      report['tasks'][task]['runs'] = runs
  report['loadavg_end'] = os.getloadavg()
  text = json.dumps(report, indent=2)
  print(text)
  if args.out:
    with open(args.out, 'w') as f:
      f.write(text + '\n')
  for task, r in report['tasks'].items():
    parts = [f'{k} {v["median"]:.2f}x (tokens/s {v["input_tokens_per_s_median"]:.2f}x)'
             for k, v in r['ratios'].items()]
    eff = ', '.join(f'{s} {m["encoder_padding_efficiency"]:.2f}' for s, m in r['median'].items())
    print(f'SUMMARY {task} ({machine["cpu_model"]}, {threads} threads): {"; ".join(parts)}; '
          f'padding efficiency: {eff}', file=sys.stderr)
  return 0


if __name__ == '__main__':
  sys.exit(main())

"""FPT (Huang et al. 2022) against plain prompt tuning on the mini stand-in (run by hand).

Per task and seed: plain prompt tuning, layer dropping, FFN reduction and
compound reduction, all for the same number of steps, evaluated on the full
model every --eval_period steps. --schedule paper (default): the paper's four
equal stages at 1/4, 1/2, 3/4 of the layers and/or FFN width, then the full
model; --schedule thirds: runs/fpt.gin's CPU default (1/3, 2/3 of the layers,
1/2, 3/4 of the width). Reports each
run's final score (mean of the last three evaluations), its training FLOPs
(XLA's count of each stage's step, summed: `train_flops_total`) and the
FLOPs it took to first reach the plain run's final score and 99% of it;
`summary` averages each variant over tasks and seeds (min / max beside).
Then the side result: partial models alone (half the FFN width, half the
layers) trained for the whole run. Everything goes
through `t5x train` / `t5x curves`, --jobs at a time. Prints JSON.

  python bench/fpt_compare.py --out /tmp/fpt --seeds 0 1 2 --json bench/results/fpt_cpu2.json
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from t5x_runs import parallel, print_and_write, t5x  # pylint: disable=g-import-not-at-top,wrong-import-position
from prompt_transfer.analysis.curves import read_metrics as records  # pylint: disable=g-import-not-at-top,wrong-import-position
MODEL = 'models/t5_1_1_mini_synthetic.gin'
# Two classification tasks (layers dropped from the encoder only) and one
# generation task (both stacks), none seen in the stand-in's pretraining.
# (`count`, the first measurement's task, is learnt by step 75: too easy.)
TASKS = ['synthetic_greater_versus', 'synthetic_majority_tally', 'synthetic_reverse_mirror']
LENGTHS = "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 16}"


def variants(steps: int, schedule: str) -> dict:
  """(layers, width) per partial stage, each steps/stages long, full model last."""
  fractions = {'paper': [0.25, 0.5, 0.75], 'thirds': None}[schedule]
  if fractions is None:
    partial = {'layer dropping': [(0.34, 1.0), (0.67, 1.0)],
               'FFN reduction': [(1.0, 0.5), (1.0, 0.75)],
               'compound': [(0.34, 0.5), (0.67, 0.75)]}
  else:
    partial = {'layer dropping': [(f, 1.0) for f in fractions],
               'FFN reduction': [(1.0, f) for f in fractions],
               'compound': [(f, f) for f in fractions]}
  out: dict = {'plain': []}
  for name, stages in partial.items():
    s = steps // (len(stages) + 1)
    sched = ', '.join(f'({s}, {a}, {b})' for a, b in stages)
    out[name] = ['--gin_file=runs/fpt.gin', f'--gin.FPT_SCHEDULE=[{sched}, (None, 1.0, 1.0)]']
  return out


PARTIAL_ALONE = {  # one stage, the whole run: the paper's Table 1 question
    'half width alone': ['--gin.train.stages=[@stages.Stage()]',
                         '--gin.stages.Stage.transform=@stages.PartialModel()',
                         '--gin.stages.PartialModel.width=0.5'],
    'half depth alone': ['--gin.train.stages=[@stages.Stage()]',
                         '--gin.stages.Stage.transform=@stages.PartialModel()',
                         '--gin.stages.PartialModel.layers=0.5'],
}


def train(run: str, task: str, flags: list, seed: int, args: argparse.Namespace) -> str:
  if not os.path.exists(os.path.join(run, 'numpy_checkpoints', f'checkpoint_{args.steps}')):
    t5x('train', f'--gin_file={MODEL}', '--gin_file=prompts/from_sampled_vocab.gin',
        '--gin_file=runs/prompt_tune.gin', *flags, f'--gin.MODEL_DIR={run}',
        f'--gin.MIXTURE_OR_TASK_NAME={task}', LENGTHS, f'--gin.TRAIN_STEPS={args.steps}',
        f'--gin.PROMPT_LENGTH={args.length}', f'--gin.train.eval_period={args.eval_period}',
        f'--gin.train.eval_num_examples={args.eval_examples}',
        f'--gin.train.checkpoint_period={args.steps}', '--gin.train.tensorboard=False',
        f'--gin.train.seed={seed}')
  return run


def final_score(values: list) -> float:
  """Scores of 100 examples swing by +-10 between evaluations: the final
  score is the mean of the last three."""
  return sum(values[-3:]) / len(values[-3:])


def summary(run: str, metric: str, levels: dict) -> dict:
  recs = records(run)
  evals = [(r['step'], r[metric], r.get('train_flops_total')) for r in recs if metric in r]
  stage = [r[f'eval_stage/{metric[5:]}'] for r in recs if f'eval_stage/{metric[5:]}' in r]
  out = {'final': round(final_score([v for _, v, _ in evals]), 2),
         'last_evals': [v for _, v, _ in evals[-3:]], 'train_flops': recs[-1]['train_flops_total'],
         'seconds': round(recs[-1]['train_seconds_total'])}
  for name, level in levels.items():
    hit = next(((s, f) for s, v, f in evals if v >= level), None)
    out[f'flops_to_{name}'] = hit[1] if hit else None
    out[f'step_to_{name}'] = hit[0] if hit else None
  if stage:
    out['partial_model_final'] = round(final_score(stage), 2)
  return out


def cross_seed_summary(seeds: dict) -> dict:
  """Per variant: mean [min, max] over tasks x seeds of the final score, its
  difference to plain, the FLOPs spent and the FLOPs to reach 99% of plain's
  final (None counts as not reached); per task the mean final score."""
  def stats(values: list) -> Optional[list]:
    values = [v for v in values if v is not None]
    return [round(sum(values) / len(values), 3), min(values), max(values)] if values else None
  names = next(iter(next(iter(seeds.values())).values()))
  out: dict = {}
  for name in names:
    rows = [rows[name] for tasks in seeds.values() for rows in tasks.values() if name in rows]
    to99 = [r.get('flops_to_99pct_plain_final_vs_plain_run') for r in rows]
    out[name] = {
        'runs': len(rows),
        'final': stats([r['final'] for r in rows]),
        'score_vs_plain': stats([r['score_vs_plain'] for r in rows]),
        'flops_vs_plain': stats([r['flops_vs_plain'] for r in rows]),
        'flops_to_99pct_plain_final_vs_plain_run': stats(to99),
        'reached_99pct_plain_final': sum(v is not None for v in to99),
        'partial_model_final': stats([r.get('partial_model_final') for r in rows]),
        'final_by_task': {t: stats([tasks[t][name]['final'] for tasks in seeds.values()
                                    if name in tasks.get(t, {})])
                          for t in next(iter(seeds.values())) if name in
                          next(iter(seeds.values()))[t]},
    }
  return out


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--out', default='/tmp/fpt_compare')
  parser.add_argument('--json', default=None)
  parser.add_argument('--tasks', nargs='+', default=TASKS)
  parser.add_argument('--partial_alone_tasks', nargs='*', default=TASKS[:1])
  parser.add_argument('--steps', type=int, default=300)
  parser.add_argument('--length', type=int, default=20)
  parser.add_argument('--eval_period', type=int, default=25)
  parser.add_argument('--eval_examples', type=int, default=200)
  parser.add_argument('--seeds', type=int, nargs='+', default=[0],
                      help='training seeds (data order, prompt init); runs go under OUT/seed_N')
  parser.add_argument('--schedule', choices=['paper', 'thirds'], default='paper')
  parser.add_argument('--variants', nargs='+', default=None,
                      help='a subset of: plain, layer dropping, FFN reduction, compound')
  parser.add_argument('--jobs', type=int, default=2)
  args = parser.parse_args()
  t0 = time.time()
  jobs = [(seed, t, name, flags) for seed in args.seeds for t in args.tasks
          for name, flags in variants(args.steps, args.schedule).items()
          if args.variants is None or name in args.variants + ['plain']]
  jobs += [(seed, t, name, flags) for seed in args.seeds[:1] for t in args.partial_alone_tasks
           for name, flags in PARTIAL_ALONE.items()]
  run_dir = lambda seed, task, name: os.path.join(args.out, f'seed_{seed}', task,
                                                  name.replace(' ', '_'))
  runs = parallel(lambda j: train(run_dir(*j[:3]), j[1], j[3], j[0], args), jobs, args.jobs)
  result: dict = {'model': MODEL, 'settings': {k: v for k, v in vars(args).items()
                                              if k not in ('out', 'json')},
                  'schedules': {n: f for n, f in variants(args.steps, args.schedule).items()},
                  'seeds': {}}
  for (seed, task, name, _), run in zip(jobs, runs):
    metric = next(k for k in records(run)[-1] if k.startswith(f'eval/{task}/'))
    plain_final = final_score([r[metric] for r in records(run_dir(seed, task, 'plain'))
                               if metric in r])
    levels = {'plain_final': plain_final, '99pct_plain_final': 0.99 * plain_final}
    result['seeds'].setdefault(str(seed), {}).setdefault(task, {})[name] = summary(
        run, metric, levels)
  for tasks in result['seeds'].values():
    for rows in tasks.values():
      plain = rows['plain']
      for row in rows.values():
        row['flops_vs_plain'] = round(row['train_flops'] / plain['train_flops'], 3)
        for key in ('flops_to_plain_final', 'flops_to_99pct_plain_final'):
          if row.get(key) and plain.get(key):
            row[key + '_vs_plain_run'] = round(row[key] / plain['train_flops'], 3)
        row['score_vs_plain'] = round(row['final'] - plain['final'], 2)
  result['summary'] = cross_seed_summary(result['seeds'])
  result['seconds'] = round(time.time() - t0)
  print_and_write(result, args.json)
  return 0


if __name__ == '__main__':
  sys.exit(main())

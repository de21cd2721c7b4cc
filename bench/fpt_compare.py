"""FPT (Huang et al. 2022) against plain prompt tuning on the mini stand-in (run by hand).

Per task: plain prompt tuning, layer dropping, FFN reduction and compound
reduction (runs/fpt.gin's three-stage schedule, the partial stages' layer or
width fractions zeroed out as the variant says), all for the same number of
steps, evaluated on the full model every --eval_period steps. Reports each
run's final score (mean of the last three evaluations), its training FLOPs
(XLA's count of each stage's step, summed: `train_flops_total`) and the
FLOPs it took to first reach the plain run's final score and 99% of it.
Then the side result: partial models alone (half the FFN width, half the
layers) trained for the whole run. Everything goes
through `t5x train` / `t5x curves`, --jobs at a time. Prints JSON.

  python bench/fpt_compare.py --out /tmp/fpt --json bench/results/fpt_cpu2.json
"""
from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from t5x_runs import parallel, print_and_write, t5x  # pylint: disable=g-import-not-at-top,wrong-import-position
from prompt_transfer.analysis.curves import read_metrics as records  # pylint: disable=g-import-not-at-top,wrong-import-position
MODEL = 'models/t5_1_1_mini_synthetic.gin'
# Two classification tasks (layers dropped from the encoder only) and one
# generation task (both stacks), none seen in the stand-in's pretraining.
TASKS = ['synthetic_majority_count', 'synthetic_greater_versus', 'synthetic_reverse_mirror']
LENGTHS = "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 16}"


def variants(steps: int) -> dict:
  """Three stages of steps/3: (layers, width) per stage, full model last."""
  s = steps // 3
  def sched(a, b):
    return f'--gin.FPT_SCHEDULE=[({s}, {a[0]}, {a[1]}), ({s}, {b[0]}, {b[1]}), (None, 1.0, 1.0)]'
  return {
      'plain': [],
      'layer dropping': ['--gin_file=runs/fpt.gin', sched((0.34, 1.0), (0.67, 1.0))],
      'FFN reduction': ['--gin_file=runs/fpt.gin', sched((1.0, 0.5), (1.0, 0.75))],
      'compound': ['--gin_file=runs/fpt.gin', sched((0.34, 0.5), (0.67, 0.75))],
  }


PARTIAL_ALONE = {  # one stage, the whole run: the paper's Table 1 question
    'half width alone': ['--gin.train.stages=[@stages.Stage()]',
                         '--gin.stages.Stage.transform=@stages.PartialModel()',
                         '--gin.stages.PartialModel.width=0.5'],
    'half depth alone': ['--gin.train.stages=[@stages.Stage()]',
                         '--gin.stages.Stage.transform=@stages.PartialModel()',
                         '--gin.stages.PartialModel.layers=0.5'],
}


def train(run: str, task: str, flags: list, args: argparse.Namespace) -> str:
  if not os.path.exists(os.path.join(run, 'numpy_checkpoints', f'checkpoint_{args.steps}')):
    t5x('train', f'--gin_file={MODEL}', '--gin_file=prompts/from_sampled_vocab.gin',
        '--gin_file=runs/prompt_tune.gin', *flags, f'--gin.MODEL_DIR={run}',
        f'--gin.MIXTURE_OR_TASK_NAME={task}', LENGTHS, f'--gin.TRAIN_STEPS={args.steps}',
        f'--gin.PROMPT_LENGTH={args.length}', f'--gin.train.eval_period={args.eval_period}',
        f'--gin.train.eval_num_examples={args.eval_examples}',
        f'--gin.train.checkpoint_period={args.steps}', '--gin.train.tensorboard=False',
        f'--gin.train.seed={args.seed}')
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


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--out', default='/tmp/fpt_compare')
  parser.add_argument('--json', default=None)
  parser.add_argument('--tasks', nargs='+', default=TASKS)
  parser.add_argument('--partial_alone_tasks', nargs='*', default=TASKS[:1])
  parser.add_argument('--steps', type=int, default=300)
  parser.add_argument('--length', type=int, default=20)
  parser.add_argument('--eval_period', type=int, default=25)
  parser.add_argument('--eval_examples', type=int, default=100)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--jobs', type=int, default=2)
  args = parser.parse_args()
  t0 = time.time()
  jobs = [(t, name, flags) for t in args.tasks for name, flags in variants(args.steps).items()]
  jobs += [(t, name, flags) for t in args.partial_alone_tasks
           for name, flags in PARTIAL_ALONE.items()]
  runs = parallel(lambda j: train(os.path.join(args.out, j[0], j[1].replace(' ', '_')),
                                  j[0], j[2], args), jobs, args.jobs)
  result: dict = {'model': MODEL, 'settings': {k: v for k, v in vars(args).items()
                                              if k not in ('out', 'json')}, 'tasks': {}}
  for (task, name, _), run in zip(jobs, runs):
    metric = next(k for k in records(run)[-1] if k.startswith(f'eval/{task}/'))
    plain_run = os.path.join(args.out, task, 'plain')
    plain_final = final_score([r[metric] for r in records(plain_run) if metric in r])
    levels = {'plain_final': plain_final, '99pct_plain_final': 0.99 * plain_final}
    result['tasks'].setdefault(task, {})[name] = summary(run, metric, levels)
  for task, rows in result['tasks'].items():
    plain = rows['plain']
    for name, row in rows.items():
      row['flops_vs_plain'] = round(row['train_flops'] / plain['train_flops'], 3)
      for key in ('flops_to_plain_final', 'flops_to_99pct_plain_final'):
        if row.get(key) and plain.get(key):
          row[key + '_vs_plain_run'] = round(row[key] / plain['train_flops'], 3)
      row['score_vs_plain'] = round(row['final'] - plain['final'], 2)
  result['seconds'] = round(time.time() - t0)
  print_and_write(result, args.json)
  return 0


if __name__ == '__main__':
  sys.exit(main())

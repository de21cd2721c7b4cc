"""Cross-model prompt transfer between the two pretrained stand-ins (run by hand).

For each seed and both directions (tiny -> mini, mini -> tiny): trains each
model's own prompts on four task types (two tasks each: one to train on, one
of the same type held out), trains projectors (task tuning on all four
training tasks, task tuning on one, distance minimisation over the four
pairs), recycles the prompts (v2v-lin, lin-comb, v2v-nn), and scores on the
target model: own prompt, each mapping zero-shot, a random prompt, on the
training task and on the held-out task of the same type. Then starts target
runs on a held-out task from the projected prompt, a sampled-vocab prompt and
a random one, and counts the steps to 90% of the own prompt's score.
Everything goes through the `t5x` commands a user would type, `--jobs` at a
time. Prints JSON (and writes it with --json).

  python bench/cross_model.py --out /tmp/xmodel --seeds 0 1 2 \
      --json bench/results/cross_model_cpu2.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from t5x_runs import parallel, print_and_write, t5x  # pylint: disable=g-import-not-at-top,wrong-import-position
MODELS = {'tiny': 'models/t5_1_1_tiny_synthetic.gin', 'mini': 'models/t5_1_1_mini_synthetic.gin'}
CHECKPOINTS = {'tiny': 'pkg://assets/t5_1_1_tiny_synthetic',
               'mini': 'pkg://assets/t5_1_1_mini_synthetic'}
# Four task types (tasks/synthetic.py): per type a training task and a
# held-out task of the same type (same rule and answer words or output, other
# phrasing). None of these phrasings was in the stand-ins' pretraining, so a
# random prompt scores ~0 on them (the pretrained `mood`/`posneg` phrasings are
# answered without any prompt, and parity is learnt by neither model: both
# would measure nothing).
TYPES = {'majority': ('synthetic_majority_count', 'synthetic_majority_tally'),
         'greater': ('synthetic_greater_versus', 'synthetic_greater_higher'),
         'copy': ('synthetic_copy_echo', 'synthetic_copy_again'),
         'reverse': ('synthetic_reverse_mirror', 'synthetic_reverse_backwards')}
TRAIN_TASKS = [t for t, _ in TYPES.values()]
HELD_OUT = {t: h for t, h in TYPES.values()}
ONE_TASK = 'synthetic_majority_count'  # the single-task projector's
LENGTHS = "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 16}"
PROMPT = 'encoder.prompt.prompt.prompt'


def prompt_of(run: str, step: Optional[int] = None) -> str:
  from prompt_transfer.prompts import files  # pylint: disable=g-import-not-at-top
  return files.prompt_file(run, step)


def train_prompt(out: str, model: str, task: str, steps: int, length: int, seed: int) -> str:
  run = os.path.join(out, 'prompts', f'{model}_{task}')
  if not os.path.exists(os.path.join(run, 'numpy_checkpoints', f'checkpoint_{steps}')):
    t5x('train', f'--gin_file={MODELS[model]}', '--gin_file=prompts/from_sampled_vocab.gin',
        '--gin_file=runs/prompt_tune.gin', f'--gin.MODEL_DIR={run}',
        f'--gin.MIXTURE_OR_TASK_NAME={task}', LENGTHS, f'--gin.TRAIN_STEPS={steps}',
        f'--gin.PROMPT_LENGTH={length}', '--gin.train.eval_period=None',
        f'--gin.train.checkpoint_period={steps}', '--gin.train.tensorboard=False',
        f'--gin.train.seed={seed}')
  return prompt_of(run, steps)


def evaluate(prompt_file: str, model: str, task: str, examples: int) -> float:
  """The task's accuracy (classification) or sequence accuracy (generation)."""
  out = f'{prompt_file}.{task}.eval.json'
  if not os.path.exists(out):
    t5x('eval', '--gin_file=runs/eval.gin', f'--gin_file={MODELS[model]}',
        f'--gin.MIXTURE_OR_TASK_NAME={task}', LENGTHS, f'--gin.PROMPT_FILE={prompt_file}',
        f'--gin.evaluate.num_examples={examples}', f'--gin.evaluate.output_file={out}')
  with open(out) as f:
    metrics = json.load(f)['metrics']
  key = f'{task}/accuracy' if f'{task}/accuracy' in metrics else f'{task}/sequence_accuracy'
  return float(metrics[key])


def train_projector(out: str, name: str, tgt: str, gin_file: str, steps: int, seed: int,
                    *flags: str) -> str:
  run = os.path.join(out, 'projectors', name)
  if not os.path.exists(os.path.join(run, 'numpy_checkpoints', f'checkpoint_{steps}')):
    t5x('train', f'--gin_file={MODELS[tgt]}', '--gin_file=runs/prompt_tune.gin',
        f'--gin_file=projectors/{gin_file}', f'--gin.MODEL_DIR={run}', LENGTHS,
        f'--gin.TRAIN_STEPS={steps}', *flags, '--gin.train.eval_period=None',
        f'--gin.train.checkpoint_period={steps}', '--gin.train.log_period=50',
        '--gin.train.tensorboard=False', f'--gin.train.seed={seed}')
  return run


def project(out: str, prompts: List[str], name: str, *how: str) -> Dict[str, str]:
  folder = os.path.join(out, 'mapped', name)
  if not os.path.exists(folder):
    t5x('project', *prompts, '--output_dir', folder, *how)
  from prompt_transfer.prompts import files  # pylint: disable=g-import-not-at-top
  by_task = {}
  for d in os.listdir(folder):
    path = os.path.join(folder, d, PROMPT)
    by_task[files.load_prompt_info(path).task] = path
  return by_task


def convergence(out: str, name: str, model: str, task: str, level: float, steps: int,
                length: int, seed: int, *init: str) -> dict:
  run = os.path.join(out, 'convergence', name)
  if not os.path.exists(os.path.join(run, 'numpy_checkpoints', f'checkpoint_{steps}')):
    t5x('train', f'--gin_file={MODELS[model]}', *init, '--gin_file=runs/prompt_tune.gin',
        f'--gin.MODEL_DIR={run}', f'--gin.MIXTURE_OR_TASK_NAME={task}', LENGTHS,
        f'--gin.TRAIN_STEPS={steps}', f'--gin.PROMPT_LENGTH={length}',
        '--gin.train.eval_period=10', '--gin.train.eval_at_start=True',
        '--gin.train.eval_num_examples=200', f'--gin.train.checkpoint_period={steps}',
        '--gin.train.tensorboard=False', f'--gin.train.seed={seed}')
  from prompt_transfer.analysis import curves  # pylint: disable=g-import-not-at-top
  c = curves.compare(curves.summarize([run]), threshold=level)[f'{task}/accuracy']['runs'][run]
  return {'at_step_0': c['at_step_0'], 'mean': c['mean'], 'last': c['last'],
          'first_step_at_90pct_of_own': c['first_step_at_threshold']}


def one_seed(args: argparse.Namespace, seed: int) -> dict:
  out = os.path.join(args.out, f'seed_{seed}')
  all_tasks = TRAIN_TASKS + list(HELD_OUT.values())
  jobs = [(m, t) for m in MODELS for t in all_tasks]
  # --prompt_seed: every seed reuses one set of own prompts (the seeds then
  # vary the projectors, recyclers' fits and target runs only).
  prompt_seed = seed if args.prompt_seed is None else args.prompt_seed
  prompt_out = os.path.join(args.out, f'seed_{prompt_seed}')
  own_files = parallel(
      lambda mt: train_prompt(prompt_out, *mt, args.prompt_steps, args.length, prompt_seed), jobs,
      args.jobs)
  own = {m: {} for m in MODELS}
  for (m, t), f in zip(jobs, own_files):
    own[m][t] = f
  random_prompt = {}
  for m in MODELS:
    run = os.path.join(out, 'random', m)
    if not os.path.exists(run):
      t5x('train', f'--gin_file={MODELS[m]}', '--gin_file=prompts/random_uniform.gin',
          '--gin_file=runs/prompt_tune.gin', f'--gin.MODEL_DIR={run}',
          f'--gin.MIXTURE_OR_TASK_NAME={ONE_TASK}', LENGTHS, '--gin.TRAIN_STEPS=0',
          f'--gin.PROMPT_LENGTH={args.length}', '--gin.train.eval_period=None',
          f'--gin.train.seed={seed}')
    random_prompt[m] = prompt_of(run, 0)
  result: dict = {}
  for src, tgt in (d.split('->') for d in args.directions):
    sources = [own[src][t] for t in TRAIN_TASKS]
    d = f'{src}_to_{tgt}'
    steps = args.projector_steps
    projectors = {
        'task tuning (4 tasks)': train_projector(
            out, f'{d}_tuned4', tgt, 'task_tuning_multi.gin', steps, seed,
            f'--gin.TASKS={TRAIN_TASKS!r}', f'--gin.SOURCE_PROMPT_FILES={sources!r}'),
        'task tuning (1 task)': train_projector(
            out, f'{d}_tuned1', tgt, 'task_tuning.gin', steps, seed,
            f'--gin.MIXTURE_OR_TASK_NAME={ONE_TASK}',
            f'--gin.SOURCE_PROMPT_FILES={[own[src][ONE_TASK]]!r}'),
        'distance (4 pairs)': train_projector(
            out, f'{d}_distance', tgt, 'distance.gin', steps, seed,
            f'--gin.MIXTURE_OR_TASK_NAME={TRAIN_TASKS[0]}',
            f'--gin.SOURCE_PROMPT_FILES={sources!r}',
            f'--gin.TARGET_PROMPT_FILES={[own[tgt][t] for t in TRAIN_TASKS]!r}')}
    short = dict(zip(projectors, ('tuned4', 'tuned1', 'distance')))
    mapped = {f'projected, {k}': project(out, sources, f'{d}_{short[k]}', '--projector', run)
              for k, run in projectors.items()}
    for recycler in ('v2v-lin', 'lin-comb', 'v2v-nn'):
      mapped[f'recycled, {recycler}'] = project(
          out, sources, f'{d}_{recycler}', '--recycler', recycler,
          '--source_checkpoint', CHECKPOINTS[src], '--target_checkpoint', CHECKPOINTS[tgt])
    evals = []  # (row, column, prompt file, task)
    for t in TRAIN_TASKS:
      h = HELD_OUT[t]
      for task in (t, h):
        evals += [(task, 'own prompt', own[tgt][task], task),
                  (task, 'random prompt', random_prompt[tgt], task)]
        evals += [(task, how, by_task[t], task) for how, by_task in mapped.items()]
    scores_list = parallel(lambda e: evaluate(e[2], tgt, e[3], args.eval_examples), evals,
                           args.jobs)
    scores: dict = {}
    for (row, col, _, _), s in zip(evals, scores_list):
      scores.setdefault(row, {})[col] = s
    held = HELD_OUT[ONE_TASK]
    level = 0.9 * scores[held]['own prompt']
    starts = {
        'from projected (task tuning, 4 tasks)': (
            '--gin_file=prompts/from_projector.gin', f'--gin.SOURCE_PROMPT_FILE={own[src][held]}',
            f'--gin.PROJECTOR_DIR={projectors["task tuning (4 tasks)"]}'),
        'from sampled vocab': ('--gin_file=prompts/from_sampled_vocab.gin',),
        'from random uniform': ('--gin_file=prompts/random_uniform.gin',)}
    conv = dict(zip(starts, parallel(
        lambda kv: convergence(out, f'{d}_{kv[0].split()[1]}', tgt, held, level,
                               args.target_steps, args.length, seed, *kv[1]),
        list(starts.items()), args.jobs)))
    result[f'{src}->{tgt}'] = {'scores': scores, f'convergence on {held}': conv}
    print(json.dumps({'seed': seed, f'{src}->{tgt}': result[f'{src}->{tgt}']}), flush=True)
  return result


def summarize(per_seed: List[dict]) -> dict:
  """Mean (and min, max) over seeds of each score; per mapping, the mean over
  types on training and held-out tasks, relative to the own prompt, and the
  share of (type, seed) prompts that beat the random prompt."""
  summary: dict = {}
  for direction in per_seed[0]:
    rows = per_seed[0][direction]['scores']
    table = {row: {col: [r[direction]['scores'][row][col] for r in per_seed]
                   for col in rows[row]} for row in rows}
    cols = list(next(iter(rows.values())))
    by_col = {}
    for col in cols:
      entry = {}
      for part, tasks in (('training tasks', TRAIN_TASKS), ('held-out same-type tasks',
                                                            list(HELD_OUT.values()))):
        vals = [v for t in tasks for v in table[t][col]]
        own = [v for t in tasks for v in table[t]['own prompt']]
        rnd = [v for t in tasks for v in table[t]['random prompt']]
        entry[part] = {'mean': round(statistics.mean(vals), 1),
                       'relative to own': round(sum(vals) / max(sum(own), 1e-9), 3),
                       'beats random': f'{sum(v > r for v, r in zip(vals, rnd))}/{len(vals)}'}
      by_col[col] = entry
    conv_key = next(k for k in per_seed[0][direction] if k.startswith('convergence'))
    conv = {}
    for start in per_seed[0][direction][conv_key]:
      runs = [r[direction][conv_key][start] for r in per_seed]
      conv[start] = {k: [run[k] for run in runs] for k in runs[0]}
    summary[direction] = {
        'per task (one value per seed)': table, 'per mapping': by_col, conv_key: conv}
  return summary


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--out', default='/tmp/cross_model')
  parser.add_argument('--json', default=None)
  parser.add_argument('--seeds', type=int, nargs='+', default=[0])
  parser.add_argument('--prompt_seed', type=int, default=None,
                      help='Train the own prompts once, with this seed, for all seeds.')
  parser.add_argument('--jobs', type=int, default=2, help='t5x commands run at once.')
  parser.add_argument('--prompt_steps', type=int, default=300)
  parser.add_argument('--projector_steps', type=int, default=300)
  parser.add_argument('--target_steps', type=int, default=100)
  parser.add_argument('--length', type=int, default=20)
  parser.add_argument('--eval_examples', type=int, default=100)
  parser.add_argument('--directions', nargs='+', default=['tiny->mini', 'mini->tiny'],
                      choices=['tiny->mini', 'mini->tiny'])
  args = parser.parse_args()
  t0 = time.time()
  per_seed = [one_seed(args, s) for s in args.seeds]
  result = {'types': TYPES, 'one_task_projector': ONE_TASK, 'seeds': args.seeds,
            'settings': {k: v for k, v in vars(args).items() if k not in ('out', 'json')},
            'summary': summarize(per_seed), 'seconds': round(time.time() - t0)}
  print_and_write(result, args.json)
  return 0


if __name__ == '__main__':
  sys.exit(main())

"""Cross-model prompt transfer between the two pretrained stand-ins (run by hand).

Trains each model's own prompts on tasks of four types, trains projectors
both ways (task tuning on one task, distance minimisation over the pairs of
the other tasks), recycles the prompts (v2v-lin, lin-comb, v2v-nn), and
evaluates on the target model: own prompt, projected (per training), recycled,
random prompt; then starts a target run from the task-tuned projection and
from a sampled-vocab prompt and counts the steps to 90% of the own prompt's
score. Everything goes through the `t5x` commands a user would type. Prints
JSON (and writes it with --json).

  python bench/cross_model.py --out /tmp/xmodel --json bench/results/cross_model_cpu2.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
MODELS = {'tiny': 'models/t5_1_1_tiny_synthetic.gin', 'mini': 'models/t5_1_1_mini_synthetic.gin'}
CHECKPOINTS = {'tiny': 'pkg://assets/t5_1_1_tiny_synthetic',
               'mini': 'pkg://assets/t5_1_1_mini_synthetic'}
# Four task types (tasks/synthetic.py), each with a second task of the same
# type for relative transfer. The projector is task-tuned on TUNE_TASK; the
# distance projector pairs the own prompts of the other types.
TASKS = ['synthetic_majority_count', 'synthetic_majority_mood', 'synthetic_greater_versus',
         'synthetic_parity_oddeven']
SAME_TYPE = {'synthetic_majority_count': 'synthetic_majority_tally',
             'synthetic_majority_mood': 'synthetic_majority_posneg',
             'synthetic_greater_versus': 'synthetic_greater_higher',
             'synthetic_parity_oddeven': 'synthetic_parity_evenodd'}
TUNE_TASK = 'synthetic_majority_count'
LENGTHS = "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 12}"
PROMPT = 'encoder.prompt.prompt.prompt'


def t5x(*args: str) -> str:
  proc = subprocess.run([sys.executable, '-m', 'prompt_transfer.cli', *args], cwd=ROOT,
                        capture_output=True, text=True)
  if proc.returncode:
    raise RuntimeError(f't5x {" ".join(args)}\n{proc.stderr[-3000:]}')
  return proc.stdout


def prompt_of(run: str, step: Optional[int] = None) -> str:
  from prompt_transfer.prompts import files  # pylint: disable=g-import-not-at-top
  return files.prompt_file(run, step)


def train_prompt(out: str, model: str, task: str, steps: int, length: int) -> str:
  run = os.path.join(out, 'prompts', f'{model}_{task}')
  if not os.path.exists(os.path.join(run, 'numpy_checkpoints', f'checkpoint_{steps}')):
    t5x('train', f'--gin_file={MODELS[model]}', '--gin_file=prompts/from_sampled_vocab.gin',
        '--gin_file=runs/prompt_tune.gin', f'--gin.MODEL_DIR={run}',
        f'--gin.MIXTURE_OR_TASK_NAME={task}', LENGTHS, f'--gin.TRAIN_STEPS={steps}',
        f'--gin.PROMPT_LENGTH={length}', '--gin.train.eval_period=None',
        f'--gin.train.checkpoint_period={steps}', '--gin.train.tensorboard=False')
  return prompt_of(run, steps)


def evaluate(prompt_file: str, model: str, task: str, examples: int) -> float:
  out = t5x('eval', '--gin_file=runs/eval.gin', f'--gin_file={MODELS[model]}',
            f'--gin.MIXTURE_OR_TASK_NAME={task}', LENGTHS, f'--gin.PROMPT_FILE={prompt_file}',
            f'--gin.evaluate.num_examples={examples}',
            f'--gin.evaluate.output_file={prompt_file}.{task}.eval.json')
  del out
  with open(f'{prompt_file}.{task}.eval.json') as f:
    return float(json.load(f)['metrics'][f'{task}/accuracy'])


def train_projector(out: str, src: str, tgt: str, kind: str, sources: List[str],
                    targets: List[str], task: str, steps: int) -> str:
  run = os.path.join(out, 'projectors', f'{src}_to_{tgt}_{kind}')
  if not os.path.exists(os.path.join(run, 'numpy_checkpoints', f'checkpoint_{steps}')):
    extra = [f'--gin.TARGET_PROMPT_FILES={targets!r}'] if kind == 'distance' else []
    t5x('train', f'--gin_file={MODELS[tgt]}', '--gin_file=runs/prompt_tune.gin',
        f'--gin_file=projectors/{kind}.gin', f'--gin.MODEL_DIR={run}',
        f'--gin.MIXTURE_OR_TASK_NAME={task}', LENGTHS, f'--gin.TRAIN_STEPS={steps}',
        f'--gin.SOURCE_PROMPT_FILES={sources!r}', *extra, '--gin.train.eval_period=None',
        f'--gin.train.checkpoint_period={steps}', '--gin.train.log_period=50',
        '--gin.train.tensorboard=False')
  return run


def project(out: str, prompts: List[str], name: str, *how: str) -> Dict[str, str]:
  folder = os.path.join(out, 'mapped', name)
  t5x('project', *prompts, '--output_dir', folder, *how)
  return {d: os.path.join(folder, d, PROMPT) for d in os.listdir(folder)}


def steps_to(out: str, name: str, model: str, task: str, level: float, steps: int,
             length: int, *init: str) -> dict:
  run = os.path.join(out, 'convergence', name)
  if not os.path.exists(os.path.join(run, 'metrics.jsonl')):
    t5x('train', f'--gin_file={MODELS[model]}', *init, '--gin_file=runs/prompt_tune.gin',
        f'--gin.MODEL_DIR={run}', f'--gin.MIXTURE_OR_TASK_NAME={task}', LENGTHS,
        f'--gin.TRAIN_STEPS={steps}', f'--gin.PROMPT_LENGTH={length}',
        '--gin.train.eval_period=10', '--gin.train.eval_at_start=True',
        '--gin.train.eval_num_examples=200', f'--gin.train.checkpoint_period={steps}',
        '--gin.train.tensorboard=False')
  from prompt_transfer.analysis import curves  # pylint: disable=g-import-not-at-top
  c = curves.compare(curves.summarize([run]), threshold=level)[f'{task}/accuracy']['runs'][run]
  return {'at_step_0': c['at_step_0'], 'mean': c['mean'], 'last': c['last'],
          'first_step_at_90pct_of_own': c['first_step_at_threshold']}


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--out', default='/tmp/cross_model')
  parser.add_argument('--json', default=None)
  parser.add_argument('--prompt_steps', type=int, default=300)
  parser.add_argument('--projector_steps', type=int, default=300)
  parser.add_argument('--target_steps', type=int, default=100)
  parser.add_argument('--length', type=int, default=20)
  parser.add_argument('--eval_examples', type=int, default=200)
  args = parser.parse_args()
  t0 = time.time()
  own = {m: {t: train_prompt(args.out, m, t, args.prompt_steps, args.length)
             for t in TASKS + [SAME_TYPE[TUNE_TASK]]} for m in MODELS}
  random_prompt = {}
  for m in MODELS:
    run = os.path.join(args.out, 'random', m)
    if not os.path.exists(run):
      t5x('train', f'--gin_file={MODELS[m]}', '--gin_file=prompts/random_uniform.gin',
          '--gin_file=runs/prompt_tune.gin', f'--gin.MODEL_DIR={run}',
          f'--gin.MIXTURE_OR_TASK_NAME={TUNE_TASK}', LENGTHS, '--gin.TRAIN_STEPS=0',
          f'--gin.PROMPT_LENGTH={args.length}', '--gin.train.eval_period=None')
    random_prompt[m] = prompt_of(run, 0)
  result: dict = {'tasks': TASKS, 'same_type': SAME_TYPE, 'tune_task': TUNE_TASK,
                  'directions': {}}
  for src, tgt in (('tiny', 'mini'), ('mini', 'tiny')):
    others = [t for t in TASKS if t != TUNE_TASK]
    tuned = train_projector(args.out, src, tgt, 'task_tuning', [own[src][TUNE_TASK]], [],
                            TUNE_TASK, args.projector_steps)
    dist = train_projector(args.out, src, tgt, 'distance', [own[src][t] for t in others],
                           [own[tgt][t] for t in others], others[0], args.projector_steps)
    sources = [own[src][t] for t in TASKS]
    mapped = {
        'projected (task tuning)': project(args.out, sources, f'{src}_{tgt}_tuned',
                                           '--projector', tuned),
        'projected (distance)': project(args.out, sources, f'{src}_{tgt}_distance',
                                        '--projector', dist)}
    for recycler in ('v2v-lin', 'lin-comb', 'v2v-nn'):
      mapped[f'recycled ({recycler})'] = project(
          args.out, sources, f'{src}_{tgt}_{recycler}', '--recycler', recycler,
          '--source_checkpoint', CHECKPOINTS[src], '--target_checkpoint', CHECKPOINTS[tgt])
    scores: dict = {}
    for t in TASKS:  # each prompt on its own task, and on a task of the same type
      row = {'own prompt': evaluate(own[tgt][t], tgt, t, args.eval_examples),
             'random prompt': evaluate(random_prompt[tgt], tgt, t, args.eval_examples)}
      for how, files_by_task in mapped.items():
        row[how] = evaluate(files_by_task[t], tgt, t, args.eval_examples)
      same = SAME_TYPE[t]
      row['same type: ' + same] = {
          how: evaluate(files_by_task[t], tgt, same, args.eval_examples)
          for how, files_by_task in mapped.items()}
      scores[t] = row
      print(json.dumps({f'{src}->{tgt}': {t: row}}), flush=True)
    own_score = scores[TUNE_TASK]['own prompt']
    conv = {
        'from projected (task tuning)': steps_to(
            args.out, f'{src}_{tgt}_from_projected', tgt, SAME_TYPE[TUNE_TASK],
            0.9 * evaluate(own[tgt][SAME_TYPE[TUNE_TASK]], tgt, SAME_TYPE[TUNE_TASK],
                           args.eval_examples), args.target_steps, args.length,
            '--gin_file=prompts/from_projector.gin',
            f'--gin.SOURCE_PROMPT_FILE={own[src][SAME_TYPE[TUNE_TASK]]}',
            f'--gin.PROJECTOR_DIR={tuned}'),
        'from sampled vocab': steps_to(
            args.out, f'{src}_{tgt}_from_vocab', tgt, SAME_TYPE[TUNE_TASK],
            0.9 * evaluate(own[tgt][SAME_TYPE[TUNE_TASK]], tgt, SAME_TYPE[TUNE_TASK],
                           args.eval_examples), args.target_steps, args.length,
            '--gin_file=prompts/from_sampled_vocab.gin')}
    result['directions'][f'{src}->{tgt}'] = {'scores': scores, 'own_score_tune_task': own_score,
                                             'convergence_on_' + SAME_TYPE[TUNE_TASK]: conv}
  result['seconds'] = round(time.time() - t0)
  text = json.dumps(result, indent=1)
  print(text)
  if args.json:
    with open(args.json, 'w') as f:
      f.write(text + '\n')
  return 0


if __name__ == '__main__':
  sys.exit(main())

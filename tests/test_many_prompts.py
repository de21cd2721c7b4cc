"""Many prompts, one frozen model (many_prompts.py): `t5x eval` / `t5x infer`
with PROMPT_LIBRARY run several tasks, each with its own prompt, in batches
that mix the tasks, and give what running each task alone gives."""
import json
import os

import numpy as np
import pytest
import seqio

from prompt_transfer import load_pretrained
from prompt_transfer import many_prompts
from prompt_transfer.prompts import files
from in_process import refused_here, t5x_here

ASSET = 'pkg://assets/t5_1_1_tiny_synthetic'
MODEL = '--gin_file=models/t5_1_1_tiny_synthetic.gin'
LENGTHS = "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 16}"
# A classification task, a generation task and a rank twin (scored, not decoded).
TASKS = {'synthetic_majority_yesno': 5, 'synthetic_copy_plain': 3,
         'synthetic_greater_versus_rank': 7}
MIXTURE = 'test_many_prompts_mixture'
COMMON = [MODEL, '--gin_file=runs/eval.gin', LENGTHS, '--gin.evaluate.num_examples=20', '--gin.evaluate.batch_size=8']
INFER = [MODEL, '--gin_file=runs/infer.gin', LENGTHS, '--gin.infer.num_examples=20', '--gin.infer.batch_size=8']


@pytest.fixture(name='library', scope='module')
def _library(tmp_path_factory):
  """A prompt per task (lengths differ), with sidecars naming the model."""
  model, params = load_pretrained(ASSET)
  weights = files.weights_fingerprint(params['token_embedder']['embedding'])
  root = tmp_path_factory.mktemp('library')
  rs = np.random.RandomState(0)
  paths = {}
  for task, length in TASKS.items():
    base = task[:-len('_rank')] if task.endswith('_rank') else task
    # Rows of the embedding table: prompts the model reads as words, not noise.
    rows = params['token_embedder']['embedding'][rs.randint(3, 250, size=length)]
    info = files.PromptInfo(task=base, model=model.config.describe(), prompt_length=length,
                            module='Prompt', weights=weights)
    paths[task] = os.path.join(files.save_prompt_folder(str(root / base), rows, info),
                               files.PROMPT_FILE)
  from prompt_transfer import cli
  cli.import_modules([])  # the bundled task catalogue, as `t5x` imports it
  if MIXTURE not in seqio.MixtureRegistry.names():
    seqio.MixtureRegistry.add(MIXTURE, list(TASKS), default_rate=1.0)
  return {'root': str(root), 'paths': paths, 'weights': weights}


def _metrics(out_file):
  return json.load(open(out_file))['metrics']


def test_mixed_eval_and_infer_equal_each_task_alone(library, tmp_path):
  mixed = str(tmp_path / 'mixed.json')
  t5x_here('eval', *COMMON, f'--gin.MIXTURE_OR_TASK_NAME={MIXTURE}', '--gin.LENGTH_BUCKETS=None',
           f'--gin.PROMPT_LIBRARY={library["root"]}', f'--gin.evaluate.output_file={mixed}')
  got = _metrics(mixed)
  assert sorted(k.split('/')[0] for k in got) == sorted(TASKS)
  for task in TASKS:
    alone = str(tmp_path / f'{task}.json')
    t5x_here('eval', *COMMON, f'--gin.MIXTURE_OR_TASK_NAME={task}',
             f'--gin.PROMPT_FILE={library["paths"][task]}', f'--gin.evaluate.output_file={alone}')
    for name, value in _metrics(alone).items():
      assert got[name] == pytest.approx(value, abs=1e-6), name
  # Predictions, line by line.
  pred = str(tmp_path / 'mixed.jsonl')
  t5x_here('infer', *INFER,
           f'--gin.MIXTURE_OR_TASK_NAME={MIXTURE}', f'--gin.PROMPT_LIBRARY={library["root"]}',
           '--gin.LENGTH_BUCKETS=None', f'--gin.infer.output_file={pred}')
  lines = [json.loads(l) for l in open(pred)]
  for task in TASKS:
    alone = str(tmp_path / f'{task}.jsonl')
    t5x_here('infer', *INFER,
             f'--gin.MIXTURE_OR_TASK_NAME={task}', f'--gin.PROMPT_FILE={library["paths"][task]}',
             f'--gin.infer.output_file={alone}')
    want = [json.loads(l) for l in open(alone)]
    have = [l for l in lines if l['task'] == task]
    assert [l['prediction'] for l in have] == [l['prediction'] for l in want], task
    for a, b in zip(have, want):
      for word, score in b.get('scores', {}).items():
        assert a['scores'][word] == pytest.approx(score, rel=1e-5, abs=1e-4)
  # In length buckets (the default: rows grouped by length, tasks still mixed): the same.
  bucketed = str(tmp_path / 'bucketed.json')
  t5x_here('eval', *COMMON, f'--gin.MIXTURE_OR_TASK_NAME={MIXTURE}', "--gin.LENGTH_BUCKETS='pow2'",
           f'--gin.PROMPT_LIBRARY={library["root"]}', f'--gin.evaluate.output_file={bucketed}')
  for name, value in _metrics(bucketed).items():
    assert got[name] == pytest.approx(value, abs=1e-6), name
  pred_b = str(tmp_path / 'bucketed.jsonl')
  t5x_here('infer', *INFER,
           f'--gin.MIXTURE_OR_TASK_NAME={MIXTURE}', f'--gin.PROMPT_LIBRARY={library["root"]}',
           "--gin.LENGTH_BUCKETS='pow2'", f'--gin.infer.output_file={pred_b}')
  assert [l['prediction'] for l in map(json.loads, open(pred_b))] == [
      l['prediction'] for l in lines]
  # Not a degenerate check: the prompts change what the model says.
  copy_preds = {l['prediction'] for l in lines if l['task'] == 'synthetic_copy_plain'}
  assert len(copy_preds) > 1


def test_batches_really_mix_tasks():
  rows = {t: {'_idx': np.arange(10), 'x': np.full(10, i)} for i, t in enumerate('abc')}
  seen = []

  def fn(batch):
    seen.append(set(batch['x'].tolist()))
    return batch['x'] * 10
  out = many_prompts.run_mixed(fn, rows, batch_size=6)
  assert sum(len(s) > 1 for s in seen) >= len(seen) - 1  # nearly every batch holds several tasks
  assert [len(seen)] == [5] and all(len(v) == 10 for v in out.values())
  for i, t in enumerate('abc'):
    assert [idx for idx, _ in out[t]] == list(range(10))
    assert all(int(v) == 10 * i for _, v in out[t])


def test_library_refusals(library, tmp_path, capsys):
  # A task of the mixture with no prompt in the library.
  only_two = str(tmp_path / 'two')
  os.makedirs(only_two)
  for task in ('synthetic_majority_yesno', 'synthetic_copy_plain'):
    os.symlink(os.path.dirname(library['paths'][task]), os.path.join(only_two, task))
  code, err = refused_here(capsys, 'eval', *COMMON, f'--gin.MIXTURE_OR_TASK_NAME={MIXTURE}',
                           f'--gin.PROMPT_LIBRARY={only_two}')
  assert code == 1 and 'synthetic_greater_versus_rank' in err and 'names it' in err, err
  # A prompt trained on other frozen weights of the same shape.
  other = str(tmp_path / 'other')
  array = np.load(library['paths']['synthetic_copy_plain'])
  info = files.load_prompt_info(library['paths']['synthetic_copy_plain'])
  info.weights = '0123456789abcdef'
  files.save_prompt_folder(os.path.join(other, 'copy'), array, info)
  code, err = refused_here(capsys, 'eval', *COMMON, '--gin.MIXTURE_OR_TASK_NAME=synthetic_copy_plain',
                           f'--gin.PROMPT_LIBRARY={other}')
  assert code == 1 and '0123456789abcdef' in err and library['weights'] in err, err
  # PROMPT_LIBRARY and PROMPT_FILE together.
  code, err = refused_here(capsys, 'eval', *COMMON, '--gin.MIXTURE_OR_TASK_NAME=synthetic_copy_plain',
                           f'--gin.PROMPT_LIBRARY={other}',
                           f'--gin.PROMPT_FILE={library["paths"]["synthetic_copy_plain"]}')
  assert code == 1 and 'leave MODEL_DIR and PROMPT_FILE unset' in err, err


def test_mixed_batches_in_length_buckets():
  """Rows grouped by length bucket, each batch cut to its bucket, tasks still
  mixed within a bucket, every output back at its task and index."""
  rs = np.random.RandomState(0)
  rows = {}
  for i, t in enumerate('abc'):
    lengths = rs.randint(1, 64, 12)
    enc = np.zeros((12, 64), np.int32)
    for j, n in enumerate(lengths):
      enc[j, :n] = 7
    rows[t] = {'_idx': np.arange(12), 'encoder_input_tokens': enc,
               'decoder_input_tokens': np.zeros((12, 4), np.int32),
               'decoder_target_tokens': np.full((12, 4), 3, np.int32), 'x': np.full(12, i)}
  buckets = {'inputs': [8, 16, 32, 64], 'targets': [4]}
  widths, mixed = [], 0

  def fn(batch):
    width = batch['encoder_input_tokens'].shape[1]
    used = (batch['encoder_input_tokens'] != 0).sum(1)
    widths.append(width)
    assert used.max() <= width and (width == 8 or used.max() > width // 2)  # its own bucket
    nonlocal mixed
    mixed += len(set(batch['x'].tolist())) > 1
    return batch['x'] * 100 + used
  out = many_prompts.run_mixed(fn, rows, batch_size=4, buckets=buckets)
  assert sorted(set(widths)) == [8, 16, 32, 64] and widths == sorted(widths)
  assert mixed >= len(widths) // 2
  for i, t in enumerate('abc'):
    used = (rows[t]['encoder_input_tokens'] != 0).sum(1)
    assert [(idx, int(v)) for idx, v in out[t]] == [(j, 100 * i + used[j]) for j in range(12)]

"""Rank-classification twins (`<task>_rank`) through the repo's eval path.

`data.build_evaluator` + `run_evaluation` (what `train` and `t5x eval`
run) on a rank twin must report the accuracy one gets by scoring every label
word of every example with `model.score_batch` directly and taking the best.
"""
from __future__ import annotations

import jax
import json

import numpy as np
import pytest
import seqio
import tensorflow_datasets as tfds

import tasks
from prompt_transfer import cli
from prompt_transfer.prompts.free import free_prompt
from prompt_transfer.training import data, evaluation
from prompt_transfer.model.config import get_config
from prompt_transfer.model.models import build_model
from tasks import synthetic

BASE = 'synthetic_majority_yesno'
RANK = BASE + '_rank'
LENGTHS = {'inputs': 64, 'targets': 8}
NUM = 32  # Examples checked; the evaluator counts rows: NUM * 2 label words.
BATCH = 16
VOCAB = seqio.ByteVocabulary()


def _pad(tokens, n):
  assert len(tokens) <= n
  return np.array(list(tokens) + [0] * (n - len(tokens)), np.int32)


def _candidate_batches(rows, word):
  """Hand-built model batches (no seqio): every row's input with one label word."""
  for i in range(0, len(rows), BATCH):
    chunk = rows[i:i + BATCH]
    enc = np.stack([_pad(VOCAB.encode(r['inputs']) + [1], LENGTHS['inputs'])
                    for r in chunk])
    tgt = np.stack([_pad(VOCAB.encode(word) + [1], LENGTHS['targets'])] * len(chunk))
    dec = np.concatenate([np.zeros((len(chunk), 1), np.int32), tgt[:, :-1]], 1)
    yield {'encoder_input_tokens': enc, 'decoder_input_tokens': dec,
           'decoder_target_tokens': tgt}


def _scores(model, params, rows, words):
  """[example, word] summed log-likelihoods, straight from model.score_batch."""
  cols = []
  for w in words:
    cols.append(np.concatenate([np.asarray(model.score_batch(params, b))
                                for b in _candidate_batches(rows, w)]))
  return np.stack(cols, 1)


def _with_y_logit_scale(params, c):
  """Scales the output column of 'y' (first byte of 'yes'): a random model prefers
  the shorter 'no' everywhere, which would make any accuracy 50%; near the
  right scale its preference depends on the input."""
  kernel = np.array(params['decoder']['logits_dense']['kernel'])
  kernel[:, VOCAB.encode('y')[0]] *= c
  decoder = dict(params['decoder'], logits_dense={'kernel': kernel})
  return dict(params, decoder=decoder)


@pytest.fixture(scope='module')
def model_and_params():
  model = build_model(get_config('t5_1_1', 'tiny', vocab_size=384), free_prompt(4))
  params = model.init_params(jax.random.PRNGKey(0))
  rows = synthetic.generate_examples(BASE, 'validation')[:NUM]
  words = tasks.get_label_words(BASE)
  lo, hi = 1.0, 8.0  # Median yes-minus-no gap: < 0 at lo, > 0 at hi.
  for _ in range(12):
    mid = (lo + hi) / 2
    s = _scores(model, _with_y_logit_scale(params, mid), rows, words)
    if np.median(s[:, 1] - s[:, 0]) < 0:
      lo = mid
    else:
      hi = mid
  return model, _with_y_logit_scale(params, (lo + hi) / 2)


def test_rank_twin_registration():
  assert RANK in tasks.RANK_TASKS and RANK in seqio.TaskRegistry.names()
  task = seqio.get_mixture_or_task(RANK)
  assert task.score_metric_fns and not task.predict_metric_fns
  info = tasks.get_task_info(RANK)
  assert info.metric_names == ('accuracy',) and info.family == 'majority'
  assert tasks.get_label_words(RANK) == tasks.get_label_words(BASE)
  # Every byte-level synthetic classification task has its twin; generation
  # tasks have none.
  for rule in ('majority', 'parity', 'greater'):
    for name in synthetic.FAMILIES[rule]:
      assert tasks.rank_task_name(name) in tasks.RANK_TASKS
  assert 'synthetic_copy_plain_rank' not in seqio.TaskRegistry.names()
  assert task.num_input_examples('validation') == 2 * synthetic.SPLIT_SIZES['validation']
  assert task.num_input_examples('train') == synthetic.SPLIT_SIZES['train']


def test_add_rank_task_options():
  name = 'test_parity_rank_on_test_only'
  try:
    task = tasks.add_rank_task('synthetic_parity_evenodd', name=name,
                               rank_splits=['test'])
    assert task.name == name and task.source.rank_splits == ('test',)
    val = next(iter(tfds.as_numpy(task.get_dataset(LENGTHS, 'validation', shuffle=False))))
    assert 'choice' not in val  # Not expanded: decode-mode rows.
    test = next(iter(tfds.as_numpy(task.get_dataset(LENGTHS, 'test', shuffle=False))))
    assert test['choice'] == 0 and test['targets_pretokenized'] == b'odd'
  finally:
    seqio.TaskRegistry.remove(name)
    tasks.core._TASK_INFO.pop(name, None)  # pylint: disable=protected-access
  with pytest.raises(ValueError, match='no fixed label words'):
    tasks.add_rank_task('synthetic_copy_plain')


def test_rank_twin_splits():
  task = seqio.get_mixture_or_task(RANK)
  # train: the base task's own text-to-text examples.
  train = list(tfds.as_numpy(task.get_dataset(LENGTHS, 'train', shuffle=False).take(3)))
  want = synthetic.generate_examples(BASE, 'train')[:3]
  assert [(e['inputs_pretokenized'].decode(), e['targets_pretokenized'].decode())
          for e in train] == [(w['inputs'], w['targets']) for w in want]
  # validation: one row per (example, label word).
  rows = list(tfds.as_numpy(task.get_dataset(LENGTHS, 'validation', shuffle=False)))
  base = synthetic.generate_examples(BASE, 'validation')
  assert len(rows) == 2 * len(base)
  for r in rows[:8]:
    ex = base[r['idx']]
    assert r['inputs_pretokenized'].decode() == ex['inputs']
    assert r['targets_pretokenized'].decode() == ('no', 'yes')[r['choice']]
    assert list(r['targets']) == VOCAB.encode(('no', 'yes')[r['choice']]) + [1]
    assert r['gold_targets'].decode() == ex['targets']
    assert bool(r['is_correct']) == (r['choice'] == ex['label'])
  assert [r['idx'] for r in rows[:6]] == [0, 0, 1, 1, 2, 2]


def test_seqio_evaluator_score_mode_grouping():
  """Hand-made scores (no model): the metric is the argmax per example group."""
  evaluator = data.build_evaluator(RANK, LENGTHS, 'validation', num_examples=2 * NUM)
  base = synthetic.generate_examples(BASE, 'validation')[:NUM]
  rng = np.random.RandomState(0)
  pick = rng.randint(0, 2, size=NUM)  # The choice each example "prefers".

  def score_fn(ds):
    out = []
    for i, ex in tfds.as_numpy(ds):
      word = VOCAB.decode([t for t in ex['decoder_target_tokens'] if t > 1])
      out.append((int(i), 1.0 if word == ('no', 'yes')[pick[i // 2]] else -1.0))
    return out

  def predict_fn(ds):
    raise AssertionError('rank twins must not decode')

  result, _ = evaluator.evaluate(compute_metrics=True, score_fn=score_fn,
                                 predict_fn=predict_fn)
  want = 100.0 * np.mean([p == r['label'] for p, r in zip(pick, base)])
  assert 0 < want < 100
  assert result.result()[RANK]['accuracy'] == pytest.approx(want)


def test_run_evaluation_matches_direct_scoring(model_and_params):
  model, params = model_and_params
  evaluator = data.build_evaluator(RANK, LENGTHS, 'validation',
                                         num_examples=2 * NUM)
  got = evaluation.run_evaluation(evaluator, model, params, batch_size=BATCH)
  assert set(got) == {f'{RANK}/accuracy'}

  rows = synthetic.generate_examples(BASE, 'validation')[:NUM]
  scores = _scores(model, params, rows, tasks.get_label_words(BASE))
  pred = scores.argmax(1)
  labels = np.array([r['label'] for r in rows])
  # The model's preferences depend on the input, so the check can tell
  # predictions apart (an all-'no' model would score 50% whatever happened).
  assert 0 < pred.sum() < NUM
  want = 100.0 * np.mean(pred == labels)
  assert got[f'{RANK}/accuracy'] == pytest.approx(want)


def test_write_predictions_on_a_rank_twin_scores_one_line_per_example(model_and_params,
                                                                      tmp_path):
  """`t5x infer` on a rank twin: one line per original example whose prediction
  is the argmax of direct scoring, with every candidate's score."""
  model, params = model_and_params
  evaluator = data.build_evaluator(RANK, LENGTHS, 'validation', num_examples=2 * NUM)
  path = str(tmp_path / 'predictions.jsonl')
  assert evaluation.write_predictions(path, evaluator, model, params, BATCH) == NUM
  lines = [json.loads(l) for l in open(path)]
  rows = synthetic.generate_examples(BASE, 'validation')[:NUM]
  words = tasks.get_label_words(BASE)
  scores = _scores(model, params, rows, words)
  by_input = {r['inputs']: (r, s) for r, s in zip(rows, scores)}
  assert len({l['inputs'] for l in lines}) == NUM
  for line in lines:
    row, s = by_input[line['inputs']]
    assert line['targets'] == row['targets'] and line['task'] == RANK
    assert sorted(line['scores']) == sorted(words)
    np.testing.assert_allclose([line['scores'][w] for w in words], s, rtol=1e-5, atol=1e-5)
    assert line['prediction'] == words[int(np.argmax(s))]


def test_list_tasks_shows_rank_twin(capsys):
  assert cli.run(['list-tasks', '--filter', RANK]) == 0
  lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith(RANK)]
  assert len(lines) == 1
  name, splits, metric = lines[0].split()
  assert (name, splits, metric) == (RANK, 'train,validation,test', 'accuracy')

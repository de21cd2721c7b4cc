"""The real-data task catalogue, offline: every registration through seqio.

TFDS tasks read hand-written raw examples through `tfds.testing.mock_data`
(the builders' real feature specs, our rows); SemEval and FewRel read small
files written here. Tokenisation uses the real T5 SentencePiece model when
../shared/data is present, else a ByteVocabulary override (same code path: the
tasks hold `tasks.DEFAULT_VOCABULARY`, which follows `set_default_vocabulary`).
"""
from __future__ import annotations

import importlib
import json
import os
import pathlib
from typing import Any

import numpy as np
import pytest
import seqio
import tensorflow as tf
import tensorflow_datasets as tfds

import tasks
from tasks import core
from tasks import pool

REPO = pathlib.Path(__file__).resolve().parents[1]
T5_VOCAB = REPO.parent / 'shared' / 'data' / 'google_prompt_tuning' / 'test_data' / 't5_vocab'
HAVE_T5_VOCAB = T5_VOCAB.exists()
NO_VOCAB_REASON = (f'real T5 SentencePiece model not found at {T5_VOCAB} '
                   '(../shared/data is absent on a plain clone)')
SEQ_LEN = {'inputs': 256, 'targets': 64}


@pytest.fixture(autouse=True)
def vocabulary():
  """Bytes for the bulk of the tests; the previous setting is restored after.

  The TF SentencePiece op reloads the model for every dataset iterator (about
  1 s), so the many pipeline runs use a ByteVocabulary override: the tasks'
  code path is the same (they hold tasks.DEFAULT_VOCABULARY, which follows
  set_default_vocabulary). Real T5 tokenisation is checked on a sample of tasks
  (test_tfds_task_real_t5_tokens) when ../shared/data is present.
  """
  previous = core._vocab_override  # pylint: disable=protected-access
  tasks.set_default_vocabulary(seqio.ByteVocabulary())
  yield tasks.get_vocabulary()
  tasks.set_default_vocabulary(previous)


@pytest.fixture(autouse=True)
def empty_data_dirs(tmp_path, monkeypatch):
  """Every test starts with empty data dirs and no env overrides."""
  for env in (core.TFDS_DATA_DIR_ENV, core.DATA_DIR_ENV):
    monkeypatch.delenv(env, raising=False)
  tasks.set_tfds_data_dir(str(tmp_path / 'tfds'))
  tasks.set_data_dir(str(tmp_path / 'files'))
  yield
  tasks.set_tfds_data_dir(None)
  tasks.set_data_dir(None)


# ------------------------------------------------------- fake TFDS examples ---

FAKE: dict[str, list[dict[str, Any]]] = {
    'glue/cola': [{'sentence': 'The book was written by John.', 'label': 1},
                  {'sentence': 'Book the was John.', 'label': 0}],
    'glue/sst2': [{'sentence': 'a gripping, funny film', 'label': 1},
                  {'sentence': 'a dull mess', 'label': 0}],
    'glue/mrpc': [{'sentence1': 'He said hi.', 'sentence2': 'He greeted us.',
                   'label': 1},
                  {'sentence1': 'It is red.', 'sentence2': 'It is blue.',
                   'label': 0}],
    'glue/qqp': [{'question1': 'How do I learn Python?',
                  'question2': 'What is the best way to learn Python?',
                  'label': 0},
                 {'question1': 'Is it raining?', 'question2': 'Is it raining now?',
                  'label': 1}],
    'glue/stsb': [{'sentence1': 'A man is playing a guitar.',
                   'sentence2': 'A man plays the guitar.', 'label': 3.75}],
    'glue/mnli': [{'premise': 'The cat sat on the mat.',
                   'hypothesis': 'A cat is sitting.', 'label': 0}],
    'glue/qnli': [{'question': 'Where is Paris?',
                   'sentence': 'Paris is in France.', 'label': 0}],
    'glue/rte': [{'sentence1': 'Dana won the race.',
                  'sentence2': 'Dana took part in a race.', 'label': 0}],
    'glue/wnli': [{'sentence1': 'The trophy did not fit because it was big.',
                   'sentence2': 'The trophy was big.', 'label': 1}],
    'super_glue/boolq': [{'question': 'is the sky blue',
                          'passage': 'The sky is blue on clear days.',
                          'label': 1}],
    'super_glue/cb': [{'premise': 'It rained all day.',
                       'hypothesis': 'The ground is dry.', 'label': 1},
                      {'premise': 'It rained.', 'hypothesis': 'It was wet.',
                       'label': 0},
                      {'premise': 'It rained.', 'hypothesis': 'Ann was sad.',
                       'label': 2}],
    'super_glue/copa': [{'premise': 'The man broke his toe.',
                         'choice1': 'He dropped a hammer on his foot.',
                         'choice2': 'He got a hole in his sock.',
                         'question': 'cause', 'label': 0}],
    'super_glue/multirc': [
        {'paragraph': 'Sam has two cats.',
         'question': 'How many cats does Sam have?', 'answer': 'two',
         'idx': {'paragraph': 0, 'question': 3, 'answer': 0}, 'label': 1},
        {'paragraph': 'Sam has two cats.',
         'question': 'How many cats does Sam have?', 'answer': 'three',
         'idx': {'paragraph': 0, 'question': 3, 'answer': 1}, 'label': 0},
    ],
    'super_glue/record': [
        {'passage': 'Tom met Ann in Rome.\n@highlight\nTom and Ann meet'
                    '\n@highlight\nRome trip',
         'query': '@placeholder met Ann.', 'entities': ['Tom', 'Ann', 'Rome'],
         'answers': ['Tom'], 'idx': {'passage': 0, 'query': 0}},
        {'passage': 'Ann Lee flew home.', 'query': '@placeholder flew.',
         'entities': ['Ann Lee'], 'answers': ['Ann', 'Ann Lee'],
         'idx': {'passage': 1, 'query': 1}},
    ],
    'super_glue/rte': [{'premise': 'Dana won the race.',
                        'hypothesis': 'Dana raced.', 'label': 0}],
    'super_glue/wic': [{'word': 'bank', 'sentence1': 'He sat on the bank.',
                        'sentence2': 'The bank closed.', 'label': 0}],
    'super_glue/wsc.fixed': [
        {'text': 'Mark told Pete many lies about himself, which Pete included '
                 'in his book.',
         'span1_index': 0, 'span1_text': 'Mark', 'span2_index': 11,
         'span2_text': 'his', 'label': 0},
    ],
    'imdb_reviews/plain_text': [
        {'text': f'Review number {i}: great.<br /><br />Loved it.',
         'label': i % 2} for i in range(30)],
    'squad/v1.1': [{'id': 'q1', 'title': 'France',
                    'context': 'Paris is the capital of France.',
                    'question': 'What is the capital of France?',
                    'answers': {'text': ['Paris', 'the city of Paris'],
                                'answer_start': [0, 0]}}],
    'squad/v2.0': [{'id': 'q2', 'title': 'France',
                    'context': 'Paris is the capital of France.',
                    'question': 'What is the capital of Spain?',
                    'answers': {'text': [], 'answer_start': []},
                    'plausible_answers': {'text': ['Paris'],
                                          'answer_start': [0]},
                    'is_impossible': True}],
    'xsum': [{'document': 'The council approved the new park on Monday.',
              'summary': 'A new park was approved.', 'id': '1'}],
}

# task -> (split, inputs, targets) of the first example out of the pipeline.
EXPECTED = {
    'cola': ('validation', 'cola sentence: The book was written by John.',
             'acceptable'),
    'sst2': ('validation', 'sst2 sentence: a gripping, funny film', 'positive'),
    'mrpc': ('validation', 'mrpc sentence1: He said hi. sentence2: He greeted us.',
             'true'),
    'qqp': ('validation', 'qqp question1: How do I learn Python? question2: What '
            'is the best way to learn Python?', 'false'),
    'stsb': ('validation', 'stsb sentence1: A man is playing a guitar. '
             'sentence2: A man plays the guitar.', '3.8'),
    'mnli': ('validation', 'mnli hypothesis: A cat is sitting. premise: The cat '
             'sat on the mat.', 'entailment'),
    'qnli': ('validation', 'qnli question: Where is Paris? sentence: Paris is in '
             'France.', 'yes'),
    'rte': ('validation', 'rte sentence1: Dana won the race. sentence2: Dana took '
            'part in a race.', 'yes'),
    'wnli': ('validation', 'wnli sentence1: The trophy did not fit because it was '
             'big. sentence2: The trophy was big.', 'yes'),
    'superglue_boolq': ('validation', 'boolq passage: The sky is blue on clear '
                        'days. question: is the sky blue', 'True'),
    'superglue_cb': ('validation', 'cb hypothesis: The ground is dry. premise: It '
                     'rained all day.', 'contradiction'),
    'superglue_copa': ('validation', 'copa choice1: He dropped a hammer on his '
                       'foot. choice2: He got a hole in his sock. premise: The '
                       'man broke his toe. question: cause', 'choice1'),
    'superglue_multirc': ('validation', 'multirc question: How many cats does Sam '
                          'have? answer: two paragraph: Sam has two cats.',
                          'True'),
    'superglue_record': ('validation', 'record query: @placeholder met Ann. '
                         'entities: Tom, Ann, Rome passage: Tom met Ann in Rome. '
                         'Tom and Ann meet. Rome trip', 'Tom'),
    'superglue_rte': ('validation', 'rte hypothesis: Dana raced. premise: Dana '
                      'won the race.', 'entailment'),
    'superglue_wic': ('validation', 'wic sentence1: He sat on the bank. '
                      'sentence2: The bank closed. word: bank', 'False'),
    'superglue_wsc': ('validation', 'wsc text: * Mark * told Pete many lies about '
                      'himself, which Pete included in # his # book.', 'False'),
    'imdb': ('test', 'imdb review: Review number 0: great. Loved it.',
             'negative'),
    'squad_v1': ('validation', 'squad question: What is the capital of France? '
                 'context: Paris is the capital of France.', 'Paris'),
    'squad_v2': ('validation', 'squad2 question: What is the capital of Spain? '
                 'context: Paris is the capital of France.', 'unanswerable'),
    'xsum': ('validation', 'summarize: The council approved the new park on '
             'Monday.', 'A new park was approved.'),
}
EXPECTED['mnli_matched'] = EXPECTED['mnli']
EXPECTED['mnli_mismatched'] = EXPECTED['mnli']
# T5-label-word twins: same inputs, T5's words.
_T5_WORDS = {'cola': 'acceptable', 'sst2': 'positive', 'mrpc': 'equivalent',
             'qqp': 'not_duplicate', 'stsb': '3.8', 'mnli': 'entailment',
             'qnli': 'entailment', 'rte': 'entailment', 'wnli': 'entailment'}
for _n, _w in _T5_WORDS.items():
  EXPECTED[f'glue_{_n}_v2'] = (EXPECTED[_n][0], EXPECTED[_n][1], _w)

TFDS_TASKS = sorted(EXPECTED)


def _fill(info: Any, row: Any) -> Any:
  """Completes a hand-written row with empty values for the other features."""
  if isinstance(info, dict):
    row = row or {}
    return {k: _fill(v, row.get(k)) for k, v in info.items()}
  if row is not None:
    return row
  if info.shape:  # Variable-length sequence.
    return np.zeros([0], dtype=info.np_dtype if info.tf_dtype != tf.string else object)
  return b'' if info.tf_dtype == tf.string else 0


def _fake_as_dataset(builder, split, decoders=None, read_config=None, **kwargs):
  """Replaces a builder's reading: our FAKE rows with the real feature specs."""
  del decoders, read_config, kwargs
  key = builder.name
  if builder.builder_config is not None:
    key += '/' + builder.builder_config.name
  if key not in FAKE:
    raise AssertionError(f'no fake examples for {key}')
  info = builder.info.features.get_tensor_info()
  rows = [_fill(info, dict(r)) for r in FAKE[key]]
  if str(split).startswith('test') and builder.name in ('glue', 'super_glue'):
    for r in rows:  # GLUE test labels are hidden: -1.
      r['label'] = -1
  signature = tf.nest.map_structure(
      lambda t: tf.TensorSpec(t.shape, t.tf_dtype), info)
  return tf.data.Dataset.from_generator(lambda: iter(rows),
                                        output_signature=signature)


@pytest.fixture
def fake_tfds():
  with tfds.testing.mock_data(as_dataset_fn=_fake_as_dataset):
    yield


def _first(task_name: str, split: str) -> dict[str, Any]:
  ds = seqio.get_mixture_or_task(task_name).get_dataset(
      sequence_length=SEQ_LEN, split=split, shuffle=False)
  return next(iter(tfds.as_numpy(ds)))


def _batch(task_name: str, split: str, batch_size: int = 2) -> dict[str, Any]:
  ds = seqio.get_mixture_or_task(task_name).get_dataset(
      sequence_length=SEQ_LEN, split=split, shuffle=False)
  converted = seqio.EncDecFeatureConverter(pack=False)(ds, SEQ_LEN)
  return next(iter(tfds.as_numpy(converted.batch(batch_size))))


# ------------------------------------------------------------ TFDS tasks ---


CONVERTER_CHECKED = ('sst2', 'stsb', 'superglue_record', 'squad_v2', 'xsum')


@pytest.mark.parametrize('name', TFDS_TASKS)
def test_tfds_task(name, fake_tfds, vocabulary):
  """Raw rows -> exact text -> tokens; postprocessing and metrics on the targets."""
  del fake_tfds
  task = seqio.get_mixture_or_task(name)
  split, inputs, targets = EXPECTED[name]
  examples = list(tfds.as_numpy(task.get_dataset(
      sequence_length=SEQ_LEN, split=split, shuffle=False)))
  ex = examples[0]
  assert ex['inputs_pretokenized'].decode() == inputs
  assert ex['targets_pretokenized'].decode() == targets
  # Tokens are the vocabulary's encoding of the text, plus EOS.
  assert list(ex['inputs']) == list(vocabulary.encode(inputs)) + [1]
  assert list(ex['targets']) == list(vocabulary.encode(targets)) + [1]

  # The targets, fed back as predictions, score perfectly.
  gold = [task.postprocess_fn(e['targets_pretokenized'], example=e,
                              is_target=True) for e in examples]
  preds = [task.postprocess_fn(e['targets_pretokenized'], example=e,
                               is_target=False) for e in examples]
  if 'stsb' in name:
    gold, preds = gold + [1.0, 2.0], preds + [1.0, 2.0]  # Correlations need variance.
  results = {}
  for fn in task.metric_fns:
    results.update(fn(gold, preds))
  assert sorted(results) == sorted(tasks.get_task_info(name).metric_names)
  for key, value in results.items():
    assert value == pytest.approx(100.0), (key, results)


@pytest.mark.parametrize('name', CONVERTER_CHECKED)
def test_tfds_task_batches(name, fake_tfds):
  """Through EncDecFeatureConverter(pack=False) to model batches."""
  del fake_tfds
  split = EXPECTED[name][0]
  ex = _first(name, split)
  batch = _batch(name, split)
  assert batch['encoder_input_tokens'].shape[1] == SEQ_LEN['inputs']
  assert batch['decoder_target_tokens'].shape[1] == SEQ_LEN['targets']
  n = len(ex['targets'])
  assert list(batch['decoder_target_tokens'][0][:n]) == list(ex['targets'])
  assert list(batch['encoder_input_tokens'][0][:len(ex['inputs'])]) == list(ex['inputs'])
  assert batch['decoder_input_tokens'][0][0] == 0  # Shifted right, BOS = 0.


@pytest.mark.skipif(not HAVE_T5_VOCAB, reason=NO_VOCAB_REASON)
@pytest.mark.parametrize('name', ['sst2', 'superglue_record', 'squad_v2'])
def test_tfds_task_real_t5_tokens(name, fake_tfds):
  """With the real T5 SentencePiece model (the default vocabulary's file)."""
  del fake_tfds
  tasks.set_default_vocabulary(str(T5_VOCAB))
  try:
    vocab = tasks.get_vocabulary()
    assert isinstance(vocab, seqio.SentencePieceVocabulary)
    split, inputs, targets = EXPECTED[name]
    batch = _batch(name, split, batch_size=1)
    tokens = list(vocab.encode(inputs)) + [1]
    assert list(batch['encoder_input_tokens'][0][:len(tokens)]) == tokens
    assert vocab.decode(batch['encoder_input_tokens'][0]) == inputs
    assert vocab.decode(batch['decoder_target_tokens'][0]) == targets
  finally:
    tasks.set_default_vocabulary(seqio.ByteVocabulary())


def test_glue_test_split_has_unk_targets(fake_tfds):
  del fake_tfds
  ex = _first('mnli', 'test_mismatched')
  assert ex['targets_pretokenized'] == b'<unk>'
  postprocess = seqio.get_mixture_or_task('mnli').postprocess_fn
  assert postprocess(ex['targets_pretokenized'], example=ex, is_target=True) == -1


def test_mnli_splits_map_to_tfds(fake_tfds):
  del fake_tfds
  assert tasks.get_task_info('mnli').splits == (
      'train', 'validation', 'validation_matched', 'validation_mismatched',
      'test_matched', 'test_mismatched')
  for split in ('train', 'validation_mismatched'):
    assert _first('mnli', split)['targets_pretokenized'] == b'entailment'
  source = seqio.get_mixture_or_task('mnli_mismatched').source
  assert source.tfds_dataset._map_split('validation') == 'validation_mismatched'  # pylint: disable=protected-access


def test_multirc_and_record_keep_groups(fake_tfds):
  del fake_tfds
  multirc = list(tfds.as_numpy(seqio.get_mixture_or_task(
      'superglue_multirc').get_dataset(SEQ_LEN, 'validation', shuffle=False)))
  assert [e['question_idx'] for e in multirc] == [3, 3]
  assert [e['targets_pretokenized'] for e in multirc] == [b'True', b'False']
  record = list(tfds.as_numpy(seqio.get_mixture_or_task(
      'superglue_record').get_dataset(SEQ_LEN, 'validation', shuffle=False)))
  # One example per answer; each keeps all answers and its query id.
  assert [e['targets_pretokenized'] for e in record] == [b'Tom', b'Ann', b'Ann Lee']
  assert [list(e['answers']) for e in record] == [
      [b'Tom'], [b'Ann', b'Ann Lee'], [b'Ann', b'Ann Lee']]
  assert [e['query_idx'] for e in record] == [0, 1_000_001, 1_000_001]


def test_imdb_validation_is_disjoint_hash_slice_of_train(fake_tfds):
  del fake_tfds
  task = seqio.get_mixture_or_task('imdb')

  def texts(split):
    ds = task.get_dataset(SEQ_LEN, split, shuffle=False)
    return [e['inputs_pretokenized'] for e in tfds.as_numpy(ds)]

  train, valid = texts('train'), texts('validation')
  assert train and valid
  assert not set(train) & set(valid)
  assert len(train) + len(valid) == len(FAKE['imdb_reviews/plain_text'])


MIXTURES = {
    'glue_mixture': 9, 'spot_glue_mixture': 8, 'superglue_mixture': 8,
    'spot_mixture': 8 + 7 + 4,
}


@pytest.mark.parametrize('name', sorted(MIXTURES))
def test_mixture_composition_and_rates(name):
  mixture = seqio.get_mixture_or_task(name)
  assert isinstance(mixture, seqio.Mixture)
  assert len(mixture.tasks) == MIXTURES[name]
  assert sorted(tasks.mixture_tasks(name)) == sorted(t.name for t in mixture.tasks)
  # Examples-proportional rates from the published split sizes, capped at K;
  # no data on disk is needed to compute them.
  for task in mixture.tasks:
    n = task.source.num_input_examples('train')
    assert mixture.get_rate(task) == min(n, tasks.MIXING_RATE_CAP)
  mixture._check_compatible_features()  # pylint: disable=protected-access


def test_mixture_batches(fake_tfds):
  """A mixture through seqio to model batches (SuperGLUE: 8 different
  preprocessors; the other mixtures differ only in their tasks, each run
  through the same pipeline above)."""
  del fake_tfds
  mixture = seqio.get_mixture_or_task('superglue_mixture')
  ds = mixture.get_dataset(SEQ_LEN, split='train', shuffle=False, seed=0,
                           copy_pretokenized=True)  # Repeats: sampled by rate.
  examples = list(tfds.as_numpy(ds.take(64)))
  prefixes = {e['inputs_pretokenized'].split()[0] for e in examples}
  assert prefixes <= {b'boolq', b'cb', b'copa', b'multirc', b'record', b'rte',
                      b'wic', b'wsc'}
  assert {b'record', b'multirc'} <= prefixes  # The largest tasks dominate.
  converted = seqio.EncDecFeatureConverter(pack=False)(ds, SEQ_LEN)
  batch = next(iter(tfds.as_numpy(converted.batch(8))))
  assert batch['encoder_input_tokens'].shape == (8, SEQ_LEN['inputs'])
  assert batch['decoder_target_tokens'].shape == (8, SEQ_LEN['targets'])


# First word of each task's inputs, to tell which task an example came from.
PREFIX = {
    **{t: t for t in ('cola', 'sst2', 'mrpc', 'qqp', 'stsb', 'mnli', 'qnli', 'rte',
                      'wnli')},
    **{f'superglue_{t}': t for t in ('boolq', 'cb', 'copa', 'multirc', 'record',
                                     'rte', 'wic', 'wsc')},
    'imdb': 'imdb', 'squad_v1': 'squad', 'squad_v2': 'squad2', 'xsum': 'summarize:',
}


def _prefixes(batch: dict[str, Any], vocabulary: seqio.Vocabulary) -> list[str]:
  return [vocabulary.decode([int(t) for t in row if t > 1]).split()[0]
          for row in batch['encoder_input_tokens']]


@pytest.mark.parametrize('name,dominant', [
    ('glue_mixture', {'mnli', 'qqp'}),
    ('spot_glue_mixture', {'mnli', 'qqp'}),
    ('spot_mixture', {'mnli', 'qqp', 'summarize:'}),
])
def test_mixture_pipeline_batches(name, dominant, fake_tfds, vocabulary):
  """The registered mixture (its real rates) -> EncDecFeatureConverter -> batches.

  Every TFDS builder of these mixtures (glue/*, super_glue/*, imdb_reviews,
  squad/v1.1, squad/v2.0, xsum) reads FAKE rows through the same
  `tfds.testing.mock_data(as_dataset_fn=...)` fixture as the task tests, so no
  builder needs mock-data generation from its metadata, nor the network.
  """
  del fake_tfds
  mixture = seqio.get_mixture_or_task(name)
  ds = mixture.get_dataset(SEQ_LEN, split='train', shuffle=False, seed=0)
  converted = seqio.EncDecFeatureConverter(pack=False)(ds, SEQ_LEN)
  batches = list(tfds.as_numpy(converted.batch(16).take(2)))
  assert len(batches) == 2
  allowed = {PREFIX[t.name] for t in mixture.tasks}
  seen = []
  for batch in batches:
    assert set(batch) == {'encoder_input_tokens', 'decoder_input_tokens',
                          'decoder_target_tokens', 'decoder_loss_weights'}
    assert batch['encoder_input_tokens'].shape == (16, SEQ_LEN['inputs'])
    assert batch['decoder_target_tokens'].shape == (16, SEQ_LEN['targets'])
    assert (batch['decoder_input_tokens'][:, 0] == 0).all()  # BOS.
    np.testing.assert_array_equal(batch['decoder_input_tokens'][:, 1:],
                                  batch['decoder_target_tokens'][:, :-1])
    assert (batch['decoder_loss_weights'] == (batch['decoder_target_tokens'] > 0)).all()
    seen += _prefixes(batch, vocabulary)
  assert set(seen) <= allowed, set(seen) - allowed
  # Examples-proportional: the largest tasks are there after 32 draws.
  assert dominant <= set(seen), seen


def test_mixture_member_train_splits_in_one_mixture(fake_tfds, vocabulary):
  """Every task of the three TFDS mixtures, through one equal-rate mixture.

  The registered mixtures rarely draw their small tasks (WNLI, CB, COPA, ...)
  in a few batches; equal rates make each task's train split appear, through
  the same Mixture -> converter path.
  """
  del fake_tfds
  names = sorted({t for m in MIXTURES if m != 'superglue_mixture'
                  for t in tasks.mixture_tasks(m)})
  assert len(names) == 20  # spot_mixture's 19 and WNLI.
  mixture = seqio.Mixture('test_equal_rate_mixture', names, default_rate=1.0)
  ds = mixture.get_dataset(SEQ_LEN, split='train', shuffle=False, seed=0)
  converted = seqio.EncDecFeatureConverter(pack=False)(ds, SEQ_LEN)
  seen = set()
  for batch in tfds.as_numpy(converted.batch(32).take(8)):
    seen |= set(_prefixes(batch, vocabulary))
  assert seen == {PREFIX[n] for n in names}


def test_real_rank_twins(fake_tfds):
  """GLUE / SuperGLUE rank twins: rows per label word, the task's own metrics."""
  del fake_tfds
  cases = {  # twin: (FAKE key, label words, metrics if right, metrics if wrong)
      'mnli_rank': ('glue/mnli', 3, {'accuracy': 100.0}, {'accuracy': 0.0}),
      'cola_rank': ('glue/cola', 2, {'mcc': 100.0, 'accuracy': 100.0},
                    {'mcc': -100.0, 'accuracy': 0.0}),
      'superglue_multirc_rank': ('super_glue/multirc', 2,
                                 {'f1a': 100.0, 'em': 100.0},
                                 {'f1a': 0.0, 'em': 0.0}),
  }
  for name, (key, n_words, if_right, if_wrong) in cases.items():
    assert tasks.get_task_info(name).metric_names == tuple(if_right)
    evaluator = seqio.Evaluator(
        name, feature_converter=seqio.EncDecFeatureConverter(pack=False),
        eval_split='validation', sequence_length=SEQ_LEN, logger_cls=())
    rows = list(tfds.as_numpy(evaluator.cached_task_datasets[name]))
    assert len(rows) == n_words * len(FAKE[key])
    assert [r['choice'] for r in rows[:n_words]] == list(range(n_words))
    assert [r['idx'] for r in rows[:n_words]] == [0] * n_words
    assert sum(r['is_correct'] for r in rows) == len(FAKE[key])
    if name == 'superglue_multirc_rank':  # Group ids survive the expansion.
      assert {int(r['question_idx']) for r in rows} == {3}
    correct = [bool(r['is_correct']) for r in rows]
    for right, expected in ((True, if_right), (False, if_wrong)):
      result, _ = evaluator.evaluate(
          compute_metrics=True,
          score_fn=lambda ds, r=right: [(int(i), float(correct[i] == r))
                                        for i, _ in tfds.as_numpy(ds)])
      assert result.result()[name] == pytest.approx(expected), (name, right)


def test_spot_mixture_contents():
  names = tasks.mixture_tasks('spot_mixture')
  assert 'wnli' not in names and 'superglue_rte' not in names
  assert {'mnli', 'qqp', 'superglue_record', 'squad_v2', 'xsum', 'imdb'} <= set(names)
  assert tasks.MIXING_RATE_CAP == 2**19


def test_add_mixture_cap_binds(fake_tfds):
  del fake_tfds
  mixture = tasks.add_mixture('test_capped_mixture', ['mnli', 'rte'],
                              maximum=1000)
  rates = {t.name: mixture.get_rate(t) for t in mixture.tasks}
  assert rates == {'mnli': 1000, 'rte': 1000}
  seqio.MixtureRegistry.remove('test_capped_mixture')
  core._MIXTURES.pop('test_capped_mixture')  # pylint: disable=protected-access


# ---------------------------------------------------------- missing data ---


@pytest.mark.parametrize('name', ['sst2', 'superglue_wsc', 'squad_v2', 'imdb'])
def test_missing_tfds_data_says_what_to_do(name, tmp_path):
  with pytest.raises(tasks.DataUnavailableError) as err:
    tasks.check_available(name)
  msg = str(err.value)
  tfds_name = seqio.get_mixture_or_task(name).source.tfds_name
  assert repr(name) in msg
  assert str(tmp_path / 'tfds') in msg
  assert f'tfds build {tfds_name}' in msg
  assert 'TFDS_DATA_DIR' in msg
  # get_dataset fails the same way, not with a TensorFlow stack.
  with pytest.raises(tasks.DataUnavailableError):
    seqio.get_mixture_or_task(name).get_dataset(SEQ_LEN, 'train', shuffle=False)
  assert not tasks.is_available(name)


def test_xsum_message_mentions_manual_download():
  with pytest.raises(tasks.DataUnavailableError, match='manual'):
    tasks.check_available('xsum')


def test_missing_data_in_mixture():
  with pytest.raises(tasks.DataUnavailableError, match="'cola'"):
    tasks.check_available('glue_mixture')


def test_missing_data_of_a_rank_twin():
  with pytest.raises(tasks.DataUnavailableError, match="'sst2'"):
    tasks.check_available('sst2_rank')
  with pytest.raises(tasks.DataUnavailableError,
                     match="'sst2_rank' is the rank-classification twin of 'sst2'"):
    seqio.get_mixture_or_task('sst2_rank').get_dataset(SEQ_LEN, 'validation',
                                                       shuffle=False)


def test_tfds_data_dir_option_and_env(monkeypatch, tmp_path):
  tasks.set_tfds_data_dir(None)
  monkeypatch.setenv('TFDS_DATA_DIR', str(tmp_path / 'from_env'))
  assert tasks.get_tfds_data_dir() == str(tmp_path / 'from_env')
  with pytest.raises(tasks.DataUnavailableError, match='from_env'):
    tasks.check_available('rte')
  tasks.set_tfds_data_dir(str(tmp_path / 'from_call'))
  assert tasks.get_tfds_data_dir() == str(tmp_path / 'from_call')
  with pytest.raises(tasks.DataUnavailableError, match='from_call'):
    tasks.check_available('rte')


class PtTinyDataset(tfds.core.GeneratorBasedBuilder):
  """A real TFDS builder, prepared on disk in tests (no download)."""
  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
        {'sentence': tfds.features.Text(), 'label': tfds.features.ClassLabel(
            num_classes=2)}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples()}

  def _generate_examples(self):
    for i in range(5):
      yield i, {'sentence': f'sentence {i}', 'label': i % 2}


def test_prepared_tfds_dir_is_read(tmp_path):
  """A TFDS data set prepared on disk passes check_available and is read."""
  PtTinyDataset(data_dir=str(tmp_path / 'prepared')).download_and_prepare()
  source = core.TfdsSource('tiny', 'pt_tiny_dataset:1.0.0',
                           splits={'train': 'train'})
  tasks.set_tfds_data_dir(str(tmp_path / 'prepared'))
  source.check()
  rows = list(tfds.as_numpy(source.get_dataset('train', shuffle=False)))
  assert sorted(r['sentence'] for r in rows) == [f'sentence {i}'.encode() for i in range(5)]
  tasks.set_tfds_data_dir(str(tmp_path / 'elsewhere'))
  with pytest.raises(tasks.DataUnavailableError, match='elsewhere'):
    source.check()


# ----------------------------------------------------------- file sources ---


def _write_semeval(path: pathlib.Path, sentences: list[tuple[str, list]]) -> None:
  parts = ['<?xml version="1.0" encoding="UTF-8" standalone="yes"?>', '<sentences>']
  for i, (text, terms) in enumerate(sentences):
    parts.append(f'  <sentence id="{i}">')
    parts.append(f'    <text>{text}</text>')
    if terms:
      parts.append('    <aspectTerms>')
      for term, polarity in terms:
        parts.append(f'      <aspectTerm term="{term}" polarity="{polarity}" '
                     'from="0" to="1"/>')
      parts.append('    </aspectTerms>')
    parts.append('  </sentence>')
  parts.append('</sentences>')
  path.write_text('\n'.join(parts), encoding='utf-8')


SEMEVAL_TRAIN = [
    ('I charge it at night and skip taking the cord with me because of the '
     'good battery life.', [('cord', 'neutral'), ('battery life', 'positive')]),
    ('The screen is dim.', [('screen', 'negative')]),
    ('Nice keyboard, awful trackpad.', [('keyboard', 'positive'),
                                        ('trackpad', 'negative')]),
    ('It works.', []),  # No aspect terms: no example.
    ('Fast boot but loud fan.', [('boot', 'positive'), ('fan', 'negative')]),
    ('The price is fair.', [('price', 'neutral')]),
    ('Good and bad speakers.', [('speakers', 'conflict')]),
    ('Battery died.', [('Battery', 'negative')]),
    ('Love the design.', [('design', 'positive')]),
    ('Held out: the hinge is weak.', [('hinge', 'negative')]),  # 10th: validation.
]
SEMEVAL_TEST = [('The touchpad is great.', [('touchpad', 'positive')])]


@pytest.mark.parametrize('domain', ['laptop', 'restaurant'])
def test_semeval_from_files(domain, tmp_path, vocabulary):
  name = f'semeval14_{domain}'
  with pytest.raises(tasks.DataUnavailableError) as err:
    tasks.check_available(name)
  train_file, test_file = tasks.sentiment.SEMEVAL_FILES[domain]
  folder = tmp_path / 'files' / 'semeval14'
  for text in (train_file, test_file, str(folder), 'PROMPT_TRANSFER_DATA_DIR'):
    assert text in str(err.value)

  folder.mkdir(parents=True)
  _write_semeval(folder / train_file, SEMEVAL_TRAIN)
  _write_semeval(folder / test_file, SEMEVAL_TEST)
  tasks.check_available(name)
  source = seqio.get_mixture_or_task(name).source
  assert source.num_input_examples('train') == 11
  assert source.num_input_examples('validation') == 1
  assert source.num_input_examples('test') == 1

  examples = list(tfds.as_numpy(seqio.get_mixture_or_task(name).get_dataset(
      SEQ_LEN, 'train', shuffle=False)))
  assert examples[0]['inputs_pretokenized'].decode() == (
      f'{domain} sentence: I charge it at night and skip taking the cord with me '
      'because of the good battery life. aspect: cord')
  assert [e['targets_pretokenized'].decode() for e in examples] == [
      'moderate', 'positive', 'negative', 'positive', 'negative', 'positive',
      'negative', 'moderate', 'conflict', 'negative', 'positive']
  assert list(examples[0]['targets']) == list(vocabulary.encode('moderate')) + [1]
  # The other splits read the same way; their raw rows suffice here.
  assert source.examples('validation') == [
      {'sentence': 'Held out: the hinge is weak.', 'aspect': 'hinge', 'label': 0}]
  assert source.examples('test') == [
      {'sentence': 'The touchpad is great.', 'aspect': 'touchpad', 'label': 2}]


def _fewrel_instance(i: int, head: str, tail: str) -> dict[str, Any]:
  tokens = f'{head} is near {tail} , number {i} .'.split()
  return {'tokens': tokens, 'h': [head, 'Q1', [[0]]], 't': [tail, 'Q2', [[3]]]}


def test_fewrel_from_files(tmp_path, vocabulary):
  with pytest.raises(tasks.DataUnavailableError) as err:
    tasks.check_available('fewrel')
  for text in ('train_wiki.json', 'val_wiki.json', 'thunlp/FewRel',
               str(tmp_path / 'files' / 'fewrel')):
    assert text in str(err.value)

  folder = tmp_path / 'files' / 'fewrel'
  folder.mkdir(parents=True)
  train = {'P931': [_fewrel_instance(i, 'Heathrow', 'London') for i in range(10)],
           'P17': [_fewrel_instance(i, 'Lyon', 'France') for i in range(10)]}
  val = {'P177': [_fewrel_instance(i, 'Tower Bridge', 'Thames') for i in range(10)]}
  (folder / 'train_wiki.json').write_text(json.dumps(train))
  (folder / 'val_wiki.json').write_text(json.dumps(val))
  tasks.check_available('fewrel')
  words = tasks.get_label_words('fewrel')
  source = seqio.get_mixture_or_task('fewrel').source
  assert [source.num_input_examples(s) for s in ('train', 'validation', 'test')] == [24, 3, 3]

  ex = _first('fewrel', 'train')
  assert ex['inputs_pretokenized'].decode() == (
      'fewrel sentence: Heathrow is near London , number 0 . head: Heathrow '
      'tail: London')
  assert ex['targets_pretokenized'].decode() == 'place served by transport hub'
  assert list(ex['targets']) == list(
      vocabulary.encode('place served by transport hub')) + [1]
  test = source.examples('test')
  assert [words[r['label']] for r in test] == [
      'place served by transport hub', 'country', 'crosses']
  assert [r['sentence'] for r in source.examples('validation')] == [
      'Heathrow is near London , number 8 .', 'Lyon is near France , number 8 .',
      'Tower Bridge is near Thames , number 8 .']
  assert len(words) == 80 and len(set(words)) == 80
  assert words[0] == 'head of government'  # P6, the lowest property id.


# ------------------------------------------------------------ vocabulary ---


def test_registration_reads_no_vocabulary_file(tmp_path):
  missing = str(tmp_path / 'nowhere.model')
  tasks.set_default_vocabulary(missing)
  try:
    importlib.reload(tasks.glue)  # Re-registering is harmless and lazy.
    task = seqio.get_mixture_or_task('sst2')
    assert task.output_features['targets'].vocabulary is tasks.DEFAULT_VOCABULARY
    assert missing in repr(task.output_features['inputs'].vocabulary)
    with pytest.raises(tasks.DataUnavailableError, match='T5_VOCAB'):
      task.output_features['inputs'].vocabulary.encode('hello')
  finally:
    tasks.set_default_vocabulary(seqio.ByteVocabulary())


def test_vocabulary_path_resolution(monkeypatch):
  try:
    tasks.set_default_vocabulary(None)
    monkeypatch.delenv('T5_VOCAB', raising=False)
    assert tasks.default_vocabulary_path() == tasks.DEFAULT_VOCAB_PATH
    assert tasks.DEFAULT_VOCAB_PATH == (
        'gs://t5-data/vocabs/cc_all.32000/sentencepiece.model')
    monkeypatch.setenv('T5_VOCAB', '/env/spm.model')
    assert tasks.default_vocabulary_path() == '/env/spm.model'
    tasks.set_default_vocabulary('/call/spm.model')
    assert tasks.default_vocabulary_path() == '/call/spm.model'
  finally:
    tasks.set_default_vocabulary(seqio.ByteVocabulary())


@pytest.mark.skipif(not HAVE_T5_VOCAB, reason=NO_VOCAB_REASON)
def test_real_t5_vocabulary():
  tasks.set_default_vocabulary(str(T5_VOCAB))
  try:
    vocab = tasks.get_vocabulary()
    assert isinstance(vocab, seqio.SentencePieceVocabulary)
    assert vocab.vocab_size == 32100  # 32,000 pieces + 100 sentinels.
    default = tasks.DEFAULT_VOCABULARY
    assert default.vocab_size == 32100 and default.eos_id == 1
    assert default == vocab
    text = 'sst2 sentence: hello'
    assert default.decode(default.encode(text)) == text
    # label words for class-label prompt init: the words' sub-token ids.
    assert all(default.encode(w) for w in tasks.get_label_words('mnli'))
  finally:
    tasks.set_default_vocabulary(seqio.ByteVocabulary())


# ----------------------------------------------------------- metadata ---


def test_label_words_and_types():
  assert tasks.get_label_words('sst2') == ['negative', 'positive']
  assert tasks.get_label_words('imdb') == ['negative', 'positive']
  assert tasks.get_label_words('semeval14_laptop') == [
      'negative', 'moderate', 'positive', 'conflict']
  assert tasks.get_label_words('mnli') == ['entailment', 'neutral', 'contradiction']
  assert tasks.get_label_words('qnli') == ['yes', 'no']
  assert tasks.get_label_words('rte') == ['yes', 'no']
  assert tasks.get_label_words('mrpc') == ['false', 'true']
  assert tasks.get_label_words('qqp') == ['false', 'true']
  assert tasks.get_label_words('glue_mrpc_v2') == ['not_equivalent', 'equivalent']
  assert tasks.get_label_words('superglue_cb') == ['entailment', 'contradiction',
                                                   'neutral']
  assert tasks.get_label_words('stsb')[:3] == ['0.0', '0.2', '0.4']
  assert tasks.get_task_info('sst2').task_type == 'sentiment'
  assert tasks.get_task_info('semeval14_restaurant').task_type == 'sentiment'
  assert tasks.get_task_info('mnli').task_type == 'nli'
  assert tasks.get_task_info('mrpc').task_type == 'paraphrase'
  assert tasks.get_task_info('fewrel').task_type == 'relation_extraction'
  assert tasks.get_task_info('stsb').kind == 'regression'
  for name in ('squad_v1', 'squad_v2', 'xsum', 'superglue_record'):
    assert tasks.get_task_info(name).kind == 'generation'
    with pytest.raises(ValueError, match='no fixed label words'):
      tasks.get_label_words(name)
  with pytest.raises(ValueError, match='mixture'):
    tasks.get_label_words('glue_mixture')
  with pytest.raises(ValueError, match='Unknown task'):
    tasks.get_label_words('no_such_task')


def test_every_registration_is_known_to_seqio_and_listed():
  rows = {r.name: r for r in tasks.list_tasks()}
  for name in tasks.task_names():
    task = seqio.get_mixture_or_task(name)
    info = tasks.get_task_info(name)
    assert tuple(task.splits) == info.splits
    assert rows[name] == (name, info.splits, info.metric_names)
    assert set(task.output_features) == {'inputs', 'targets'}
    if info.kind == 'classification':
      assert info.label_words and len(set(info.label_words)) == len(info.label_words)
  for name in tasks.mixture_names():
    assert isinstance(seqio.get_mixture_or_task(name), seqio.Mixture)
    assert name in rows
  assert rows['squad_v2'].metrics == ('em', 'f1')
  assert rows['xsum'].metrics == ('rouge1', 'rouge2', 'rougeLsum')
  assert rows['stsb'].metrics == ('pearson', 'spearman')
  # Every task but the synthetic ones is exercised on data above.
  real = {n for n in tasks.task_names() if not n.startswith(('synthetic_', 'pool_'))
          and not n.endswith('_rank')}
  assert real == set(TFDS_TASKS) | {'semeval14_laptop', 'semeval14_restaurant',
                                    'fewrel'}
  assert set(MIXTURES) | {'synthetic_mixture'} | set(pool.MIXTURES) == set(
      tasks.mixture_names())
  # Every classification task has a rank-classification twin, same metrics.
  classification = {n for n in tasks.task_names() if not n.endswith('_rank')
                    and tasks.get_task_info(n).kind == 'classification'}
  assert {tasks.rank_task_name(n) for n in classification} == set(tasks.RANK_TASKS)
  for n in classification:
    assert rows[n + '_rank'].metrics == rows[n].metrics
    assert rows[n + '_rank'].splits == rows[n].splits


def test_module_import_flag_style():
  # `--module_import=tasks.glue` imports the module by name; tasks are there.
  module = importlib.import_module('tasks.glue')
  assert 'sst2' in seqio.TaskRegistry.names()
  assert module.GLUE_TASKS[0] == 'cola'
  assert os.path.basename(module.__file__) == 'glue.py'

"""Metrics, postprocessors, preprocessors and rank classification on known values."""
from __future__ import annotations

import numpy as np
import pytest
import seqio
import tensorflow as tf
import tensorflow_datasets as tfds

import tasks
from tasks import metrics
from tasks import preprocessors as pp


def _run(preprocessor, raw: dict) -> list[dict]:
  """Applies a preprocessor to one hand-written raw example."""
  ds = preprocessor(tf.data.Dataset.from_tensors(raw))
  return list(tfds.as_numpy(ds))


def _texts(rows: list[dict]) -> list[tuple[str, str]]:
  return [(r['inputs'].decode(), r['targets'].decode()) for r in rows]


# ------------------------------------------------------------ metric fns ---


def test_classification_metrics():
  assert metrics.accuracy([0, 1, 1, 0], [0, 1, 0, -1]) == {'accuracy': 50.0}
  # TP 1, FP 1, FN 1 -> F1 0.5; the unknown prediction (-1) counts as wrong.
  assert metrics.f1_positive([1, 1, 0, 0], [1, 0, 1, -1])['f1'] == pytest.approx(50.0)
  # Per class F1: 2/3, 1, 2/3.
  assert metrics.make_f1_macro(3)([0, 1, 2, 2], [0, 1, 2, 0])['f1_macro'] == (
      pytest.approx(100 * (2 / 3 + 1 + 2 / 3) / 3))
  assert metrics.matthews_corrcoef([0, 1, 0, 1], [0, 1, 0, 1])['mcc'] == pytest.approx(100)
  assert metrics.matthews_corrcoef([0, 1, 0, 1], [1, 0, 1, 0])['mcc'] == pytest.approx(-100)


def test_correlation_metrics():
  assert metrics.pearson_corrcoef([1., 2., 3.], [2., 4., 6.])['pearson'] == pytest.approx(100)
  assert metrics.pearson_corrcoef([1., 2., 3.], [1., 3., 2.])['pearson'] == pytest.approx(50)
  assert metrics.spearman_corrcoef([1., 2., 3.], [1., 3., 2.])['spearman'] == pytest.approx(50)
  assert metrics.spearman_corrcoef([1., 2., 3.], [3., 30., 300.])['spearman'] == pytest.approx(100)


def test_squad_official_normalisation_and_scores():
  assert metrics.normalize_answer('The  Cat, sat!') == 'cat sat'
  assert metrics.normalize_answer('an apple a day') == 'apple day'
  assert metrics.squad_f1('the cat sat', 'a cat sat down') == pytest.approx(0.8)
  got = metrics.squad([['Paris', 'the city of Paris'], ['Rome']],
                      ['City of Paris.', 'Milan'])
  assert got == {'em': 50.0, 'f1': 50.0}
  # F1 takes the best gold answer: 'city of paris' vs 'paris' -> 0.5; vs
  # 'city of paris' -> 1.
  assert metrics.squad([['Paris', 'the city of Paris']], ['Paris city'])['f1'] == (
      pytest.approx(100 * 0.8))
  # SQuAD 2.0: no gold answer is the empty answer.
  assert metrics.squad([[]], ['']) == {'em': 100.0, 'f1': 100.0}
  assert metrics.squad([[]], ['Paris']) == {'em': 0.0, 'f1': 0.0}
  assert metrics.squad([['Paris']], ['']) == {'em': 0.0, 'f1': 0.0}


def test_qa_postprocess():
  example = {'answers': np.array([b'Paris', b'the city of Paris'])}
  assert metrics.qa_postprocess(b'Paris', example=example, is_target=True) == [
      'Paris', 'the city of Paris']
  assert metrics.qa_postprocess(b' unanswerable ', example=example) == ''
  assert metrics.qa_postprocess(b'Rome') == 'Rome'
  empty = {'answers': np.array([], dtype=object)}
  assert metrics.qa_postprocess(b'unanswerable', example=empty, is_target=True) == []


def test_record_scores_once_per_query():
  targets = [{'answers': ['Tom'], 'group': 0},
             {'answers': ['Ann', 'Ann Lee'], 'group': 1},
             {'answers': ['Ann', 'Ann Lee'], 'group': 1}]
  assert metrics.record(targets, ['Tom', 'Ann Lee', 'wrong']) == {'em': 100.0,
                                                                  'f1': 100.0}
  example = {'answers': np.array([b'Ann']), 'query_idx': np.int64(7)}
  assert metrics.record_postprocess(b'Ann', example=example, is_target=True) == {
      'answers': ['Ann'], 'group': 7}


def test_multirc_f1a_and_em():
  targets = [{'value': v, 'group': g} for v, g in [(1, 0), (0, 0), (1, 1), (1, 1)]]
  got = metrics.multirc(targets, [1, 0, 1, 0])
  assert got['f1a'] == pytest.approx(80.0)  # P 1, R 2/3.
  assert got['em'] == pytest.approx(50.0)  # Question 0 right, question 1 not.
  post = metrics.make_grouped_label_postprocessor(('False', 'True'), 'question_idx')
  assert post(b'True', example={'question_idx': np.int64(3)}, is_target=True) == {
      'value': 1, 'group': 3}
  assert post(b'True', example={'question_idx': np.int64(3)}) == 1


def test_rouge_and_sequence_accuracy():
  same = metrics.rouge(['the cat sat .'], ['the cat sat .'])
  assert same == pytest.approx({'rouge1': 100, 'rouge2': 100, 'rougeLsum': 100})
  got = metrics.rouge(['the cat sat'], ['the cat'])
  assert got['rouge1'] == pytest.approx(80.0)  # P 1, R 2/3.
  assert got['rouge2'] == pytest.approx(100 * 2 / 3)  # P 1, R 1/2.
  assert metrics.sequence_accuracy(['ab', 'cd'], ['ab', 'ce']) == {
      'sequence_accuracy': 50.0}


def test_label_postprocessors():
  post = metrics.make_label_postprocessor(('no', 'yes'))
  assert post(b' yes ') == 1 and post('no') == 0
  assert post(b'maybe') == -1 and post(b'Yes') == -1  # Exact words only.
  assert metrics.string_to_float(b'3.8') == pytest.approx(3.8)
  assert metrics.string_to_float(b'high') == -1.0


# --------------------------------------------------------- preprocessors ---


def test_classification_text_and_unknown_label():
  raw = {'sentence1': 'A b.', 'sentence2': 'C d.', 'label': np.int64(-1),
         'idx': np.int32(4)}
  ds = tf.data.Dataset.from_tensors(raw)
  out = list(tfds.as_numpy(pp.classification_text(
      ds, benchmark='rte', feature_names=('sentence1', 'sentence2'),
      label_words=('yes', 'no'))))
  assert _texts(out) == [('rte sentence1: A b. sentence2: C d.', '<unk>')]
  assert out[0]['label'] == -1 and out[0]['idx'] == 4


@pytest.mark.parametrize('score,text', [(3.75, '3.8'), (1.0, '1.0'), (0.0, '0.0'),
                                        (5.0, '5.0'), (4.9, '4.8')])
def test_stsb_rounds_to_fifths(score, text):
  # 4.9 * 5 = 24.5 rounds half to even (TF and T5), hence 4.8.
  out = _run(pp.stsb, {'sentence1': 'a', 'sentence2': 'b',
                       'label': np.float32(score), 'idx': np.int32(0)})
  assert _texts(out) == [('stsb sentence1: a sentence2: b', text)]
  assert text in pp.STSB_LABEL_WORDS


def test_imdb_strips_html_breaks():
  out = _run(lambda ds: pp.imdb(ds, label_words=('negative', 'positive')),
             {'text': 'Bad.<br /><br />Very  bad.<br/>', 'label': np.int64(0)})
  assert _texts(out) == [('imdb review: Bad. Very bad.', 'negative')]


def test_wsc_marks_spans_with_regex_characters():
  raw = {'text': 'Mr. Lee (the boss) said he was late.', 'span1_index': np.int32(0),
         'span1_text': 'Mr. Lee', 'span2_index': np.int32(5),
         'span2_text': 'he', 'label': np.int64(1), 'idx': np.int32(0)}
  out = _run(lambda ds: pp.wsc(ds, label_words=('False', 'True')), raw)
  assert _texts(out) == [
      ('wsc text: * Mr. Lee * (the boss) said # he # was late.', 'True')]
  # Pronoun before the noun: no index shift.
  raw = {'text': 'He said Tom was late.', 'span1_index': np.int32(2),
         'span1_text': 'Tom', 'span2_index': np.int32(0), 'span2_text': 'He',
         'label': np.int64(0), 'idx': np.int32(1)}
  out = _run(lambda ds: pp.wsc(ds, label_words=('False', 'True')), raw)
  assert _texts(out) == [('wsc text: # He # said * Tom * was late.', 'False')]


def test_record_without_answers_gives_one_unk_example():
  raw = {'passage': 'P.', 'query': '@placeholder.', 'entities': ['A', 'B'],
         'answers': tf.constant([], tf.string),
         'idx': {'passage': np.int32(2), 'query': np.int32(5)}}
  out = _run(pp.record, raw)
  assert _texts(out) == [('record query: @placeholder. entities: A, B passage: P.',
                          '<unk>')]
  assert out[0]['query_idx'] == 2_000_005 and list(out[0]['answers']) == []


def test_squad_and_summarize():
  raw = {'id': 'x', 'question': 'Q?', 'context': 'C.',
         'answers': {'text': tf.constant([], tf.string),
                     'answer_start': tf.constant([], tf.int32)}}
  out = _run(lambda ds: pp.squad(ds, benchmark='squad2'), raw)
  assert _texts(out) == [('squad2 question: Q? context: C.', 'unanswerable')]
  out = _run(pp.summarize, {'document': 'Long text.', 'summary': 'Short.'})
  assert _texts(out) == [('summarize: Long text.', 'Short.')]


def test_semeval_and_fewrel_formats():
  out = _run(lambda ds: pp.aspect_sentiment(
      ds, benchmark='restaurant', label_words=tasks.sentiment.SEMEVAL_LABEL_WORDS),
             {'sentence': 'Good food.', 'aspect': 'food', 'label': np.int32(2)})
  assert _texts(out) == [('restaurant sentence: Good food. aspect: food', 'positive')]
  out = _run(lambda ds: pp.fewrel(ds, label_words=tasks.fewrel.LABEL_WORDS),
             {'sentence': 'Heathrow serves London .', 'head': 'Heathrow',
              'tail': 'London',
              'label': np.int32(tasks.fewrel.RELATION_IDS.index('P931'))})
  assert _texts(out) == [('fewrel sentence: Heathrow serves London . head: '
                          'Heathrow tail: London', 'place served by transport hub')]


# ------------------------------------------------------ rank classification ---


def test_rank_classification_pairs_and_predictions():
  pairs = tasks.rank_classification_pairs(
      {'inputs': 'mnli hypothesis: a premise: b', 'targets': b'neutral'},
      tasks.get_label_words('mnli'))
  assert [(p['targets'], p['choice'], p['is_correct']) for p in pairs] == [
      ('entailment', 0, False), ('neutral', 1, True), ('contradiction', 2, False)]
  assert all(p['inputs'] == 'mnli hypothesis: a premise: b' for p in pairs)
  assert tasks.rank_classification_predictions(
      idx=[0, 0, 0, 1, 1, 1], choice=[0, 1, 2, 0, 1, 2],
      scores=[-3., -1., -2., -0.5, -4., -9.]) == {0: 1, 1: 0}


def test_rank_classification_tf():
  ds = tf.data.Dataset.from_tensor_slices({'inputs': ['x', 'y'],
                                           'targets': ['yes', 'maybe']})
  out = list(tfds.as_numpy(tasks.rank_classification(ds, ['no', 'yes'])))
  assert [(r['idx'], r['choice'], r['targets'], r['label'], r['is_correct'])
          for r in out] == [(0, 0, b'no', 1, False), (0, 1, b'yes', 1, True),
                            (1, 0, b'no', -1, False), (1, 1, b'yes', -1, False)]
  # keep_features: the gold text and the other scalar features on every row.
  ds = tf.data.Dataset.from_tensor_slices({'inputs': ['x'], 'targets': ['yes'],
                                           'group': [7], 'span': [[1, 2]]})
  out = list(tfds.as_numpy(tasks.rank_classification(ds, ['no', 'yes'],
                                                     keep_features=True)))
  assert [(r['group'], r['gold_targets']) for r in out] == [(7, b'yes')] * 2
  assert 'span' not in out[0]  # Not a scalar.


def test_rank_classification_dataset_on_a_task():
  name = tasks.synthetic.DEMO_TARGET
  seq = {'inputs': 48, 'targets': 8}
  ds = tasks.rank_classification_dataset(name, 'validation', seq)
  out = list(tfds.as_numpy(ds.take(4)))
  vocab = seqio.ByteVocabulary()
  words = tasks.get_label_words(name)
  assert [r['choice'] for r in out] == [0, 1, 0, 1]
  assert [r['idx'] for r in out] == [0, 0, 1, 1]
  for r in out:
    assert list(r['targets']) == vocab.encode(words[r['choice']]) + [1]
    assert r['targets_pretokenized'].decode() == words[r['choice']]
    assert r['is_correct'] == (r['choice'] == r['label'])
  assert sum(r['is_correct'] for r in out) == 2  # One right choice per example.
  assert list(out[0]['inputs']) == list(out[1]['inputs'])
  assert vocab.decode(out[0]['inputs']) == out[0]['inputs_pretokenized'].decode()
  with pytest.raises(ValueError, match='no fixed label words'):
    tasks.rank_classification_dataset('synthetic_copy_plain', 'validation', seq)

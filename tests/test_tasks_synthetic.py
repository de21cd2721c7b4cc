"""Synthetic task families: deterministic data, known relatedness, seqio pipeline."""
from __future__ import annotations

import pathlib
import re

import numpy as np
import pytest
import seqio
import tensorflow_datasets as tfds

import tasks
from tasks import synthetic

T5_VOCAB = (pathlib.Path(__file__).resolve().parents[2] / 'shared' / 'data' /
            'google_prompt_tuning' / 'test_data' / 't5_vocab')
SEQ_LEN = {'inputs': 64, 'targets': 16}
BYTE_TASKS = [n for names in synthetic.FAMILIES.values() for n in names]
CLASSIFICATION_RULES = ('majority', 'parity', 'greater')


def _label(name: str, text: str) -> object:
  """Recomputes the rule from the input text alone."""
  rule = synthetic.family_of(name)
  if rule == 'majority':
    s = re.search(r'[abc]{8,}', text).group(0)
    return int(s.count('a') > s.count('b'))
  if rule == 'parity':
    s = re.search(r'[01]{6,}', text).group(0)
    return int(s.count('1') % 2 == 0)
  if rule == 'greater':
    x, y = map(int, re.findall(r'\d+', text))
    return int(x > y)
  s = text.split(': ', 1)[1]
  return s if rule == 'copy' else s[::-1]


def test_family_structure():
  assert set(synthetic.FAMILIES) == set(CLASSIFICATION_RULES) | {'copy', 'reverse'}
  for rule in CLASSIFICATION_RULES:
    names = synthetic.FAMILIES[rule]
    assert len(names) >= 4
    words = [tuple(synthetic.LABEL_WORDS[n]) for n in names]
    assert len(set(words)) >= 3  # Same rule, at least three sets of label words.
    for n in names:
      assert n.startswith(f'synthetic_{rule}_')
      assert tasks.get_label_words(n) == list(synthetic.LABEL_WORDS[n])
      assert tasks.get_task_info(n).family == rule
      assert tasks.get_task_info(n).kind == 'classification'
  for rule in ('copy', 'reverse'):
    names = synthetic.FAMILIES[rule]
    assert len(names) == 3  # plain (pretrained phrasing) and two unseen ones
    for name in names:
      assert synthetic.LABEL_WORDS[name] is None
      assert tasks.get_task_info(name).kind == 'generation'
  # Label words recur across unrelated rules, so they do not signal relatedness.
  assert (synthetic.LABEL_WORDS['synthetic_majority_yesno'] ==
          synthetic.LABEL_WORDS['synthetic_parity_yesno'])
  assert synthetic.related('synthetic_majority_yesno', 'synthetic_majority_posneg')
  assert not synthetic.related('synthetic_majority_yesno', 'synthetic_parity_yesno')
  assert {k: [n + '_t5' for n in v] for k, v in synthetic.FAMILIES.items()} == (
      synthetic.FAMILIES_T5)


def test_task_types_share_rule_and_words_no_other_type_uses():
  assert set(synthetic.TASK_TYPES) == set(CLASSIFICATION_RULES)
  for rule, names in synthetic.TASK_TYPES.items():
    assert len(names) == 2 and all(synthetic.family_of(n) == rule for n in names)
    words = {synthetic.LABEL_WORDS[n] for n in names}
    assert len(words) == 1 and synthetic.same_type(*names)
    assert synthetic.same_type(names[0], names[1] + '_t5')
    # The type's verbalizer is used by no other type.
    others = {synthetic.LABEL_WORDS[n] for r, ns in synthetic.TASK_TYPES.items() if r != rule
              for n in ns}
    assert not words & others
  assert not synthetic.same_type('synthetic_majority_yesno', 'synthetic_majority_posneg')
  assert not synthetic.same_type('synthetic_majority_yesno', 'synthetic_parity_yesno')


def test_quickstart_pair():
  src, tgt = synthetic.QUICKSTART_SOURCE, synthetic.QUICKSTART_TARGET
  assert src != tgt and synthetic.related(src, tgt)
  assert src in seqio.TaskRegistry.names() and tgt in seqio.TaskRegistry.names()
  assert synthetic.LABEL_WORDS[src] != synthetic.LABEL_WORDS[tgt]


def test_demo_pair_shares_rule_and_words_and_was_not_pretrained():
  src, tgt = synthetic.DEMO_SOURCE, synthetic.DEMO_TARGET
  assert src != tgt and synthetic.same_type(src, tgt)
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(
      'make_tiny_checkpoint', pathlib.Path(__file__).parents[1] / 'tools' / 'make_tiny_checkpoint.py')
  pretraining = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(pretraining)
  words = set(synthetic.LABEL_WORDS[src])
  for name in pretraining.PRETRAIN_POOL:
    assert name not in (src, tgt)
    assert not words & set(synthetic.LABEL_WORDS[name] or ())


def test_deterministic_from_seed():
  name = synthetic.QUICKSTART_SOURCE
  first = synthetic.generate_examples(name, 'train')
  synthetic._generate.cache_clear()  # pylint: disable=protected-access
  assert synthetic.generate_examples(name, 'train') == first
  # Pinned: the same on every machine and Python version (random() only).
  assert first[0] == {'inputs': 'more a than b? abbaacccccccc', 'targets': 'yes',
                      'label': 1}
  other = synthetic.generate_examples(name, 'train', seed=1)
  assert other != first and len(other) == len(first)
  # Templates of one rule draw their own strings; the T5 twin the same ones.
  assert (synthetic.generate_examples('synthetic_majority_truefalse', 'train')[0]
          ['inputs'] != first[0]['inputs'])
  assert synthetic.generate_examples(name + '_t5', 'train') == first


@pytest.mark.parametrize('name', BYTE_TASKS)
def test_examples_follow_their_rule(name):
  seen = set()
  for split, size in synthetic.SPLIT_SIZES.items():
    rows = synthetic.generate_examples(name, split)
    assert len(rows) == size
    inputs = [r['inputs'] for r in rows]
    assert max(len(x) for x in inputs) <= synthetic.MAX_INPUT_CHARS
    assert not seen & set(inputs), 'splits overlap'
    seen |= set(inputs)
    words = synthetic.LABEL_WORDS[name]
    for r in rows:
      if words is None:
        assert r['targets'] == _label(name, r['inputs']) and r['label'] == -1
      else:
        assert r['label'] == _label(name, r['inputs'])
        assert r['targets'] == words[r['label']]
    if words is not None:  # Balanced classes.
      assert sum(r['label'] for r in rows) == size // 2


@pytest.mark.parametrize('name', BYTE_TASKS)
def test_byte_task_pipeline(name):
  task = seqio.get_mixture_or_task(name)
  vocab = task.output_features['inputs'].vocabulary
  assert isinstance(vocab, seqio.ByteVocabulary)
  ds = task.get_dataset(SEQ_LEN, split='validation', shuffle=False)
  got = list(tfds.as_numpy(ds))
  want = synthetic.generate_examples(name, 'validation')
  assert len(got) == len(want)
  assert got[0]['inputs_pretokenized'].decode() == want[0]['inputs']
  assert got[0]['targets_pretokenized'].decode() == want[0]['targets']
  assert list(got[0]['inputs']) == list(vocab.encode(want[0]['inputs'])) + [1]
  assert list(got[0]['targets']) == list(vocab.encode(want[0]['targets'])) + [1]
  assert task.num_input_examples('train') == synthetic.SPLIT_SIZES['train']


def test_quickstart_batches():
  for name in (synthetic.QUICKSTART_SOURCE, synthetic.QUICKSTART_TARGET):
    ds = seqio.get_mixture_or_task(name).get_dataset(SEQ_LEN, split='train',
                                                      shuffle=False)
    converted = seqio.EncDecFeatureConverter(pack=False)(ds, SEQ_LEN)
    batch = next(iter(tfds.as_numpy(converted.batch(16))))
    assert batch['encoder_input_tokens'].shape == (16, SEQ_LEN['inputs'])
    assert batch['decoder_target_tokens'].shape == (16, SEQ_LEN['targets'])
    assert batch['encoder_input_tokens'].max() < 259  # ByteVocabulary size.


def test_synthetic_mixture():
  mixture = seqio.get_mixture_or_task('synthetic_mixture')
  assert sorted(t.name for t in mixture.tasks) == sorted(BYTE_TASKS)
  ds = mixture.get_dataset(SEQ_LEN, split='train', shuffle=False, seed=0)
  batch = next(iter(tfds.as_numpy(
      seqio.EncDecFeatureConverter(pack=False)(ds, SEQ_LEN).batch(8))))
  assert batch['encoder_input_tokens'].shape == (8, SEQ_LEN['inputs'])


@pytest.mark.skipif(not T5_VOCAB.exists(),
                    reason=f'real T5 SentencePiece model not found at {T5_VOCAB}')
def test_t5_twin_uses_default_vocabulary():
  name = synthetic.QUICKSTART_SOURCE + '_t5'
  task = seqio.get_mixture_or_task(name)
  assert task.output_features['inputs'].vocabulary is tasks.DEFAULT_VOCABULARY
  previous = tasks.core._vocab_override  # pylint: disable=protected-access
  tasks.set_default_vocabulary(str(T5_VOCAB))
  try:
    ex = next(iter(tfds.as_numpy(task.get_dataset(SEQ_LEN, 'test', shuffle=False))))
    vocab = tasks.get_vocabulary()
    want = synthetic.generate_examples(name, 'test')[0]
    assert vocab.decode(ex['inputs']) == want['inputs']
    assert list(ex['targets']) == list(vocab.encode(want['targets'])) + [1]
  finally:
    tasks.set_default_vocabulary(previous)


@pytest.mark.parametrize('name,key', [('synthetic_parity_evenodd', 'accuracy'),
                                      ('synthetic_reverse_plain',
                                       'sequence_accuracy')])
def test_seqio_evaluator_metrics(name, key):
  """seqio's own evaluation loop: decode -> postprocess_fn -> metric_fns."""
  vocab = seqio.get_mixture_or_task(name).output_features['targets'].vocabulary
  evaluator = seqio.Evaluator(
      name, feature_converter=seqio.EncDecFeatureConverter(pack=False),
      eval_split='validation', sequence_length=SEQ_LEN)

  def predict(ds, model_feature_shapes=None, wrong_every=0):
    del model_feature_shapes
    out = []
    for i, ex in tfds.as_numpy(ds):  # (example index, model features)
      tokens = ex['decoder_target_tokens']
      if wrong_every and i % wrong_every:  # Same length (seqio stacks them).
        wrong = vocab.encode('zz') + [1]
        tokens = np.zeros_like(tokens)
        tokens[:len(wrong)] = wrong
      out.append((i, tokens))
    return out

  for wrong_every, expected in ((0, 100.0), (2, 50.0)):
    result, _ = evaluator.evaluate(
        compute_metrics=True,
        predict_fn=lambda ds, shapes=None, w=wrong_every: predict(ds, shapes, w))
    assert result.result()[name][key] == pytest.approx(expected)

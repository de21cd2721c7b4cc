"""Sentiment tasks besides SST-2 (which lives with GLUE): IMDB, SemEval-2014.

* `imdb`: TFDS imdb_reviews/plain_text:1.0.0, label words negative/positive.
  IMDB has no validation split; 'validation' is the tenth of 'train' whose text
  hashes (TF's stable fingerprint) to bucket 0, and 'train' the rest, so the
  split does not depend on file order.
* `semeval14_laptop`, `semeval14_restaurant`: SemEval-2014 Task 4 aspect-term
  polarity, read from the XML files the organisers publish. One example per
  aspect term: 'laptop sentence: <sentence> aspect: <term>' -> negative /
  moderate / positive / conflict (the organisers' negative / neutral / positive
  / conflict; 'moderate' as in the prompt-transferability work). The train file
  gives 'train' and, every tenth sentence, 'validation'; the gold test file gives
  'test'.
"""
from __future__ import annotations

import functools
from typing import Any, Mapping
import xml.etree.ElementTree as ET

import tensorflow as tf

from tasks import core
from tasks import metrics
from tasks import preprocessors

IMDB_LABEL_WORDS = ('negative', 'positive')
SEMEVAL_LABEL_WORDS = ('negative', 'moderate', 'positive', 'conflict')
_POLARITY = {'negative': 0, 'neutral': 1, 'positive': 2, 'conflict': 3}

SEMEVAL_FILES = {
    'laptop': ('Laptop_Train_v2.xml', 'Laptops_Test_Gold.xml'),
    'restaurant': ('Restaurants_Train_v2.xml', 'Restaurants_Test_Gold.xml'),
}
SEMEVAL_SUBDIR = 'semeval14'
_SEMEVAL_HELP = (
    'They are the SemEval-2014 Task 4 (aspect based sentiment analysis) '
    'training data v2 and gold test data, published by the organisers '
    '(alt.qcri.org/semeval2014/task4, "Data and Tools"; the gold test files are '
    'also on META-SHARE).')


def _imdb_held_out(x: Mapping[str, tf.Tensor]) -> tf.Tensor:
  return tf.equal(tf.strings.to_hash_bucket_fast(x['text'], 10), 0)


core.add_task(
    'imdb',
    core.TfdsSource(
        'imdb', 'imdb_reviews/plain_text:1.0.0',
        splits={'train': 'train', 'validation': 'train', 'test': 'test'},
        # Hash split sizes are approximate; they only set mixing rates.
        sizes={'train': 22500, 'validation': 2500, 'test': 25000},
        filters={'train': lambda x: tf.logical_not(_imdb_held_out(x)),
                 'validation': _imdb_held_out}),
    [functools.partial(preprocessors.imdb, label_words=IMDB_LABEL_WORDS)],
    task_type='sentiment', kind='classification', label_words=IMDB_LABEL_WORDS,
    metric_fns=[metrics.accuracy], metric_names=['accuracy'],
    postprocess_fn=metrics.make_label_postprocessor(IMDB_LABEL_WORDS),
    splits=['train', 'validation', 'test'],
    source_desc='tfds:imdb_reviews/plain_text:1.0.0',
    description='IMDB movie reviews (sentiment)')


def read_semeval14(path: str, split: str) -> list[dict[str, Any]]:
  """Aspect-term examples of one SemEval-2014 Task 4 XML file.

  Args:
    path: a *_Train_v2.xml or *_Test_Gold.xml file.
    split: 'train' / 'validation' (every tenth sentence of a training file) or
      'test' (all sentences).

  Returns:
    [{'sentence', 'aspect', 'label'}], label indexing SEMEVAL_LABEL_WORDS.
  """
  root = ET.parse(path).getroot()
  rows = []
  for i, sentence in enumerate(root.iter('sentence')):
    if split != 'test' and (i % 10 == 9) != (split == 'validation'):
      continue
    text = ' '.join((sentence.findtext('text') or '').split())
    terms = sentence.find('aspectTerms')
    if terms is None:
      continue
    for term in terms.iter('aspectTerm'):
      polarity = term.get('polarity')
      if polarity not in _POLARITY:  # Skip unlabelled terms (e.g. test input files).
        continue
      rows.append({'sentence': text, 'aspect': term.get('term', ''),
                   'label': _POLARITY[polarity]})
  return rows


def _register_semeval(domain: str) -> None:
  train_file, test_file = SEMEVAL_FILES[domain]
  name = f'semeval14_{domain}'

  def read(split: str, paths: Mapping[str, str]) -> list[dict[str, Any]]:
    return read_semeval14(paths[test_file if split == 'test' else train_file],
                          split)

  source = core.FileSource(
      name, SEMEVAL_SUBDIR,
      files={'train': (train_file,), 'validation': (train_file,),
             'test': (test_file,)},
      read_fn=read,
      columns={'sentence': tf.string, 'aspect': tf.string, 'label': tf.int32},
      how_to_get=_SEMEVAL_HELP)
  core.add_task(
      name, source,
      [functools.partial(preprocessors.aspect_sentiment, benchmark=domain,
                         label_words=SEMEVAL_LABEL_WORDS)],
      task_type='sentiment', kind='classification',
      label_words=SEMEVAL_LABEL_WORDS,
      metric_fns=[metrics.accuracy, metrics.make_f1_macro(4)],
      metric_names=['accuracy', 'f1_macro'],
      postprocess_fn=metrics.make_label_postprocessor(SEMEVAL_LABEL_WORDS),
      splits=['train', 'validation', 'test'],
      source_desc=f'files:{SEMEVAL_SUBDIR}/{{{train_file},{test_file}}}',
      description=f'SemEval-2014 Task 4 {domain} aspect polarity (sentiment)')


for _domain in SEMEVAL_FILES:
  _register_semeval(_domain)

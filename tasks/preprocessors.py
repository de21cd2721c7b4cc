"""Text preprocessors: raw examples -> {'inputs': text, 'targets': text, ...}.

Formats follow T5 ("sst2 sentence: ...", "mnli hypothesis: ... premise: ...")
so checkpoints and prompts trained on T5's tasks meet the same text; targets are
label words. Extra keys kept for metrics (idx, label, answers, group ids) pass
through tokenisation untouched.

Also the rank-classification helpers: one (inputs, label word) pair per class.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import seqio
import tensorflow as tf

UNK = '<unk>'


def _join(parts: Sequence[Any]) -> tf.Tensor:
  return tf.strings.join(list(parts), separator=' ')


def label_text(label: tf.Tensor, label_words: Sequence[str]) -> tf.Tensor:
  """The label word of a class index; '<unk>' for -1 (unlabelled test splits)."""
  words = tf.constant(list(label_words))
  idx = tf.cast(label, tf.int32)
  valid = tf.logical_and(idx >= 0, idx < len(label_words))
  return tf.where(valid, tf.gather(words, tf.clip_by_value(idx, 0, len(label_words) - 1)),
                  tf.constant(UNK))


@seqio.map_over_dataset
def classification_text(x: Mapping[str, tf.Tensor], benchmark: str,
                        feature_names: Sequence[str],
                        label_words: Sequence[str],
                        label_key: str = 'label') -> dict[str, tf.Tensor]:
  """T5's GLUE format: '<benchmark> <f1>: <x[f1]> <f2>: <x[f2]>' -> label word."""
  parts = [benchmark]
  for f in feature_names:
    parts += [f'{f}:', x[f]]
  out = {
      'inputs': _join(parts),
      'targets': label_text(x[label_key], label_words),
      'label': tf.cast(x[label_key], tf.int32),
  }
  if 'idx' in x and not isinstance(x['idx'], Mapping):
    out['idx'] = tf.cast(x['idx'], tf.int32)
  return out


@seqio.map_over_dataset
def stsb(x: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
  """STS-B as text: the score rounded to the nearest 0.2, e.g. '3.8' (T5)."""
  score = tf.round(tf.cast(x['label'], tf.float32) * 5.0) / 5.0
  return {
      'inputs': _join(['stsb sentence1:', x['sentence1'], 'sentence2:',
                       x['sentence2']]),
      'targets': tf.strings.as_string(score, precision=1),
      'idx': tf.cast(x['idx'], tf.int32),
  }


STSB_LABEL_WORDS = tuple(f'{i / 5:.1f}' for i in range(26))  # 0.0, 0.2, ..., 5.0


@seqio.map_over_dataset
def imdb(x: Mapping[str, tf.Tensor], label_words: Sequence[str]
         ) -> dict[str, tf.Tensor]:
  """'imdb review: <text>' with the HTML line breaks of the raw reviews removed."""
  text = tf.strings.regex_replace(x['text'], r'<br\s*/?>', ' ')
  text = tf.strings.strip(tf.strings.regex_replace(text, r'\s+', ' '))
  return {
      'inputs': _join(['imdb review:', text]),
      'targets': label_text(x['label'], label_words),
      'label': tf.cast(x['label'], tf.int32),
  }


@seqio.map_over_dataset
def aspect_sentiment(x: Mapping[str, tf.Tensor], benchmark: str,
                     label_words: Sequence[str]) -> dict[str, tf.Tensor]:
  """SemEval-2014 aspect polarity: '<benchmark> sentence: <s> aspect: <term>'."""
  return {
      'inputs': _join([benchmark, 'sentence:', x['sentence'], 'aspect:',
                       x['aspect']]),
      'targets': label_text(x['label'], label_words),
      'label': tf.cast(x['label'], tf.int32),
  }


@seqio.map_over_dataset
def fewrel(x: Mapping[str, tf.Tensor], label_words: Sequence[str]
           ) -> dict[str, tf.Tensor]:
  """'fewrel sentence: <s> head: <h> tail: <t>' -> relation name."""
  return {
      'inputs': _join(['fewrel sentence:', x['sentence'], 'head:', x['head'],
                       'tail:', x['tail']]),
      'targets': label_text(x['label'], label_words),
      'label': tf.cast(x['label'], tf.int32),
  }


def _group_id(a: tf.Tensor, b: tf.Tensor) -> tf.Tensor:
  # Unique whether the inner index is global or per outer item.
  return tf.cast(a, tf.int64) * 1_000_000 + tf.cast(b, tf.int64)


@seqio.map_over_dataset
def multirc(x: Mapping[str, tf.Tensor], label_words: Sequence[str]
            ) -> dict[str, tf.Tensor]:
  """T5's MultiRC: 'multirc question: .. answer: .. paragraph: ..' -> False/True."""
  return {
      'inputs': _join(['multirc question:', x['question'], 'answer:',
                       x['answer'], 'paragraph:', x['paragraph']]),
      'targets': label_text(x['label'], label_words),
      'label': tf.cast(x['label'], tf.int32),
      'question_idx': _group_id(x['idx']['paragraph'], x['idx']['question']),
  }


def _escape_regex(s: tf.Tensor) -> tf.Tensor:
  return tf.strings.regex_replace(s, r'([.^$*+?(){}\[\]|\\])', r'\\\1')


def _mark_span(text: tf.Tensor, span: tf.Tensor, index: tf.Tensor,
               mark: str) -> tf.Tensor:
  """Surrounds the span starting at word `index` with `mark` (T5's WSC format)."""
  pattern = tf.strings.join([
      r'^((?:\S+\s){', tf.strings.as_string(index), r'})(', _escape_regex(span),
      r')'])
  return tf.strings.regex_replace(text, pattern, r'\1' + mark + r' \2 ' + mark)


@seqio.map_over_dataset
def wsc(x: Mapping[str, tf.Tensor], label_words: Sequence[str]
        ) -> dict[str, tf.Tensor]:
  """T5's WSC: the noun in '* *', the pronoun in '# #' -> does the pronoun refer to it?"""
  text = _mark_span(x['text'], x['span1_text'], x['span1_index'], '*')
  # The first mark added two words before span 2 if span 1 came first.
  span2_index = x['span2_index'] + 2 * tf.cast(
      x['span1_index'] < x['span2_index'], x['span2_index'].dtype)
  text = _mark_span(text, x['span2_text'], span2_index, '#')
  return {
      'inputs': _join(['wsc text:', text]),
      'targets': label_text(x['label'], label_words),
      'label': tf.cast(x['label'], tf.int32),
      'idx': tf.cast(x['idx'], tf.int32),
  }


def record(dataset: tf.data.Dataset) -> tf.data.Dataset:
  """T5's ReCoRD: one example per gold answer; 'answers' keeps all for scoring.

  Input: 'record query: <query> entities: <e1>, <e2> passage: <passage>' with
  the '@highlight' lines of the passage turned into sentences.
  """

  def expand(x):
    passage = tf.strings.regex_replace(
        x['passage'], r'(\.|\?|\!|\"|\')\n@highlight\n', r'\1 ')
    passage = tf.strings.regex_replace(passage, r'\n@highlight\n', '. ')
    inputs = _join(['record query:', x['query'], 'entities:',
                    tf.strings.reduce_join(x['entities'], separator=', '),
                    'passage:', passage])
    answers = x['answers']
    n = tf.size(answers)
    targets = tf.cond(n > 0, lambda: answers, lambda: tf.constant([UNK]))
    copies = tf.maximum(n, 1)
    return {
        'inputs': tf.fill([copies], inputs),
        'targets': targets,
        'answers': tf.tile(answers[tf.newaxis], [copies, 1]),
        'query_idx': tf.fill([copies], _group_id(x['idx']['passage'],
                                                 x['idx']['query'])),
    }

  return dataset.map(expand, num_parallel_calls=tf.data.AUTOTUNE).unbatch()


@seqio.map_over_dataset
def squad(x: Mapping[str, tf.Tensor], benchmark: str = 'squad'
          ) -> dict[str, tf.Tensor]:
  """'<benchmark> question: <q> context: <c>' -> first answer, or 'unanswerable'."""
  answers = x['answers']['text']
  # The first answer, or 'unanswerable' when there is none (SQuAD 2.0).
  target = tf.concat([answers, tf.constant(['unanswerable'])], axis=0)[0]
  return {
      'inputs': _join([f'{benchmark} question:', x['question'], 'context:',
                       x['context']]),
      'targets': target,
      'answers': answers,
      'id': x['id'],
  }


@seqio.map_over_dataset
def summarize(x: Mapping[str, tf.Tensor], document_key: str = 'document',
              summary_key: str = 'summary') -> dict[str, tf.Tensor]:
  """T5's 'summarize: <document>' -> summary."""
  return {
      'inputs': _join(['summarize:', x[document_key]]),
      'targets': x[summary_key],
  }


# ------------------------------------------------------ rank classification ---


def rank_classification_pairs(example: Mapping[str, Any],
                              label_words: Sequence[str]) -> list[dict[str, Any]]:
  """One candidate per class for a text example: score each, predict the best.

  Args:
    example: a preprocessed example with text 'inputs' and 'targets'.
    label_words: the task's label words (tasks.get_label_words).

  Returns:
    [{'inputs', 'targets' (label word), 'choice' (class index), 'is_correct'}].
  """
  inputs = example['inputs']
  target = example.get('targets')
  if isinstance(target, bytes):
    target = target.decode('utf-8')
  return [{'inputs': inputs, 'targets': w, 'choice': i, 'is_correct': w == target}
          for i, w in enumerate(label_words)]


def rank_classification(dataset: tf.data.Dataset, label_words: Sequence[str],
                        keep_features: bool = False) -> tf.data.Dataset:
  """Text dataset -> one example per (example, class), for scoring-based eval.

  Output keys: 'inputs', 'targets' (the label word), 'idx' (example number),
  'choice' (class index), 'label' (true class index, -1 if the target is no
  label word) and 'is_correct'. With `keep_features`, also 'gold_targets' (the
  example's own target text) and every other scalar feature of the example
  (e.g. MultiRC's 'question_idx'), repeated on each of its rows, so a task's
  postprocess_fn can still read them.
  """
  words = tf.constant(list(label_words))
  n = len(label_words)
  own = ('inputs', 'targets', 'idx', 'choice', 'label', 'is_correct',
         'gold_targets')

  def expand(i, x):
    match = tf.equal(words, x['targets'])
    label = tf.where(tf.reduce_any(match),
                     tf.cast(tf.argmax(tf.cast(match, tf.int32)), tf.int32), -1)
    choices = tf.range(n, dtype=tf.int32)
    out = {}
    if keep_features:
      out = {k: tf.fill([n], v) for k, v in x.items()
             if k not in own and v.shape.rank == 0}
      out['gold_targets'] = tf.fill([n], x['targets'])
    out.update({
        'inputs': tf.fill([n], x['inputs']),
        'targets': words,
        'idx': tf.fill([n], tf.cast(i, tf.int32)),
        'choice': choices,
        'label': tf.fill([n], label),
        'is_correct': tf.equal(choices, label),
    })
    return tf.data.Dataset.from_tensor_slices(out)

  return dataset.enumerate().flat_map(expand)


def rank_classification_dataset(
    task_name: str, split: str,
    sequence_length: Optional[Mapping[str, int]] = None,
    vocabulary: Optional[seqio.Vocabulary] = None) -> tf.data.Dataset:
  """A task's split, tokenised, expanded to one example per class.

  Each example of `task.get_dataset(...)` becomes one example per label word
  with the same 'inputs' tokens and 'targets' = tokens of the word + EOS, plus
  'idx', 'choice', 'label', 'is_correct' and the *_pretokenized texts. Score
  each with the model and take the best choice per 'idx'
  (`rank_classification_predictions`).
  """
  # Imported here: core imports nothing from this module, but keep it lazy.
  from tasks import core  # pylint: disable=g-import-not-at-top
  task = seqio.get_mixture_or_task(task_name)
  label_words = core.get_label_words(task_name)
  vocab = vocabulary or task.output_features['targets'].vocabulary
  eos = vocab.eos_id
  encoded = [list(vocab.encode(w)) + [eos] for w in label_words]
  if sequence_length and sequence_length.get('targets'):
    limit = sequence_length['targets']
    encoded = [e[:limit - 1] + [eos] if len(e) > limit else e for e in encoded]
  word_tokens = tf.ragged.constant(encoded, dtype=tf.int32)
  words = tf.constant(list(label_words))
  n = len(label_words)
  ds = task.get_dataset(sequence_length=sequence_length, split=split,
                        shuffle=False)

  def expand(i, x):
    match = tf.equal(words, x['targets_pretokenized'])
    label = tf.where(tf.reduce_any(match),
                     tf.cast(tf.argmax(tf.cast(match, tf.int32)), tf.int32), -1)
    choices = tf.range(n, dtype=tf.int32)
    return tf.data.Dataset.from_tensor_slices({
        'inputs': tf.tile(x['inputs'][tf.newaxis], [n, 1]),
        'inputs_pretokenized': tf.fill([n], x['inputs_pretokenized']),
        'targets': word_tokens,
        'targets_pretokenized': words,
        'idx': tf.fill([n], tf.cast(i, tf.int32)),
        'choice': choices,
        'label': tf.fill([n], label),
        'is_correct': tf.equal(choices, label),
    })

  def densify(x):
    return {k: (v.to_tensor() if isinstance(v, tf.RaggedTensor) else v)
            for k, v in x.items()}

  return ds.enumerate().flat_map(expand).map(densify)


def rank_classification_predictions(idx: Sequence[int], choice: Sequence[int],
                                    scores: Sequence[float]) -> dict[int, int]:
  """Per example ('idx'), the choice with the highest score (log-likelihood)."""
  best: dict[int, tuple[float, int]] = {}
  for i, c, s in zip(idx, choice, scores):
    i, c, s = int(i), int(c), float(s)
    if i not in best or s > best[i][0]:
      best[i] = (s, c)
  return {i: c for i, (_, c) in sorted(best.items())}

"""Rank-classification twins: `<task>_rank` scores every label word, no decoding.

For a task with fixed label words, `add_rank_task(name)` registers
`<name>_rank`:

* 'train' is the task's own text-to-text split (same inputs, label-word
  targets), so one can train on the twin as on the task.
* every other split (validation, test, MNLI's validation_mismatched, ...) holds
  one example per (input, label word): 'targets' is the candidate word, 'idx'
  numbers the original example, 'choice' the class, 'is_correct' marks the gold
  candidate, 'gold_targets' keeps the example's own target text, and the other
  scalar features of the example (e.g. MultiRC's 'question_idx') are repeated.
* the task's only metric is a *score* metric (`metric_fn(targets, scores)`), so
  `seqio.Evaluator` calls the `score_fn` (the log-likelihood of each candidate,
  `prompt_transfer.training.evaluation.make_score_fn`) instead of decoding; per 'idx' the
  highest-scoring candidate is the prediction. The prediction and the gold
  target go through the original task's postprocess_fn and then its own metric
  fns, so the twin reports the same metric names (accuracy, mcc, f1, F1a/EM,
  ...) as the task, computed from ranked rather than decoded answers.

seqio 0.0.20 itself ships no rank-classification preprocessor or metric (they
live in T5's `t5.data` / `t5.evaluation`, which is not a dependency here), so
the expansion is `tasks.preprocessors.rank_classification` and the metric is
built here in seqio's score-metric form.

Twins are registered on import for every classification task of the catalogue
(GLUE, SuperGLUE including MultiRC, IMDB, SemEval, FewRel and the synthetic
tasks; `RANK_TASKS`). Register one for your own task (any task made with
`tasks.core.add_task` that has label words) with `tasks.add_rank_task(name)`.

Note: `seqio.Evaluator(num_examples=N)` takes the first N *rows* of the
expanded split, i.e. N / (number of label words) examples; pass a multiple of
the number of label words so no example loses candidates.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence

import numpy as np
import seqio
import tensorflow as tf

from tasks import core
from tasks import preprocessors

RANK_SUFFIX = '_rank'
TRAIN_SPLIT = 'train'


def rank_task_name(name: str) -> str:
  return name + RANK_SUFFIX


class RankTarget(NamedTuple):
  """What the twin's postprocess_fn makes of one candidate row (is_target=True).

  idx: the original example; gold: the task's postprocessed gold target;
  prediction: what the task's postprocess_fn makes of this candidate's word
  (the prediction if this candidate scores best).
  """
  idx: int
  gold: Any
  prediction: Any


def _text(x: Any) -> str:
  if isinstance(x, np.ndarray):
    x = x.item()
  return x.decode('utf-8') if isinstance(x, bytes) else str(x)


def make_rank_postprocessor(base_postprocess: Optional[Callable[..., Any]]
                            ) -> Callable[..., Any]:
  """Twin postprocess_fn: a candidate row -> RankTarget (scores pass untouched)."""
  base = base_postprocess or (lambda output, example=None, is_target=False: output)

  def postprocess(output: Any, example: Optional[Mapping[str, Any]] = None,
                  is_target: bool = False) -> Any:
    if not is_target or example is None:
      return output
    gold_text = _text(example['gold_targets'])
    return RankTarget(
        idx=int(np.asarray(example['idx'])),
        gold=base(gold_text, example=example, is_target=True),
        prediction=base(_text(output), example=example, is_target=False))

  return postprocess


def make_rank_metric(metric_fns: Sequence[Callable[..., Mapping[str, float]]]
                     ) -> Callable[..., Mapping[str, float]]:
  """A seqio score metric: best candidate per example -> the task's metric fns."""
  metric_fns = tuple(metric_fns)

  def rank_metric(targets: Sequence[RankTarget], scores: Sequence[float]
                  ) -> dict[str, float]:
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(targets) != len(scores):
      raise ValueError(f'{len(targets)} candidates but {len(scores)} scores')
    best: dict[int, tuple[float, RankTarget]] = {}
    for t, s in zip(targets, scores):
      if t.idx not in best or s > best[t.idx][0]:  # Ties: the first candidate.
        best[t.idx] = (float(s), t)
    chosen = [best[i][1] for i in sorted(best)]
    gold = [t.gold for t in chosen]
    predictions = [t.prediction for t in chosen]
    out: dict[str, float] = {}
    for fn in metric_fns:
      out.update(fn(gold, predictions))
    return out

  rank_metric.__name__ = 'rank_' + '_'.join(
      getattr(f, '__name__', 'metric') for f in metric_fns)
  return rank_metric


class RankClassificationSource(seqio.DataSource):
  """The base task's source + text preprocessing; eval splits expanded per class.

  seqio passes no split to preprocessors, so the split-dependent expansion
  happens here, in the source; the twin task then only tokenises.
  """

  def __init__(self, name: str, base_name: str, base_source: seqio.DataSource,
               text_preprocessors: Sequence[Callable[..., tf.data.Dataset]],
               label_words: Sequence[str], rank_splits: Sequence[str],
               output_features: Mapping[str, seqio.Feature]):
    super().__init__(splits=base_source.splits,
                     caching_permitted=base_source.caching_permitted)
    self._name = name
    self._base_name = base_name
    self._base = base_source
    self._text_preprocessors = tuple(text_preprocessors)
    self._label_words = tuple(label_words)
    self._rank_splits = tuple(rank_splits)
    self._output_features = dict(output_features)

  @property
  def base(self) -> seqio.DataSource:
    return self._base

  @property
  def rank_splits(self) -> tuple[str, ...]:
    return self._rank_splits

  @property
  def supports_arbitrary_sharding(self) -> bool:
    return False

  def list_shards(self, split: str) -> Sequence[str]:
    # One shard for expanded splits: seqio then shards after the expansion, so
    # 'idx' stays one numbering over the whole split.
    if split in self._rank_splits:
      return [split]
    return self._base.list_shards(split)

  def get_dataset(self, split: str = 'train', shuffle: bool = True,
                  seed: Optional[int] = None, shard_info=None, **unused
                  ) -> tf.data.Dataset:
    del unused
    kwargs = {'shard_info': shard_info} if shard_info is not None else {}
    try:
      ds = self._base.get_dataset(split=split, shuffle=shuffle, seed=seed, **kwargs)
    except core.DataUnavailableError as e:
      raise core.DataUnavailableError(
          f'{self._name!r} is the rank-classification twin of '
          f'{self._base_name!r} and reads its data: {e}') from e
    for prep in self._text_preprocessors:
      prep = seqio.utils.add_kwargs_to_transform(
          prep, sequence_length=None, output_features=self._output_features)
      ds = prep(ds)
    if split in self._rank_splits:
      ds = preprocessors.rank_classification(ds, self._label_words,
                                             keep_features=True)
    return ds

  def num_input_examples(self, split: str) -> Optional[int]:
    n = self._base.num_input_examples(split)
    if n is not None and split in self._rank_splits:
      return n * len(self._label_words)
    return n

  def check(self, splits=None) -> None:
    check = getattr(self._base, 'check', None)
    if check is not None:
      check(splits)


def _text_preprocessors(task: seqio.Task) -> list[Callable[..., Any]]:
  preps = list(task.preprocessors)
  if seqio.preprocessors.tokenize not in preps:
    raise ValueError(f'Task {task.name!r} was not made with tasks.core.add_task '
                     '(no seqio.preprocessors.tokenize step); cannot make its '
                     'rank-classification twin.')
  return preps[:preps.index(seqio.preprocessors.tokenize)]


def add_rank_task(base_name: str, name: Optional[str] = None,
                  rank_splits: Optional[Sequence[str]] = None) -> seqio.Task:
  """Registers the rank-classification twin of a task with label words.

  Args:
    base_name: a task registered with `tasks.core.add_task` that has label
      words (`tasks.get_label_words`).
    name: the twin's name (default `<base_name>_rank`).
    rank_splits: splits expanded to one row per label word (default: all but
      'train').

  Returns:
    The registered seqio.Task.
  """
  name = name or rank_task_name(base_name)
  base = seqio.get_mixture_or_task(base_name)
  info = core.get_task_info(base_name)
  words = core.get_label_words(base_name)  # Raises for tasks without them.
  if base.score_metric_fns:
    raise ValueError(f'Task {base_name!r} already evaluates by scores.')
  if rank_splits is None:
    rank_splits = [s for s in info.splits if s != TRAIN_SPLIT]
  vocabulary = base.output_features['targets'].vocabulary
  source = RankClassificationSource(
      name, base_name, base.source, _text_preprocessors(base), words,
      rank_splits, base.output_features)
  return core.add_task(
      name, source, [], task_type=info.task_type, kind=info.kind,
      label_words=words,
      metric_fns=[make_rank_metric(base.predict_metric_fns)],
      metric_names=info.metric_names,
      postprocess_fn=make_rank_postprocessor(base.postprocess_fn),
      splits=info.splits, source_desc=info.source, vocabulary=vocabulary,
      family=info.family,
      description=f'{info.description}; rank classification over '
                  f'{len(words)} label words on {", ".join(rank_splits)}')


def _register_all() -> tuple[str, ...]:
  names = []
  for base_name in core.task_names():
    info = core.get_task_info(base_name)
    if (info.kind != 'classification' or info.label_words is None
        or base_name.endswith(RANK_SUFFIX)):
      continue
    names.append(add_rank_task(base_name).name)
  return tuple(names)


RANK_TASKS = _register_all()

"""The task pool of intrinsic prompt tuning: many small tasks, one frozen model.

IPT (Qin et al. 2021) needs prompts of many tasks (the authors: 100 training
and 20 held-out CrossFit tasks). This pool builds them from the rules the
stand-in models can do (tasks/synthetic.py), with inputs that carry no hint
of the task: the prompt alone says which rule to apply and which words to
answer with.

* Classification rules (binary), on two input kinds:
  `morea` (more a than b in a string over {a, b, c}), `moreb` (the same
  strings, more b than a), `greater` (first number larger: "{x} {y}"),
  `smaller` (first number smaller).
* 13 pairs of answer words (`WORDS`): no/yes, false/true, ..., lose/win.
* A task type is (rule, answer words): 4 x 13 = 52 types, task
  `pool_<rule>_<negative word>_<positive word>`. Ten are held out
  (`HELD_OUT_TASKS`): each pairs a rule with words the training tasks use
  only with other rules, so every held-out task is a type no training task
  covers. The other 42, plus `pool_copy` and `pool_reverse` (generation, on
  one input kind), are `TRAIN_TASKS` (44).
* "Seen tasks, new data": every task has a `<task>_newdata` twin, the same
  rule on examples drawn from another seed (data seed 1), for tuning a seen
  task on data the subspace was not found on.
* Mixtures (equal rates): `ipt_pool_train`, `ipt_pool_held_out`,
  `ipt_pool_train_newdata`.

Splits as in tasks/synthetic.py: train 2,000, validation 200, test 200,
disjoint and class-balanced. Byte vocabulary (the stand-in models').
"""
from __future__ import annotations

import functools
import random
from typing import Any, Callable, Optional

import seqio
import tensorflow as tf

from tasks import core
from tasks import synthetic

NEW_DATA = '_newdata'
NEW_DATA_SEED = 1
Sample = Callable[[random.Random], Optional[tuple[dict[str, Any], Any]]]


def _flipped(sample: Sample) -> Sample:
  def flipped(rng: random.Random):
    drawn = sample(rng)
    return None if drawn is None else (drawn[0], 1 - drawn[1])
  return flipped


# rule -> (sampler, input format, description)
RULES: dict[str, tuple[Sample, str, str]] = {
    'morea': (synthetic.RULES['majority'].sample, '{s}', 'more a than b in the string'),
    'moreb': (_flipped(synthetic.RULES['majority'].sample), '{s}', 'more b than a in the string'),
    'greater': (synthetic.RULES['greater'].sample, '{x} {y}', 'first number larger'),
    'smaller': (_flipped(synthetic.RULES['greater'].sample), '{x} {y}', 'first number smaller'),
}
GENERATION: dict[str, tuple[Sample, str, str]] = {
    'copy': (synthetic.RULES['copy'].sample, '{s}', 'copy the string'),
    'reverse': (synthetic.RULES['reverse'].sample, '{s}', 'reverse the string'),
}
# (answer for class 0, answer for class 1)
WORDS: tuple[tuple[str, str], ...] = (
    ('no', 'yes'), ('false', 'true'), ('negative', 'positive'), ('less', 'more'),
    ('lower', 'higher'), ('bad', 'good'), ('off', 'on'), ('down', 'up'), ('cold', 'hot'),
    ('small', 'big'), ('wrong', 'right'), ('zero', 'one'), ('lose', 'win'))


def task_name(rule: str, words: Optional[tuple[str, str]] = None) -> str:
  return f'pool_{rule}' + (f'_{words[0]}_{words[1]}' if words else '')


_RULE_NAMES = list(RULES)
# Held out: word pair i with rule i mod 4, for the first ten pairs.
HELD_OUT_TASKS: tuple[str, ...] = tuple(
    task_name(_RULE_NAMES[i % len(_RULE_NAMES)], WORDS[i]) for i in range(10))
CLASSIFICATION_TASKS: tuple[str, ...] = tuple(
    task_name(r, w) for w in WORDS for r in RULES)
TRAIN_TASKS: tuple[str, ...] = tuple(
    n for n in CLASSIFICATION_TASKS if n not in HELD_OUT_TASKS) + tuple(
        task_name(r) for r in GENERATION)
ALL_TASKS = TRAIN_TASKS + HELD_OUT_TASKS
# name -> (sampler, format, label words or None, description)
_SPEC: dict[str, tuple[Sample, str, Optional[tuple[str, str]], str]] = {}
for _rule, (_sample, _fmt, _desc) in RULES.items():
  for _words in WORDS:
    _SPEC[task_name(_rule, _words)] = (_sample, _fmt, _words, f'{_desc}: {"/".join(_words)}')
for _rule, (_sample, _fmt, _desc) in GENERATION.items():
  _SPEC[task_name(_rule)] = (_sample, _fmt, None, _desc)


def rule_of(name: str) -> str:
  """The rule of a pool task (or of its new-data twin)."""
  return base_name(name).split('_')[1]


def base_name(name: str) -> str:
  base = name[:-len(NEW_DATA)] if name.endswith(NEW_DATA) else name
  if base not in _SPEC:
    raise ValueError(f'Unknown pool task {name!r}; known: pool_<rule>_<words> with rules '
                     f'{sorted(RULES)}, or {sorted(task_name(r) for r in GENERATION)}.')
  return base


@functools.lru_cache(maxsize=None)
def _generate(name: str) -> dict[str, tuple[dict[str, Any], ...]]:
  base = base_name(name)
  sample, fmt, words, _ = _SPEC[base]
  seed = NEW_DATA_SEED if name.endswith(NEW_DATA) else synthetic.DEFAULT_SEED
  return synthetic.make_splits(sample, fmt, words, base, seed)


def generate_examples(name: str, split: str) -> list[dict[str, Any]]:
  """The examples of a pool task's split: [{'inputs', 'targets', 'label'}]."""
  return [dict(r) for r in _generate(name)[split]]


def _dataset_fn(split: str, shuffle_files: bool, seed: Optional[int] = None, *,
                name: str) -> tf.data.Dataset:
  del shuffle_files, seed  # fixed data; seqio shuffles later
  return synthetic.rows_dataset(_generate(name)[split])


def register(name: str) -> seqio.Task:
  _, _, words, description = _SPEC[base_name(name)]
  kind, metric_fns, metric_names, postprocess = synthetic.scoring(words)
  source = seqio.FunctionDataSource(
      functools.partial(_dataset_fn, name=name), splits=list(synthetic.SPLIT_SIZES),
      num_input_examples=dict(synthetic.SPLIT_SIZES))
  return core.add_task(
      name, source, [], task_type='synthetic', kind=kind, label_words=words,
      metric_fns=metric_fns, metric_names=metric_names, postprocess_fn=postprocess,
      splits=list(synthetic.SPLIT_SIZES),
      source_desc=f'pool:seed={NEW_DATA_SEED if name.endswith(NEW_DATA) else 0}',
      vocabulary=synthetic.BYTE_VOCABULARY, family=f'pool_{rule_of(name)}',
      description=description + (' (new data)' if name.endswith(NEW_DATA) else ''))


for _name in _SPEC:
  register(_name)
  register(_name + NEW_DATA)
# Equal rates (every task has 2,000 training examples).
MIXTURES = {'ipt_pool_train': TRAIN_TASKS, 'ipt_pool_held_out': HELD_OUT_TASKS,
            'ipt_pool_train_newdata': tuple(n + NEW_DATA for n in TRAIN_TASKS)}
for _mixture, _tasks in MIXTURES.items():
  core.add_mixture(_mixture, _tasks, maximum=None)

"""Synthetic task families whose relatedness is known by construction.

No data files: examples are generated deterministically from a seed, short
(inputs <= 48 characters) so a tiny model on a CPU learns them in minutes.

Families (one labelling rule each), every classification rule phrased by
several templates:

* `majority`: does a string over {a, b, c} hold more a's than b's?
* `parity`: does a binary string hold an even number of 1s?
* `greater`: is the first number larger than the second?
* `copy`, `reverse`: copy / reverse a short string (generation).

Tasks of one family share the rule, so a prompt trained on one should transfer
to the others; across families the rules are unrelated. Label words recur
across families (yes/no, true/false, negative/positive), so shared label words
alone do not make tasks related.

Task types (`TASK_TYPES`): what the SPoT and Prompt-Transferability papers
call related tasks share both the rule and the verbalizer (sentiment tasks
answer positive/negative, NLI tasks entailment/...). Each classification rule
has one type of two templates with label words no other type uses:
majority -> negative/positive (`posneg`, `mood`), parity -> odd/even
(`evenodd`, `oddeven`), greater -> lower/higher (`higher`, `versus`).
Majority has a second such pair, `count` and `tally` (less/more), unseen by
the bundled tiny model's pretraining (its words too): the `make demo` pair,
where a prompt trained on `count` answers `tally` before any training.

Names: `synthetic_<rule>_<template>` use `seqio.ByteVocabulary()` (no
SentencePiece file; the quick-start's tiny model); `..._t5` twins use the T5
vocabulary (tasks.set_default_vocabulary). `FAMILIES` / `FAMILIES_T5` map a
family to its task names; `LABEL_WORDS` maps a task to its label words (None for
generation). Splits: train 2,000, validation 200, test 200, disjoint.
"""
from __future__ import annotations

import dataclasses
import functools
import random
from typing import Any, Callable, Optional, Sequence

import seqio
import tensorflow as tf

from tasks import core
from tasks import metrics

SPLIT_SIZES = {'train': 2000, 'validation': 200, 'test': 200}
DEFAULT_SEED = 0
MAX_INPUT_CHARS = 48
BYTE_VOCABULARY = seqio.ByteVocabulary()


def _randint(rng: random.Random, lo: int, hi: int) -> int:
  # Only random() is guaranteed to give the same stream on every Python version.
  return lo + int(rng.random() * (hi - lo + 1))


def _string(rng: random.Random, alphabet: str, lo: int, hi: int) -> str:
  n = _randint(rng, lo, hi)
  return ''.join(alphabet[_randint(rng, 0, len(alphabet) - 1)] for _ in range(n))


def _majority(rng: random.Random) -> Optional[tuple[dict[str, Any], Any]]:
  s = _string(rng, 'abc', 8, 16)
  a, b = s.count('a'), s.count('b')
  return None if a == b else ({'s': s}, int(a > b))


def _parity(rng: random.Random) -> tuple[dict[str, Any], Any]:
  s = _string(rng, '01', 6, 14)
  return {'s': s}, int(s.count('1') % 2 == 0)


def _greater(rng: random.Random) -> Optional[tuple[dict[str, Any], Any]]:
  x, y = _randint(rng, 0, 999), _randint(rng, 0, 999)
  return None if x == y else ({'x': x, 'y': y}, int(x > y))


def _copy(rng: random.Random) -> tuple[dict[str, Any], Any]:
  s = _string(rng, 'abcdefghijklmnopqrstuvwxyz', 3, 12)
  return {'s': s}, s


def _reverse(rng: random.Random) -> tuple[dict[str, Any], Any]:
  s = _string(rng, 'abcdefghijklmnopqrstuvwxyz', 3, 12)
  return {'s': s}, s[::-1]


@dataclasses.dataclass(frozen=True)
class Rule:
  """A labelling rule: a sampler of (fields, label-or-target) and its templates.

  templates: template name -> (input format, label words by class or None).
  """
  sample: Callable[[random.Random], Optional[tuple[dict[str, Any], Any]]]
  templates: dict[str, tuple[str, Optional[tuple[str, ...]]]]
  description: str

  @property
  def is_classification(self) -> bool:
    return next(iter(self.templates.values()))[1] is not None


RULES = {
    'majority': Rule(_majority, {
        'yesno': ('more a than b? {s}', ('no', 'yes')),
        'truefalse': ('{s} has more a than b:', ('false', 'true')),
        'posneg': ('a vs b mood: {s}', ('negative', 'positive')),
        'mood': ('mood of {s} if a is good, b bad:', ('negative', 'positive')),
        'count': ('count a against b in {s}:', ('less', 'more')),
        'tally': ('{s} tally of a minus b:', ('less', 'more')),
    }, 'more a than b in the string'),
    'parity': Rule(_parity, {
        'yesno': ('even number of 1s? {s}', ('no', 'yes')),
        'truefalse': ('{s} has an even count of 1s:', ('false', 'true')),
        'evenodd': ('parity of {s}:', ('odd', 'even')),
        'oddeven': ('is the 1-count of {s} odd or even?', ('odd', 'even')),
    }, 'even number of 1s in a binary string'),
    'greater': Rule(_greater, {
        'yesno': ('is {x} more than {y}?', ('no', 'yes')),
        'truefalse': ('{x} > {y}:', ('false', 'true')),
        'posneg': ('compare {x} to {y}:', ('negative', 'positive')),
        'higher': ('{x} vs {y}:', ('lower', 'higher')),
        'versus': ('rank {x} against {y}:', ('lower', 'higher')),
    }, 'first number larger than the second'),
    # echo/again and mirror/backwards: phrasings the stand-ins' pretraining
    # never saw (it saw `plain`), the generative task types of cross-model
    # transfer (bench/cross_model.py).
    'copy': Rule(_copy, {'plain': ('copy: {s}', None), 'echo': ('echo: {s}', None),
                         'again': ('say again: {s}', None)}, 'copy a string'),
    'reverse': Rule(_reverse, {'plain': ('reverse: {s}', None), 'mirror': ('mirror: {s}', None),
                               'backwards': ('backwards: {s}', None)},
                    'reverse a string'),
}

T5_SUFFIX = '_t5'
# Template names must not end a task name in '_rank' (tasks.rank's twins).
assert all(t != 'rank' for r in RULES.values() for t in r.templates)


def task_name(rule: str, template: str, t5: bool = False) -> str:
  return f'synthetic_{rule}_{template}' + (T5_SUFFIX if t5 else '')


FAMILIES: dict[str, list[str]] = {
    r: [task_name(r, t) for t in rule.templates] for r, rule in RULES.items()}
FAMILIES_T5: dict[str, list[str]] = {
    r: [task_name(r, t, True) for t in rule.templates] for r, rule in RULES.items()}
_SPEC: dict[str, tuple[str, str]] = {}
for _rule, _r in RULES.items():
  for _template in _r.templates:
    _SPEC[task_name(_rule, _template)] = (_rule, _template)
    _SPEC[task_name(_rule, _template, True)] = (_rule, _template)
LABEL_WORDS: dict[str, Optional[tuple[str, ...]]] = {
    name: RULES[r].templates[t][1] for name, (r, t) in _SPEC.items()}

# Task types: same rule and same verbalizer, other phrasing (see the docstring).
TASK_TYPES: dict[str, list[str]] = {
    'majority': [task_name('majority', 'posneg'), task_name('majority', 'mood')],
    'parity': [task_name('parity', 'evenodd'), task_name('parity', 'oddeven')],
    'greater': [task_name('greater', 'higher'), task_name('greater', 'versus')],
}

# `make demo`: a prompt trained on the source starts the target (same rule and
# answer words, other phrasing; neither seen by the tiny model's pretraining).
DEMO_SOURCE = 'synthetic_majority_count'
DEMO_TARGET = 'synthetic_majority_tally'
# runs/quickstart.gin's task, and the pair the tiny model's pretraining left out
# (tools/make_tiny_checkpoint.py).
QUICKSTART_SOURCE = 'synthetic_majority_yesno'
QUICKSTART_TARGET = 'synthetic_majority_truefalse'


def family_of(name: str) -> str:
  """The rule (family) a synthetic task belongs to."""
  return _spec(name)[0]


def related(a: str, b: str) -> bool:
  """True when two synthetic tasks share their labelling rule."""
  return family_of(a) == family_of(b)


def same_type(a: str, b: str) -> bool:
  """True when two synthetic tasks share rule and label words (one task type)."""
  return related(a, b) and LABEL_WORDS[_base(a)] == LABEL_WORDS[_base(b)]


def _base(name: str) -> str:
  _spec(name)
  return name[:-len(T5_SUFFIX)] if name.endswith(T5_SUFFIX) else name


def _spec(name: str) -> tuple[str, str]:
  if name not in _SPEC:
    raise ValueError(f'Unknown synthetic task {name!r}; known: {sorted(_SPEC)}')
  return _SPEC[name]


def make_splits(sample: Callable[[random.Random], Optional[tuple[dict[str, Any], Any]]],
                fmt: str, label_words: Optional[tuple[str, ...]], key: str, seed: int
                ) -> dict[str, tuple[dict[str, Any], ...]]:
  """Disjoint, class-balanced splits (SPLIT_SIZES) of one rule and template;
  the same (key, seed) always gives the same examples, on any machine."""
  rng = random.Random(f'{seed}/{key}')
  seen: set[tuple[Any, ...]] = set()
  out = {}
  for split, size in SPLIT_SIZES.items():  # Later splits avoid earlier examples.
    rows = []
    while len(rows) < size:
      drawn = sample(rng)
      if drawn is None:
        continue
      fields, label = drawn
      # Alternate the classes so every split is balanced.
      if label_words is not None and label != len(rows) % 2:
        continue
      k = tuple(sorted(fields.items()))
      if k in seen:
        continue
      seen.add(k)
      rows.append({
          'inputs': fmt.format(**fields),
          'targets': label_words[label] if label_words else label,
          'label': label if label_words else -1,
      })
    for i in range(len(rows) - 1, 0, -1):  # Fisher-Yates with random() only.
      j = int(rng.random() * (i + 1))
      rows[i], rows[j] = rows[j], rows[i]
    out[split] = tuple(rows)
  return out


@functools.lru_cache(maxsize=64)
def _generate(name: str, seed: int) -> dict[str, tuple[dict[str, Any], ...]]:
  rule_name, template = _spec(name)
  rule = RULES[rule_name]
  fmt, label_words = rule.templates[template]
  # The T5 twin gets the same examples as its byte-level task.
  base = name[:-len(T5_SUFFIX)] if name.endswith(T5_SUFFIX) else name
  return make_splits(rule.sample, fmt, label_words, base, seed)


def generate_examples(name: str, split: str, seed: int = DEFAULT_SEED
                      ) -> list[dict[str, Any]]:
  """The examples of a synthetic task's split: [{'inputs', 'targets', 'label'}].

  The same (name, split, seed) always gives the same examples, on any machine.
  """
  if split not in SPLIT_SIZES:
    raise ValueError(f'Unknown split {split!r}; splits: {list(SPLIT_SIZES)}')
  return [dict(r) for r in _generate(name, seed)[split]]


def _dataset_fn(split: str, shuffle_files: bool, seed: Optional[int] = None, *,
                name: str, data_seed: int) -> tf.data.Dataset:
  del shuffle_files, seed  # Data are fixed by data_seed; seqio shuffles later.
  return rows_dataset(_generate(name, data_seed)[split])


def rows_dataset(rows: Sequence[dict[str, Any]]) -> tf.data.Dataset:
  """Generated examples as the dataset of a seqio source."""
  return tf.data.Dataset.from_tensor_slices({
      'inputs': tf.constant([r['inputs'] for r in rows], tf.string),
      'targets': tf.constant([r['targets'] for r in rows], tf.string),
      'label': tf.constant([r['label'] for r in rows], tf.int32),
  })


def scoring(label_words: Optional[Sequence[str]]) -> tuple:
  """(kind, metric fns, metric names, postprocess fn) of a generated task:
  accuracy over label words, or exact-match sequence accuracy."""
  if label_words is not None:
    return ('classification', [metrics.accuracy], ['accuracy'],
            metrics.make_label_postprocessor(label_words))
  return 'generation', [metrics.sequence_accuracy], ['sequence_accuracy'], metrics.text_postprocess


def register(name: str, vocabulary: seqio.Vocabulary,
             seed: int = DEFAULT_SEED) -> seqio.Task:
  """Registers one synthetic task (also usable for other seeds / vocabularies)."""
  rule_name, template = _spec(name)
  label_words = LABEL_WORDS[name]
  kind, metric_fns, metric_names, postprocess = scoring(label_words)
  source = seqio.FunctionDataSource(
      functools.partial(_dataset_fn, name=name, data_seed=seed),
      splits=list(SPLIT_SIZES), num_input_examples=dict(SPLIT_SIZES))
  return core.add_task(
      name, source, [], task_type='synthetic', kind=kind,
      label_words=label_words, metric_fns=metric_fns, metric_names=metric_names,
      postprocess_fn=postprocess, splits=list(SPLIT_SIZES),
      source_desc=f'synthetic:seed={seed}', vocabulary=vocabulary,
      family=rule_name,
      description=f'{RULES[rule_name].description} ({template} template)')


for _name in _SPEC:
  register(_name, core.DEFAULT_VOCABULARY if _name.endswith(T5_SUFFIX)
           else BYTE_VOCABULARY)

SYNTHETIC_TASKS = tuple(n for names in FAMILIES.values() for n in names)
core.add_mixture('synthetic_mixture', SYNTHETIC_TASKS, maximum=None)

"""SuperGLUE tasks (TFDS super_glue/*:1.0.2) and the SuperGLUE mixture.

Names `superglue_<task>`. Formats and label words are T5's (the prompt-tuning
and SPoT papers evaluate on T5's SuperGLUE tasks): False/True for BoolQ, MultiRC,
WiC and WSC; entailment/contradiction/neutral for CB; entailment/not_entailment
for RTE; choice1/choice2 for COPA. ReCoRD is generative (the answer entity) and
MultiRC is scored per answer option (F1a) and per question (EM).
WSC uses the fixed TFDS release (wsc.fixed) in T5's classification form: the
candidate noun in '* *', the pronoun in '# #'.
"""
from __future__ import annotations

import functools

from tasks import core
from tasks import metrics
from tasks import preprocessors

TFDS_VERSION = '1.0.2'
_SPLITS = {'train': 'train', 'validation': 'validation', 'test': 'test'}

_SIZES = {
    'boolq': (9427, 3270, 3245),
    'cb': (250, 56, 250),
    'copa': (400, 100, 500),
    'multirc': (27243, 4848, 9693),
    'record': (100730, 10000, 10000),
    'rte': (2490, 277, 3000),
    'wic': (5428, 638, 1400),
    'wsc': (554, 104, 146),
}

_TF = ('False', 'True')


def _source(task_name: str, config: str) -> core.TfdsSource:
  tfds_name = f'super_glue/{config}:{TFDS_VERSION}'
  sizes = dict(zip(_SPLITS, _SIZES[config.split('.')[0]]))
  return core.TfdsSource(task_name, tfds_name, splits=_SPLITS, sizes=sizes)


def _classification(name: str, fields, label_words, task_type: str,
                    extra_metrics=(), extra_names=()) -> None:
  task_name = f'superglue_{name}'
  core.add_task(
      task_name, _source(task_name, name),
      [functools.partial(preprocessors.classification_text, benchmark=name,
                         feature_names=fields, label_words=label_words)],
      task_type=task_type, kind='classification', label_words=label_words,
      metric_fns=[metrics.accuracy, *extra_metrics],
      metric_names=['accuracy', *extra_names],
      postprocess_fn=metrics.make_label_postprocessor(label_words),
      splits=list(_SPLITS),
      source_desc=f'tfds:super_glue/{name}:{TFDS_VERSION}',
      description=f'SuperGLUE {name} ({task_type})')


_classification('boolq', ('passage', 'question'), _TF, 'qa')
_classification('cb', ('hypothesis', 'premise'),
                ('entailment', 'contradiction', 'neutral'), 'nli',
                [metrics.make_f1_macro(3)], ['f1_macro'])
_classification('copa', ('choice1', 'choice2', 'premise', 'question'),
                ('choice1', 'choice2'), 'causal_reasoning')
_classification('rte', ('hypothesis', 'premise'),
                ('entailment', 'not_entailment'), 'nli')
_classification('wic', ('sentence1', 'sentence2', 'word'), _TF, 'word_sense')

core.add_task(
    'superglue_multirc', _source('superglue_multirc', 'multirc'),
    [functools.partial(preprocessors.multirc, label_words=_TF)],
    task_type='qa', kind='classification', label_words=_TF,
    metric_fns=[metrics.multirc], metric_names=['f1a', 'em'],
    postprocess_fn=metrics.make_grouped_label_postprocessor(_TF, 'question_idx'),
    splits=list(_SPLITS), source_desc=f'tfds:super_glue/multirc:{TFDS_VERSION}',
    description='SuperGLUE MultiRC (qa)')

core.add_task(
    'superglue_wsc', _source('superglue_wsc', 'wsc.fixed'),
    [functools.partial(preprocessors.wsc, label_words=_TF)],
    task_type='coreference', kind='classification', label_words=_TF,
    metric_fns=[metrics.accuracy], metric_names=['accuracy'],
    postprocess_fn=metrics.make_label_postprocessor(_TF),
    splits=list(_SPLITS), source_desc=f'tfds:super_glue/wsc.fixed:{TFDS_VERSION}',
    description='SuperGLUE WSC (coreference)')

core.add_task(
    'superglue_record', _source('superglue_record', 'record'),
    [preprocessors.record],
    task_type='qa', kind='generation', label_words=None,
    metric_fns=[metrics.record], metric_names=['em', 'f1'],
    postprocess_fn=metrics.record_postprocess,
    splits=list(_SPLITS), source_desc=f'tfds:super_glue/record:{TFDS_VERSION}',
    description='SuperGLUE ReCoRD (cloze qa, generative)')

SUPERGLUE_TASKS = tuple(f'superglue_{n}' for n in _SIZES)

core.add_mixture('superglue_mixture', SUPERGLUE_TASKS)

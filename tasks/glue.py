"""GLUE tasks (TFDS glue/*:2.0.0) and the GLUE mixtures.

Two sets of names:

* `cola`, `sst2`, `mrpc`, `qqp`, `stsb`, `mnli`, `qnli`, `rte`, `wnli` use the
  label words of the prompt-transferability work (docs/methods.md section 3):
  negative/positive (SST-2), false/true (MRPC, QQP), entailment/neutral/
  contradiction (MNLI), yes/no (QNLI, RTE: yes = entailment), no/yes (WNLI,
  whose class 1 is entailment); CoLA keeps T5's unacceptable/acceptable.
  Label-word lists are ordered by the TFDS class index.
* `glue_<name>_v2` are T5's tasks with T5's label words (e.g. not_equivalent/
  equivalent for MRPC), so prompts trained on T5's GLUE tasks, such as Google's
  released prompts, meet the targets they were trained on.

Input text is T5's: '<task> <field>: <text> ...', fields in T5's order.
MNLI: `mnli` trains on 'train'; its 'validation' is validation_matched and it
also offers 'validation_mismatched' (and the test splits). `mnli_matched` and
`mnli_mismatched` are evaluation-only tasks whose 'validation' is that half, for
trainers that evaluate the 'validation' split of several tasks.
"""
from __future__ import annotations

import functools

from tasks import core
from tasks import metrics
from tasks import preprocessors

TFDS_VERSION = '2.0.0'

# name -> (fields in T5's order, T5 label words, our label words, task type)
_GLUE = {
    'cola': (('sentence',), ('unacceptable', 'acceptable'),
             ('unacceptable', 'acceptable'), 'acceptability'),
    'sst2': (('sentence',), ('negative', 'positive'), ('negative', 'positive'),
             'sentiment'),
    'mrpc': (('sentence1', 'sentence2'), ('not_equivalent', 'equivalent'),
             ('false', 'true'), 'paraphrase'),
    'qqp': (('question1', 'question2'), ('not_duplicate', 'duplicate'),
            ('false', 'true'), 'paraphrase'),
    'stsb': (('sentence1', 'sentence2'), None, None, 'similarity'),
    'mnli': (('hypothesis', 'premise'),
             ('entailment', 'neutral', 'contradiction'),
             ('entailment', 'neutral', 'contradiction'), 'nli'),
    'qnli': (('question', 'sentence'), ('entailment', 'not_entailment'),
             ('yes', 'no'), 'nli'),
    'rte': (('sentence1', 'sentence2'), ('entailment', 'not_entailment'),
            ('yes', 'no'), 'nli'),
    'wnli': (('sentence1', 'sentence2'), ('not_entailment', 'entailment'),
             ('no', 'yes'), 'nli'),
}

# Published TFDS split sizes (glue 2.0.0), for mixing rates without data on disk.
_SIZES = {
    'cola': {'train': 8551, 'validation': 1043, 'test': 1063},
    'sst2': {'train': 67349, 'validation': 872, 'test': 1821},
    'mrpc': {'train': 3668, 'validation': 408, 'test': 1725},
    'qqp': {'train': 363846, 'validation': 40430, 'test': 390965},
    'stsb': {'train': 5749, 'validation': 1500, 'test': 1379},
    'mnli': {'train': 392702, 'validation': 9815, 'validation_matched': 9815,
             'validation_mismatched': 9832, 'test_matched': 9796,
             'test_mismatched': 9847},
    'qnli': {'train': 104743, 'validation': 5463, 'test': 5463},
    'rte': {'train': 2490, 'validation': 277, 'test': 3000},
    'wnli': {'train': 635, 'validation': 71, 'test': 146},
}

_MNLI_SPLITS = {
    'train': 'train', 'validation': 'validation_matched',
    'validation_matched': 'validation_matched',
    'validation_mismatched': 'validation_mismatched',
    'test_matched': 'test_matched', 'test_mismatched': 'test_mismatched',
}


def _metrics(name: str, num_classes: int):
  """GLUE's metrics per task (names of the returned keys alongside)."""
  if name == 'cola':
    return [metrics.matthews_corrcoef, metrics.accuracy], ['mcc', 'accuracy']
  if name in ('mrpc', 'qqp'):
    return [metrics.accuracy, metrics.f1_positive], ['accuracy', 'f1']
  if name == 'stsb':
    return ([metrics.pearson_corrcoef, metrics.spearman_corrcoef],
            ['pearson', 'spearman'])
  del num_classes
  return [metrics.accuracy], ['accuracy']


def _register(task_name: str, config: str, label_words, splits: dict[str, str],
              sizes: dict[str, int], description: str) -> None:
  fields, _, _, task_type = _GLUE[config]
  tfds_name = f'glue/{config}:{TFDS_VERSION}'
  source = core.TfdsSource(task_name, tfds_name, splits=splits, sizes=sizes)
  if config == 'stsb':
    text = [preprocessors.stsb]
    postprocess = metrics.string_to_float
    kind, words = 'regression', preprocessors.STSB_LABEL_WORDS
  else:
    benchmark = 'mnli' if config.startswith('mnli') else config
    text = [functools.partial(preprocessors.classification_text,
                              benchmark=benchmark, feature_names=fields,
                              label_words=label_words)]
    postprocess = metrics.make_label_postprocessor(label_words)
    kind, words = 'classification', label_words
  metric_fns, metric_names = _metrics(config, len(words))
  core.add_task(
      task_name, source, text, task_type=task_type, kind=kind,
      label_words=words, metric_fns=metric_fns, metric_names=metric_names,
      postprocess_fn=postprocess, splits=list(splits),
      source_desc=f'tfds:{tfds_name}', description=description)


def _splits(config: str) -> dict[str, str]:
  if config == 'mnli':
    return dict(_MNLI_SPLITS)
  return {'train': 'train', 'validation': 'validation', 'test': 'test'}


for _name, (_, _t5_words, _our_words, _type) in _GLUE.items():
  _register(_name, _name, _our_words, _splits(_name), _SIZES[_name],
            f'GLUE {_name.upper()} ({_type})')
  _register(f'glue_{_name}_v2', _name, _t5_words, _splits(_name), _SIZES[_name],
            f'GLUE {_name.upper()} with T5 label words')

for _half in ('matched', 'mismatched'):
  _register(f'mnli_{_half}', 'mnli', _GLUE['mnli'][2],
            {'validation': f'validation_{_half}', 'test': f'test_{_half}'},
            {'validation': _SIZES['mnli'][f'validation_{_half}'],
             'test': _SIZES['mnli'][f'test_{_half}']},
            f'MNLI {_half} evaluation')

GLUE_TASKS = tuple(_GLUE)
# SPoT's GLUE source mixture: the 8 tasks of the GLUE score, WNLI left out.
SPOT_GLUE_TASKS = tuple(t for t in GLUE_TASKS if t != 'wnli')

core.add_mixture('glue_mixture', GLUE_TASKS)
core.add_mixture('spot_glue_mixture', SPOT_GLUE_TASKS)
